"""A tracked run: the control points of a training loop, and the parts that serve them.

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

``Run`` is a facade over parts a newcomer can find by name:

* :mod:`.controller` - commands: one transition table that applies them and says which are possible;
* :mod:`.resume` - the resume point: checkpoint state, the epoch-start RNG, the skip on resume;
* :mod:`onthefly.signals.recorder` - per-sample values kept on the device, handed over in batches;
* :mod:`.transfer` - the sink that owns everything running on the transfer thread;
* :mod:`.checks` - what is checked at the first step and at every step;
* :mod:`.evaluate` - validation and test.

Everything here runs on the training thread except :meth:`Run.request` and the read-only
properties, which any thread may call. Commands queued from any thread are applied inside
``run.step`` at the step boundary, and recorded with the step at which they took effect.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError, OnTheFlyError, StateError
from ..signals.grad_norm import GradNormTracker
from ..signals.per_sample import PerSampleLoss, classification_signals, cross_entropy_signals
from ..signals.quantiles import Reservoir
from ..signals.recorder import LOSS, ClassSignals, Derive, Indices, SampleRecorder
from ..store.checkpoints import read_checkpoint
from ..store.session import SessionStore
from ..store.sources import ResumeSource, resume_source
from .batch import logits_of
from .callbacks import HOOKS, Callback, overrides
from .checks import check_first_step, check_step_shapes, non_finite_error
from .control import Command, CommandQueue, RunStatus
from .controller import CommandController, Effect
from .device import model_device
from .distributed import distributed_loader, set_epoch, world
from .evaluate import Evaluator, SampleRows
from .events import Event, EventBus
from .loader import TrackedLoader
from .resume import STATE_FORMAT, Progress, ResumePoint, TrainingObjects
from .schedules import set_group_lr
from .transfer import ExactSum, TransferSink, sample_chunk

__all__ = ["Embed", "Run", "host_lr"]

# Per-sample values reach the host at least this often (seconds) while training, for live views.
# Each flush has a fixed cost on every thread of the engine (and the GIL they share): 0.5 s read
# 1.032 and 1.043 in benchmarks/step_overhead.py where 1.0 s read 1.012 and 1.021; 0.25 s had
# measured ~0.5 % more background CPU than 0.5 s. One update a second keeps the dashboard live.
FLUSH_SECONDS = 1.0

# A checkpoint as read: the model's tensors and the rest of its state.
Checkpoint = tuple[dict[str, torch.Tensor], dict[str, Any]]

# embed(indices, layer) -> (layer, features): the model's view of training samples, for clustering.
Embed = Callable[[np.ndarray, "str | None"], "tuple[str, np.ndarray]"]


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
        evaluator: Evaluator | None = None,
        embed: Embed | None = None,
        train_dataset: Any = None,
        export_dataset: Any = None,
        parent: tuple[int, int | None] | None = None,
        tensorboard_dir: str | Path | None = None,
    ) -> None:
        _check_names(project, run_name)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. "
                "Create it from the model: torch.optim.Adam(model.parameters(), lr=1e-3)."
            )
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise ConfigError(f"callbacks must be onthefly.Callback instances, got {type(cb).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.device = device or model_device(model)
        self.keep_alive = keep_alive
        self.project = project
        self.name = run_name
        self.callbacks = list(callbacks)
        self._hooks = {hook: [cb for cb in self.callbacks if overrides(cb, hook)] for hook in HOOKS}
        self.evaluator = evaluator
        self.embed = embed  # set by Trainer, which knows how a batch feeds the model
        self.train_dataset = train_dataset  # the dataset trained on (updated by batches())
        # What a slice export reads the samples' data from (a view without augmentation, or the
        # map-style twin of an IterableDataset); None: the training dataset.
        self.export_dataset = export_dataset

        # Under torchrun: rank 0 owns the session; every other rank records into its own inside it.
        self.world = world()
        self.grad_norms: GradNormTracker | None = None
        if self.world is not None and self.world.rank > 0:
            source, checkpoint, continued = self._open_rank_session(project, run_name, resume_from, session, config,
                                                                    grad_norm)
        else:
            source, checkpoint, continued = self._open_session(project, run_name, resume_from, session, config,
                                                               grad_norm, parent)

        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.target_epochs = 0
        self.batches_per_epoch: int | None = None
        self.last_eval: dict[str, dict[str, float]] = {}
        self.started = time.time()
        self._on_close: list[Callable[[], None]] = []
        self._on_closing: list[Callable[[], None]] = []
        self.controller = CommandController(self._effects(), can=self._can, on_status=self._status_changed,
                                            publish=lambda kind, payload: self.bus.publish(kind, payload,
                                                                                           **self._where()))
        if self.world is not None:
            self.controller.sync = self.world.commands  # one small broadcast every few step boundaries
        self.sink = TransferSink(self.session, self.bus, lambda: self.batch_in_epoch, **self._rank_closing())
        self.recorder = SampleRecorder(self.device, self.sink)
        self.resume = ResumePoint()
        self._objects = TrainingObjects(model, optimizer, scheduler, scaler, self.callbacks)
        self._wait_for_run = wait_for_run
        self._indices: Indices | None = None  # the batch being trained, from batches()
        self._first_step = True
        self._classification = False
        self._last_flush = time.perf_counter()
        self._trackers: dict[int, TrackedLoader] = {}
        self._tracked: TrackedLoader | None = None  # the loader of the epoch in progress (or last)
        # The epoch's batches are exhausted and (for the loop that owns the epoch) its end is done:
        # a checkpoint now continues with the next epoch.
        self._epoch_done = False
        self._in_batches = False  # inside run.batches(): steps get their indices from it
        self._samples_resumed = 0  # samples of the resumed epoch trained before its checkpoint
        self._loose_epoch: int | None = None  # epoch recorded from step(indices=...) outside batches()
        self._reported_drops = 0
        self._closed = False
        self._checkpoint_at: tuple[int, int] | None = None  # (step, id) of the newest checkpoint saved
        # The newest checkpoint this run saved or resumed from, and its step (the determinism check
        # replays from it).
        self.last_checkpoint: tuple[int, Path] | None = None
        if checkpoint is not None:
            assert source is not None
            try:
                self._restore(*checkpoint, source=source)
                self.fire("on_load_checkpoint", source.checkpoint)
            except BaseException as exc:
                self.close(exc)  # the session records why, and is not left looking "running"
                raise
        if tensorboard_dir is not None:  # scalars also as TensorBoard event files
            from .tensorboard import TensorBoardTap

            tap = TensorBoardTap(tensorboard_dir, self.run_id, run_name)
            self.session.metric_taps.append(tap)
            self.config["tensorboard_dir"] = str(tap.log_dir)
            self.session.set_run_config(self.run_id, self.config)

            def untap() -> None:
                self.session.metric_taps.remove(tap)
                tap.close()

            self.add_close_callback(untap)
        self.bus.publish("run_created", {"name": run_name, "project": project, "session": str(self.session.dir),
                                         "continued": continued is not None}, **self._where())

    # ---- the session -----------------------------------------------------------------------------
    def _open_session(self, project: str, run_name: str, resume_from: str | Path | None, session: SessionStore | None,
                      config: Mapping[str, Any] | None, grad_norm: bool, parent: tuple[int, int | None] | None,
                      ) -> tuple[ResumeSource | None, Checkpoint | None, int | None]:
        """The session (a new one, the given one, or the one a checkpoint continues) and the run in it."""
        # Found (an archive is imported) and read before the new session's clean-up runs.
        source = resume_source(resume_from, project=project, run_name=run_name) if resume_from is not None else None
        if resume_from is not None and source is None:  # "last" with nothing to resume: a fresh start, said
            print(f"onthefly: resume_from='last': no checkpoint of project {project!r} on this machine yet; "
                  "training starts from the model as given", file=sys.stderr)
        checkpoint = read_checkpoint(source.checkpoint) if source is not None else None
        self._owns_session = session is None
        if session is None and source is not None and source.session_dir is not None:
            session = SessionStore.reopen(source.session_dir)  # an archive's session: its curves go on
        self.session = session or SessionStore(project, keep=[source.checkpoint] if source is not None else [])
        self._listen()
        self._track_grad_norms(grad_norm, config)
        continued = self._continued_run(source)
        if continued is not None:  # the checkpoint is where its run stopped: the same run goes on
            self.run_id = continued
            self.name = run_name = str((self.session.run_record(continued) or {}).get("name", run_name))
            self.session.set_run_config(continued, self.config)
        else:
            in_session = source is not None and source.session_dir is not None
            if parent is None and in_session:  # resumed from an earlier checkpoint of its session
                parent = (source.run_id, source.checkpoint_id)  # type: ignore[union-attr,assignment]
            self.run_id = self.session.new_run(run_name, config=self.config,
                                               parent_id=parent[0] if parent else None,
                                               parent_checkpoint_id=parent[1] if parent else None)
        if self.world is not None:  # the other ranks follow: this session, this run, this checkpoint
            step = int(checkpoint[1]["progress"]["global_step"]) if checkpoint is not None else None
            origin = source.session_dir if source is not None and source.session_dir is not None else self.session.dir
            self.world.share({"session": str(self.session.dir), "run_id": self.run_id, "name": self.name,
                              "step": step, "origin": str(origin), "continued": continued is not None})
        return source, checkpoint, continued

    def _open_rank_session(self, project: str, run_name: str, resume_from: str | Path | None,
                           session: SessionStore | None, config: Mapping[str, Any] | None, grad_norm: bool,
                           ) -> tuple[ResumeSource | None, Checkpoint | None, int | None]:
        """Rank R > 0: its session inside rank 0's (``ranks/rank-R``, or the given one: a fork's
        child records where its parent does), the run rank 0 trains, and its own checkpoint at the
        step rank 0 resumes from."""
        assert self.world is not None
        shared = self.world.share()
        rank = self.world.rank
        folder = Path(shared["session"]) / "ranks" / f"rank-{rank}"
        source: ResumeSource | None = None
        checkpoint: Checkpoint | None = None
        if shared["step"] is not None:
            mine = Path(shared["origin"]) / "ranks" / f"rank-{rank}" / "checkpoints"
            found = sorted(mine.glob(f"run-*/*-step-{shared['step']:09d}"))
            if not found:
                raise StateError(
                    f"rank {rank} has no checkpoint at step {shared['step']} in {mine}: every rank saves its own "
                    "(its RNG and sampler state); resume with the number of ranks the run was saved with")
            source = ResumeSource(checkpoint=found[-1], session_dir=None, checkpoint_id=None,
                                  run_id=shared["run_id"], step=shared["step"], next_loss=None)
            checkpoint = read_checkpoint(found[-1])
        self._owns_session = session is None
        if session is None:
            session = SessionStore.reopen(folder) if SessionStore.exists(folder) else \
                SessionStore.for_rank(folder, project)
        self.session = session
        self._listen()
        self._track_grad_norms(grad_norm, config)
        self.run_id = int(shared["run_id"])
        self.name = str(shared["name"])
        if self.session.run_record(self.run_id) is None:
            self.session.new_run(self.name, config=self.config, run_id=self.run_id)
        return source, checkpoint, self.run_id if shared["continued"] else None

    def _listen(self) -> None:
        self.bus = EventBus(seq_source=self.session.next_seq)
        self.bus.subscribe(self._persist)
        self.session.overflow_listener = lambda dropped: self.bus.publish(
            "store_overflow", {"dropped_records": dropped, "reason": "store queue full (disk too slow)"},
            **self._where())

    def _track_grad_norms(self, grad_norm: bool, config: Mapping[str, Any] | None) -> None:
        # Per-sample gradient norms (optional): hooks on the model's Linear layers, none when off.
        self.grad_norms = GradNormTracker(self.model) if grad_norm else None
        self.config = {**(config or {}), "grad_norm": self.grad_norms.method if self.grad_norms else None}
        if self.world is not None:
            self.config["world_size"] = self.world.size

    # ---- what any thread may read or ask -----------------------------------------------------
    @property
    def status(self) -> str:
        return self.controller.status

    @property
    def commands(self) -> CommandQueue:
        return self.controller.queue

    @property
    def stopping(self) -> bool:
        return self.controller.stopping

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def latest(self) -> dict[str, float]:
        """The last flushed step's loss, lr and throughput."""
        return self.sink.latest

    @property
    def eval_splits(self) -> frozenset[str]:
        return self.evaluator.splits if self.evaluator is not None else frozenset()

    def request(self, kind: str, **args: Any) -> Command:
        """Queue a command (thread-safe); it takes effect at the next step boundary."""
        return self.controller.request(kind, **args)

    def possible_commands(self) -> list[str]:
        """The commands that would be accepted now (what a dashboard enables)."""
        return self.controller.possible()

    def live_losses(self) -> tuple[int, Reservoir] | None:
        """(epoch, reservoir) of the training epoch in progress, None between epochs."""
        return self.sink.live()

    # ---- set-up by the composer (before training) --------------------------------------------
    def register_action(self, kind: str, handler: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Carry out command ``kind`` (e.g. "cluster", by onthefly.actions) at a step boundary;
        ``handler(args)`` returns a result for the event log. A failing handler rejects the
        command and never ends the training."""
        def effect(args: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
            try:
                return None, handler(args)
            except Exception as exc:
                return f"{kind} failed: {exc}", None

        self.controller.register_action(kind, effect)

    def add_hook(self, hook: str, callback: Callback) -> None:
        """Call ``callback``'s ``hook`` too (a tool's, such as scheduled health check-ups; not one
        of the run's callbacks, so checkpoints neither save nor expect its state)."""
        if hook not in self._hooks:
            raise ConfigError(f"unknown hook {hook!r}; the hooks: {', '.join(self._hooks)}")
        self._hooks[hook].append(callback)

    def add_closing_callback(self, callback: Callable[[], None]) -> None:
        """Called when the run begins to close, while the session still records (a tool's last
        values: a gradient monitor's window)."""
        self._on_closing.append(callback)

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Called once the run is closed (e.g. to stop its dashboard)."""
        self._on_close.append(callback)

    def stop(self) -> None:
        """Stop at the next step boundary, from the training thread itself (e.g. on Ctrl-C)."""
        self.controller.stopping = True

    # ---- the loop ------------------------------------------------------------------------------
    def epochs(self, max_epochs: int, *, on_plan_end: Callable[[], object] | None = None) -> Iterator[int]:
        """Yield epoch numbers until ``max_epochs`` have been trained (counting from the start,
        resumed epochs included), a ``stop`` command arrives, or - with ``keep_alive`` - forever
        while ``train_more`` commands extend the plan."""
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 0:
            raise ConfigError(f"max_epochs must be a whole number >= 0, got {max_epochs!r}")
        self.target_epochs = max_epochs
        if self._wait_for_run:
            self.bus.publish("waiting", {"for": "run"}, **self._where())
            if not self.controller.wait_for_run():
                return
        self.controller.set_status(RunStatus.RUNNING)
        while True:
            while self.epoch < self.target_epochs and not self.stopping:
                self.resume.restore_global()  # resumed at an epoch boundary: the RNG as it was
                yield self.epoch
                self._end_loose_epoch()
                if self.stopping:
                    break
                self.epoch += 1
                self.batch_in_epoch = 0
                self._epoch_done = False
                self.controller.apply_pending()
            if self.stopping:
                return
            # Planned training is done: wait for the last per-sample values (once, not per step)
            # so a non-finite loss in a run shorter than a flush interval still fails it.
            self.recorder.wait_idle()
            self._check_health()
            if on_plan_end is not None:
                on_plan_end()
            keep_alive = self.keep_alive() if callable(self.keep_alive) else self.keep_alive
            if self.world is not None:  # rank 0's dashboard decides for every rank: they idle together
                keep_alive = self.world.share(bool(keep_alive))
            if not keep_alive:
                return
            self.recorder.flush()
            if not self.controller.idle(lambda: self.epoch < self.target_epochs):
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
            tracked = self._trackers.get(id(loader)) or TrackedLoader(
                loader if self.world is None else distributed_loader(loader, self.world))
            self._trackers[id(loader)] = tracked
        set_epoch(tracked.original, self.epoch)  # a DistributedSampler's order follows the epoch
        resuming = self.resume.skip
        iterator = self.resume.begin(tracked)  # draws the epoch's order (again, when resuming)
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
                if self.stopping:
                    self.recorder.flush()
                    return
        finally:
            self._in_batches = False
        self._end_recorded_epoch()
        if ends_epoch:
            self.end_epoch()

    def _end_recorded_epoch(self) -> None:
        """The epoch's rows are complete. Under torchrun, rank 0 announces the epoch once every
        rank has written its own, on its writer thread: no rank waits here (see _rank_closing)."""
        self.recorder.end_epoch()

    def _rank_closing(self) -> dict[str, Any]:
        """How the sink closes a training epoch under torchrun: rank 0 waits (on its writer thread)
        for the other ranks' folders in its session to have the epoch's rows; they say so."""
        if self.world is None or self.world.size == 1:
            return {}
        if self.world.rank > 0:
            return {"marks_closed": True}
        return {"rank_folders": [self.session.dir / "ranks" / f"rank-{r}" for r in range(1, self.world.size)]}

    def end_epoch(self) -> None:
        """Say that the epoch's end (validation, scheduler step) is done, for a loop that iterated
        ``batches(loader, ends_epoch=False)``: a checkpoint from now on resumes at the next epoch."""
        self._epoch_done = True
        self.resume.end()

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
        logits = logits_of(logits)  # a Hugging Face ModelOutput (or a dict) gives its logits
        if self._first_step:
            self._classification = check_first_step(per_sample_loss, indices, logits, targets)
            self._first_step = False
        check_step_shapes(per_sample_loss, indices, loss)
        per = per_sample_loss.detach()
        if self._classification and (logits.shape[0] != per.shape[0] or targets.shape[0] != per.shape[0]):
            raise DataError(f"a step gave {per.shape[0]} per-sample losses, {logits.shape[0]} rows of logits and "
                            f"{targets.shape[0]} targets; they must describe the same samples")
        # Margin, prediction and confidence are derived at the flush for thousands of rows at once.
        self.recorder.record(self.global_step + 1, indices, per, per.mean() if loss is None else loss,
                             host_lr(self.optimizer.param_groups[0]["lr"] if lr is None else lr),
                             None, targets if self._classification else None,
                             self._take_grad_norms(per.shape[0], grad_norm_factor),
                             logits=logits if self._classification else None)
        self._end_of_step(boundary)

    def step_outputs(self, outputs: torch.Tensor, targets: torch.Tensor, per_sample_loss: PerSampleLoss,
                     *, loss: torch.Tensor, boundary: bool = True, lr: float | None = None,
                     grad_norm_factor: float | torch.Tensor | None = None) -> None:
        """Like :meth:`step`, for a loss computed row by row (``per_sample_loss.deferrable``): only
        the outputs and targets are kept now; per-sample loss, margin and prediction are derived
        for thousands of rows at once when the recorder flushes (the fast path Trainer uses)."""
        indices = self._take_indices(None)
        if self._first_step:
            per = per_sample_loss.per_sample(outputs, targets, outputs.shape[0])
            self._classification = check_first_step(per, indices, outputs, targets)
            self._first_step = False
            self.recorder.derive = _derive(per_sample_loss, self._classification)
        elif indices is not None and (outputs.shape[0] != len(indices) or targets.shape[0] != len(indices)):
            raise DataError(  # shapes are host metadata: no sync
                f"a batch of {len(indices)} sampled indices gave {outputs.shape[0]} outputs and "
                f"{targets.shape[0]} targets; a collate_fn must keep every sample of its batch."
            )
        self.recorder.record_outputs(self.global_step + 1, indices, outputs, targets, loss,
                                     host_lr(self.optimizer.param_groups[0]["lr"] if lr is None else lr),
                                     self._take_grad_norms(outputs.shape[0], grad_norm_factor))
        self._end_of_step(boundary)

    def step_boundary(self) -> None:
        """An optimizer step after micro-batches recorded with ``step(..., boundary=False)``, when
        the last of them could not know it was the last (an unsized loader's end)."""
        self._end_of_step(True)

    def _end_of_step(self, boundary: bool) -> None:
        if not boundary:
            return
        self.global_step += 1
        now = time.perf_counter()
        if now - self._last_flush > FLUSH_SECONDS:  # a clock read, no device sync
            self._last_flush = now
            self.recorder.flush()
            self._check_health()
        if self.commands.pending or self.world is not None:  # a lock-free check; every step under torchrun
            self.controller.apply_pending()
        for callback in self._hooks["on_step_end"]:
            callback.on_step_end(self)

    def fire(self, hook: str, *args: Any) -> None:
        """Call ``hook`` (with ``args`` after the run) on every callback that overrides it."""
        for callback in self._hooks[hook]:
            getattr(callback, hook)(self, *args)

    def fires(self, hook: str) -> bool:
        """Whether a callback overrides ``hook`` (so a caller builds its arguments only then)."""
        return bool(self._hooks[hook])

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
            if type(given) is np.ndarray and not given.flags.writeable and given.flags.owndata \
                    and given.dtype == np.int64 and given.ndim == 1:
                return given  # read-only and its own (loader.frozen): nobody can change it
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

    def _end_loose_epoch(self) -> None:
        if self._loose_epoch is not None:
            self.recorder.end_epoch()
            self._loose_epoch = None

    def _take_grad_norms(self, batch: int, factor: float | torch.Tensor | None) -> torch.Tensor | None:
        if self.grad_norms is None:
            return None
        norms = self.grad_norms.take(1.0 / batch if factor is None else factor)
        return norms if norms is not None and norms.shape == (batch,) else None

    def _note_sample_ids(self, tracked: TrackedLoader) -> None:
        """Say in the run's config what a recorded index is (once the loader is known)."""
        sample_ids = "position" if tracked.iterable else "index"
        if self.config.get("sample_ids") != sample_ids:
            self.config["sample_ids"] = sample_ids
            self.session.set_run_config(self.run_id, self.config)

    def _check_health(self) -> None:
        """At a flush: what the transfer thread found, and what it could not take."""
        if self.sink.nonfinite is not None:
            raise non_finite_error(*self.sink.nonfinite)
        dropped = self.recorder.dropped_packets
        if dropped > self._reported_drops:
            self.bus.publish("samples_dropped", {
                "packets": dropped - self._reported_drops,
                "reason": "the per-sample transfer queue was full (the host side is too slow)"},
                **self._where())
            self._reported_drops = dropped
        if self.recorder.error is not None:
            raise RuntimeError(f"per-sample transfer failed: {self.recorder.error}") from self.recorder.error

    # ---- evaluation and metrics ----------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float] | None:
        """Evaluate on the ``split`` loader ("val", "test"); logs metrics and an event."""
        if self.evaluator is None:
            return None
        result = self.evaluator(split, self._eval_rows(split) if split in self.evaluator.record else None)
        if result is None:
            return None
        self.last_eval[split] = result
        tested: dict[str, Any] = {}
        if split == "test":  # every test names the checkpoint of the weights it tested
            checkpoint_id, why_not = self.checkpoint_here("test")
            tested = {"checkpoint_id": checkpoint_id} if why_not is None else {"checkpoint_error": why_not}
        now = time.time()
        self.session.metrics([
            (self.run_id, f"{split}_{name}", self.global_step, self.epoch, now, value)
            for name, value in result.items() if name != "samples"
        ])
        self.bus.publish("eval", {"split": split, **result, **tested}, **self._where())
        if split == "val":
            self.fire("on_validation_end", dict(result))
        return result

    def _eval_rows(self, split: str) -> SampleRows:
        """Where an evaluation's per-sample rows go: stored as ``split`` at the current epoch."""
        def store(indices: np.ndarray, rows: np.ndarray, classification: bool) -> None:
            steps = np.full(len(indices), self.global_step, dtype=np.int64)
            self.session.samples(sample_chunk(self.run_id, split, self.epoch, steps, indices, rows, classification))
            self.session.close_epoch(self.run_id, split, self.epoch)
            self.bus.publish("epoch_summary", {"split": split, "loss": float(np.nanmean(rows[:, LOSS])),
                                               "samples": len(indices)}, **self._where())

        return store

    def epoch_loss(self, epoch: int | None = None) -> float | None:
        """The mean per-sample training loss of ``epoch`` (default: the last one trained; so far,
        for an epoch still open). Waits until the epoch's rows have reached the host (the
        transfer thread's work, not the disk's); call it at an epoch end, not every step."""
        self.recorder.wait_idle()
        if self.world is None:
            return self.sink.epoch_loss(epoch)
        # Every rank's share of the epoch: the same mean on every rank (their schedulers agree).
        epoch = self.sink.latest_epoch() if epoch is None else epoch
        mean = self.sink.epoch_loss(epoch) if epoch is not None else None
        count = self.sink.epoch_count(epoch) if epoch is not None and mean is not None else 0
        total, n = self.world.sum([mean * count if mean is not None and count else 0.0, float(count)])
        return total / n if n else None

    def log_metric(self, name: str, value: float, *, step: int | None = None) -> None:
        """Log a scalar of your own (host value) at ``step`` (default: the current step)."""
        self.session.metrics([(self.run_id, name, self.global_step if step is None else step,
                               self.epoch, time.time(), float(value))])

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path | None = None, *, reason: str = "manual") -> Path:
        """Save everything needed to continue exactly from here. Call at a step boundary."""
        model_tensors, objects = self._objects.save()
        progress = self._progress()
        total = ExactSum()
        if progress.batch_in_epoch:  # the epoch's losses so far, for its exact mean after a resume
            self.recorder.wait_idle()
            total = self.sink.sum_so_far(self.epoch)
        state = {
            "format": STATE_FORMAT,
            "run": {"project": self.project, "name": self.name},
            **objects,
            **self.resume.state(self._tracked, progress),
            "progress": progress.as_dict(),
            "world_size": self.world.size if self.world is not None else 1,
            "epoch_loss_sum": {"bins": torch.from_numpy(total.bins.copy()), "count": total.count,
                               "nonfinite": total.nonfinite},
        }
        checkpoint_id, folder = self.session.checkpoint(
            self.run_id, step=self.global_step, epoch=progress.epoch, batch_in_epoch=progress.batch_in_epoch,
            model_tensors=model_tensors, state=state, reason=reason,
            # Every rank saves its own (its RNG and sampler state); the others in their sessions.
            folder=Path(path) if path is not None and (self.world is None or self.world.rank == 0) else None,
        )
        self._checkpoint_at = (self.global_step, checkpoint_id)
        self.last_checkpoint = (self.global_step, folder)
        self.bus.publish("checkpoint", {"path": str(folder), "reason": reason, "checkpoint_id": checkpoint_id},
                         **self._where())
        self.fire("on_save_checkpoint", folder)
        return folder

    def checkpoint_here(self, reason: str) -> tuple[int | None, str | None]:
        """(id, None) of a checkpoint of the weights as they are now (saved unless one was just
        saved at this step), or (None, why not)."""
        if self._checkpoint_at is not None and self._checkpoint_at[0] == self.global_step:
            return self._checkpoint_at[1], None
        try:
            self.save_checkpoint(reason=reason)
        except (OnTheFlyError, OSError) as exc:  # e.g. a full disk: say so, never lose the run
            return None, f"{type(exc).__name__}: {exc}"
        assert self._checkpoint_at is not None
        return self._checkpoint_at[1], None

    def _continued_run(self, source: ResumeSource | None) -> int | None:
        """The run a resume continues: in its own session, from the point where it stopped (its
        newest checkpoint, no step recorded after it); None: the resume is a new run."""
        if source is None or source.session_dir is None or source.run_id is None or source.step is None:
            return None
        later = self.session.later_than(source.run_id, source.step)
        return source.run_id if not later else None

    def _progress(self) -> Progress:
        if self._epoch_done:  # the epoch is over: what follows is the next one's start
            return Progress(self.epoch + 1, 0, self.global_step, self.target_epochs)
        if self._loose_epoch is not None:
            raise StateError(
                "a checkpoint inside an epoch of a loop that passes step(indices=...) cannot be resumed "
                "exactly: On The Fly does not know how the loop draws its batches. Save it after "
                "run.end_epoch() (the next epoch's start), or iterate run.batches(loader)."
            )
        if self.resume.pending:  # resumed, and not trained since: the checkpoint's own point
            samples = self._samples_resumed
        else:
            samples = self.recorder.position_in_epoch if self.batch_in_epoch else 0
        return Progress(self.epoch, self.batch_in_epoch, self.global_step, self.target_epochs, samples)

    def _restore(self, model_tensors: dict[str, torch.Tensor], state: dict[str, Any], source: ResumeSource) -> None:
        ranks, size = int(state.get("world_size", 1)), self.world.size if self.world is not None else 1
        if ranks != size:
            raise StateError(
                f"the checkpoint {source.checkpoint} was saved by {ranks} rank(s) and this run has {size}: every "
                "rank's RNG and sampler share are in it, and they cannot be split again exactly. Resume with "
                f"torchrun --nproc-per-node {ranks} (or start a new run from its weights: "
                "model.load_state_dict(safetensors.torch.load_file(folder / 'model.safetensors')))")
        self._objects.load(model_tensors, state, source.checkpoint)
        progress = Progress(**state["progress"])
        self.epoch = progress.epoch
        self.batch_in_epoch = progress.batch_in_epoch
        self.global_step = progress.global_step
        self._samples_resumed = progress.samples_in_epoch
        saved = state.get("epoch_loss_sum")
        if progress.batch_in_epoch and saved is not None:
            self.sink.resume_epoch(progress.epoch, ExactSum(saved["bins"].numpy(), saved["count"],
                                                            saved["nonfinite"]))
        self.resume.restore(state, progress)
        self.last_checkpoint = (progress.global_step, Path(source.checkpoint))
        if self.world is not None:  # every rank resumed from its own checkpoint: the same weights?
            agree, hashes = self.world.weights_agree(self.model)
            if not agree:
                raise StateError(f"the ranks resumed with different weights (hashes {hashes}): their checkpoints at "
                                 f"step {progress.global_step} do not belong together")
            self.bus.publish("ranks_in_sync", {"ranks": self.world.size, "hash": hashes[0]}, **self._where())
        if source.checkpoint_id is not None and source.session_dir is not None:
            self._checkpoint_at = (progress.global_step, source.checkpoint_id)  # its own session holds it
        self.bus.publish("resumed_from_checkpoint", {"path": str(source.checkpoint), "checkpoint_id": source.checkpoint_id,
                                                     **progress.as_dict()}, **self._where())
        # The first step trained now is checked against the loss the session recorded for it.
        if source.next_loss is not None and source.next_loss[0] == progress.global_step + 1:
            self.sink.expect_loss(*source.next_loss)
        else:
            self.bus.publish("resume_unverified", {"reason": "the session recorded no step after this checkpoint "
                                                             "to compare the first resumed step with"},
                             **self._where())

    # ---- what commands do -------------------------------------------------------------------
    def _effects(self) -> dict[str, Effect]:
        """The effect of each command that does more than change the status (controller.TABLE
        says when each may be applied)."""
        def pause(_: dict[str, Any]) -> tuple[str | None, None]:
            self.recorder.flush()  # the dashboard sees every step trained before the pause
            return None, None

        def test(_: dict[str, Any]) -> tuple[str | None, None]:
            try:
                return (None if self.evaluate("test") is not None else "no test_loader was given"), None
            except Exception as exc:  # a broken test loader must not end hours of training
                return f"the test failed: {type(exc).__name__}: {exc}", None

        def train_more(args: dict[str, Any]) -> tuple[None, None]:
            self.target_epochs = max(self.target_epochs, self.epoch) + args["epochs"]
            return None, None

        def set_lr(args: dict[str, Any]) -> tuple[str | None, None]:
            # Rescales the scheduler's schedule, so that the change holds (or says why it cannot).
            return set_group_lr(self.optimizer, self.scheduler, args["lr"], args["group"]), None

        def set_weight_decay(args: dict[str, Any]) -> tuple[str | None, None]:
            return self._set_group_value("weight_decay", args["weight_decay"], args["group"]), None

        def checkpoint(args: dict[str, Any]) -> tuple[str | None, None]:
            try:
                self.save_checkpoint(args["path"], reason="command")
            except (OnTheFlyError, OSError) as exc:  # e.g. a full disk: say so, keep training
                return f"the checkpoint failed: {exc}", None
            return None, None

        return {"pause": pause, "test": test, "train_more": train_more, "set_lr": set_lr,
                "set_weight_decay": set_weight_decay, "checkpoint": checkpoint}

    def _can(self, capability: str) -> bool:
        return capability in self.eval_splits

    def _set_group_value(self, key: str, value: float, group: int | None) -> str | None:
        groups = self.optimizer.param_groups
        if group is not None and group >= len(groups):
            return f"the optimizer has {len(groups)} parameter group(s); there is no group {group}"
        if key not in groups[0]:
            return f"this optimizer ({type(self.optimizer).__name__}) has no {key!r} setting"
        for g in [groups[group]] if group is not None else groups:
            g[key] = value
        return None

    # ---- status, events, life cycle ------------------------------------------------------------
    def _where(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "step": self.global_step, "epoch": self.epoch}

    def _status_changed(self, status: str) -> None:
        self.session.set_run_status(self.run_id, status)
        self.bus.publish("status", {"status": status}, **self._where())

    def _persist(self, event: Event) -> None:
        if event.persist:
            self.session.event(event.seq, event.run_id, event.step, event.epoch, event.kind,
                               event.payload, event.time)

    def close(self, error: BaseException | None = None) -> None:
        """Flush everything and mark the run finished (or failed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.controller.closed = True
        if self.world is not None and error is None:
            with contextlib.suppress(Exception):
                self.world.finish()  # the command word of the last step, received on every rank
        for closing in self._on_closing:
            with contextlib.suppress(Exception):
                closing()
        if error is None and self.global_step > 0 and self._loose_epoch is None:
            # The final model is always in the session (and so in its export): saved unless the
            # newest checkpoint already holds these weights.
            with contextlib.suppress(Exception):
                _, why_not = self.checkpoint_here("final")
                if why_not is not None:
                    self.bus.publish("final_checkpoint_failed", {"reason": why_not}, **self._where())
        with contextlib.suppress(Exception):
            self._end_loose_epoch()
        with contextlib.suppress(Exception):
            self.recorder.close()
        with contextlib.suppress(Exception):
            self.session.flush()  # the last epoch_summary (published once written) precedes run_finished
        if error is not None:
            status = RunStatus.FAILED
            self.bus.publish("error", {"type": type(error).__name__, "message": str(error)}, **self._where())
        else:
            status = RunStatus.STOPPED if self.stopping else RunStatus.FINISHED
        self.controller.set_status(status)
        self.bus.publish("run_finished", {"status": status, "seconds": time.time() - self.started,
                                          "steps": self.global_step}, **self._where())
        if self._owns_session:
            self.session.close(status, None if error is None else f"{type(error).__name__}: {error}")
        else:
            self.session.flush()
        for callback in self._on_close:
            callback()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(exc)


def host_lr(lr: Any) -> float:
    """A learning rate as a host number. Optimizers may keep it as a tensor (``lr=torch.tensor(...)``,
    updated in place by schedulers): a CPU one is read now, so each step records its own rate; a
    device one is not read at all (that would wait for the device every step) and records NaN."""
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.device.type == "cpu" else math.nan
    return lr


def _derive(per_sample_loss: PerSampleLoss, classification: bool) -> Derive:
    loss_fn = per_sample_loss.loss_fn
    if classification and type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None \
            and loss_fn.label_smoothing == 0.0:
        ignore_index = loss_fn.ignore_index

        def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ClassSignals | None]:
            return cross_entropy_signals(outputs, targets, ignore_index)  # one log-softmax for both

        return cross_entropy

    def derive(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ClassSignals | None]:
        per = per_sample_loss.per_sample(outputs, targets, outputs.shape[0])
        return per, classification_signals(outputs, targets) if classification else None

    return derive


def _check_names(project: Any, run_name: Any) -> None:
    for label, value in (("project", project), ("run_name", run_name)):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{label} must be a non-empty string, got {value!r}")

