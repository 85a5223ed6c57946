"""Evaluation on a loader (validation, test), without changing the training trajectory.

Creating a DataLoader iterator draws from torch's global RNG; evaluation saves every RNG first
and restores it after, so validating or pressing "Test now" never alters what training does next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..signals.per_sample import PerSampleLoss, classification_signals, is_classification
from ..signals.recorder import rows_of
from .batch import BatchSpec, batch_size_of, to_device
from .loader import TrackedLoader
from .state import capture_rng, restore_rng

__all__ = ["Evaluator", "Metric", "SampleRows", "evaluate"]

# (indices, rows [n, COLUMNS] as in onthefly.signals.recorder, classification): per-sample values
# of an evaluation, handed over once at its end.
SampleRows = Callable[[np.ndarray, np.ndarray, bool], None]
# A metric of the user's over a whole evaluation: fn(outputs, targets) -> a number, both CPU
# tensors concatenated over the split (logits and class ids for a classifier).
Metric = Callable[[torch.Tensor, torch.Tensor], float]


class Evaluator:
    """Evaluates a model on named loaders ("val", "test") with the user's loss: what a run's
    ``evaluate(split)`` and the "test" command call. Training thread."""

    def __init__(self, model: nn.Module, loss: PerSampleLoss, spec: BatchSpec, device: torch.device,
                 loaders: dict[str, DataLoader | None], *,
                 autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 record: frozenset[str] = frozenset(), metrics: Mapping[str, Metric] | None = None) -> None:
        self._model, self._loss, self._spec, self._device = model, loss, spec, device
        self._metrics = dict(metrics or {})
        self._loaders = {split: loader for split, loader in loaders.items() if loader is not None}
        self._autocast = autocast
        self.record = record  # splits whose per-sample values are recorded too (Trainer's val_samples)

    @property
    def splits(self) -> frozenset[str]:
        return frozenset(self._loaders)

    def __call__(self, split: str, per_sample: SampleRows | None = None) -> dict[str, float] | None:
        loader = self._loaders.get(split)
        if loader is None:
            return None
        return evaluate(self._model, loader, self._loss, self._spec, self._device, self._autocast,
                        per_sample=per_sample, metrics=self._metrics)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, loss: PerSampleLoss, spec: BatchSpec, device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]], *, per_sample: SampleRows | None = None,
    metrics: Mapping[str, Metric] | None = None,
) -> dict[str, float]:
    """Mean per-sample loss (and accuracy for classification) over the whole loader. With
    ``per_sample``, every sample's values (with its dataset index) are kept on the device and
    handed over in one copy at the end. With ``metrics``, the outputs and targets are kept on the
    device too and each metric gets them whole, on the CPU, at the end (one copy)."""
    rng = capture_rng()
    was_training = model.training
    model.eval()
    try:
        # One float32 sum a batch, added up in float64 on the host at the end: MPS has no float64.
        sums: list[torch.Tensor] = []
        correct = torch.zeros((), dtype=torch.int64, device=device)
        samples = 0
        classification = True
        kept: list[torch.Tensor] = []
        indices: list[np.ndarray] = []
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (outputs, targets) for the metrics
        batches = TrackedLoader(loader, name="loader").begin() if per_sample is not None else (
            (batch, None) for batch in loader)
        for batch, index in batches:
            batch = to_device(batch, device, non_blocking=loader.pin_memory)
            with autocast():
                outputs, targets = spec.forward(model, batch)
                per = loss.per_sample(outputs, targets, batch_size_of(outputs, targets))
            sums.append(per.float().sum())
            if metrics:
                seen.append((outputs.detach(), targets.detach()))
            if classification and is_classification(outputs, targets):
                correct += (outputs.argmax(dim=1) == targets).sum()
            else:
                classification = False
            if per_sample is not None:
                signals = classification_signals(outputs, targets) if classification else None
                kept.append(rows_of(per, signals, targets if classification else None))
                indices.append(np.asarray(index, dtype=np.int64) if index is not None
                               else np.arange(samples, samples + per.shape[0]))
            samples += per.shape[0]
        total = float(torch.stack(sums).cpu().numpy().astype(np.float64).sum()) if sums else 0.0  # one sync
        result = {"loss": total / max(samples, 1), "samples": float(samples)}
        if classification and samples:
            result["accuracy"] = float(correct) / samples
        if metrics and seen:
            outputs_all = torch.cat([o for o, _ in seen]).cpu()
            targets_all = torch.cat([t for _, t in seen]).cpu()
            for name, metric in metrics.items():
                result[name] = float(metric(outputs_all, targets_all))
        if per_sample is not None and kept:
            rows = torch.cat(kept).cpu().numpy()  # one copy for the whole evaluation
            if not classification:
                rows[:, 1:] = np.nan  # a batch that looked like classification in a regression set
            per_sample(np.concatenate(indices), rows, classification)
        return result
    finally:
        model.train(was_training)
        restore_rng(rng)
