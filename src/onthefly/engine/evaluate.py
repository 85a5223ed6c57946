"""Evaluation on a loader (validation, test), without changing the training trajectory.

Creating a DataLoader iterator draws from torch's global RNG; evaluation saves every RNG first
and restores it after, so validating or pressing "Test now" never alters what training does next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..signals.per_sample import PerSampleLoss, is_classification
from .batch import BatchSpec, batch_size_of, to_device
from .state import capture_rng, restore_rng

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, loss: PerSampleLoss, spec: BatchSpec, device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> dict[str, float]:
    """Mean per-sample loss (and accuracy for classification) over the whole loader."""
    rng = capture_rng()
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        samples = 0
        classification = True
        for batch in loader:
            batch = to_device(batch, device, non_blocking=loader.pin_memory)
            with autocast():
                outputs, targets = spec.forward(model, batch)
                per = loss.per_sample(outputs, targets, batch_size_of(outputs, targets))
            total += per.double().sum()
            samples += per.shape[0]
            if classification and is_classification(outputs, targets):
                correct += (outputs.argmax(dim=1) == targets).sum()
            else:
                classification = False
        result = {"loss": float(total) / max(samples, 1), "samples": float(samples)}  # one sync
        if classification and samples:
            result["accuracy"] = float(correct) / samples
        return result
    finally:
        model.train(was_training)
        restore_rng(rng)
