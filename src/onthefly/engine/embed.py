"""Embeddings: what a model computes at one layer for chosen samples of a dataset.

A forward hook is registered for this pass only (training never pays for it), the model runs in
eval mode without gradients, and every RNG is restored afterwards, so taking embeddings mid-run
does not change the training trajectory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError, StateError
from .batch import BatchSpec, to_device
from .state import capture_rng, restore_rng

__all__ = ["embeddings", "last_linear_input"]


def last_linear_input(model: nn.Module) -> str:
    """The name of the last nn.Linear module (its input is the default embedding)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError("the model has no nn.Linear layer to take embeddings from: pass layer= (a name "
                          "from model.named_modules()) or cluster on features='signals'")
    return names[-1]


@torch.no_grad()
def embeddings(model: nn.Module, loader: DataLoader, indices: np.ndarray, spec: BatchSpec,
               device: torch.device, layer: str | None = None,
               autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
               ) -> tuple[str, np.ndarray]:
    """(layer, [len(indices), d] float32): the input of ``layer`` for each listed sample of the
    loader's dataset, in eval mode; every RNG is restored afterwards."""
    modules = dict(model.named_modules())
    layer = layer or last_linear_input(model)
    if layer not in modules:
        raise ConfigError(f"the model has no module named {layer!r}; names are those of model.named_modules(), "
                          f"e.g. {', '.join(list(modules)[1:6])}")
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        captured.append(inputs[0].detach().flatten(1).float().cpu())

    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size or 256, sampler=indices.tolist(),
                         collate_fn=loader.collate_fn, num_workers=0)
    rng = capture_rng()
    was_training = model.training
    handle = modules[layer].register_forward_hook(hook)
    model.eval()
    try:
        for batch in ordered:
            with autocast():
                spec.forward(model, to_device(batch, device, non_blocking=False))
    finally:
        handle.remove()
        model.train(was_training)
        restore_rng(rng)
    if not captured:
        raise StateError("no embeddings were captured: the layer was not called in the forward pass")
    return layer, torch.cat(captured).numpy()
