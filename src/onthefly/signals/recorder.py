"""Per-sample rows and per-step losses, gathered on the device and handed to the host in batches.

Hot-path contract: a ``record*`` call launches one to three small copy kernels into preallocated
device buffers and appends host-side numbers (indices, step) to lists. It never reads a device
value, so it never waits for the GPU.

Two ways in:

* :meth:`SampleRecorder.record_outputs` (the fast path): the batch's model outputs and targets
  are copied into buffers, and the per-sample values (loss, margin, prediction) are derived once
  per flush, for thousands of rows at a time, by ``derive`` - on the device for CUDA (launched
  asynchronously), or on the transfer thread for the CPU. Used when outputs and targets are small
  tensors and the loss is computed row by row (a loss with ``reduction="none"``).
* :meth:`SampleRecorder.record` : per-sample values computed by the caller, one batch at a time.

:meth:`flush` starts the device-to-host copy and hands the packet to the transfer thread, which
waits for the copy and passes plain NumPy arrays on.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["COLUMNS", "ClassSignals", "Derive", "HostPacket", "SampleRecorder", "rows_of"]

MIN_ROWS = 16_384  # rows per flush at most; the store writes Parquet parts of >= this size
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
    indices: list[np.ndarray | None]
    sizes: list[int]
    steps: list[int]
    lrs: list[float]
    first_position: int
    rows: torch.Tensor | None  # derived rows (host, maybe still being copied)
    raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None  # CPU outputs, targets,
    # grad norms, still to derive from
    step_losses: torch.Tensor
    samples_per_second: float
    ready: torch.cuda.Event | None
    closes_epoch: bool
    classification: bool  # for ``raw``: decided when the rows are derived


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
        self._rows: torch.Tensor | None = None  # [capacity, COLUMNS] float32 (record)
        self._outputs: torch.Tensor | None = None  # [capacity, ...] float32 (record_outputs)
        self._targets: torch.Tensor | None = None  # [capacity, ...] targets' dtype
        self._grad_norms: torch.Tensor | None = None  # [capacity] float32 (record_outputs)
        self._step_losses = torch.empty(MAX_STEPS, dtype=torch.float32, device=device)
        self._context: tuple[int, str, int] | None = None
        self._classification = False
        self._position_in_epoch = 0  # rows recorded so far in this epoch
        self._reset_batch()
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=TRANSFER_QUEUE)
        self.dropped_packets = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._transfer, name="onthefly-transfer", daemon=True)
        self._thread.start()

    def _reset_batch(self) -> None:
        self._n_rows = 0
        self._n_steps = 0
        self._has_grad_norms = False
        self._indices: list[np.ndarray | None] = []
        self._sizes: list[int] = []
        self._steps: list[int] = []
        self._lrs: list[float] = []
        self._first_position = self._position_in_epoch
        self._started = time.perf_counter()

    def begin_epoch(self, run_id: int, split: str, epoch: int) -> None:
        self.flush()
        self._context = (run_id, split, epoch)
        self._position_in_epoch = 0
        self._first_position = 0

    # ---- hot path ------------------------------------------------------------------------
    def record_outputs(self, step: int, indices: np.ndarray | None, outputs: torch.Tensor,
                       targets: torch.Tensor, loss: torch.Tensor, lr: float,
                       grad_norm: torch.Tensor | None = None) -> None:
        """Record one batch by its outputs and targets (per-sample values derived at flush)."""
        batch = outputs.shape[0]  # shape is host metadata: no sync
        out_buf, tgt_buf = self._outputs, self._targets
        if (out_buf is None or tgt_buf is None or self._rows is not None
                or out_buf.shape[1:] != outputs.shape[1:] or tgt_buf.shape[1:] != targets.shape[1:]
                or tgt_buf.dtype != targets.dtype or out_buf.shape[0] < batch):
            self.flush()
            capacity = max(MIN_ROWS, 4 * batch)
            self._rows = None
            self._outputs = out_buf = torch.empty((capacity, *outputs.shape[1:]), dtype=torch.float32,
                                                  device=self.device)
            self._targets = tgt_buf = torch.empty((capacity, *targets.shape[1:]), dtype=targets.dtype,
                                                  device=self.device)
            self._grad_norms = torch.full((capacity,), math.nan, dtype=torch.float32, device=self.device)
        elif self._n_rows + batch > out_buf.shape[0] or self._n_steps == MAX_STEPS:
            self.flush()
        n = self._n_rows
        out_buf[n : n + batch].copy_(outputs.detach())  # one copy kernel (casts to float32)
        tgt_buf[n : n + batch].copy_(targets)  # one copy kernel
        if grad_norm is not None:
            self._grad_norms[n : n + batch].copy_(grad_norm)  # type: ignore[index]
            self._has_grad_norms = True
        elif self._has_grad_norms:  # the buffer is reused: do not leave an older value here
            self._grad_norms[n : n + batch].fill_(math.nan)  # type: ignore[index]
        self._append(step, indices, batch, loss, lr)

    def record(
        self, step: int, indices: np.ndarray | None, per_sample: torch.Tensor, loss: torch.Tensor,
        lr: float, signals: ClassSignals | None = None, labels: torch.Tensor | None = None,
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        """Record one batch whose per-sample values are already computed."""
        batch = per_sample.shape[0]
        classification = signals is not None
        if self._rows is None or self._outputs is not None or self._rows.shape[0] < batch:
            self.flush()
            self._outputs = self._targets = self._grad_norms = None
            self._rows = torch.empty((max(MIN_ROWS, 4 * batch), COLUMNS), dtype=torch.float32, device=self.device)
        elif self._n_rows + batch > self._rows.shape[0] or self._n_steps == MAX_STEPS or (
            classification != self._classification and self._n_rows
        ):
            self.flush()
        self._classification = classification
        # one stack kernel into the buffer
        self._rows[self._n_rows : self._n_rows + batch].copy_(rows_of(per_sample, signals, labels, grad_norm))
        self._append(step, indices, batch, loss, lr)

    def _append(self, step: int, indices: np.ndarray | None, batch: int, loss: torch.Tensor, lr: float) -> None:
        self._step_losses[self._n_steps].copy_(loss.detach())
        self._n_rows += batch
        self._n_steps += 1
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
        if self._context is None or (not self._n_steps and not closes_epoch):
            self._reset_batch()
            return
        elapsed = time.perf_counter() - self._started
        n = self._n_rows
        rows: torch.Tensor | None = None
        raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        classification = self._classification
        if self._outputs is not None and self._targets is not None and n:
            if self.derive is None:
                raise RuntimeError("record_outputs needs SampleRecorder.derive to be set")
            grad_norms = self._grad_norms[:n] if self._has_grad_norms and self._grad_norms is not None else None
            if self.device.type == "cpu":
                # Derived on the transfer thread: the training thread only copies the buffers.
                raw = (self._outputs[:n].clone(), self._targets[:n].clone(),
                       None if grad_norms is None else grad_norms.clone())
            else:
                with torch.no_grad():  # launched on the device's stream; no host sync
                    per, signals = self.derive(self._outputs[:n], self._targets[:n])
                    rows = _to_host(rows_of(per, signals, self._targets[:n], grad_norms))
                classification = signals is not None
        elif self._rows is not None:
            rows = _to_host(self._rows[:n])
        step_losses = _to_host(self._step_losses[: self._n_steps])
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # the stream the copies are on
        run_id, split, epoch = self._context
        pending = _Pending(
            run_id, split, epoch, self._indices, self._sizes, self._steps, self._lrs, self._first_position,
            rows, raw, step_losses, n / elapsed if elapsed >= MIN_RATE_WINDOW else math.nan, ready,
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
        classification = pending.classification
        if pending.raw is not None and self.derive is not None:
            outputs, targets, grad_norms = pending.raw
            with torch.no_grad():
                per, signals = self.derive(outputs, targets)
                rows = rows_of(per, signals, targets, grad_norms).numpy()
            classification = signals is not None
        elif pending.rows is not None:
            rows = pending.rows.numpy()
        else:
            rows = np.empty((0, COLUMNS), dtype=np.float32)
        sizes = np.asarray(pending.sizes, dtype=np.int64)
        position = pending.first_position
        indices = []
        for size, idx in zip(pending.sizes, pending.indices, strict=True):
            # An iterable dataset has no sampler indices: number samples by position in the epoch.
            indices.append(idx if idx is not None else np.arange(position, position + size, dtype=np.int64))
            position += size
        steps = np.asarray(pending.steps, dtype=np.int64)
        return HostPacket(
            run_id=pending.run_id, split=pending.split, epoch=pending.epoch, classification=classification,
            indices=np.concatenate(indices) if indices else np.empty(0, dtype=np.int64),
            row_steps=np.repeat(steps, sizes), rows=rows, steps=steps,
            step_losses=pending.step_losses.numpy(), lrs=np.asarray(pending.lrs, dtype=np.float64),
            samples_per_second=pending.samples_per_second, closes_epoch=pending.closes_epoch,
        )


def _to_host(values: torch.Tensor) -> torch.Tensor:
    if values.device.type == "cpu":
        return values.clone()  # the device buffer is reused: the packet needs its own copy
    if values.device.type != "cuda":  # e.g. MPS: no event to wait on, so copy synchronously
        return values.to("cpu")
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)  # ordered on the stream before later writes to the buffer
    return host
