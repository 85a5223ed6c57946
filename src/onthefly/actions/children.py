"""Building a child run from the live run's objects (forks, merges, distillation students): the
same optimizer class over the child's parameters, the draws of its loader, its seeds, and the one
per-sample evaluation every comparison uses. Runs on the training thread, like its callers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from ..errors import ConfigError
from . import compare as comparing

__all__ = ["Draws", "evaluate", "evaluation_sets", "optimizer_like", "seed_all"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def optimizer_like(parent: torch.optim.Optimizer, params: list[nn.Parameter], card: Mapping[str, Any]) \
        -> torch.optim.Optimizer:
    """The parent's optimizer class over ``params``, with its first group's settings and the card's
    learning rate and weight decay."""
    if not params:
        raise ConfigError("trains: nothing would train (no parameter requires a gradient)")
    settings = {k: v for k, v in parent.param_groups[0].items() if k != "params" and k in parent.defaults}
    settings["lr"] = card["lr"]
    if card["weight_decay"] is not None:
        if "weight_decay" not in settings:
            raise ConfigError(f"weight_decay: {type(parent).__name__} has no weight decay setting")
        settings["weight_decay"] = card["weight_decay"]
    for key in ("initial_lr",):
        settings.pop(key, None)
    try:
        return type(parent)(params, **settings)
    except TypeError as exc:
        raise ConfigError(f"cannot build a {type(parent).__name__} for the fork from the parent's settings: {exc}") \
            from exc


class Draws(Sampler[int]):
    """Dataset indices for one epoch of a fork: ``samples`` draws from ``pool`` - shuffled passes
    without replacement, or with ``weights`` (with replacement) - from ``generator``, which the
    engine saves and restores with its checkpoints."""

    def __init__(self, pool: np.ndarray, weights: np.ndarray | None, samples: int, generator: torch.Generator) -> None:
        self.pool = torch.as_tensor(pool, dtype=torch.int64)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.samples = samples
        self.generator = generator

    def __len__(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[int]:
        if self.weights is not None:
            drawn = self.pool[torch.multinomial(self.weights, self.samples, replacement=True, generator=self.generator)]
            yield from drawn.tolist()
            return
        left = self.samples
        while left > 0:
            order = self.pool[torch.randperm(len(self.pool), generator=self.generator)][:left]
            yield from order.tolist()
            left -= len(order)


def evaluate(trainer: Any, model: nn.Module, dataset: Any, indices: np.ndarray | None) -> comparing.PerSample:
    """``model`` on ``dataset[indices]`` with the live run's loss, batch rules, device, collate
    function and autocast: the per-sample results every comparison pairs."""
    loader = trainer.train_loader.original
    return comparing.evaluate_set(model, dataset, indices, loss=trainer.loss, spec=trainer.spec,
                                  device=trainer.device, batch_size=max(loader.batch_size or 1, 256),
                                  collate_fn=loader.collate_fn, autocast=trainer._autocast)


def evaluation_sets(trainer: Any, reader: Any, names: list[str]) -> dict[str, tuple[Any, np.ndarray | None]]:
    """Each named set as (dataset, indices or None): "val" and "test" the live run's loaders'
    datasets, any other name a saved slice of its training data."""
    sets: dict[str, tuple[Any, np.ndarray | None]] = {}
    for name in names:
        if name in ("val", "test"):
            loader = trainer.val_loader if name == "val" else trainer.test_loader
            if loader is None:
                raise ConfigError(f"sets: the live run has no {name}_loader")
            sets[name] = (loader.dataset, None)
        else:
            sets[name] = (trainer.train_loader.original.dataset,
                          np.asarray(reader.slice_indices(reader.slice(name)), dtype=np.int64))
    return sets
