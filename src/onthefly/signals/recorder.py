"""Per-sample rows and per-step losses, gathered on the device and handed to the host in batches.

Hot-path contract: a ``record*`` call copies the step's outputs and targets into preallocated
device rows (two small kernels, asynchronous on CUDA) and appends host-side numbers (indices,
step) to lists. It never reads a device value, so it never waits for the GPU. Keeping references
to each step's own tensors instead launched no kernel, but held a few small blocks of every step
alive between the step's large ones until the flush: on CPU the heap then grew and shrank by up
to 200 MiB in a sawtooth (benchmarks/whole_run.py: peak resident memory 617-829 MiB against
597-620 MiB with the copies). Rows whose shape changes from step to step are kept by reference.
At most ``MAX_ROWS`` rows are held before a flush.

Two ways in:

* :meth:`SampleRecorder.record_outputs` (the fast path): the batch's model outputs and targets
  are kept, and the per-sample values (loss, margin, prediction, confidence) are derived once
  per flush, for thousands of rows at a time, by ``derive``. Used when outputs and targets are
  small tensors and the loss is computed row by row (a loss with ``reduction="none"``).
* :meth:`SampleRecorder.record` : per-sample values computed by the caller, one batch at a time.

:meth:`flush` runs on the training thread: it concatenates what was kept, derives the rows and
starts the device-to-host copy (asynchronous on CUDA). The transfer thread waits for the copy and
passes plain NumPy arrays on; it runs no torch operation. That is deliberate: the first parallel
torch operation on a second thread gives that thread its own OpenMP team, and once a process has
more OpenMP threads than cores, GNU OpenMP stops spinning between parallel regions - every region
of the training thread then pays a futex wake-up. Deriving on the transfer thread measured a
1.28x slower CPU training run (benchmarks/overhead.py); deriving here costs the training thread
about a millisecond per flush.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .per_sample import classification_signals

__all__ = ["COLUMNS", "ClassSignals", "Derive", "HostPacket", "Indices", "SampleRecorder", "rows_of"]

# The dataset indices of one batch: an int64 array, or the list of ints a batch sampler gave
# (converted to an array on the transfer thread).
Indices = np.ndarray | list[int]

MAX_ROWS = 32_768  # rows held before a flush at most
# Values of outputs and targets in the preallocated rows at most (16 MiB float32): 16k rows of 256
# classes, about a second of steps of 256 - wide rows must not force a flush every few steps.
BUFFER_VALUES = 1 << 22
MAX_STEPS = 4_096  # per-step loss values per flush at most
TRANSFER_QUEUE = 64
MIN_RATE_WINDOW = 0.1  # seconds: a shorter window gives no meaningful samples/s

# Classification signals of n rows: (margin, prediction, confidence), each [n].
ClassSignals = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (outputs, targets) -> (per-sample loss [n], classification signals or None).
Derive = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ClassSignals | None]]

# Columns of a packet's rows.
LOSS, MARGIN, PRED, LABEL, CONFIDENCE, GRAD_NORM = range(6)
COLUMNS = 6


@dataclass
class HostPacket:
    """What reaches the host per flush. Columns of ``rows``: loss, margin, pred, label,
    confidence, grad_norm (NaN where not measured)."""

    run_id: int
    split: str
    epoch: int
    classification: bool
    indices: np.ndarray
    row_steps: np.ndarray
    rows: np.ndarray  # float32 [n, COLUMNS] (margin..confidence are NaN when not classification)
    steps: np.ndarray  # one entry per recorded micro-batch
    step_losses: np.ndarray
    lrs: np.ndarray
    samples_per_second: float
    closes_epoch: bool = False  # the last packet of (run, split, epoch)
    flushed_at: float = field(default_factory=time.time)


@dataclass
class _Pending:
    run_id: int
    split: str
    epoch: int
    indices: list[Indices | None]
    sizes: list[int]
    steps: list[int]
    lrs: list[float]
    first_position: int
    # NumPy views of host tensors (on CUDA their copies may still be running until ``ready``)
    rows: np.ndarray  # float32 [n, COLUMNS]
    step_losses: np.ndarray  # float32, one per recorded micro-batch
    samples_per_second: float
    ready: torch.cuda.Event | None
    closes_epoch: bool
    classification: bool


@dataclass
class _Kept:
    """One step's tensors, held by reference until the next flush."""

    outputs: torch.Tensor
    targets: torch.Tensor
    grad_norm: torch.Tensor | None


class _StepRows:
    """Preallocated rows for one row shape: each step's outputs and targets are copied in."""

    def __init__(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.output_row, self.output_dtype = outputs.shape[1:], outputs.dtype
        self.target_row, self.target_dtype = targets.shape[1:], targets.dtype
        row_values = max(1, math.prod(outputs.shape[1:]) + math.prod(targets.shape[1:]))
        self.capacity = min(MAX_ROWS, max(outputs.shape[0], BUFFER_VALUES // row_values))
        self.outputs = torch.empty((self.capacity, *outputs.shape[1:]), dtype=outputs.dtype, device=outputs.device)
        self.targets = torch.empty((self.capacity, *targets.shape[1:]), dtype=targets.dtype, device=targets.device)


    def fits(self, outputs: torch.Tensor, targets: torch.Tensor) -> bool:
        """Rows of this step have the buffer's shapes and dtypes (host metadata: no sync)."""
        return (outputs.dtype is self.output_dtype and targets.dtype is self.target_dtype
                and outputs.shape[1:] == self.output_row and targets.shape[1:] == self.target_row)


def _keep(value: torch.Tensor) -> torch.Tensor:
    """A detached reference; a view is copied, so that a large base tensor is not kept alive."""
    return value.detach() if value._base is None else value.detach().clone()


def rows_of(per: torch.Tensor, signals: ClassSignals | None, labels: torch.Tensor | None,
            grad_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Stack per-sample values into [n, COLUMNS] float32 rows (pred and label exact up to 2**24)."""
    nan = torch.full_like(per, math.nan, dtype=torch.float32)
    norms = nan if grad_norm is None else grad_norm.float()
    if signals is None or labels is None:
        return torch.stack((per.float(), nan, nan, nan, nan, norms), dim=1)
    margin, pred, confidence = signals
    return torch.stack((per.float(), margin.float(), pred.float(), labels.float(), confidence.float(), norms),
                       dim=1)


class SampleRecorder:
    def __init__(self, device: torch.device, consumer: Callable[[HostPacket], None]) -> None:
        self.device = device
        self._consumer = consumer
        self.derive: Derive | None = None  # set before the first record_outputs
        self._context: tuple[int, str, int] | None = None
        self._classification = False
        self._step_rows: _StepRows | None = None
        self._by_reference = False  # row shapes changed between steps: keep references instead
        self._position_in_epoch = 0  # rows recorded so far in this epoch
        self._reset_batch()
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=TRANSFER_QUEUE)
        self.dropped_packets = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._transfer, name="onthefly-transfer", daemon=True)
        self._thread.start()

    def _reset_batch(self) -> None:
        self._n_rows = 0
        self._copied = 0  # rows of this flush in self._step_rows (from row 0 on)
        self._kept: list[_Kept] = []  # record_outputs
        self._rows: list[torch.Tensor] = []  # record
        # record with logits: (per-sample loss, logits, labels, grad norms), rows derived at the flush
        self._deferred: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
        self._deferred_values = 0
        self._losses: list[torch.Tensor] = []
        self._indices: list[Indices | None] = []
        self._sizes: list[int] = []
        self._steps: list[int] = []
        self._lrs: list[float] = []
        self._first_position = self._position_in_epoch
        self._started = time.perf_counter()

    def begin_epoch(self, run_id: int, split: str, epoch: int, *, first_position: int = 0) -> None:
        """Rows from now on belong to ``epoch``; ``first_position`` is the number of samples of
        the epoch trained before (a resumed epoch: positions of an IterableDataset go on)."""
        self.flush()
        self._context = (run_id, split, epoch)
        self._position_in_epoch = first_position
        self._first_position = first_position

    @property
    def position_in_epoch(self) -> int:
        """Samples recorded so far in the epoch (training thread)."""
        return self._position_in_epoch

    # ---- hot path ------------------------------------------------------------------------
    def record_outputs(self, step: int, indices: Indices | None, outputs: torch.Tensor,
                       targets: torch.Tensor, loss: torch.Tensor, lr: float,
                       grad_norm: torch.Tensor | None = None) -> None:
        """Record one batch by its outputs and targets (per-sample values derived at flush)."""
        batch = outputs.shape[0]  # host metadata: no sync
        rows = self._step_rows
        if rows is not None and not rows.fits(outputs, targets):
            # Shapes change from step to step: keep references from now on (rows copied so far
            # stay where they are until the flush, which groups steps by shape).
            rows, self._step_rows, self._by_reference = None, None, True
        if rows is None and not self._by_reference and batch <= MAX_ROWS:
            rows = self._step_rows = _StepRows(outputs, targets)
        limit = rows.capacity if rows is not None else MAX_ROWS
        if self._rows or self._n_rows + batch > limit or len(self._losses) == MAX_STEPS:
            self.flush()  # one mode per flush; rows of differing shapes are grouped at the flush
        norms = None if grad_norm is None else grad_norm.detach()
        if rows is not None and self._copied == self._n_rows and batch <= rows.capacity:
            start = self._copied
            kept_outputs, kept_targets = rows.outputs[start:start + batch], rows.targets[start:start + batch]
            kept_outputs.copy_(outputs.detach())  # two small kernels, no sync
            kept_targets.copy_(targets.detach())
            self._copied += batch
            self._kept.append(_Kept(kept_outputs, kept_targets, norms))
        else:
            self._kept.append(_Kept(_keep(outputs), _keep(targets), norms))
        self._append(step, indices, batch, loss, lr)

    def record(
        self, step: int, indices: Indices | None, per_sample: torch.Tensor, loss: torch.Tensor,
        lr: float, signals: ClassSignals | None = None, labels: torch.Tensor | None = None,
        grad_norm: torch.Tensor | None = None, logits: torch.Tensor | None = None,
    ) -> None:
        """Record one batch whose per-sample losses are already computed. With ``logits`` (and
        ``labels``), margin, prediction and confidence are derived at the flush, for thousands of
        rows at once: this step only keeps references (no kernel)."""
        batch = per_sample.shape[0]
        classification = signals is not None or logits is not None
        values = batch if logits is None else logits.numel() + batch
        if self._kept or self._n_rows + batch > MAX_ROWS or len(self._losses) == MAX_STEPS or (
                classification != self._classification and (self._rows or self._deferred)) or (
                self._deferred_values + values > BUFFER_VALUES and self._deferred):  # bounded memory
            self.flush()
        self._classification = classification
        if signals is None:  # kept by reference: the rows are made at the flush
            self._deferred.append((_keep(per_sample), None if logits is None else _keep(logits),
                                   None if logits is None or labels is None else _keep(labels),
                                   None if grad_norm is None else grad_norm.detach()))
            self._deferred_values += values
        else:
            self._rows.append(rows_of(per_sample.detach(), signals, labels, grad_norm))  # one stack kernel
        self._append(step, indices, batch, loss, lr)

    def _append(self, step: int, indices: Indices | None, batch: int, loss: torch.Tensor, lr: float) -> None:
        self._losses.append(loss.detach())
        self._n_rows += batch
        self._position_in_epoch += batch
        self._indices.append(indices)
        self._sizes.append(batch)
        self._steps.append(step)
        self._lrs.append(lr)

    # ---- handing over ----------------------------------------------------------------------
    def end_epoch(self) -> None:
        """Flush, marking the packet as the epoch's last (the store then closes its files)."""
        self.flush(closes_epoch=True)

    def flush(self, *, closes_epoch: bool = False) -> None:
        """Hand what was recorded to the transfer thread (asynchronous copy on CUDA)."""
        if self._context is None or (not self._losses and not closes_epoch):
            self._reset_batch()
            return
        elapsed = time.perf_counter() - self._started
        n = self._n_rows
        classification = self._classification
        if self._kept and self.derive is None:
            raise RuntimeError("record_outputs needs SampleRecorder.derive to be set")
        rows = np.empty((0, COLUMNS), dtype=np.float32)
        step_losses = np.empty(0, dtype=np.float32)
        with torch.no_grad():  # on CUDA launched on the device's stream: no host sync
            parts = self._rows + _deferred_rows(self._deferred)
            if self._kept:
                parts = []
                copied = self._step_rows is not None and self._copied == n
                for group in [self._kept] if copied else _same_shapes(self._kept):
                    if copied:  # every row is in the preallocated rows already: no concatenation
                        assert self._step_rows is not None
                        outputs, targets = self._step_rows.outputs[:n].float(), self._step_rows.targets[:n]
                        grad_norms = _concat_norms(group)
                    else:
                        outputs, targets, grad_norms = _concat(group)
                    per, signals = self.derive(outputs, targets)  # type: ignore[misc]
                    parts.append(rows_of(per, signals, targets, grad_norms))
                    classification = signals is not None
            if parts:
                rows = _to_host(parts[0] if len(parts) == 1 else torch.cat(parts)).numpy()
            if self._losses:
                step_losses = _to_host(_stack_scalars(self._losses).float()).numpy()
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # the stream the copies are on
        run_id, split, epoch = self._context
        pending = _Pending(
            run_id, split, epoch, self._indices, self._sizes, self._steps, self._lrs, self._first_position,
            rows, step_losses, n / elapsed if elapsed >= MIN_RATE_WINDOW else math.nan, ready,
            closes_epoch, classification,
        )
        self._reset_batch()
        if closes_epoch:
            self._queue.put(pending)  # an epoch's last packet is never dropped (not per step)
            return
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            self.dropped_packets += 1  # reported by the engine as a samples_dropped event

    def close(self) -> None:
        """Flush and wait until the transfer thread has passed everything on. Idempotent."""
        self.flush()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def wait_idle(self) -> None:
        """Block until every packet handed over so far has reached the consumer."""
        self.flush()
        self._queue.join()

    # ---- transfer thread -----------------------------------------------------------------
    def _transfer(self) -> None:
        while True:
            pending = self._queue.get()
            try:
                if pending is None:
                    return
                self._consumer(self._to_packet(pending))
            except Exception as exc:  # reported by the engine at the next step boundary
                self.error = exc
            finally:
                self._queue.task_done()

    def _to_packet(self, pending: _Pending) -> HostPacket:
        if pending.ready is not None:
            pending.ready.synchronize()  # waits here, not on the training thread
        sizes = np.asarray(pending.sizes, dtype=np.int64)
        position = pending.first_position
        indices = []
        for size, idx in zip(pending.sizes, pending.indices, strict=True):
            # An iterable dataset has no sampler indices: number samples by position in the epoch.
            indices.append(np.asarray(idx, dtype=np.int64) if idx is not None
                           else np.arange(position, position + size, dtype=np.int64))
            position += size
        steps = np.asarray(pending.steps, dtype=np.int64)
        return HostPacket(
            run_id=pending.run_id, split=pending.split, epoch=pending.epoch,
            classification=pending.classification,
            indices=np.concatenate(indices) if indices else np.empty(0, dtype=np.int64),
            row_steps=np.repeat(steps, sizes), rows=pending.rows, steps=steps,
            step_losses=pending.step_losses, lrs=np.asarray(pending.lrs, dtype=np.float64),
            samples_per_second=pending.samples_per_second, closes_epoch=pending.closes_epoch,
        )


def _deferred_rows(deferred: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                         torch.Tensor | None]]) -> list[torch.Tensor]:
    """Rows of the steps recorded by reference, in their order: consecutive steps alike (logits of
    one shape and dtype or none, grad norms or none) are derived together, a handful of kernels
    for thousands of rows."""
    def kind(entry: tuple[Any, ...]) -> tuple[Any, ...]:
        logits = entry[1]
        return (None if logits is None else (logits.shape[1:], logits.dtype), entry[3] is None)

    parts: list[torch.Tensor] = []
    start = 0
    while start < len(deferred):
        end = start + 1
        while end < len(deferred) and kind(deferred[end]) == kind(deferred[start]):
            end += 1
        group = deferred[start:end]
        per, logits, labels, norms = (_joined([g[k] for g in group]) for k in range(4))
        assert per is not None
        signals = classification_signals(logits, labels) if logits is not None and labels is not None else None
        parts.append(rows_of(per, signals, labels, norms))
        start = end
    return parts


def _joined(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    if values[0] is None:
        return None
    return values[0] if len(values) == 1 else torch.cat(values)  # type: ignore[arg-type]


def _same_shapes(kept: list[_Kept]) -> list[list[_Kept]]:
    """Consecutive steps whose outputs and targets concatenate (same per-row shapes and dtypes)."""
    groups: list[list[_Kept]] = []
    key: tuple[object, ...] | None = None
    for k in kept:
        shape = (k.outputs.shape[1:], k.outputs.dtype, k.targets.shape[1:], k.targets.dtype)
        if shape != key:
            groups.append([])
            key = shape
        groups[-1].append(k)
    return groups


def _concat(kept: list[_Kept]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kept steps as one batch: outputs (float32), targets, grad norms (NaN where none)."""
    outputs = torch.cat([k.outputs for k in kept]).float()
    targets = torch.cat([k.targets for k in kept])
    return outputs, targets, _concat_norms(kept)


def _concat_norms(kept: list[_Kept]) -> torch.Tensor | None:
    if not any(k.grad_norm is not None for k in kept):
        return None
    return torch.cat([k.grad_norm.float() if k.grad_norm is not None
                      else torch.full((k.outputs.shape[0],), math.nan, device=k.outputs.device)
                      for k in kept])


def _stack_scalars(losses: list[torch.Tensor]) -> torch.Tensor:
    """One value per step, in one kernel where the losses have one shape (as they do in a loop)."""
    try:
        return torch.stack(losses).reshape(-1)
    except RuntimeError:  # shapes () and (1,) mixed
        return torch.stack([loss.reshape(()) for loss in losses])


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """Start copying an accelerator tensor to the host (CPU tensors are handed over as they are)."""
    if values.device.type != "cuda":  # e.g. MPS: no event to wait on, so copy synchronously
        return values.to("cpu")
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    # Asynchronous; the caching allocator reuses ``values``' memory only for work queued after it.
    host.copy_(values, non_blocking=True)
    return host
