"""The latest trained batches, as the determinism check's replay needs them, in storage allocated once.

Per batch: its epoch, where it lay in the epoch, its dataset indices, how its loss was computed
and the loss it gave. Held as one small object per step (a list of indices, a detached loss
tensor) for 512 steps, interleaved with each step's large temporaries, those fragmented glibc's
heap: a 3-epoch run's peak resident memory varied from 650 to 757 MiB between identical runs
(``benchmarks/whole_run.py``). In these arrays, written in place, it stays at about 625 MiB.

A batch is held by reference (the index list and the loss the recorder holds until its flush
anyway) for up to ``SETTLE_EVERY`` steps, then those batches are written into the arrays at once:
written one by one, right after each step, the copies cost 90 us a step inside a fit (the step
had evicted NumPy's and torch's code and data from the caches), against 7 us in a loop of their
own. Training thread only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["REPLAY_WINDOW", "ReplayLog", "ReplayedBatch"]

# How many of the latest batches the determinism check can train again.
REPLAY_WINDOW = 512
# Batches held by reference before they are written into the arrays together.
SETTLE_EVERY = 64
KINDS = ("deferred", "per_sample", "curated")


@dataclass(frozen=True)
class ReplayedBatch:
    """One trained batch as the determinism check's replay needs it: where it lay in its epoch
    (``batch_in_epoch`` counts it), its dataset indices, and how its loss was computed
    (``deferred``: the loss function's own reduction; ``per_sample``: the mean of per-sample
    losses; ``curated``: weighed by curation), and the loss it gave."""

    epoch: int
    batch_in_epoch: int
    indices: np.ndarray | None
    kind: str
    loss: torch.Tensor | None  # the loss the run computed (on the device: never read per step)


class ReplayLog:
    """The last ``window`` batches (older ones are overwritten), iterated oldest first."""

    def __init__(self, window: int = REPLAY_WINDOW) -> None:
        self.window = window
        self._count = 0  # batches appended so far; the newest is in slot (count - 1) % window
        self._epoch = np.zeros(window, dtype=np.int64)
        self._batch = np.zeros(window, dtype=np.int64)
        self._kind = np.zeros(window, dtype=np.int8)
        self._sizes = np.full(window, -1, dtype=np.int64)  # -1: no indices
        self._indices = np.empty((window, 0), dtype=np.int64)
        self._has_loss = np.zeros(window, dtype=bool)
        self._losses: torch.Tensor | None = None  # [window], the losses' dtype and device
        self._held: list[tuple[int, int, Any, str, torch.Tensor | None]] = []  # appended, not yet written

    def __len__(self) -> int:
        return min(self._count + len(self._held), self.window)

    def append(self, epoch: int, batch_in_epoch: int, indices: Any, kind: str, loss: torch.Tensor | None) -> None:
        self._held.append((epoch, batch_in_epoch, indices, kind, loss))
        if len(self._held) >= SETTLE_EVERY:
            self._settle()

    def _settle(self) -> None:
        """Write the held batches into the arrays: each column in one assignment, the losses in
        one stack and at most two copies into the ring."""
        held, self._held = self._held, []
        if len(held) > self.window:  # only the last window's batches can be kept
            self._count += len(held) - self.window
            held = held[-self.window:]
        if not held:
            return
        start = self._count % self.window
        slots = (start + np.arange(len(held))) % self.window
        self._epoch[slots] = [h[0] for h in held]
        self._batch[slots] = [h[1] for h in held]
        self._kind[slots] = [KINDS.index(h[3]) for h in held]
        self._write_indices(slots, [h[2] for h in held])
        self._write_losses(start, slots, [h[4] for h in held])
        self._count += len(held)

    def _write_indices(self, slots: np.ndarray, indices: list[Any]) -> None:
        sizes = [-1 if ids is None else len(ids) for ids in indices]
        self._sizes[slots] = sizes
        widest = max(sizes)
        if widest > self._indices.shape[1]:  # a larger batch than any so far: wider rows, once
            wider = np.empty((self.window, max(widest, 2 * self._indices.shape[1])), dtype=np.int64)
            wider[:, :self._indices.shape[1]] = self._indices
            self._indices = wider
        if min(sizes) == widest > 0:  # batches of one size (all but an epoch's last, as a rule)
            self._indices[slots, :widest] = np.array(indices, dtype=np.int64)
            return
        for slot, ids, n in zip(slots, indices, sizes, strict=True):
            if n > 0:
                self._indices[slot, :n] = ids

    def _write_losses(self, start: int, slots: np.ndarray, losses: list[torch.Tensor | None]) -> None:
        first = losses[0]
        if first is None or not all(loss is not None and loss.ndim == 0 and loss.dtype == first.dtype
                                    and loss.device == first.device for loss in losses):
            for slot, loss in zip(slots, losses, strict=True):
                self._has_loss[slot] = self._keep_loss(int(slot), loss)
            return
        ring = self._ring_like(first)
        with torch.no_grad():
            stacked = torch.stack(losses)  # type: ignore[arg-type]  # one kernel; asynchronous on a GPU
        fits = min(len(losses), self.window - start)
        ring[start:start + fits] = stacked[:fits]
        if fits < len(losses):
            ring[:len(losses) - fits] = stacked[fits:]
        self._has_loss[slots] = True

    def _ring_like(self, loss: torch.Tensor) -> torch.Tensor:
        losses = self._losses
        if losses is None or losses.dtype != loss.dtype or losses.device != loss.device:
            losses = self._losses = torch.empty(self.window, dtype=loss.dtype, device=loss.device)
            self._has_loss[:] = False  # kept in another dtype or on another device: not comparable
        return losses

    def _keep_loss(self, slot: int, loss: torch.Tensor | None) -> bool:
        if loss is None or loss.ndim != 0:
            return False
        self._ring_like(loss)[slot] = loss.detach()
        return True

    def __iter__(self) -> Iterator[ReplayedBatch]:
        self._settle()
        for count in range(self._count - len(self), self._count):
            slot = count % self.window
            size = int(self._sizes[slot])
            yield ReplayedBatch(
                int(self._epoch[slot]), int(self._batch[slot]),
                self._indices[slot, :size].copy() if size >= 0 else None, KINDS[int(self._kind[slot])],
                self._losses[slot].clone() if self._has_loss[slot] and self._losses is not None else None)
