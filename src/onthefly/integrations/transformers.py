"""On The Fly inside a Hugging Face ``transformers.Trainer``: one callback attaches a run and gives it control.

    callback = OnTheFlyCallback(project="demo", run_name="bert")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=[callback],
                                   compute_loss_func=per_sample_loss(callback))
    trainer.train()

The Trainer owns the loop; the callback maps its events onto the control points of
:class:`onthefly.Run` (the custom-loop API, created with :func:`onthefly.start_run`, dashboard
included):

==============================  ================================================================
transformers.Trainer            On The Fly
==============================  ================================================================
``on_train_begin``              the run: the model, the Trainer's optimizer and LR scheduler; the
                                dashboard (``dashboard=``, as in start_run); the train DataLoader
                                the Trainer built records the dataset indices of every batch
``compute_loss_func``           :func:`per_sample_loss`: per-sample cross-entropy of each
                                micro-batch, handed to ``run.step(..., boundary=False)``
``on_substep_end``              a micro-batch of a gradient-accumulation window is done
``on_step_end``                 the optimizer step's boundary (``run.step_boundary``): commands
                                are applied here; pause waits here, stop sets
                                ``control.should_training_stop``
``on_epoch_end``                the run's epoch ends (its rows closed, commands applied)
``on_log``                      the Trainer's logs: ``eval_*`` as ``val_*`` (and an ``eval``
                                event), the others as ``hf/<name>``
``on_train_end``                the run closed: final checkpoint, status finished (or stopped)
==============================  ================================================================

Learning rate: ``set_lr`` rescales the Trainer's LR scheduler (its ``base_lrs``, see
:mod:`onthefly.engine.schedules`), so the rate is the new one at once and the schedule keeps its
shape from there: under the default linear decay every later rate is ``new / current`` times
the planned one. ``set_weight_decay`` without a group changes every group, the Trainer's no-decay
group (biases, LayerNorm) included; ``group=0`` changes only the decayed parameters.

Sample identity: the Trainer builds its own DataLoader (wrapped by accelerate), so the callback
puts a recording stand-in around that loader's batch sampler when training begins, as
:mod:`onthefly.engine.loader` does for a user's loader: the indices are drawn in the main process
(ahead of the batches when workers or the Trainer prefetch) and the batches come in that same
order, so the oldest pending entry is the micro-batch being trained.

The Trainer calls no callback when ``train()`` raises: use the callback as a context manager
(``with OnTheFlyCallback(...) as callback:``) or call :meth:`OnTheFlyCallback.close` so that the
run is marked failed. Every hook runs on the training thread; other threads only queue commands
(``run.request``). Nothing here reads a device value per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..engine.batch import logits_of
from ..engine.loader import Positions, SampledIndices
from ..engine.run import Run
from ..errors import ConfigError, DataError, LossError, StateError
from ..launch import start_run

try:
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # the integration is optional; On The Fly itself never needs transformers
    raise ImportError(
        "onthefly.integrations.transformers needs the `transformers` package (>= 4.46, for "
        "compute_loss_func): pip install transformers"
    ) from exc

__all__ = ["OnTheFlyCallback", "per_sample_loss"]

# The Trainer's compute_loss_func(outputs, labels, num_items_in_batch=...) -> the loss to backpropagate.
ComputeLossFunc = Callable[..., torch.Tensor]

_IGNORE = -100  # the label transformers' losses skip (padding, prompt tokens)
_NO_INDICES = np.empty(0, dtype=np.int64)
# Series the engine writes itself, which the Trainer's logs stand in for when no per-sample loss
# function records them (see _store_logs).
_STAND_INS = {"loss": "train_loss", "learning_rate": "lr"}


_Source = SampledIndices | Positions


def _track(dataloader: Any) -> tuple[_Source | None, str | None]:
    """Make the Trainer's train DataLoader record its batches' indices: (source, None), or
    (None, why they cannot be known)."""
    # accelerate's DataLoaderShard iterates a plain DataLoader it keeps as base_dataloader.
    base = vars(dataloader).get("base_dataloader", dataloader) if dataloader is not None else None
    if not isinstance(base, DataLoader):
        return None, "the Trainer's train dataloader is not a torch DataLoader, so it has no sampler to read"
    if isinstance(base.dataset, IterableDataset):
        return Positions(base.dataset), None
    if type(base) is not DataLoader:  # e.g. torchdata's StatefulDataLoader (use_stateful_dataloader)
        return None, (f"the Trainer's train dataloader is a {type(base).__name__}, whose sampler state "
                      "On The Fly does not wrap; per-sample identity needs a plain DataLoader")
    if base.num_workers > 0 and getattr(base, "in_order", True) is False:
        raise DataError(
            "dataloader_in_order=False: with workers the train DataLoader yields batches out of sampling "
            "order, so On The Fly cannot tell which samples a batch holds. Use dataloader_in_order=True "
            "(the default)."
        )
    batch_sampler = base.batch_sampler
    batched = batch_sampler is not None
    source = SampledIndices(batch_sampler if batch_sampler is not None else base.sampler, batched, base.dataset)
    # The Trainer built this loader for this train() call and iterates it each epoch; DataLoader
    # forbids setting its sampler after __init__, so it is set past that check.
    object.__setattr__(base, "batch_sampler" if batched else "sampler", source)
    return source, None


# ---- per-sample loss ----------------------------------------------------------------------------
def per_sample_loss(callback: OnTheFlyCallback, *, shift_labels: bool = False) -> ComputeLossFunc:
    """A ``compute_loss_func`` for ``transformers.Trainer`` that records one loss per sample.

    It computes cross-entropy (labels of ``-100`` ignored, as transformers' own losses do) for
    sequence classification (logits ``[batch, classes]``, labels ``[batch]``) and for token-level
    models (logits ``[batch, tokens, vocab]``, labels ``[batch, tokens]``; a sample's loss is the
    mean over its labelled tokens; ``shift_labels=True`` for a causal language model, whose
    position ``t`` predicts label ``t + 1``). The micro-batch's values go to ``callback``'s run
    (with margin and prediction for classification), and it returns what the Trainer expects of
    a ``compute_loss_func``: the sum of the losses over ``num_items_in_batch``, the labelled items
    of the whole gradient-accumulation window (so accumulated gradients are those of the window's
    mean). Called during evaluation it only computes the loss."""
    if not isinstance(callback, OnTheFlyCallback):
        raise ConfigError(f"per_sample_loss needs the OnTheFlyCallback given to the Trainer, got "
                          f"{type(callback).__name__}")

    def compute_loss_func(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = logits_of(outputs)  # a ModelOutput, a dict or a tuple gives its logits
        if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise LossError(
                f"per_sample_loss needs the model's logits and the batch's labels as tensors, got "
                f"{type(logits).__name__} and {type(labels).__name__}; give the Trainer batches with a "
                "'labels' key and a model whose output has 'logits'"
            )
        per, total, count = _cross_entropy(logits, labels, shift_labels)
        if torch.is_grad_enabled():  # training; the Trainer's evaluation runs under no_grad
            callback._record(per, total / count.clamp(min=1), logits if logits.ndim == 2 else None, labels)
        if num_items_in_batch is None:  # the Trainer did not count the window: this batch's mean
            return total / count.clamp(min=1) / callback._accumulation
        return total / num_items_in_batch

    return compute_loss_func


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                   shift: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per sample, sum of the losses of every labelled item, labelled items), on the device."""
    if shift:
        if logits.ndim < 3:
            raise LossError(f"shift_labels=True is for token-level logits [batch, tokens, vocab]; got logits "
                            f"{tuple(logits.shape)}")
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    if logits.ndim == 2 and labels.ndim == 1 and labels.shape[0] == logits.shape[0]:
        # Upcast, as transformers' own losses do (bf16/fp16 logits); an ignored label costs 0.
        per = F.cross_entropy(logits.float(), labels, ignore_index=_IGNORE, reduction="none")
        return per, per.sum(), (labels != _IGNORE).sum()
    if logits.ndim == labels.ndim + 1 and logits.shape[:-1] == labels.shape and labels.ndim >= 2:
        items = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=_IGNORE,
                                reduction="none").view(labels.shape[0], -1)
        counts = (labels != _IGNORE).view(labels.shape[0], -1).sum(dim=1)
        return items.sum(dim=1) / counts.clamp(min=1), items.sum(), counts.sum()
    raise LossError(
        f"per_sample_loss takes logits [batch, classes] with labels [batch], or logits [batch, tokens, "
        f"vocab] with labels [batch, tokens]; got logits {tuple(logits.shape)} and labels "
        f"{tuple(labels.shape)}. For another loss, pass a compute_loss_func of your own (the run then "
        "records the Trainer's logged loss, without per-sample rows)."
    )


# ---- the callback ---------------------------------------------------------------------------
class OnTheFlyCallback(TrainerCallback):
    """Attach an On The Fly run to ``transformers.Trainer.train`` (see the module docstring).

    ``dashboard`` and ``port`` are :func:`onthefly.start_run`'s; ``wait_for_run`` waits for the
    dashboard's "run" before the first step. ``config`` is stored with the run. The run closes when
    training ends (the Trainer's loop cannot be extended, so the session does not stay up for
    ``train_more``; ``onthefly open`` serves it afterwards). After ``train()``, :attr:`run` is the
    run it trained (closed).
    """

    def __init__(self, *, project: str, run_name: str, dashboard: bool | None = None, port: int | None = None,
                 wait_for_run: bool = False, config: Mapping[str, Any] | None = None) -> None:
        for label, value in (("project", project), ("run_name", run_name)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
        self._options: dict[str, Any] = dict(project=project, run_name=run_name, dashboard=dashboard, port=port,
                                             wait_for_run=wait_for_run)
        self._config = dict(config or {})
        self._run: Run | None = None  # the run of the train() in progress (None outside it)
        self._last: Run | None = None  # the run of the last train(), closed
        self._reset()

    def _reset(self) -> None:
        self._epochs: Iterator[int] | None = None  # run.epochs(), advanced at each epoch's end
        self._planned = 0  # run.target_epochs when training began (train_more cannot raise it)
        self._source: _Source | None = None
        self._untracked: str | None = None  # why per-sample rows cannot be recorded
        self._said_untracked = False  # ... said once
        self._accumulation = 1  # the Trainer's gradient_accumulation_steps
        self._in_step = False  # between on_step_begin and on_step_end: training micro-batches
        self._rows = False  # per_sample_loss recorded in this train(): the engine writes train_loss and lr
        self._step_recorded = False  # ... in the step in progress
        self._no_rows: torch.Tensor | None = None  # a micro-batch without identity: an empty row set

    @property
    def run(self) -> Run | None:
        """The run of the training in progress, or of the last one."""
        return self._run or self._last

    # ---- set-up ----------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self._run is not None:  # the last train() raised (no on_train_end) outside `with callback:`
            self._finish(StateError("trainer.train() ended without on_train_end: it raised. Use "
                                    "`with OnTheFlyCallback(...) as callback:` to record why"))
        self._reset()
        if args.world_size > 1:
            raise ConfigError(
                f"OnTheFlyCallback runs in one process; this Trainer has {args.world_size} "
                "(torchrun / accelerate launch). Train in one process, or use onthefly.quickstart under torchrun."
            )
        model, optimizer, scheduler = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        dataloader = kwargs.get("train_dataloader")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the Trainer handed its callbacks no torch model (got {type(model).__name__})")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"the Trainer handed its callbacks no torch optimizer (got {type(optimizer).__name__}); "
                              "On The Fly needs one to record the lr and apply set_lr / set_weight_decay")
        self._accumulation = args.gradient_accumulation_steps
        self._source, self._untracked = _track(dataloader)
        batches = len(dataloader) if dataloader is not None and _sized(dataloader) else None
        epochs_trained = self._resume_skip(args, state, batches)
        config = {**self._config, "integration": "transformers", "transformers": transformers.__version__,
                  "gradient_accumulation_steps": self._accumulation,
                  "per_device_train_batch_size": args.per_device_train_batch_size,
                  "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                  "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                  "max_steps": state.max_steps, "seed": args.seed, "resumed_at_step": state.global_step}
        run = self._run = start_run(model=model, optimizer=optimizer, scheduler=scheduler, config=config,
                                    keep_alive=False, **self._options)
        run.batches_per_epoch = batches
        if self._source is not None:  # what a recorded index is, and what slice exports read
            run.train_dataset = self._source.dataset
            run.config["sample_ids"] = self._source.kind
            run.session.set_run_config(run.run_id, run.config)
        self._planned = max(state.num_train_epochs - epochs_trained, 0)
        self._epochs = run.epochs(self._planned)
        self._next_epoch(control, run)  # with wait_for_run: waits here for the "run" command

    def _resume_skip(self, args: TrainingArguments, state: TrainerState, batches: int | None) -> int:
        """After ``train(resume_from_checkpoint=...)`` the Trainer starts at the checkpoint's step:
        the epochs it has trained, and the batches of the resumed epoch that accelerate draws and
        skips (which must not be paired with the batches trained)."""
        if state.global_step == 0 or not batches:
            return 0
        per_epoch = max(batches // self._accumulation + int(batches % self._accumulation > 0), 1)  # as the Trainer
        if isinstance(self._source, SampledIndices) and not args.ignore_data_skip:
            self._source.skip = (state.global_step % per_epoch) * self._accumulation
        return state.global_step // per_epoch

    # ---- an epoch and its steps -----------------------------------------------------------------
    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        run = self._run
        if run is None or self._epochs is None:
            return
        if self._source is not None:
            self._source.begin_epoch()
        run.batch_in_epoch = 0
        run.bus.publish("epoch_started", {"batches": run.batches_per_epoch},
                        run_id=run.run_id, step=run.global_step, epoch=run.epoch)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._in_step = self._run is not None and self._epochs is not None

    def _record(self, per: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor | None,
                labels: torch.Tensor) -> None:
        """A training micro-batch's per-sample losses, from :func:`per_sample_loss` (inside the
        Trainer's training_step, before backward): recorded for the step in progress."""
        run = self._run
        if run is None:
            if self._last is None:
                raise ConfigError("per_sample_loss(callback) is used, but the callback is not one of the "
                                  "Trainer's: Trainer(..., callbacks=[callback], "
                                  "compute_loss_func=per_sample_loss(callback))")
            return
        if not self._in_step:
            return
        self._rows = self._step_recorded = True
        indices = self._source.current(per.shape[0]) if self._source is not None else None
        # The lr is read now, before the optimizer steps: the rate this step trains with.
        if indices is None:  # the loss curve only: a micro-batch with no per-sample rows
            self._say_untracked(run, self._untracked or "the batch's dataset indices were not recorded")
            if self._no_rows is None or self._no_rows.device != per.device:
                self._no_rows = torch.empty(0, device=per.device)
            run.step(self._no_rows, loss=loss.detach(), indices=_NO_INDICES, boundary=False)
        else:
            run.step(per, loss=loss.detach(), logits=logits.detach() if logits is not None else None,
                     targets=labels if logits is not None else None, indices=indices, boundary=False)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self._run is not None:
            self._micro_batch_done(self._run)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        run = self._run
        if run is None or self._epochs is None:
            return
        self._micro_batch_done(run)
        self._in_step = False
        if not self._step_recorded:
            self._say_untracked(run, "the Trainer computed the loss itself; pass "
                                     "compute_loss_func=per_sample_loss(callback) to record one loss per sample")
        self._step_recorded = False
        run.step_boundary()  # after optimizer.step() and scheduler.step(): commands apply (pause waits) here
        self._after_boundary(control, run)

    def _micro_batch_done(self, run: Run) -> None:
        run.batch_in_epoch += 1
        if self._source is not None:
            self._source.done()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        run = self._run
        if run is not None and self._epochs is not None:
            self._next_epoch(control, run)

    def _next_epoch(self, control: TrainerControl, run: Run) -> None:
        """Advance the run's epochs: the one that ended closes (its rows, commands queued at the
        boundary); after the planned epochs the run checks its health."""
        assert self._epochs is not None
        try:
            next(self._epochs)
        except StopIteration:
            self._epochs = None
            if run.stopping:  # e.g. stopped while waiting for "run": train nothing more
                control.should_training_stop = True
        self._after_boundary(control, run)

    def _after_boundary(self, control: TrainerControl, run: Run) -> None:
        if run.stopping:
            control.should_training_stop = True  # the Trainer ends after this step (its epoch end still runs)
        if run.target_epochs != self._planned:  # host ints, no cost
            self._planned = run.target_epochs
            run.bus.publish("train_more_unsupported", {
                "reason": "the transformers Trainer fixes its epochs and steps when train() begins, so the "
                          "plan cannot grow; train again with a larger num_train_epochs / max_steps"},
                run_id=run.run_id, step=run.global_step, epoch=run.epoch)

    def _say_untracked(self, run: Run, reason: str) -> None:
        if not self._said_untracked:
            run.bus.publish("samples_untracked", {"reason": f"per-sample losses are not recorded: {reason}"},
                            run_id=run.run_id, step=run.global_step, epoch=run.epoch)
            self._said_untracked = True

    # ---- metrics -------------------------------------------------------------------------------
    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        run = self._run
        if run is not None and logs:
            self._store_logs(run, logs)

    def _store_logs(self, run: Run, logs: Mapping[str, Any]) -> None:
        """The Trainer's logged scalars (host numbers already): ``eval_<name>`` as ``val_<name>``,
        the engine's name for validation (the dashboard's validation chart reads val_loss and
        val_accuracy), with an ``eval`` event; the others as ``hf/<name>``, and - when no
        per-sample loss function writes the engine's own series - ``loss`` and ``learning_rate``
        as ``train_loss`` and ``lr`` too. The Trainer's fractional ``epoch`` is left out."""
        values = {name: float(value) for name, value in logs.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "epoch"}
        rows: dict[str, float] = {}
        evaluated: dict[str, float] = {}
        for name, value in values.items():
            if name.startswith("eval_"):
                evaluated[name[len("eval_"):]] = value
                rows[f"val_{name[len('eval_'):]}"] = value
            else:
                rows[f"hf/{name}"] = value
                if not self._rows and name in _STAND_INS:
                    rows[_STAND_INS[name]] = value
        now = time.time()
        run.session.metrics([(run.run_id, name, run.global_step, run.epoch, now, value)
                             for name, value in rows.items()])
        if evaluated:
            run.bus.publish("eval", {**evaluated, "split": "val", "source": "transformers"},
                            run_id=run.run_id, step=run.global_step, epoch=run.epoch)

    # ---- the end -------------------------------------------------------------------------------
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._finish(None)

    def close(self, error: BaseException | None = None) -> None:
        """Close the run of the training in progress (idempotent): marked failed with ``error``,
        else finished (or stopped) with its final checkpoint. For a ``train()`` that raised: the
        Trainer calls no callback then."""
        self._finish(error)

    def __enter__(self) -> OnTheFlyCallback:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._finish(exc)

    def _finish(self, error: BaseException | None) -> None:
        """Close the run (idempotent); Ctrl-C is a clean stop, as in quickstart."""
        if self._epochs is not None:
            self._epochs.close()  # type: ignore[attr-defined]  # run.epochs() is a generator
            self._epochs = None
        run, self._run = self._run, None
        self._in_step = False
        if run is None:
            return
        self._last = run
        if isinstance(error, KeyboardInterrupt):
            run.stop()
            error = None
        run.close(error)


def _sized(loader: Any) -> bool:
    try:
        len(loader)
    except TypeError:
        return False
    return True
