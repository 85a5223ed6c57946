"""The resume point: where a run stands in its epochs, and how to come back to exactly there.

A checkpoint is taken at a step boundary. Where that boundary lies decides how a resumed run
continues, so that it gives bit for bit the weights of the run that was never interrupted:

* **inside an epoch** (after batch k of N, the last batch included, before the loop that owns the
  epoch has finished it): the resumed run draws the epoch's sample order again from the RNG and
  sampler state saved when the epoch began, skips the k batches already trained (their indices
  are drawn, their data never loaded), then puts back every RNG as it was at the checkpoint. The
  epoch's end (validation, an epoch scheduler, ``on_epoch_end`` hooks) then runs once, as it would
  have.
* **after an epoch ended** (``on_epoch_end``, or - in your own loop - after ``run.batches()`` is
  exhausted): the resumed run starts the next epoch, with every RNG as it was at the checkpoint.

Everything random is saved: Python's ``random``, NumPy's global generator, torch's CPU (and
CUDA) generators, generators found on the loader and its samplers, and the ``state_dict()`` of a
sampler, batch sampler or dataset that has one (the protocol torchdata's ``StatefulDataLoader``
uses). An ``IterableDataset`` has no sampler: its samples are numbered by position within the
epoch, and a resumed epoch continues the numbering. One with ``state_dict()/load_state_dict()``
(and ``num_workers=0``) continues from its saved state; any other is fast-forwarded by loading
and discarding the batches already trained, which the ``resume_fast_forward`` event says.

Everything here runs on the training thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import StateError
from .callbacks import Callback
from .loader import TrackedLoader
from .state import capture_rng, generator_states, restore_generators, restore_rng, to_cpu

__all__ = ["STATE_FORMAT", "Progress", "ResumePoint", "TrainingObjects"]

# The layout of a checkpoint's state.pt (format 1: only torch's CPU generator at the epoch start).
STATE_FORMAT = 2


@dataclass
class Progress:
    """Where a checkpoint was taken, normalised: an epoch that had ended is saved as the start
    of the next one (``batch_in_epoch == 0``)."""

    epoch: int
    batch_in_epoch: int
    global_step: int
    target_epochs: int
    samples_in_epoch: int = 0  # samples trained in the epoch so far (positions of an IterableDataset)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class TrainingObjects:
    """The user's objects a checkpoint saves and restores, besides RNG and position."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    callbacks: Sequence[Callback]

    def save(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """CPU copies (a host sync: checkpoints are the one place it is acceptable)."""
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}
        scaler = self.scaler
        return tensors, {
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": to_cpu(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def load(self, tensors: dict[str, torch.Tensor], state: Mapping[str, Any], source: Path) -> None:
        try:
            self.model.load_state_dict(tensors)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise StateError(f"the checkpoint {source} does not fit this model/optimizer: {exc}") from exc
        if state["scheduler"] is not None:
            if self.scheduler is None:
                raise StateError(f"the checkpoint {source} has scheduler state but no scheduler was given")
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        saved_callbacks = state.get("callbacks", [])
        if len(saved_callbacks) != len(self.callbacks):
            raise StateError(
                f"the checkpoint {source} saved {len(saved_callbacks)} callback state(s) but "
                f"{len(self.callbacks)} callback(s) were given; pass the same callbacks to resume"
            )
        for callback, cb_state in zip(self.callbacks, saved_callbacks, strict=True):
            callback.load_state_dict(cb_state)


def _random_state(tracked: TrackedLoader | None) -> dict[str, Any]:
    generators = tracked.generators() if tracked is not None else []
    return {**capture_rng(), "generators": generator_states(generators)}


def _restore_random(state: Mapping[str, Any], tracked: TrackedLoader | None) -> None:
    restore_rng(state)
    if tracked is not None:
        restore_generators(tracked.generators(), list(state.get("generators", [])))


def _load_states(tracked: TrackedLoader, states: Mapping[str, Any], names: tuple[str, ...]) -> None:
    objects = tracked.stateful()
    for name in names:
        if name in states and states[name] is not None:
            if name not in objects:
                raise StateError(
                    f"the checkpoint saved the state of the loader's {name}, but this loader's {name} "
                    "has no load_state_dict(); resume with the same loader setup"
                )
            objects[name].load_state_dict(states[name])


class ResumePoint:
    """Saves the state a run needs at each epoch start and restores it on resume."""

    def __init__(self) -> None:
        # Every RNG and the samplers' states as the epoch in progress began (its order is drawn
        # from them); None between epochs.
        self._epoch_start: dict[str, Any] | None = None
        # A checkpoint's state, held until the first epoch of the resumed run begins.
        self._pending: dict[str, Any] | None = None
        self.skip = 0  # batches of the resumed epoch already trained before the checkpoint
        self.skipped_by_loading = 0  # of those, batches an IterableDataset had to load to skip

    # ---- a new epoch ------------------------------------------------------------------------
    def begin(self, tracked: TrackedLoader) -> Iterator[tuple[Any, Any]]:
        """Start iterating an epoch of ``tracked``: fresh, or the resumed one."""
        pending, self._pending = self._pending, None
        if pending is not None and self.skip:
            return self._resume_inside(tracked, pending)
        if pending is not None:  # resuming at an epoch boundary
            if pending.get("global_restored"):  # by restore_global(): only the loader's part now
                restore_generators(tracked.generators(), list(pending["rng"].get("generators", [])))
            else:
                _restore_random(pending["rng"], tracked)
            _load_states(tracked, pending["loader"], ("sampler", "batch_sampler", "dataset"))
        self._epoch_start = {"rng": _random_state(tracked),
                             "loader": _states(tracked, ("sampler", "batch_sampler"))}
        return tracked.begin()

    def _resume_inside(self, tracked: TrackedLoader, pending: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
        start = pending["epoch_start"]
        if start is None:
            raise StateError("the checkpoint was taken inside an epoch but holds no epoch-start state, so "
                             "the epoch's sample order cannot be drawn again; resume from a checkpoint "
                             "taken at an epoch boundary")
        # Draw the epoch's order again from its starting state, skip what was trained...
        _restore_random(start["rng"], tracked)
        _load_states(tracked, start["loader"], ("sampler", "batch_sampler"))
        skip = self.skip
        continues = tracked.iterable and "dataset" in tracked.stateful() \
            and tracked.original.num_workers == 0 and pending["loader"].get("dataset") is not None
        if continues:  # the dataset's own state says where it was: nothing to skip
            _load_states(tracked, pending["loader"], ("dataset",))
            skip = 0
        elif tracked.iterable:
            self.skipped_by_loading = skip
        iterator = tracked.begin(skip=skip)
        # ...then put back every RNG (and the dataset) as it was at the checkpoint.
        _restore_random(pending["rng"], tracked)
        if not tracked.iterable:
            _load_states(tracked, pending["loader"], ("dataset",))
        self._epoch_start = start
        return iterator

    def end(self) -> None:
        self._epoch_start = None

    @property
    def pending(self) -> bool:
        """A checkpoint's state is waiting for the resumed epoch to begin."""
        return self._pending is not None

    def restore_global(self) -> None:
        """Resuming at an epoch boundary: put back Python's, NumPy's and torch's RNG now, as the
        epoch begins, for a loop that draws its own batches (``step(indices=...)``); the loader's
        generators and states follow in :meth:`begin` if the loop iterates ``run.batches()``."""
        if self._pending is not None and not self.skip and not self._pending.get("global_restored"):
            restore_rng(self._pending["rng"])
            self._pending["global_restored"] = True

    # ---- checkpoints --------------------------------------------------------------------
    def state(self, tracked: TrackedLoader | None, progress: Progress) -> dict[str, Any]:
        """The random and loader state of a checkpoint at ``progress`` (a host sync is fine here)."""
        if self._pending is not None:  # resumed, and nothing trained since: the same point again
            return {key: self._pending[key] for key in ("rng", "epoch_start", "loader")}
        inside = progress.batch_in_epoch > 0
        return {
            "rng": _random_state(tracked),
            "epoch_start": self._epoch_start if inside else None,
            "loader": _states(tracked, ("sampler", "batch_sampler", "dataset")),
        }

    def restore(self, state: Mapping[str, Any], progress: Progress) -> None:
        """Hold a checkpoint's state until the resumed epoch begins."""
        if state.get("format", 1) > STATE_FORMAT:
            raise StateError(
                f"the checkpoint has state format {state['format']}; this version of On The Fly reads "
                f"formats 1 to {STATE_FORMAT}. Resume it with the On The Fly version that wrote it, or newer."
            )
        if state.get("format", 1) == 1:  # torch's generator and loader generators at the epoch start only
            rng = state["rng"]
            old = state.get("epoch_rng")
            start = None if old is None else {"rng": {**rng, "torch": old["torch"],
                                                      "generators": old["generators"]}, "loader": {}}
            state = {"rng": rng, "epoch_start": start, "loader": {}}
        self._pending = {"rng": state["rng"], "loader": dict(state.get("loader") or {}),
                         "epoch_start": state.get("epoch_start") if progress.batch_in_epoch else None}
        self.skip = progress.batch_in_epoch


def _states(tracked: TrackedLoader | None, names: tuple[str, ...]) -> dict[str, Any]:
    if tracked is None:
        return {}
    objects = tracked.stateful()
    return {name: objects[name].state_dict() for name in names if name in objects}
