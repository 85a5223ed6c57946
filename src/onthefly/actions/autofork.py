"""Autofork suggestions: when the loss tail stops improving while the rest of the data does, the
engine proposes a fork card with its evidence. It never carries one out unless the user opted in
(``mode="approve"``); by default (``"suggest"``) the card waits, proposed, like any other.

The rule, at the end of each training epoch ``e`` (thresholds in :class:`AutoForkRule`): take the
samples in the loss tail ``patience`` epochs ago (loss above the ``tail_quantile``), and compare
each group's mean loss then and now. If the rest's fell by at least ``min_rest_gain`` (relative)
while the tail's fell by less than ``max_tail_gain``, the tail is a regime the model is not
learning: the tail (as it was) is saved as a slice and a fork card on it is proposed. After a
suggestion the rule waits ``cooldown`` epochs.

Runs on a thread of its own, woken by each epoch's ``epoch_summary`` (published once the epoch's
table is in the store): reading the per-sample table never touches the training thread.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from ..store.columns import numpy_column
from ..store.reader import SessionReader
from ..store.samples import read_samples, release_arrow_memory
from . import fork as forking

__all__ = ["AutoForkRule", "attach"]

Mode = Literal["off", "suggest", "approve"]


@dataclass(frozen=True)
class AutoForkRule:
    tail_quantile: float = 0.9  # the tail: samples above this loss quantile
    patience: int = 3  # epochs the tail is watched over
    min_rest_gain: float = 0.05  # the rest's mean loss fell by at least this fraction...
    max_tail_gain: float = 0.01  # ...while the tail's fell by less than this fraction
    cooldown: int = 5  # epochs between two suggestions
    min_tail: int = 20  # a tail of fewer samples is not worth a fork
    budget: int = 1  # the proposed fork's budget, in epochs
    lr_factor: float = 1.0  # the proposed learning rate: the run's current one times this


def attach(trainer: Any, *, mode: Mode = "suggest", rule: AutoForkRule | None = None) -> Any:
    """Watch ``trainer``'s run and propose fork cards (``mode``: off, suggest, approve). Returns
    the watcher (``.suggestions`` lists the cards it proposed)."""
    if mode not in ("off", "suggest", "approve"):
        raise ValueError(f"autofork must be 'off', 'suggest' or 'approve', got {mode!r}")
    watcher = _Watcher(trainer, mode, rule or AutoForkRule())
    if mode != "off":
        trainer.run.bus.subscribe(watcher.on_event)
        trainer.run.add_close_callback(watcher.close)
    return watcher


class _Watcher:
    """The rule's state and its worker thread (``onthefly-autofork``)."""

    def __init__(self, trainer: Any, mode: Mode, rule: AutoForkRule) -> None:
        self.trainer, self.mode, self.rule = trainer, mode, rule
        self.run = trainer.run
        self.suggestions: list[dict[str, Any]] = []
        self._losses: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (indices, losses), sorted
        self._last: int | None = None
        self._epochs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.suggested = threading.Event()  # set once a card has been proposed (and approved, with opt-in)

    def on_event(self, event: Any) -> None:  # any thread: the bus's publisher
        if (event.kind == "epoch_summary" and event.run_id == self.run.run_id
                and event.payload.get("split") == "train" and event.epoch is not None):
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="onthefly-autofork", daemon=True)
                self._thread.start()
            self._epochs.put(int(event.epoch))

    def close(self) -> None:
        """The run has ended: finish the last epochs' rule, and say of any card approved too late
        for a step boundary to carry it out that it was not."""
        self._epochs.put(None)
        if self._thread is not None:
            self._thread.join(30)
        reader = SessionReader(self.run.session.dir)
        for suggestion in self.suggestions:
            if self.mode == "approve" and reader.plan(suggestion["id"])["status"] == "approved":
                self.run.session.update_plan(suggestion["id"], status="failed",
                                             error="the run ended before a step boundary carried it out; "
                                                   "fork from its final checkpoint instead")

    def _work(self) -> None:
        while (epoch := self._epochs.get()) is not None:
            try:
                self._epoch_ended(epoch)
            except Exception as exc:  # a suggestion is never worth failing training for: say why
                self.error = exc
                self.run.bus.publish("autofork_failed", {"error": f"{type(exc).__name__}: {exc}"},
                                     run_id=self.run.run_id, step=None, epoch=epoch)

    def _epoch_ended(self, epoch: int) -> None:
        table = read_samples(self.run.session.dir, self.run.run_id, epoch=epoch, columns=["index", "loss"])
        indices = numpy_column(table.column("index")).copy()
        losses = numpy_column(table.column("loss")).astype(np.float64)
        del table
        release_arrow_memory()  # in the user's training process
        order = np.argsort(indices, kind="stable")
        self._losses[epoch] = (indices[order], losses[order])
        then = epoch - self.rule.patience
        for old in [e for e in self._losses if e < then]:
            del self._losses[old]
        if then not in self._losses or (self._last is not None and epoch - self._last < self.rule.cooldown):
            return
        evidence = self._evidence(then, epoch)
        if evidence is None:
            return
        self._last = epoch
        self._suggest(then, epoch, evidence)

    def _evidence(self, then: int, now: int) -> dict[str, Any] | None:
        before_ids, before = self._losses[then]
        after_ids, after = self._losses[now]
        common, at_before, at_after = np.intersect1d(before_ids, after_ids, assume_unique=True, return_indices=True)
        finite = np.isfinite(before[at_before]) & np.isfinite(after[at_after])
        if finite.sum() < 2 * self.rule.min_tail:
            return None
        b, a = before[at_before][finite], after[at_after][finite]
        tail = b > np.quantile(b, self.rule.tail_quantile)
        if tail.sum() < self.rule.min_tail or (~tail).sum() == 0:
            return None

        def gain(x: np.ndarray, y: np.ndarray) -> float:
            start = float(x.mean())
            return (start - float(y.mean())) / start if start > 0 else 0.0

        tail_gain, rest_gain = gain(b[tail], a[tail]), gain(b[~tail], a[~tail])
        if not (rest_gain >= self.rule.min_rest_gain and tail_gain < self.rule.max_tail_gain):
            return None
        return {"epochs": [then, now], "tail_samples": int(tail.sum()), "tail_quantile": self.rule.tail_quantile,
                "tail_mean_loss": [float(b[tail].mean()), float(a[tail].mean())],
                "rest_mean_loss": [float(b[~tail].mean()), float(a[~tail].mean())],
                "tail_gain": tail_gain, "rest_gain": rest_gain, "rule": asdict(self.rule),
                "tail_indices": common[finite][tail]}

    def _suggest(self, then: int, now: int, evidence: dict[str, Any]) -> None:
        run = self.run
        name = f"autofork tail e{now}"
        tail = evidence.pop("tail_indices")
        run.session.save_slice(name=name, run_id=run.run_id, epoch=then, split="train",
                               definition={"kind": "quantile_band", "low": self.rule.tail_quantile, "high": 1.0},
                               indices=np.asarray(tail, dtype=np.int64))
        lr = float(self.trainer.optimizer.param_groups[0]["lr"]) * self.rule.lr_factor  # a plain float read
        card = {"kind": "fork", "name": f"specialist e{now}", "run_id": run.run_id, "slice": name,
                "lr": lr, "budget": self.rule.budget, "budget_unit": "epochs", "mix": "oversample"}
        plan = forking.propose(run, card, source="autofork")
        run.session.update_plan(plan["id"], result={"evidence": evidence})
        run.bus.publish("autofork_suggested", {"plan_id": plan["id"], "evidence": evidence, "mode": self.mode},
                        run_id=run.run_id, step=None, epoch=now)
        self.suggestions.append({**plan, "evidence": evidence})
        if self.mode == "approve" and not run.closed:
            forking.approve(run, plan["id"])
        self.suggested.set()
