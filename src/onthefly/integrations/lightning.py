"""On The Fly inside a Lightning ``Trainer``: one callback attaches a run and gives it control.

    trainer = lightning.Trainer(max_epochs=3, callbacks=[OnTheFlyCallback(project="demo", run_name="lit")])
    trainer.fit(model, train_loader)

Lightning owns the loop; the callback maps its hooks onto the control points of
:class:`onthefly.Run` (the custom-loop API, created with :func:`onthefly.start_run`, dashboard
included):

=================================  ===========================================================
Lightning                          On The Fly
=================================  ===========================================================
``on_fit_start``                   the run: the LightningModule, ``trainer.optimizers[0]`` and its
                                   scheduler; the dashboard (``dashboard=``, as in start_run)
the train DataLoader is processed  a copy of it records the dataset indices of every batch
``on_train_start``                 the run's epochs begin (``run.epochs``: status "running")
``on_train_batch_end``             ``run.step``: per-sample rows (if ``training_step`` returns
                                   them), the batch loss, the lr; commands at the step boundary:
                                   pause waits here, stop sets ``trainer.should_stop``
``on_validation_end``              ``val*`` metrics of ``trainer.callback_metrics``, an eval event
``on_train_epoch_end``             the run's epoch ends: rows closed, commands applied, and after
                                   the planned epochs, with a dashboard watching, the run idles
                                   (``train_more`` raises Lightning's ``max_epochs``)
next epoch / ``on_train_end``      the other metrics of ``trainer.callback_metrics``
``on_fit_end`` / ``on_exception``  the run closed: final checkpoint / marked failed
=================================  ===========================================================

Per-sample values: ``training_step`` returns ``{"loss": losses.mean(), "per_sample_loss": losses}``
(``"logits"`` adds margin and prediction; targets are read from an ``(inputs, targets)`` or dict
batch, or given as ``"targets"``). A plain loss still records the loss curve, and control works.

Every hook runs on the training thread; other threads only queue commands (``run.request``).
Nothing here reads a device value per step: metrics are read at validation and epoch ends.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..engine.batch import ForwardFn
from ..engine.loader import Positions, SampledIndices
from ..engine.run import Run
from ..errors import ConfigError, DataError
from ..launch import start_run
from ..signals.per_sample import LossFn

try:
    import lightning
    import lightning.pytorch as pl
except ImportError as exc:  # the integration is optional; On The Fly itself never needs Lightning
    raise ImportError(
        "onthefly.integrations.lightning needs the `lightning` package (2.x): pip install lightning"
    ) from exc

__all__ = ["OnTheFlyCallback"]

# Lightning's max_epochs=-1 (train until max_steps / max_time): a plan with no end of its own.
_UNBOUNDED = 2**31 - 1
# Series the engine writes itself: a Lightning metric of the same name is kept beside it.
_ENGINE_METRICS = frozenset({"train_loss", "train_loss_epoch", "lr", "throughput", "test_loss", "test_accuracy"})
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")


_Source = SampledIndices | Positions


# ---- the callback ---------------------------------------------------------------------------
class OnTheFlyCallback(pl.Callback):
    """Attach an On The Fly run to ``lightning.Trainer.fit`` (see the module docstring).

    ``dashboard``, ``port``, ``keep_alive`` and ``wait_for_run`` are :func:`onthefly.start_run`'s.
    ``loss_fn`` with ``test_loader`` makes the "test" command work (the engine's evaluator: one
    loss per test sample recorded, the model called as ``pl_module(inputs)``; ``inputs``,
    ``targets`` and ``forward_fn`` say how a batch feeds it, as in ``quickstart``). ``config``
    is stored with the run. After ``fit``, :attr:`run` is the run it trained (closed).
    """

    def __init__(
        self, *, project: str, run_name: str, dashboard: bool | None = None, port: int | None = None,
        keep_alive: bool | None = None, loss_fn: LossFn | None = None, test_loader: DataLoader | None = None,
        inputs: Any = None, targets: Any = None, forward_fn: ForwardFn | None = None, wait_for_run: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        for label, value in (("project", project), ("run_name", run_name)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable(outputs, targets), got {type(loss_fn).__name__}")
        if test_loader is not None and not isinstance(test_loader, DataLoader):
            raise ConfigError(f"test_loader must be a torch.utils.data.DataLoader, got {type(test_loader).__name__}")
        if test_loader is not None and loss_fn is None:
            raise ConfigError("test_loader needs loss_fn, which the test evaluates with: "
                              "OnTheFlyCallback(..., loss_fn=nn.CrossEntropyLoss(), test_loader=test)")
        self._options: dict[str, Any] = dict(
            project=project, run_name=run_name, dashboard=dashboard, port=port, keep_alive=keep_alive,
            loss_fn=loss_fn, test_loader=test_loader, inputs=inputs, targets=targets, forward_fn=forward_fn,
            wait_for_run=wait_for_run)
        self._config = dict(config or {})
        self._run: Run | None = None  # the run of the fit in progress (None outside fit)
        self._last: Run | None = None  # the run of the last fit, closed
        self._reset()

    def _reset(self) -> None:
        self._optimizer: torch.optim.Optimizer | None = None
        self._epochs: Iterator[int] | None = None  # run.epochs(), advanced at each epoch's end
        self._epoch_offset = 0  # Lightning's current_epoch when training began (a ckpt_path resume)
        self._planned = 0  # run.target_epochs as Lightning's max_epochs last followed it
        self._bounded = True  # Lightning has a max_epochs that train_more can raise
        self._new_sources: list[_Source | None] = []  # train loaders processed since the last epoch began
        self._source: _Source | None = None
        self._untracked: str | None = None  # why per-sample rows cannot be recorded
        self._said_untracked = False  # ... said once, at the first per-sample loss dropped
        self._draws_own_batches = False  # training_step(dataloader_iter): no index per step
        self._stepped = False  # an optimizer stepped during this batch
        self._lr: Any = None  # the lr that step used (read before it)
        self._epoch_end: tuple[int, int] | None = None  # (step, epoch) whose metrics are still to record
        self._no_rows: torch.Tensor | None = None  # a step without per-sample values: an empty row set
        self._restore_strategy: Any = None

    @property
    def run(self) -> Run | None:
        """The run of the fit in progress, or of the last one."""
        return self._run or self._last

    # ---- set-up ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        if trainer.world_size > 1:
            raise ConfigError(
                f"OnTheFlyCallback runs in one process; this Trainer has {trainer.world_size} "
                "(devices/num_nodes > 1). Train on one device, or use onthefly.quickstart under torchrun."
            )
        if not trainer.optimizers:
            raise ConfigError("the LightningModule's configure_optimizers() returned no optimizer; "
                              "On The Fly needs one to record the lr and apply set_lr / set_weight_decay")
        optimizer = self._optimizer = trainer.optimizers[0]
        scheduler = next((c.scheduler for c in trainer.lr_scheduler_configs
                          if getattr(c.scheduler, "optimizer", None) is optimizer), None)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        config = {**self._config, "integration": "lightning", "lightning": lightning.__version__,
                  "optimizers": len(trainer.optimizers), "automatic_optimization": pl_module.automatic_optimization,
                  "accumulate_grad_batches": trainer.accumulate_grad_batches, "precision": str(trainer.precision)}
        self._watch_train_loaders(trainer)
        self._run = start_run(model=pl_module, optimizer=optimizer, scheduler=scheduler,
                              scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
                              config=config, **self._options)

    def _watch_train_loaders(self, trainer: pl.Trainer) -> None:
        """Lightning creates the first epoch's DataLoader iterator - and, with workers, draws its
        first indices - inside the fit loop's data set-up, before any callback hook. The one
        point every train loader passes through between its creation and that first draw is
        the strategy's ``process_dataloader``; the callback wraps it for the fit (restored when
        the fit ends) and hands Lightning a copy of each train loader that records indices."""
        strategy = trainer.strategy
        own = vars(strategy).get("process_dataloader")  # an instance attribute already there
        original = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            processed = original(dataloader)
            return self._track(processed) if trainer.training else processed

        strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]

        def restore() -> None:
            if own is not None:
                strategy.process_dataloader = own  # type: ignore[method-assign]
            else:
                del strategy.process_dataloader

        self._restore_strategy = restore

    def _track(self, loader: object) -> object:
        if not isinstance(loader, DataLoader):
            self._new_sources.append(None)
            return loader
        if isinstance(loader.dataset, IterableDataset):
            self._new_sources.append(Positions(loader.dataset))
            return loader
        if loader.num_workers > 0 and getattr(loader, "in_order", True) is False:
            raise DataError(
                "the train DataLoader has in_order=False: with workers it yields batches out of sampling "
                "order, so On The Fly cannot tell which samples a batch holds. Use in_order=True (the default)."
            )
        batch_sampler = loader.batch_sampler
        batched = batch_sampler is not None
        source = SampledIndices(batch_sampler if batch_sampler is not None else loader.sampler, batched,
                                 loader.dataset)
        tracked = copy.copy(loader)  # the user's loader is untouched
        tracked._iterator = None  # never share a persistent-workers iterator with the original
        # DataLoader forbids setting its sampler after __init__; the copy is ours.
        object.__setattr__(tracked, "batch_sampler" if batched else "sampler", source)
        self._new_sources.append(source)
        return tracked

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run
        if run is None:
            return
        if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
            self._draws_own_batches = True
        self._epoch_offset = trainer.current_epoch  # after a ckpt_path resume: the epochs already trained
        max_epochs = trainer.max_epochs
        self._bounded = max_epochs is not None and max_epochs >= 0
        planned = max(max_epochs - self._epoch_offset, 0) if self._bounded else _UNBOUNDED  # type: ignore[operator]
        self._epochs = run.epochs(planned)
        self._next_epoch(trainer, run)  # with wait_for_run: waits here for the "run" command

    # ---- an epoch ----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run
        if run is None:
            return
        self._record_epoch_metrics(trainer, run)  # the last epoch's, now that all its hooks have logged
        if self._new_sources:  # the loaders were (re)loaded: the epoch draws from these
            self._source, self._untracked = _one_source(self._new_sources, self._draws_own_batches)
            self._new_sources = []
            self._describe_samples(run)
        if self._source is not None:
            self._source.begin_epoch()
        batches = trainer.num_training_batches
        run.batches_per_epoch = int(batches) if batches != float("inf") else None
        run.batch_in_epoch = 0
        run.bus.publish("epoch_started", {"batches": run.batches_per_epoch},
                        run_id=run.run_id, step=run.global_step, epoch=run.epoch)

    def _describe_samples(self, run: Run) -> None:
        """Say in the run's config what a recorded index is, and what slice exports read."""
        if self._source is None:
            return
        run.train_dataset = self._source.dataset
        if run.config.get("sample_ids") != self._source.kind:
            run.config["sample_ids"] = self._source.kind
            run.session.set_run_config(run.run_id, run.config)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True
        if optimizer is self._optimizer:
            self._lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (a scheduler moves it after)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        run = self._run
        if run is None:
            return
        # What training_step returned (Lightning passes a dict): the loss it backpropagated,
        # detached, and what else it chose to return.
        per = logits = targets = loss = None
        if type(outputs) is dict or isinstance(outputs, Mapping):  # the type check first: an ABC check costs more
            loss, per, logits = outputs.get("loss"), outputs.get("per_sample_loss"), outputs.get("logits")
            targets = outputs.get("targets")
        elif isinstance(outputs, torch.Tensor):
            loss = outputs
        source = self._source
        # Taken for every batch, so that the next batch gets its own indices.
        indices = source.take(per.shape[0] if isinstance(per, torch.Tensor) and per.ndim else 0) \
            if source is not None else None
        stepped, lr = self._stepped, self._lr
        self._stepped, self._lr = False, None
        run.batch_in_epoch = batch_idx + 1
        if isinstance(loss, torch.Tensor) and pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for accumulation (one kernel)
        if per is not None and indices is None:
            self._say_untracked(run)
            per = None
        if per is not None:
            if logits is not None and targets is None:
                targets = _targets_of(batch)
            run.step(per, loss=loss, logits=logits, targets=targets, indices=indices, boundary=stepped, lr=lr)
        elif isinstance(loss, torch.Tensor):  # the loss curve only: a step with no per-sample rows
            if self._no_rows is None or self._no_rows.device != loss.device:
                self._no_rows = torch.empty(0, device=loss.device)
            run.step(self._no_rows, loss=loss, indices=_NO_INDICES, boundary=stepped, lr=lr)
        elif stepped:  # training_step returned nothing to record
            run.step_boundary()
        self._after_step(trainer, run)

    def _after_step(self, trainer: pl.Trainer, run: Run) -> None:
        if run.stopping:
            trainer.should_stop = True  # Lightning ends the epoch (and the fit) after this batch
        if run.target_epochs != self._planned:  # train_more: host ints, no cost
            self._follow_plan(trainer, run)

    def _say_untracked(self, run: Run) -> None:
        if not self._said_untracked:
            reason = self._untracked or "the batch's dataset indices were not recorded"
            run.bus.publish("samples_untracked", {"reason": f"per-sample losses are not recorded: {reason}"},
                            run_id=run.run_id, step=run.global_step, epoch=run.epoch)
            self._said_untracked = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run
        if run is None or trainer.sanity_checking:
            return
        values = {name: value for name, value in _scalars(trainer.callback_metrics).items() if name.startswith("val")}
        if not values:
            return
        self._store_metrics(run, values, run.global_step, run.epoch)
        # The dashboard's validation chart reads "loss" and "accuracy" (val_loss, val_accuracy).
        short = {name[4:] if name[3:4] in ("_", "/") else name: value for name, value in values.items()}
        run.bus.publish("eval", {**short, "split": "val", "source": "lightning"},
                        run_id=run.run_id, step=run.global_step, epoch=run.epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run
        if run is None:
            return
        self._epoch_end = (run.global_step, run.epoch)
        if self._epochs is not None:
            self._next_epoch(trainer, run)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run is not None:
            self._record_epoch_metrics(trainer, self._run)

    def _next_epoch(self, trainer: pl.Trainer, run: Run) -> None:
        """Advance the run's epochs: the one that ended closes (its rows, commands queued at the
        boundary); after the planned epochs the run checks its health and, with a dashboard
        watching (or keep_alive), idles here until stopped or told to train more."""
        assert self._epochs is not None
        try:
            next(self._epochs)
        except StopIteration:
            self._epochs = None
        self._after_step(trainer, run)

    def _follow_plan(self, trainer: pl.Trainer, run: Run) -> None:
        """``train_more`` raised the run's plan: Lightning's max_epochs follows it."""
        self._planned = run.target_epochs
        if self._bounded:
            trainer.fit_loop.max_epochs = self._epoch_offset + run.target_epochs

    # ---- metrics -------------------------------------------------------------------------------
    def _record_epoch_metrics(self, trainer: pl.Trainer, run: Run) -> None:
        """``trainer.callback_metrics`` but validation's, at the step and epoch where the last
        epoch ended (read now: the LightningModule's own on_train_epoch_end logs after ours)."""
        if self._epoch_end is None:
            return
        step, epoch = self._epoch_end
        self._epoch_end = None
        values = {name: value for name, value in _scalars(trainer.callback_metrics).items()
                  if not name.startswith("val")}
        self._store_metrics(run, values, step, epoch)

    @staticmethod
    def _store_metrics(run: Run, values: Mapping[str, float], step: int, epoch: int) -> None:
        now = time.time()
        run.session.metrics([(run.run_id, f"lightning/{name}" if name in _ENGINE_METRICS else name, step, epoch,
                              now, value) for name, value in values.items()])

    # ---- the end -------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run is not None:
            self._record_epoch_metrics(trainer, self._run)
        self._finish(None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish(None)  # after on_fit_end this finds nothing left to do

    def _finish(self, error: BaseException | None) -> None:
        """Close the run (idempotent): the final checkpoint, or failed with ``error``; Ctrl-C
        is a clean stop, as in quickstart."""
        if self._restore_strategy is not None:
            self._restore_strategy()
            self._restore_strategy = None
        if self._epochs is not None:
            self._epochs.close()  # type: ignore[attr-defined]  # run.epochs() is a generator
            self._epochs = None
        run, self._run = self._run, None
        if run is None:
            return
        self._last = run
        if isinstance(error, KeyboardInterrupt):
            run.stop()
            error = None
        run.close(error)


_NO_INDICES = np.empty(0, dtype=np.int64)


def _one_source(sources: list[_Source | None], draws_own_batches: bool) -> tuple[_Source | None, str | None]:
    """Where this epoch's indices come from, or why they cannot be known."""
    if draws_own_batches:
        return None, ("training_step(dataloader_iter) draws its own batches, so which samples a step "
                      "trained on is not known; write training_step(batch, batch_idx)")
    if len(sources) > 1:
        return None, (f"Lightning combines {len(sources)} train loaders into each batch, so a per-sample "
                      "loss has no one dataset index; train on one DataLoader")
    if sources[0] is None:
        return None, "the train loader is not a torch DataLoader, so it has no sampler to read indices from"
    return sources[0], None


def _targets_of(batch: Any) -> Any:
    """The targets of an ``(inputs, targets)`` batch or of a dict batch with a usual key; None
    otherwise (return ``"targets"`` from training_step to give them)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return next((batch[key] for key in _TARGET_KEYS if key in batch), None)
    return None


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Host numbers of the scalar metrics (a device read each: at epoch ends, never per step)."""
    values: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            values[name] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = float(value)
    return values
