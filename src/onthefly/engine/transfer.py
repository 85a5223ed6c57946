"""What a run does with per-sample values once they reach the host: on the transfer thread.

:class:`TransferSink` is the recorder's consumer. Everything in it runs on the recorder's
``onthefly-transfer`` thread, one packet at a time, except the few methods marked "training
thread", which read what it has gathered after waiting for it (``SampleRecorder.wait_idle``):
the store gets the rows and per-step metrics, the dashboard a progress event, and the sink keeps
the exact mean loss of every epoch, a uniform sample of the epoch in progress for live views,
and the first non-finite loss seen (the training thread fails the run with it).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..signals.quantiles import Reservoir
from ..signals.recorder import CONFIDENCE, GRAD_NORM, LABEL, LOSS, MARGIN, PRED, HostPacket
from ..store.samples import SampleChunk
from ..store.session import SessionStore
from .events import EventBus

__all__ = ["ExactSum", "TransferSink", "sample_chunk"]


class ExactSum:
    """The exact sum of float32 values, kept as integers: the same whatever their order and
    chunking, in constant memory. A finite float32 is an integer below 2**24 times 2**(e - 24),
    with e from -148 to 128; one int64 per e holds the integers' sum."""

    LOW = -148  # the smallest exponent np.frexp gives a float32

    def __init__(self, bins: np.ndarray | None = None, count: int = 0, nonfinite: bool = False) -> None:
        self.bins = np.zeros(128 - self.LOW + 1, dtype=np.int64) if bins is None else bins.astype(np.int64)
        self.count = count
        self.nonfinite = nonfinite

    def add(self, values: np.ndarray) -> None:
        values = values.astype(np.float32, copy=False)
        self.count += len(values)
        finite = np.isfinite(values)
        if not finite.all():
            self.nonfinite = True
            values = values[finite]
        mantissas, exponents = np.frexp(values)
        integers = (mantissas.astype(np.float64) * (1 << 24)).astype(np.int64)  # exact: 24 bits
        for exponent in np.unique(exponents):  # a handful: losses span few powers of two
            self.bins[exponent - self.LOW] += int(integers[exponents == exponent].sum())

    def mean(self) -> float:
        """The correctly rounded mean (NaN if a value was not finite)."""
        if self.nonfinite or not self.count:
            return math.nan
        total = sum(int(b) << k for k, b in enumerate(self.bins.tolist()) if b)
        return total / (self.count << (24 - self.LOW))  # exact integers: one rounding


class TransferSink:
    """Runs on the transfer thread (see the module docstring)."""

    def __init__(self, session: SessionStore, bus: EventBus, batch_in_epoch: Callable[[], int], *,
                 rank_folders: list[Path] | None = None, marks_closed: bool = False) -> None:
        self._session = session
        self._bus = bus
        # Under torchrun: rank 0 announces a training epoch once every other rank's session folder
        # (``rank_folders``) has its rows; the other ranks say when theirs are written (``marks_closed``).
        self._rank_folders = rank_folders or []
        self._marks_closed = marks_closed
        self._batch_in_epoch = batch_in_epoch  # for progress events: a plain int read, no lock needed
        self.latest: dict[str, float] = {}  # the last flushed step's loss, lr and throughput
        # The exact sum of each open epoch's per-sample training losses, and the mean of each
        # closed one: exact, so a mean does not depend on when flushes happened (nor on a resume
        # in the middle of its epoch).
        self._epoch_sums: dict[int, ExactSum] = {}
        self._epoch_means: dict[int, float] = {}
        self._epoch_counts: dict[int, int] = {}
        # A uniform sample of the epoch in progress's per-sample losses: live, approximate views.
        self._live: tuple[int, Reservoir] | None = None
        self.nonfinite: tuple[int, int] | None = None  # (step, samples) of the first NaN/inf loss
        self._expected: tuple[int, float] | None = None  # a resumed run's first step and its recorded loss

    def expect_loss(self, step: int, loss: float) -> None:
        """Training thread, before the first resumed step: check that step's loss against ``loss``."""
        self._expected = (step, loss)

    def _check_resumed(self, run_id: int, epoch: int, loss: float) -> None:
        assert self._expected is not None
        step, recorded = self._expected
        self._expected = None
        # The same machine gives the same bits; elsewhere kernels may round differently.
        same = loss == recorded or abs(loss - recorded) <= 1e-6 * max(1.0, abs(recorded))
        self._bus.publish("resume_verified" if same else "resume_differs",
                          {"step": step, "loss": loss, "recorded": recorded, "difference": loss - recorded},
                          run_id=run_id, step=step, epoch=epoch)

    def __call__(self, packet: HostPacket) -> None:
        if len(packet.indices):
            self._rows(packet)
        if len(packet.steps):
            self._steps(packet)
        if packet.closes_epoch:
            self._close_epoch(packet)

    def _rows(self, packet: HostPacket) -> None:
        rows, indices, steps = packet.rows, packet.indices, packet.row_steps
        if indices.min() < 0:  # a DistributedSampler's padding (index -1): trained, not recorded
            keep = indices >= 0
            rows, indices, steps = rows[keep], indices[keep], steps[keep]
            if not len(indices):
                return
        self._session.samples(sample_chunk(packet.run_id, packet.split, packet.epoch, steps,
                                           indices, rows, packet.classification))
        bad = ~np.isfinite(rows[:, LOSS])
        if bad.any() and self.nonfinite is None:
            self.nonfinite = (int(steps[bad][0]), int(bad.sum()))
        if packet.split == "train":
            if self._live is None or self._live[0] != packet.epoch:
                self._live = (packet.epoch, Reservoir())
            self._live[1].add(rows[:, LOSS])
        self._epoch_sums.setdefault(packet.epoch, ExactSum()).add(rows[:, LOSS])

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
        if self._expected is not None and self._expected[0] in steps:
            self._check_resumed(packet.run_id, packet.epoch, float(means[np.searchsorted(steps, self._expected[0])]))
        self.latest = {"step": last_step, "loss": loss_rows[-1][-1], "lr": float(packet.lrs[-1]),
                       "samples_per_second": rate if rate_rows else self.latest.get("samples_per_second", math.nan)}
        self._bus.publish("progress", {**self.latest, "batch_in_epoch": self._batch_in_epoch()},
                          run_id=packet.run_id, step=last_step, epoch=packet.epoch, persist=False)

    def _close_epoch(self, packet: HostPacket) -> None:
        if packet.split == "train" and self._live is not None and self._live[0] == packet.epoch:
            self._live = None  # the store now has the whole epoch: exact views from here on
        self._session.close_epoch(packet.run_id, packet.split, packet.epoch)
        if self._marks_closed and packet.split == "train":
            self._session.mark_closed(packet.run_id, packet.split, packet.epoch)
        total = self._epoch_sums.pop(packet.epoch, None)
        count = total.count if total is not None else 0
        if total is not None and count:
            mean = total.mean()
            self._epoch_means[packet.epoch] = mean
            self._epoch_counts[packet.epoch] = count
            step = int(self.latest.get("step", 0))
            self._session.metrics([(packet.run_id, "train_loss_epoch", step, packet.epoch, packet.flushed_at, mean)])
            # Announced once the epoch's table is committed: a page that reads it on this event
            # finds it (published from the writer thread).
            announce: Callable[[], object] = functools.partial(
                self._bus.publish, "epoch_summary", {"split": packet.split, "loss": mean, "samples": count},
                run_id=packet.run_id, step=step, epoch=packet.epoch)
            if self._rank_folders and packet.split == "train":
                announce = functools.partial(self._when_ranks_closed, packet, announce)
            self._session.after_written(announce)

    def _when_ranks_closed(self, packet: HostPacket, announce: Callable[[], object]) -> None:
        """Writer thread (rank 0): announce the epoch once every rank has written its rows."""
        missing = self._session.wait_closed(self._rank_folders, packet.run_id, packet.split, packet.epoch)
        if missing:
            ranks = ", ".join(folder.name for folder in missing)
            print(f"onthefly: epoch {packet.epoch}'s rows of {ranks} were not written in time; the epoch is "
                  "announced without them", file=sys.stderr)
        announce()

    def live(self) -> tuple[int, Reservoir] | None:
        """(epoch, reservoir) of the training epoch in progress, None between epochs (any thread:
        one reference read)."""
        return self._live

    # ---- training thread, after SampleRecorder.wait_idle() --------------------------------
    def epoch_loss(self, epoch: int | None) -> float | None:
        """The mean per-sample loss of ``epoch`` (default: the latest; so far, if still open)."""
        open_epochs = [e for e, total in self._epoch_sums.items() if total.count]
        if epoch is None:
            candidates = [*self._epoch_means, *open_epochs]
            if not candidates:
                return None
            epoch = max(candidates)
        total = self._epoch_sums.get(epoch)
        if total is not None and total.count:
            return total.mean()
        return self._epoch_means.get(epoch)

    def epoch_count(self, epoch: int) -> int:
        """How many per-sample losses ``epoch``'s mean is over (so far, if still open)."""
        total = self._epoch_sums.get(epoch)
        return total.count if total is not None and total.count else self._epoch_counts.get(epoch, 0)

    def latest_epoch(self) -> int | None:
        """The newest epoch with losses (open or closed)."""
        epochs = [*self._epoch_means, *(e for e, total in self._epoch_sums.items() if total.count)]
        return max(epochs) if epochs else None

    def sum_so_far(self, epoch: int) -> ExactSum:
        """The exact sum of the open ``epoch``'s losses so far (a checkpoint carries it)."""
        return self._epoch_sums.get(epoch) or ExactSum()

    def resume_epoch(self, epoch: int, total: ExactSum) -> None:
        """Before the first packet: the resumed epoch's sum from before its checkpoint."""
        if total.count:
            self._epoch_sums[epoch] = total


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
