"""A tracked run: the control points, per-sample recording, checkpoints and metrics.

This is the API for users who keep their own training loop, and the core that
:class:`~onthefly.engine.trainer.Trainer` (and so ``quickstart``) is built on::

    with onthefly.start_run(project="demo", run_name="custom", model=model, optimizer=opt) as run:
        for epoch in run.epochs(3):
            for x, y in run.batches(train_loader):
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                opt.zero_grad()
                losses.mean().backward()
                opt.step()
                run.step(losses, logits=logits, targets=y)

Commands (pause, stop, set_lr, ...) queued from any thread are applied inside ``run.step`` at the
step boundary, and recorded with the step at which they took effect.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError, LossError, OnTheFlyError, StateError
from ..signals.grad_norm import GradNormTracker
from ..signals.per_sample import PerSampleLoss, classification_signals, is_classification
from ..signals.quantiles import Reservoir
from ..signals.recorder import (
    CONFIDENCE,
    GRAD_NORM,
    LABEL,
    LOSS,
    MARGIN,
    PRED,
    ClassSignals,
    Derive,
    HostPacket,
    Indices,
    SampleRecorder,
)
from ..store.checkpoints import read_checkpoint
from ..store.samples import SampleChunk
from ..store.session import SessionStore
from .batch import BatchSpec
from .callbacks import HOOKS, Callback, overrides
from .control import Command, CommandQueue, RunStatus
from .evaluate import evaluate
from .events import Event, EventBus
from .loader import TrackedLoader
from .resume import STATE_FORMAT, Progress, ResumePoint
from .schedules import set_group_lr
from .state import to_cpu

__all__ = ["Run", "start_run"]

# Per-sample values reach the host at least this often (seconds) while training, for live views.
# Each flush has a fixed cost on every thread of the engine (and the GIL they share): 0.5 s read
# 1.032 and 1.043 in benchmarks/step_overhead.py where 1.0 s read 1.012 and 1.021; 0.25 s had
# measured ~0.5 % more background CPU than 0.5 s. One update a second keeps the dashboard live.
FLUSH_SECONDS = 1.0

Evaluator = Callable[[str], "dict[str, float] | None"]


class Run:
    def __init__(
        self,
        *,
        project: str,
        run_name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        device: torch.device | None = None,
        keep_alive: bool | Callable[[], bool] = False,
        wait_for_run: bool = False,
        resume_from: str | Path | None = None,
        session: SessionStore | None = None,
        config: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
        grad_norm: bool = False,
    ) -> None:
        _check_names(project, run_name)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                "Create it from the model: torch.optim.Adam(model.parameters(), lr=1e-3)."
            )
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.device = device or _model_device(model)
        self.keep_alive = keep_alive
        self.project = project
        self.name = run_name
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise ConfigError(f"callbacks must be onthefly.Callback instances, got {type(cb).__name__}")
        self.callbacks = list(callbacks)
        self._hooks = {hook: [cb for cb in self.callbacks if overrides(cb, hook)] for hook in HOOKS}

        checkpoint = None
        if resume_from is not None:
            checkpoint = read_checkpoint(Path(resume_from))  # before the session clean-up runs
        self._owns_session = session is None
        self.session = session or SessionStore(
            project, keep=[Path(resume_from)] if resume_from is not None else []
        )
        self.bus = EventBus(seq_source=self.session.next_seq)
        self.bus.subscribe(self._persist)
        self.session.overflow_listener = lambda dropped: self.bus.publish(
            "store_overflow", {"dropped_records": dropped, "reason": "store queue full (disk too slow)"},
            **self._where())
        self.commands = CommandQueue()
        # Per-sample gradient norms (optional): hooks on the model's Linear layers, none when off.
        self.grad_norms = GradNormTracker(model) if grad_norm else None
        self.config = {**(config or {}), "grad_norm": self.grad_norms.method if self.grad_norms else None}
        self.run_id = self.session.new_run(run_name, config=self.config)
        self.recorder = SampleRecorder(self.device, self._on_packet)

        self.status = RunStatus.CREATED
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.target_epochs = 0
        self.latest: dict[str, float] = {}
        self.last_eval: dict[str, dict[str, float]] = {}
        self.evaluator: Evaluator | None = None
        self.on_close: list[Callable[[], None]] = []  # called once the run is closed
        self.eval_splits: set[str] = set()  # splits the evaluator can run ("val", "test")
        # Commands carried out outside the engine (e.g. "cluster", by onthefly.actions), applied at
        # a step boundary like any other: kind -> handler(args) -> result for the event log.
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {}
        # embed(indices, layer) -> (layer, features): the model's view of training samples, for
        # clustering; set by Trainer, which knows how a batch feeds the model.
        self.embed: Callable[[np.ndarray, str | None], tuple[str, np.ndarray]] | None = None
        self.train_dataset: Any = None  # the dataset of the loader last trained on
        self.batches_per_epoch: int | None = None
        self._wait_for_run = wait_for_run
        self._stop = False
        self._indices: Indices | None = None
        self._first_step = True
        self._classification: bool | None = None
        self._last_flush = time.perf_counter()
        self.resume = ResumePoint()
        self._tracked: TrackedLoader | None = None  # the loader of the epoch in progress (or last)
        # The epoch's batches are exhausted and (for the loop that owns the epoch) its end is done:
        # a checkpoint now continues with the next epoch.
        self._epoch_done = False
        self._in_batches = False  # inside run.batches(): steps get their indices from it
        self._samples_resumed = 0  # samples of the resumed epoch trained before its checkpoint
        self._loose_epoch: int | None = None  # epoch recorded from step(indices=...) outside batches()
        self._nonfinite: tuple[int, int] | None = None
        self._reported_drops = 0
        # Per-sample training losses of each open epoch (transfer thread), and the exact mean of
        # each closed one: math.fsum is correctly rounded whatever the order or the chunks, so the
        # mean does not depend on when flushes happened (nor on a resume in the middle).
        self._epoch_losses: dict[int, list[np.ndarray]] = {}
        self._epoch_means: dict[int, float] = {}
        # A uniform sample of the epoch in progress's per-sample losses: live, approximate views.
        self._live: tuple[int, Reservoir] | None = None
        self._trackers: dict[int, TrackedLoader] = {}
        self._closed = False
        self._started = time.time()
        if checkpoint is not None:
            try:
                self._restore(*checkpoint, source=Path(resume_from))  # type: ignore[arg-type]
            except BaseException as exc:
                self.close(exc)  # the session records why, and is not left looking "running"
                raise
        self.bus.publish("run_created", {"name": run_name, "project": project,
                                         "session": str(self.session.dir)}, **self._where())

    # ---- the loop ----------------------------------------------------------------------
    def epochs(self, max_epochs: int, *, on_plan_end: Callable[[], object] | None = None) -> Iterator[int]:
        """Yield epoch numbers until ``max_epochs`` have been trained (counting from the start,
        resumed epochs included), a ``stop`` command arrives, or - with ``keep_alive`` - forever
        while ``train_more`` commands extend the plan."""
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 0:
            raise ConfigError(f"max_epochs must be a whole number >= 0, got {max_epochs!r}")
        self.target_epochs = max_epochs
        if self._wait_for_run and not self._await_run():
            return
        self._set_status(RunStatus.RUNNING)
        while True:
            while self.epoch < self.target_epochs and not self._stop:
                yield self.epoch
                self._end_loose_epoch()
                if self._stop:
                    break
                self.epoch += 1
                self.batch_in_epoch = 0
                self._epoch_done = False
                self._control()
            if self._stop:
                return
            # Planned training is done: wait for the last per-sample values (once, not per step)
            # so a non-finite loss in a run shorter than a flush interval still fails it.
            self.recorder.wait_idle()
            self._check_health()
            if on_plan_end is not None:
                on_plan_end()
            keep_alive = self.keep_alive() if callable(self.keep_alive) else self.keep_alive
            if not keep_alive or not self._idle():
                return

    def batches(self, loader: DataLoader | TrackedLoader, *, ends_epoch: bool = True) -> Iterator[Any]:
        """Iterate one epoch of ``loader``, recording the dataset indices of every batch.

        Once every batch is consumed the epoch counts as ended: a checkpoint saved after the inner
        loop resumes at the next epoch (step an epoch scheduler before saving one). A loop with
        more to do at its epoch end passes ``ends_epoch=False`` and calls :meth:`end_epoch` when
        that is done (``Trainer`` does, after validation and its scheduler step)."""
        if isinstance(loader, TrackedLoader):
            tracked = loader
        else:
            tracked = self._trackers.get(id(loader)) or TrackedLoader(loader)
            self._trackers[id(loader)] = tracked
        resuming = self.resume.skip
        iterator = self.resume.begin(tracked)
        self.resume.skip = 0
        if not resuming:
            self.batch_in_epoch = 0
        self._tracked = tracked
        self._note_sample_ids(tracked)
        self.train_dataset = tracked.original.dataset
        self.batches_per_epoch = tracked.length
        self.recorder.begin_epoch(self.run_id, "train", self.epoch, first_position=self._samples_resumed)
        self._samples_resumed = 0
        if self.resume.skipped_by_loading:
            self.bus.publish("resume_fast_forward", {
                "batches": self.resume.skipped_by_loading,
                "reason": "an IterableDataset without state_dict() is resumed by loading and discarding "
                          "the batches trained before the checkpoint"}, **self._where())
            self.resume.skipped_by_loading = 0
        self.bus.publish("epoch_started", {"batches": tracked.length}, **self._where())
        self.fire("on_epoch_start")
        self._in_batches = True
        try:
            for batch, indices in iterator:
                self._indices = indices
                self.batch_in_epoch += 1
                yield batch
                if self._stop:
                    self.recorder.flush()
                    return
        finally:
            self._in_batches = False
        self.recorder.end_epoch()
        self.resume.end()
        self._epoch_done = ends_epoch

    def _note_sample_ids(self, tracked: TrackedLoader) -> None:
        """Say in the run's config what a recorded index is (once the loader is known)."""
        sample_ids = "position" if tracked.iterable else "index"
        if self.config.get("sample_ids") != sample_ids:
            self.config["sample_ids"] = sample_ids
            self.session.set_run_config(self.run_id, self.config)

    def _end_loose_epoch(self) -> None:
        if self._loose_epoch is not None:
            self.recorder.end_epoch()
            self._loose_epoch = None

    def end_epoch(self) -> None:
        """Say that the epoch's end (validation, scheduler step) is done, for a loop that iterated
        ``batches(loader, ends_epoch=False)``: a checkpoint from now on resumes at the next epoch."""
        self._epoch_done = True

    def step(
        self, per_sample_loss: torch.Tensor, *, loss: torch.Tensor | None = None, logits: Any = None,
        targets: Any = None, boundary: bool = True, lr: float | None = None,
        grad_norm_factor: float | torch.Tensor | None = None, indices: Any = None,
    ) -> None:
        """Record one batch's per-sample losses, then (at an optimizer-step ``boundary``) apply
        pending commands. ``logits``/``targets`` add margin, prediction and correctness for
        classification. Call it after ``optimizer.step()``; ``lr`` is the learning rate the step
        used (default: the optimizer's current one, which a per-step scheduler has already moved).
        With ``grad_norm=True``, ``grad_norm_factor`` is what the loss you backpropagated was
        multiplied by relative to the sum of per-sample losses (default 1/batch: a mean).
        ``indices`` are the batch's dataset indices, for a loop that does not iterate
        ``run.batches(loader)`` (which records them itself)."""
        indices = self._take_indices(indices)
        if self._first_step:
            self._check_first_step(per_sample_loss, indices, logits, targets)
        elif per_sample_loss.ndim != 1 or (indices is not None and len(indices) != per_sample_loss.shape[0]):
            # Shapes are host metadata: this check costs no sync.
            raise LossError(
                f"step() got per-sample losses of shape {tuple(per_sample_loss.shape)} for a batch of "
                f"{'?' if indices is None else len(indices)} samples; pass one loss per sample "
                "(a 1-D tensor, reduction='none')."
            )
        if loss is not None and (not isinstance(loss, torch.Tensor) or loss.numel() != 1):
            raise LossError(  # numel is host metadata: no sync
                f"step(loss=...) must be the scalar loss you backpropagated, got "
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}."
            )
        per = per_sample_loss.detach()
        if lr is None:
            lr = self.optimizer.param_groups[0]["lr"]
        signals = classification_signals(logits, targets) if self._classification else None
        self.recorder.record(self.global_step + 1, indices, per, per.mean() if loss is None else loss, lr,
                             signals, targets if signals is not None else None,
                             self._take_grad_norms(per.shape[0], grad_norm_factor))
        self._end_of_step(boundary)

    def step_outputs(self, outputs: torch.Tensor, targets: torch.Tensor, per_sample_loss: PerSampleLoss,
                     *, loss: torch.Tensor, boundary: bool = True, lr: float | None = None,
                     grad_norm_factor: float | torch.Tensor | None = None) -> None:
        """Like :meth:`step`, for a loss computed row by row (``per_sample_loss.deferrable``): only
        the outputs and targets are copied now; per-sample loss, margin and prediction are derived
        for thousands of rows at once when the recorder flushes (the fast path Trainer uses)."""
        indices = self._take_indices(None)
        if self._first_step:
            batch = outputs.shape[0]
            per = per_sample_loss.per_sample(outputs, targets, batch)
            self._check_first_step(per, indices, outputs, targets)
            self.recorder.derive = _derive(per_sample_loss, bool(self._classification))
        elif indices is not None and (outputs.shape[0] != len(indices) or targets.shape[0] != len(indices)):
            raise DataError(  # shapes are host metadata: no sync
                f"a batch of {len(indices)} sampled indices gave {outputs.shape[0]} outputs and "
                f"{targets.shape[0]} targets; a collate_fn must keep every sample of its batch."
            )
        self.recorder.record_outputs(self.global_step + 1, indices, outputs, targets, loss,
                                     self.optimizer.param_groups[0]["lr"] if lr is None else lr,
                                     self._take_grad_norms(outputs.shape[0], grad_norm_factor))
        self._end_of_step(boundary)

    def _take_indices(self, given: Any) -> Indices | None:
        """The batch's dataset indices: from run.batches(), or given to step()."""
        indices, self._indices = self._indices, None
        if given is not None:
            if isinstance(given, torch.Tensor) and given.device.type != "cpu":
                raise DataError("step(indices=...) must be a CPU tensor, array or list (dataset indices are "
                                "host values; reading a device tensor would wait for the device every step)")
            if not self._in_batches and self._loose_epoch != self.epoch:
                # A loop of its own: the epoch's rows begin with its first step, end with the epoch.
                self._end_loose_epoch()
                self.recorder.begin_epoch(self.run_id, "train", self.epoch)
                self._loose_epoch = self.epoch
            array = given.numpy() if isinstance(given, torch.Tensor) else given
            return np.array(array, dtype=np.int64).reshape(-1)  # a copy: the caller may reuse its buffer
        if indices is None and not self._in_batches:
            raise DataError(
                "step() was called outside run.batches(loader), so On The Fly does not know which samples "
                "the batch holds and would record nothing. Iterate `for batch in run.batches(loader):` "
                "instead of the loader itself, or pass the batch's dataset indices: "
                "run.step(losses, indices=idx)."
            )
        return indices

    def _take_grad_norms(self, batch: int, factor: float | torch.Tensor | None) -> torch.Tensor | None:
        if self.grad_norms is None:
            return None
        norms = self.grad_norms.take(1.0 / batch if factor is None else factor)
        return norms if norms is not None and norms.shape == (batch,) else None

    def _end_of_step(self, boundary: bool) -> None:
        if not boundary:
            return
        self.global_step += 1
        now = time.perf_counter()
        if now - self._last_flush > FLUSH_SECONDS:  # a clock read, no device sync
            self._last_flush = now
            self.recorder.flush()
            self._check_health()
        if self.commands.pending:
            self._control()
        for callback in self._hooks["on_step_end"]:
            callback.on_step_end(self)

    def step_boundary(self) -> None:
        """An optimizer step after micro-batches recorded with ``step(..., boundary=False)``, when
        the last of them could not know it was the last (an unsized loader's end)."""
        self._end_of_step(True)

    def fire(self, hook: str) -> None:
        """Call ``hook`` on every callback that overrides it."""
        for callback in self._hooks[hook]:
            getattr(callback, hook)(self)

    # ---- evaluation and metrics ----------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float] | None:
        """Evaluate with the registered evaluator ("val", "test"); logs metrics and an event."""
        if self.evaluator is None:
            return None
        result = self.evaluator(split)
        if result is None:
            return None
        self.last_eval[split] = result
        now = time.time()
        self.session.metrics([
            (self.run_id, f"{split}_{name}", self.global_step, self.epoch, now, value)
            for name, value in result.items() if name != "samples"
        ])
        self.bus.publish("eval", {"split": split, **result}, **self._where())
        return result

    def record_rows_for(self, split: str) -> Callable[[np.ndarray, np.ndarray, bool], None]:
        """A sink for an evaluation's per-sample rows: stored as ``split`` at the current epoch."""
        def store(indices: np.ndarray, rows: np.ndarray, classification: bool) -> None:
            steps = np.full(len(indices), self.global_step, dtype=np.int64)
            self.session.samples(_chunk(self.run_id, split, self.epoch, steps, indices, rows, classification))
            self.session.close_epoch(self.run_id, split, self.epoch)
            self.bus.publish("epoch_summary", {"split": split, "loss": float(np.nanmean(rows[:, LOSS])),
                                               "samples": len(indices)}, **self._where())

        return store

    def log_metric(self, name: str, value: float, *, step: int | None = None) -> None:
        """Log a scalar of your own (host value) at ``step`` (default: the current step)."""
        self.session.metrics([(self.run_id, name, self.global_step if step is None else step,
                               self.epoch, time.time(), float(value))])

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path | None = None, *, reason: str = "manual") -> Path:
        """Save everything needed to continue exactly from here. Call at a step boundary."""
        model_tensors = {k: v.detach().to("cpu", copy=True).contiguous()
                         for k, v in self.model.state_dict().items()}
        progress = self._progress()
        if progress.batch_in_epoch:
            # The epoch's per-sample losses so far, for its exact mean after a resume.
            self.recorder.wait_idle()
            parts = self._epoch_losses.get(self.epoch, [])
            losses = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0)
        else:
            losses = torch.empty(0)
        state = {
            "format": STATE_FORMAT,
            "run": {"project": self.project, "name": self.name},
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": to_cpu(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else None,
            **self.resume.state(self._tracked, progress),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "progress": progress.as_dict(),
            "epoch_losses": losses,
        }
        _, folder = self.session.checkpoint(
            self.run_id, step=self.global_step, epoch=progress.epoch, batch_in_epoch=progress.batch_in_epoch,
            model_tensors=model_tensors, state=state, reason=reason,
            folder=Path(path) if path is not None else None,
        )
        self.bus.publish("checkpoint", {"path": str(folder), "reason": reason}, **self._where())
        return folder

    def _progress(self) -> Progress:
        if self._epoch_done:  # the epoch is over: what follows is the next one's start
            return Progress(self.epoch + 1, 0, self.global_step, self.target_epochs)
        samples = self.recorder.position_in_epoch if self.batch_in_epoch else 0
        return Progress(self.epoch, self.batch_in_epoch, self.global_step, self.target_epochs, samples)

    def _restore(self, model_tensors: dict[str, torch.Tensor], state: dict[str, Any], source: Path) -> None:
        try:
            self.model.load_state_dict(model_tensors)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise StateError(
                f"the checkpoint {source} does not fit this model/optimizer: {exc}"
            ) from exc
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
        progress = Progress(**state["progress"])
        self.epoch = progress.epoch
        self.batch_in_epoch = progress.batch_in_epoch
        self.global_step = progress.global_step
        self._samples_resumed = progress.samples_in_epoch
        losses = state.get("epoch_losses")
        if progress.batch_in_epoch and losses is not None and len(losses):
            self._epoch_losses[progress.epoch] = [losses.numpy().astype(np.float32)]
        self.resume.restore(state, progress)
        self.bus.publish("resumed_from_checkpoint", {"path": str(source), **progress.as_dict()},
                         **self._where())

    # ---- control ---------------------------------------------------------------------------
    def _control(self) -> None:
        """Apply queued commands; while paused, wait here for more."""
        for command in self.commands.drain():
            self._apply(command)
        while self.status == RunStatus.PAUSED and not self._stop:
            for command in self.commands.wait():
                self._apply(command)

    def _apply(self, command: Command) -> None:
        kind, args = command.kind, command.args
        status = self.status
        rejected: str | None = None
        result: dict[str, Any] | None = None
        if kind == "pause":
            if status == RunStatus.RUNNING:
                self.recorder.flush()
                self._set_status(RunStatus.PAUSED)
            else:
                rejected = f"cannot pause while {status}"
        elif kind in ("resume", "run"):
            if status in (RunStatus.PAUSED, RunStatus.CREATED):
                self._set_status(RunStatus.RUNNING)
            else:
                rejected = f"cannot {kind} while {status}"
        elif kind == "stop":
            self._stop = True
        elif kind == "test":
            try:
                if self.evaluate("test") is None:  # no evaluator, or one without a test loader
                    rejected = "no test_loader was given"
            except Exception as exc:  # a broken test loader must not end hours of training
                rejected = f"the test failed: {type(exc).__name__}: {exc}"
        elif kind == "train_more":
            self.target_epochs = max(self.target_epochs, self.epoch) + args["epochs"]
        elif kind == "set_lr":  # rescales the scheduler's schedule, so that the change holds
            rejected = set_group_lr(self.optimizer, self.scheduler, args["lr"], args["group"])
        elif kind == "set_weight_decay":
            rejected = self._set_group_value("weight_decay", args["weight_decay"], args["group"])
        elif kind == "checkpoint":
            try:
                self.save_checkpoint(args["path"], reason="command")
            except (OnTheFlyError, OSError) as exc:  # e.g. a full disk: say so, keep training
                rejected = f"the checkpoint failed: {exc}"
        elif kind in self.handlers:
            try:
                result = self.handlers[kind](args)
            except Exception as exc:  # an action that fails must not end the training
                rejected = f"{kind} failed: {exc}"
        else:
            rejected = f"this run has no handler for {kind!r}"
        payload = {"id": command.id, "command": kind, "args": args}
        if result is not None:
            payload["result"] = result
        if rejected is not None:
            self.bus.publish("command_rejected", {**payload, "reason": rejected}, **self._where())
        else:
            self.bus.publish("command_applied", payload, **self._where())

    def _set_group_value(self, key: str, value: float, group: int | None) -> str | None:
        groups = self.optimizer.param_groups
        if group is not None and group >= len(groups):
            return f"the optimizer has {len(groups)} parameter group(s); there is no group {group}"
        if key not in groups[0]:
            return f"this optimizer ({type(self.optimizer).__name__}) has no {key!r} setting"
        for g in [groups[group]] if group is not None else groups:
            g[key] = value
        return None

    def _await_run(self) -> bool:
        """Wait in CREATED until a 'run' command (or 'stop')."""
        self.bus.publish("waiting", {"for": "run"}, **self._where())
        while not self._stop and self.status == RunStatus.CREATED:
            for command in self.commands.wait():
                self._apply(command)
        return not self._stop

    def _idle(self) -> bool:
        """Planned training is done: wait for commands. True when more epochs were asked for."""
        self.recorder.flush()
        self._set_status(RunStatus.IDLE)
        while not self._stop:
            for command in self.commands.wait():
                if command.kind in ("pause", "resume", "run"):
                    self.bus.publish("command_rejected", {
                        "id": command.id, "command": command.kind, "args": command.args,
                        "reason": "training has finished; use train_more to train further"},
                        **self._where())
                    continue
                self._apply(command)
            if self.epoch < self.target_epochs and not self._stop:
                self._set_status(RunStatus.RUNNING)
                return True
        return False

    def possible_commands(self) -> list[str]:
        """The commands that make sense in the current state (what a dashboard enables)."""
        if self._closed or self._stop:
            return []
        settings = ["set_lr", "set_weight_decay", "checkpoint"]
        test = ["test"] if "test" in self.eval_splits else []
        by_status = {
            RunStatus.CREATED: ["run", "stop"],
            RunStatus.RUNNING: ["pause", "stop", "train_more"],
            RunStatus.PAUSED: ["resume", "stop", "train_more"],
            RunStatus.IDLE: ["train_more", "stop"],
        }
        if self.status not in by_status:
            return []
        actions = sorted(self.handlers) if self.status != RunStatus.CREATED else []
        return by_status[self.status] + test + settings + actions

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, kind: str, **args: Any) -> Command:
        """Queue a command (thread-safe); it takes effect at the next step boundary."""
        return self.commands.put(kind, **args)

    # ---- signals arriving on the host (transfer thread) -------------------------------------
    def _on_packet(self, packet: HostPacket) -> None:
        if len(packet.indices):
            rows = packet.rows
            self.session.samples(_chunk(packet.run_id, packet.split, packet.epoch, packet.row_steps,
                                        packet.indices, rows, packet.classification))
            bad = ~np.isfinite(rows[:, LOSS])
            if bad.any() and self._nonfinite is None:
                self._nonfinite = (int(packet.row_steps[bad][0]), int(bad.sum()))
            if packet.split == "train":
                if self._live is None or self._live[0] != packet.epoch:
                    self._live = (packet.epoch, Reservoir())
                self._live[1].add(rows[:, LOSS])
            self._epoch_losses.setdefault(packet.epoch, []).append(rows[:, LOSS].copy())
        if len(packet.steps):
            steps, first = np.unique(packet.steps, return_index=True)
            sums_per_step = np.bincount(np.searchsorted(steps, packet.steps), weights=packet.step_losses)
            counts = np.bincount(np.searchsorted(steps, packet.steps))
            now = packet.flushed_at
            loss_rows = [(packet.run_id, "train_loss", int(s), packet.epoch, now, float(v))
                         for s, v in zip(steps, sums_per_step / counts, strict=True)]
            lr_rows = [(packet.run_id, "lr", int(s), packet.epoch, now, float(packet.lrs[i]))
                       for s, i in zip(steps, first, strict=True)]
            last_step = int(steps[-1])
            rate = packet.samples_per_second
            rate_rows = [(packet.run_id, "throughput", last_step, packet.epoch, now, rate)] if math.isfinite(rate) else []
            self.session.metrics([*loss_rows, *lr_rows, *rate_rows])
            self.latest = {"step": last_step, "loss": loss_rows[-1][-1], "lr": float(packet.lrs[-1]),
                           "samples_per_second": rate if rate_rows else self.latest.get("samples_per_second",
                                                                                         math.nan)}
            self.bus.publish("progress", {**self.latest, "batch_in_epoch": self.batch_in_epoch},
                             run_id=packet.run_id, step=last_step, epoch=packet.epoch, persist=False)
        if packet.closes_epoch:
            if packet.split == "train" and self._live is not None and self._live[0] == packet.epoch:
                self._live = None  # the store now has the whole epoch: exact views from here on
            self.session.close_epoch(packet.run_id, packet.split, packet.epoch)
            parts = self._epoch_losses.pop(packet.epoch, [])
            count = sum(len(part) for part in parts)
            if count:
                mean = _exact_mean(parts)
                self._epoch_means[packet.epoch] = mean
                self.session.metrics([(packet.run_id, "train_loss_epoch", int(self.latest.get("step", 0)),
                                       packet.epoch, packet.flushed_at, mean)])
                self.bus.publish("epoch_summary", {"split": packet.split, "loss": mean, "samples": count},
                                 run_id=packet.run_id, step=int(self.latest.get("step", 0)),
                                 epoch=packet.epoch)

    def epoch_loss(self, epoch: int | None = None) -> float | None:
        """The mean per-sample training loss of ``epoch`` (default: the last one trained; so far,
        for an epoch still open). Waits until the epoch's rows have reached the host (the
        transfer thread's work, not the disk's); call it at an epoch end, not every step."""
        self.recorder.wait_idle()
        open_epochs = [e for e, parts in self._epoch_losses.items() if parts]
        if epoch is None:
            candidates = [*self._epoch_means, *open_epochs]
            if not candidates:
                return None
            epoch = max(candidates)
        if self._epoch_losses.get(epoch):
            return _exact_mean(self._epoch_losses[epoch])
        return self._epoch_means.get(epoch)

    def live_losses(self) -> tuple[int, Reservoir] | None:
        """(epoch, reservoir) of the training epoch in progress, None between epochs."""
        return self._live

    def _check_health(self) -> None:
        if self._nonfinite is not None:
            step, count = self._nonfinite
            raise LossError(
                f"the loss became non-finite (NaN or inf) for {count} sample(s) at step {step}. "
                "Lower the learning rate, clip gradients (grad_clip=1.0), or check the data for "
                "NaN/inf values; the session keeps everything up to this point."
            )
        dropped = self.recorder.dropped_packets
        if dropped > self._reported_drops:
            self.bus.publish("samples_dropped", {
                "packets": dropped - self._reported_drops,
                "reason": "the per-sample transfer queue was full (the host side is too slow)"},
                **self._where())
            self._reported_drops = dropped
        if self.recorder.error is not None:
            raise RuntimeError(f"per-sample transfer failed: {self.recorder.error}") from self.recorder.error

    def _check_first_step(self, per: torch.Tensor, indices: Indices | None, logits: Any, targets: Any) -> None:
        self._first_step = False
        if not isinstance(per, torch.Tensor) or per.ndim != 1:
            shape = tuple(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__
            raise LossError(
                f"step() needs one loss per sample (a 1-D tensor), got {shape}. Compute the loss with "
                "reduction='none', e.g. F.cross_entropy(logits, y, reduction='none')."
            )
        if indices is not None and len(indices) == 1 and per.shape[0] > 1:
            raise DataError(
                f"the DataLoader drew one dataset index for a batch of {per.shape[0]} samples: with "
                "batch_size=None (automatic batching off) each index must give one sample, so On The Fly "
                "cannot tell which samples a batch returned whole by the dataset holds. Let the DataLoader "
                "batch (batch_size=... or batch_sampler=...); a dataset can fetch a whole batch of indices "
                "at once with __getitems__."
            )
        if indices is not None and len(indices) != per.shape[0]:
            raise LossError(
                f"step() got {per.shape[0]} per-sample losses for a batch of {len(indices)} samples; "
                "pass one loss per sample (reduction='none')."
            )
        self._classification = logits is not None and is_classification(logits, targets)
        # One deliberate host sync, on the first step only: fail now, not an hour later.
        if not bool(torch.isfinite(per).all()):
            raise LossError(
                "the loss is not finite (NaN or inf) at the very first step. Check the data for "
                "NaN/inf values and the model's initialisation, and lower the learning rate."
            )

    # ---- status, events, life cycle ------------------------------------------------------
    def _where(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "step": self.global_step, "epoch": self.epoch}

    def _set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.session.set_run_status(self.run_id, status)
            self.bus.publish("status", {"status": status}, **self._where())

    def _persist(self, event: Event) -> None:
        if event.persist:
            self.session.event(event.seq, event.run_id, event.step, event.epoch, event.kind,
                               event.payload, event.time)

    @property
    def stopping(self) -> bool:
        return self._stop

    def close(self, error: BaseException | None = None) -> None:
        """Flush everything and mark the run finished (or failed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._end_loose_epoch()
            self.recorder.close()
        if error is not None:
            status = RunStatus.FAILED
            self.bus.publish("error", {"type": type(error).__name__, "message": str(error)}, **self._where())
        else:
            status = RunStatus.STOPPED if self._stop else RunStatus.FINISHED
        self._set_status(status)
        self.bus.publish("run_finished", {"status": status, "seconds": time.time() - self._started,
                                          "steps": self.global_step}, **self._where())
        if self._owns_session:
            self.session.close(status, None if error is None else f"{type(error).__name__}: {error}")
        else:
            self.session.flush()
        for callback in self.on_close:
            callback()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(exc)


def start_run(
    *,
    project: str,
    run_name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    val_loader: DataLoader | None = None,
    test_loader: DataLoader | None = None,
    inputs: Any = None,
    targets: Any = None,
    forward_fn: Any = None,
    **options: Any,
) -> Run:
    """Start a tracked run for a training loop you write yourself (see the module docstring).

    With ``loss_fn`` and a ``val_loader``/``test_loader``, ``run.evaluate("val")`` and the
    "test" command work as in ``quickstart``. Other ``options`` are :class:`Run`'s.
    """
    run = Run(project=project, run_name=run_name, model=model, optimizer=optimizer, **options)
    if loss_fn is not None:
        per_sample = PerSampleLoss(loss_fn)
        spec = BatchSpec(inputs, targets, forward_fn)
        loaders = {"val": val_loader, "test": test_loader}

        def evaluator(split: str) -> dict[str, float] | None:
            loader = loaders.get(split)
            if loader is None:
                return None
            return evaluate(model, loader, per_sample, spec, run.device, contextlib.nullcontext)

        run.evaluator = evaluator
        run.eval_splits = {split for split, loader in loaders.items() if loader is not None}
    return run


def _exact_mean(parts: list[np.ndarray]) -> float:
    """The correctly rounded mean of float32 values, whatever their order and chunking."""
    values = np.concatenate(parts) if len(parts) != 1 else parts[0]
    return math.fsum(values.astype(np.float64).tolist()) / len(values)


def _chunk(run_id: int, split: str, epoch: int, steps: np.ndarray, indices: np.ndarray, rows: np.ndarray,
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


def _derive(per_sample_loss: PerSampleLoss, classification: bool) -> Derive:
    def derive(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ClassSignals | None]:
        per = per_sample_loss.per_sample(outputs, targets, outputs.shape[0])
        return per, classification_signals(outputs, targets) if classification else None

    return derive


def _check_names(project: Any, run_name: Any) -> None:
    for label, value in (("project", project), ("run_name", run_name)):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{label} must be a non-empty string, got {value!r}")


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
