"""What a run does with per-sample values once they reach the host: on the transfer thread.

:class:`TransferSink` is the recorder's consumer. Everything in it runs on the recorder's
``onthefly-transfer`` thread, one packet at a time, except the few methods marked "training
thread", which read what it has gathered after waiting for it (``SampleRecorder.wait_idle``):
the store gets the rows and per-step metrics, the dashboard a progress event, and the sink keeps
the exact mean loss of every epoch, a uniform sample of the epoch in progress for live views,
and the first non-finite loss seen (the training thread fails the run with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..signals.quantiles import Reservoir
from ..signals.recorder import CONFIDENCE, GRAD_NORM, LABEL, LOSS, MARGIN, PRED, HostPacket
from ..store.samples import SampleChunk
from ..store.session import SessionStore
from .events import EventBus

__all__ = ["TransferSink", "exact_mean", "sample_chunk"]


class TransferSink:
    """Runs on the transfer thread (see the module docstring)."""

    def __init__(self, session: SessionStore, bus: EventBus, batch_in_epoch: Callable[[], int]) -> None:
        self._session = session
        self._bus = bus
        self._batch_in_epoch = batch_in_epoch  # for progress events: a plain int read, no lock needed
        self.latest: dict[str, float] = {}  # the last flushed step's loss, lr and throughput
        # Per-sample training losses of each open epoch, and the exact mean of each closed one:
        # math.fsum is correctly rounded whatever the order or the chunks, so a mean does not
        # depend on when flushes happened (nor on a resume in the middle of its epoch).
        self._epoch_losses: dict[int, list[np.ndarray]] = {}
        self._epoch_means: dict[int, float] = {}
        # A uniform sample of the epoch in progress's per-sample losses: live, approximate views.
        self._live: tuple[int, Reservoir] | None = None
        self.nonfinite: tuple[int, int] | None = None  # (step, samples) of the first NaN/inf loss

    def __call__(self, packet: HostPacket) -> None:
        if len(packet.indices):
            self._rows(packet)
        if len(packet.steps):
            self._steps(packet)
        if packet.closes_epoch:
            self._close_epoch(packet)

    def _rows(self, packet: HostPacket) -> None:
        rows = packet.rows
        self._session.samples(sample_chunk(packet.run_id, packet.split, packet.epoch, packet.row_steps,
                                           packet.indices, rows, packet.classification))
        bad = ~np.isfinite(rows[:, LOSS])
        if bad.any() and self.nonfinite is None:
            self.nonfinite = (int(packet.row_steps[bad][0]), int(bad.sum()))
        if packet.split == "train":
            if self._live is None or self._live[0] != packet.epoch:
                self._live = (packet.epoch, Reservoir())
            self._live[1].add(rows[:, LOSS])
        self._epoch_losses.setdefault(packet.epoch, []).append(rows[:, LOSS].copy())

    def _steps(self, packet: HostPacket) -> None:
        """Per-step metrics: the mean loss of each step's micro-batches, its lr, the throughput."""
        steps, first = np.unique(packet.steps, return_index=True)
        position = np.searchsorted(steps, packet.steps)
        means = np.bincount(position, weights=packet.step_losses) / np.bincount(position)
        now = packet.flushed_at
        loss_rows = [(packet.run_id, "train_loss", int(s), packet.epoch, now, float(v))
                     for s, v in zip(steps, means, strict=True)]
        lr_rows = [(packet.run_id, "lr", int(s), packet.epoch, now, float(packet.lrs[i]))
                   for s, i in zip(steps, first, strict=True)]
        last_step = int(steps[-1])
        rate = packet.samples_per_second
        rate_rows = [(packet.run_id, "throughput", last_step, packet.epoch, now, rate)] if math.isfinite(rate) else []
        self._session.metrics([*loss_rows, *lr_rows, *rate_rows])
        self.latest = {"step": last_step, "loss": loss_rows[-1][-1], "lr": float(packet.lrs[-1]),
                       "samples_per_second": rate if rate_rows else self.latest.get("samples_per_second", math.nan)}
        self._bus.publish("progress", {**self.latest, "batch_in_epoch": self._batch_in_epoch()},
                          run_id=packet.run_id, step=last_step, epoch=packet.epoch, persist=False)

    def _close_epoch(self, packet: HostPacket) -> None:
        if packet.split == "train" and self._live is not None and self._live[0] == packet.epoch:
            self._live = None  # the store now has the whole epoch: exact views from here on
        self._session.close_epoch(packet.run_id, packet.split, packet.epoch)
        parts = self._epoch_losses.pop(packet.epoch, [])
        count = sum(len(part) for part in parts)
        if count:
            mean = exact_mean(parts)
            self._epoch_means[packet.epoch] = mean
            step = int(self.latest.get("step", 0))
            self._session.metrics([(packet.run_id, "train_loss_epoch", step, packet.epoch, packet.flushed_at, mean)])
            self._bus.publish("epoch_summary", {"split": packet.split, "loss": mean, "samples": count},
                              run_id=packet.run_id, step=step, epoch=packet.epoch)

    def live(self) -> tuple[int, Reservoir] | None:
        """(epoch, reservoir) of the training epoch in progress, None between epochs (any thread:
        one reference read)."""
        return self._live

    # ---- training thread, after SampleRecorder.wait_idle() --------------------------------
    def epoch_loss(self, epoch: int | None) -> float | None:
        """The mean per-sample loss of ``epoch`` (default: the latest; so far, if still open)."""
        open_epochs = [e for e, parts in self._epoch_losses.items() if parts]
        if epoch is None:
            candidates = [*self._epoch_means, *open_epochs]
            if not candidates:
                return None
            epoch = max(candidates)
        if self._epoch_losses.get(epoch):
            return exact_mean(self._epoch_losses[epoch])
        return self._epoch_means.get(epoch)

    def losses_so_far(self, epoch: int) -> np.ndarray:
        """The per-sample losses of the open ``epoch`` (a checkpoint carries them)."""
        parts = self._epoch_losses.get(epoch, [])
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)

    def resume_epoch(self, epoch: int, losses: np.ndarray) -> None:
        """Before the first packet: the resumed epoch's losses from before its checkpoint."""
        if len(losses):
            self._epoch_losses[epoch] = [losses.astype(np.float32)]


def exact_mean(parts: list[np.ndarray]) -> float:
    """The correctly rounded mean of float32 values, whatever their order and chunking."""
    values = np.concatenate(parts) if len(parts) != 1 else parts[0]
    return math.fsum(values.astype(np.float64).tolist()) / len(values)


def sample_chunk(run_id: int, split: str, epoch: int, steps: np.ndarray, indices: np.ndarray, rows: np.ndarray,
                 classification: bool) -> SampleChunk:
    """Recorder rows ([n, COLUMNS]) as the store's per-sample chunk (pred and label -1 when the
    task is not classification)."""
    minus_one = np.full(len(indices), -1, dtype=np.int64)
    return SampleChunk(
        run_id=run_id, split=split, epoch=epoch, step=steps, index=indices, loss=rows[:, LOSS],
        margin=rows[:, MARGIN], pred=rows[:, PRED].astype(np.int64) if classification else minus_one,
        label=rows[:, LABEL].astype(np.int64) if classification else minus_one,
        confidence=rows[:, CONFIDENCE], grad_norm=rows[:, GRAD_NORM],
    )
