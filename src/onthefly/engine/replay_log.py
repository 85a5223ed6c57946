"""The latest trained batches, as the determinism check's replay needs them, in storage allocated once.

Per batch: its epoch, where it lay in the epoch, its dataset indices, how its loss was computed
and the loss it gave. Held as one small object per step (a list of indices, a detached loss
tensor) for 512 steps, interleaved with each step's large temporaries, those fragmented glibc's
heap: a 3-epoch run's peak resident memory varied from 650 to 757 MiB between identical runs
(``benchmarks/whole_run.py``). In these arrays, written in place, it stays at about 625 MiB.
Training thread only.
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

    def __len__(self) -> int:
        return min(self._count, self.window)

    def append(self, epoch: int, batch_in_epoch: int, indices: Any, kind: str, loss: torch.Tensor | None) -> None:
        slot = self._count % self.window
        self._epoch[slot], self._batch[slot], self._kind[slot] = epoch, batch_in_epoch, KINDS.index(kind)
        if indices is None:
            self._sizes[slot] = -1
        else:
            n = len(indices)
            if n > self._indices.shape[1]:  # a larger batch than any so far: wider rows, once
                wider = np.empty((self.window, max(n, 2 * self._indices.shape[1])), dtype=np.int64)
                wider[:, :self._indices.shape[1]] = self._indices
                self._indices = wider
            self._indices[slot, :n] = indices
            self._sizes[slot] = n
        self._has_loss[slot] = self._keep_loss(slot, loss)
        self._count += 1

    def _keep_loss(self, slot: int, loss: torch.Tensor | None) -> bool:
        if loss is None or loss.ndim != 0:
            return False
        losses = self._losses
        if losses is None or losses.dtype != loss.dtype or losses.device != loss.device:
            losses = self._losses = torch.empty(self.window, dtype=loss.dtype, device=loss.device)
            self._has_loss[:] = False  # kept in another dtype or on another device: not comparable
        losses[slot] = loss.detach()  # one copy kernel, asynchronous on a GPU
        return True

    def __iter__(self) -> Iterator[ReplayedBatch]:
        for count in range(self._count - len(self), self._count):
            slot = count % self.window
            size = int(self._sizes[slot])
            yield ReplayedBatch(
                int(self._epoch[slot]), int(self._batch[slot]),
                self._indices[slot, :size].copy() if size >= 0 else None, KINDS[int(self._kind[slot])],
                self._losses[slot].clone() if self._has_loss[slot] and self._losses is not None else None)
