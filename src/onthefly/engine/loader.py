"""Sample identity from the sampler side.

The user's DataLoader is kept: we take a shallow copy and put a recording wrapper around its
batch sampler. The DataLoader pulls index lists from the sampler in the main process (with or
without workers) and yields batches in the same order, so a FIFO of index lists pairs every
batch with the dataset indices it was drawn with. No Dataset changes, no collate changes.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..errors import DataError
from ..signals.recorder import Indices
from .distributed import real_samples

__all__ = ["Positions", "SampledIndices", "TrackedLoader", "frozen"]


def frozen(indices: np.ndarray) -> np.ndarray:
    """``indices`` made read-only: an array nobody can change, which ``Run.step`` keeps as it is
    instead of copying it again (a copy's first NumPy call after a training step costs ~30 us:
    the step has evicted NumPy's code from the caches)."""
    indices.flags.writeable = False
    return indices


class _RecordingIterator:
    def __init__(self, inner: Iterable[Any], pending: deque[Indices], skip: int, batched: bool,
                 limit: int | None = None) -> None:
        self._inner = iter(inner)
        self._pending = pending
        self._skip = skip
        self._batched = batched
        self._primed: Any = None
        self._started = False
        self._exhausted = False
        # Samples of the epoch after which indices are recorded as -1 (a DistributedSampler's
        # padding: trained, never recorded); None: every one is recorded.
        self._limit = limit
        self._drawn = 0

    def prime(self) -> None:
        """Pull the first index list now (the sampler draws its seed at that moment)."""
        if not self._started:
            try:
                self._primed = self._pull()
            except StopIteration:
                self._exhausted = True

    def _pull(self) -> Any:
        self._started = True
        while self._skip:
            skipped = next(self._inner)  # indices of batches already trained on before a resume
            self._drawn += len(skipped) if self._batched else 1
            self._skip -= 1
        return next(self._inner)

    def __iter__(self) -> _RecordingIterator:
        return self

    def __next__(self) -> Any:
        if self._exhausted:
            raise StopIteration
        if self._primed is not None:
            item, self._primed = self._primed, None  # handed over once, then pulled as usual
        else:
            item = self._pull()
        ids = item if self._batched else [item]
        if self._limit is not None:
            own = max(0, min(len(ids), self._limit - self._drawn))
            self._drawn += len(ids)
            if own < len(ids):
                marked = np.asarray(ids, dtype=np.int64).copy()
                marked[own:] = -1
                self._pending.append(marked)
                return item
        # A list of ints (what a BatchSampler yields) is kept - copied, in case a sampler reuses
        # its list - and converted to an array on the engine's transfer thread, not here on every
        # step; anything else (tensors, arrays) is converted now, so that no torch operation runs
        # on another thread.
        self._pending.append(ids.copy() if type(ids) is list and (not ids or type(ids[0]) is int)
                             else np.asarray(ids, dtype=np.int64))
        return item


class _RecordingSampler:
    """Wraps a batch sampler (or, without auto-batching, a sampler) and records what it yields."""

    def __init__(self, inner: Any, batched: bool) -> None:
        self.inner = inner
        self.batched = batched
        self.pending: deque[Indices] = deque()
        self.skip_next = 0
        self.limit: int | None = None  # see _RecordingIterator
        self.current: _RecordingIterator | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> _RecordingIterator:
        self.pending.clear()
        # skip_next is cleared by TrackedLoader.begin, not here: a multi-worker DataLoader
        # iterator calls iter() on its sampler twice while it is created and pulls from the second.
        self.current = _RecordingIterator(self.inner, self.pending, self.skip_next, self.batched, self.limit)
        return self.current


class SampledIndices:
    """For integrations whose framework owns the loop (Lightning, the Hugging Face Trainer): stands
    in for the batch sampler of a copy of the framework's train DataLoader and keeps, in order, the
    dataset indices of every batch it hands out. The DataLoader draws them in the main process -
    ahead of the batches when workers prefetch - and yields batches in that same order, so the
    oldest pending entry is the batch being trained: ``current()`` reads it, ``done()`` drops it,
    ``take()`` does both. ``skip``: batches the next epoch draws but never trains (a resume)."""

    kind = "index"

    def __init__(self, inner: Iterable[Any], batched: bool, dataset: Any) -> None:
        self.inner = inner
        self.batched = batched
        self.dataset = dataset
        self.pending: deque[np.ndarray] = deque()
        self.skip = 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        # A generator, so nothing runs until the first draw: a multi-worker DataLoader calls
        # iter() twice and draws from the second; only the one in use clears an epoch's leftovers.
        self.pending.clear()
        skip, self.skip = self.skip, 0
        for item in self.inner:
            if skip:
                skip -= 1
            else:  # a copy (samplers may reuse their list); ~2 us for a batch of 64 ints
                self.pending.append(frozen(np.array(item if self.batched else [item], dtype=np.int64).reshape(-1)))
            yield item

    def __getattr__(self, name: str) -> Any:
        # set_epoch (the frameworks call it every epoch), .sampler and the like reach the real one.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def begin_epoch(self) -> None:
        """Nothing to do: the DataLoader's own iter() starts the epoch's draws."""

    def current(self, batch: int) -> np.ndarray | None:
        return self.pending[0] if self.pending else None

    def done(self) -> None:
        if self.pending:
            self.pending.popleft()

    def take(self, batch: int) -> np.ndarray | None:
        found = self.current(batch)
        self.done()
        return found


class Positions:
    """An IterableDataset has no sampler: its samples are numbered by position in the epoch
    (the same interface as ``SampledIndices``)."""

    kind = "position"

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._next = 0
        self._batch = 0

    def begin_epoch(self) -> None:
        self._next = self._batch = 0

    def current(self, batch: int) -> np.ndarray:
        self._batch = batch
        return frozen(np.arange(self._next, self._next + batch, dtype=np.int64))

    def done(self) -> None:
        self._next, self._batch = self._next + self._batch, 0

    def take(self, batch: int) -> np.ndarray:
        found = self.current(batch)
        self.done()
        return found


class TrackedLoader:
    """A user's DataLoader with the dataset indices of every batch recorded."""

    def __init__(self, loader: DataLoader, *, name: str = "train_loader") -> None:
        if not isinstance(loader, DataLoader):
            raise DataError(
                f"{name} must be a torch.utils.data.DataLoader, got {type(loader).__name__}. "
                "Wrap your dataset: DataLoader(dataset, batch_size=..., shuffle=...)."
            )
        self.original = loader
        self.name = name
        self.iterable = isinstance(loader.dataset, IterableDataset)
        self._recorder: _RecordingSampler | None = None
        if self.iterable:
            # No sampler to read indices from: samples are numbered by position in the epoch.
            self.loader = loader
        else:
            if loader.num_workers > 0 and getattr(loader, "in_order", True) is False:
                raise DataError(
                    f"{name} has in_order=False: with workers it yields batches out of sampling order, "
                    "so On The Fly cannot tell which samples a batch holds. Use in_order=True (the default)."
                )
            tracked = copy.copy(loader)
            tracked._iterator = None  # never share a persistent-workers iterator with the original
            batched = loader.batch_sampler is not None
            self._recorder = _RecordingSampler(loader.batch_sampler if batched else loader.sampler, batched)
            # DataLoader forbids setting these after __init__; the copy is ours, the user's is untouched.
            object.__setattr__(tracked, "batch_sampler" if batched else "sampler", self._recorder)
            self.loader = tracked
        try:
            self.length: int | None = len(loader)
        except TypeError:
            self.length = None
        if self.length == 0:
            raise DataError(
                f"{name} is empty: it yields no batches (dataset of {_dataset_size(loader)} samples, "
                f"batch_size={loader.batch_size}, drop_last={loader.drop_last}). Give it data, or "
                "lower batch_size / set drop_last=False."
            )

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"{self.name} has no length")
        return self.length

    def generators(self) -> list[torch.Generator]:
        """Random generators the loader's sampling reads from, besides torch's global one."""
        found: list[torch.Generator] = []
        candidates = [self.original.generator, getattr(self.original, "sampler", None),
                      getattr(self.original, "batch_sampler", None)]
        batch_sampler = self.original.batch_sampler
        if batch_sampler is not None:
            candidates.append(getattr(batch_sampler, "sampler", None))
        for obj in candidates:
            gen = obj if isinstance(obj, torch.Generator) else getattr(obj, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
        return found

    def stateful(self) -> dict[str, Any]:
        """The loader's sampler, batch sampler and dataset that have ``state_dict()`` and
        ``load_state_dict()`` (torchdata's protocol), by role."""
        found: dict[str, Any] = {}
        for role, obj in (("sampler", self.original.sampler), ("batch_sampler", self.original.batch_sampler),
                          ("dataset", self.original.dataset)):
            if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
                found[role] = obj
        return found

    def begin(self, skip: int = 0) -> Iterator[tuple[Any, Indices | None]]:
        """Start one epoch; iterate the result for (batch, dataset indices).

        The DataLoader iterator is created and the sampler's first indices drawn right here, so
        every random number the epoch's ordering needs is taken now, in the same order as a plain
        ``for batch in loader`` takes them (the engine restores the training RNG right after this
        when resuming). ``skip`` batches are drawn from the sampler but never loaded.
        """
        if self._recorder is None:
            iterator = iter(self.loader)
            for _ in range(skip):
                next(iterator)
            return ((batch, None) for batch in iterator)
        self._recorder.skip_next = skip
        self._recorder.limit = real_samples(self.original)
        try:
            iterator = iter(self.loader)
        finally:
            self._recorder.skip_next = 0
        if self._recorder.current is not None:
            self._recorder.current.prime()
        pending = self._recorder.pending
        return ((batch, pending.popleft()) for batch in iterator)


def _dataset_size(loader: DataLoader) -> str:
    try:
        return str(len(loader.dataset))  # type: ignore[arg-type]
    except TypeError:
        return "unknown"
