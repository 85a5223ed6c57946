"""Per-sample rows and per-step losses, gathered on the device and handed to the host in batches.

Hot-path contract: :meth:`SampleRecorder.record` launches a few small device kernels and
appends host-side numbers (indices, step) to lists. It never reads a device value, so it never
waits for the GPU. :meth:`flush` starts an asynchronous device-to-host copy and hands the packet
to a transfer thread, which waits for the copy and passes plain NumPy arrays on.
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

__all__ = ["HostPacket", "SampleRecorder"]

MIN_ROWS = 16_384  # rows per flush at most; the store writes Parquet parts of >= this size
MAX_STEPS = 4_096  # per-step loss values per flush at most
TRANSFER_QUEUE = 64
MIN_RATE_WINDOW = 0.1  # seconds: a shorter window gives no meaningful samples/s


@dataclass
class HostPacket:
    """What reaches the host per flush. Columns of ``rows``: loss, margin, pred, label."""

    run_id: int
    split: str
    epoch: int
    classification: bool
    indices: np.ndarray
    row_steps: np.ndarray
    rows: np.ndarray  # float32 [n, 4] (only column 0 is meaningful when not classification)
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
    classification: bool
    indices: list[np.ndarray]
    row_steps: list[np.ndarray]
    rows: torch.Tensor
    steps: list[int]
    step_losses: torch.Tensor
    lrs: list[float]
    samples_per_second: float
    ready: torch.cuda.Event | None
    closes_epoch: bool


class SampleRecorder:
    def __init__(self, device: torch.device, consumer: Callable[[HostPacket], None]) -> None:
        self.device = device
        self._consumer = consumer
        self._rows: torch.Tensor | None = None  # [capacity, 4] float32 on the device
        self._step_losses = torch.empty(MAX_STEPS, dtype=torch.float32, device=device)
        self._context: tuple[int, str, int] | None = None
        self._classification = False
        self._position_in_epoch = 0
        self._reset_batch()
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=TRANSFER_QUEUE)
        self.dropped_packets = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._transfer, name="onthefly-transfer", daemon=True)
        self._thread.start()

    def _reset_batch(self) -> None:
        self._n_rows = 0
        self._n_steps = 0
        self._indices: list[np.ndarray] = []
        self._row_steps: list[np.ndarray] = []
        self._steps: list[int] = []
        self._lrs: list[float] = []
        self._started = time.perf_counter()

    def begin_epoch(self, run_id: int, split: str, epoch: int) -> None:
        self.flush()
        self._context = (run_id, split, epoch)
        self._position_in_epoch = 0

    # ---- hot path ------------------------------------------------------------------------
    def record(
        self, step: int, indices: np.ndarray | None, per_sample: torch.Tensor, loss: torch.Tensor,
        lr: float, margin: torch.Tensor | None = None, pred: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Record one batch. ``per_sample`` has one value per sample; ``loss`` is the batch loss."""
        batch = per_sample.shape[0]  # shape is host metadata: no sync
        if indices is None:  # iterable dataset: number samples by their position in the epoch
            indices = np.arange(self._position_in_epoch, self._position_in_epoch + batch, dtype=np.int64)
        self._position_in_epoch += batch
        classification = margin is not None
        if self._rows is None or self._rows.shape[0] < batch:
            self.flush()
            self._rows = torch.empty((max(MIN_ROWS, 4 * batch), 4), dtype=torch.float32, device=self.device)
        elif self._n_rows + batch > self._rows.shape[0] or self._n_steps == MAX_STEPS or (
            classification != self._classification and self._n_rows
        ):
            self.flush()
        self._classification = classification
        target = self._rows[self._n_rows : self._n_rows + batch]
        if classification:
            # pred and label as float32: exact for up to 2**24 classes.
            torch.stack((per_sample.float(), margin.float(), pred.float(), labels.float()),  # type: ignore[union-attr]
                        dim=1, out=target)
        else:
            target[:, 0].copy_(per_sample)
        self._step_losses[self._n_steps].copy_(loss.detach())
        self._n_rows += batch
        self._n_steps += 1
        self._indices.append(indices)
        self._row_steps.append(np.full(batch, step, dtype=np.int64))
        self._steps.append(step)
        self._lrs.append(lr)

    def end_epoch(self) -> None:
        """Flush, marking the packet as the epoch's last (the store then closes its files)."""
        self.flush(closes_epoch=True)

    def flush(self, *, closes_epoch: bool = False) -> None:
        """Hand what was recorded to the transfer thread (asynchronous copy on CUDA)."""
        if self._context is None or (not self._n_steps and not closes_epoch):
            self._reset_batch()
            return
        elapsed = time.perf_counter() - self._started
        rows = _to_host(self._rows[: self._n_rows]) if self._rows is not None else torch.empty((0, 4))
        step_losses = _to_host(self._step_losses[: self._n_steps])
        ready = None
        if rows.device.type == "cpu" and self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        run_id, split, epoch = self._context
        pending = _Pending(
            run_id, split, epoch, self._classification, self._indices, self._row_steps, rows,
            self._steps, step_losses, self._lrs, self._n_rows / elapsed if elapsed >= MIN_RATE_WINDOW else math.nan,
            ready,
            closes_epoch,
        )
        self._reset_batch()
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            self.dropped_packets += 1

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
                if pending.ready is not None:
                    pending.ready.synchronize()  # waits here, not on the training thread
                self._consumer(HostPacket(
                    run_id=pending.run_id, split=pending.split, epoch=pending.epoch,
                    classification=pending.classification,
                    indices=_concat(pending.indices),
                    row_steps=_concat(pending.row_steps),
                    rows=pending.rows.numpy(),
                    steps=np.asarray(pending.steps, dtype=np.int64),
                    step_losses=pending.step_losses.numpy(),
                    lrs=np.asarray(pending.lrs, dtype=np.float64),
                    samples_per_second=pending.samples_per_second,
                    closes_epoch=pending.closes_epoch,
                ))
            except Exception as exc:  # reported by the engine at the next step boundary
                self.error = exc
            finally:
                self._queue.task_done()


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _to_host(values: torch.Tensor) -> torch.Tensor:
    if values.device.type == "cpu":
        return values.clone()  # the device buffer is reused: the packet needs its own copy
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.device.type == "cuda")
    host.copy_(values, non_blocking=True)  # ordered on the stream before later writes to the buffer
    return host
