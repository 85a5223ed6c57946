"""The loop On The Fly runs for you: ``Trainer.fit`` (``onthefly.quickstart`` builds on it).

One training step, top to bottom: zero the gradients (at the start of an accumulation window),
move the batch (non-blocking when the loader pins memory), forward under optional autocast, the
user's loss for backward, backward (scaled under fp16), and at an accumulation boundary: unscale,
clip, step, step a per-step scheduler. Then ``run.step`` records the per-sample values on
the device and applies queued commands. Nothing in the step reads a device value.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError, DataError, LossError, OnTheFlyError
from ..signals.per_sample import LossFn, PerSampleLoss
from ..store.session import SessionStore
from .batch import BatchSpec, Field, Fields, ForwardFn, batch_size_of, describe, to_device
from .callbacks import Callback
from .device import amp_mode, autocast_dtype, pick_device
from .distributed import distributed_loader, is_wrapped, unwrapped, world
from .embed import embeddings
from .evaluate import Evaluator, Metric
from .loader import TrackedLoader
from .replay_log import REPLAY_WINDOW, ReplayedBatch, ReplayLog
from .run import Run, host_lr

__all__ = ["REPLAY_WINDOW", "FitSummary", "ReplayedBatch", "StepObjects", "Trainer"]

Forward = Callable[[nn.Module, Any], tuple[Any, Any, torch.Tensor, "torch.Tensor | None"]]


@dataclass
class StepObjects:
    """What a training step changes: the model, its optimizer, scheduler and scaler, and whether
    the next step opens an accumulation window (zeroes the gradients first)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    zero_grad_next: bool = True


@dataclass
class FitSummary:
    status: str
    session_dir: Path
    run_id: int
    epochs: int
    steps: int
    seconds: float
    train_loss: float | None  # mean per-sample loss of the last epoch trained (so far, if stopped in it)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        def fmt(result: dict[str, float]) -> str:
            return "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "samples")

        lines = [
            f"On The Fly: run {self.run_id} {self.status} after {self.epochs} epoch(s), "
            f"{self.steps} step(s), {self.seconds:.1f} s",
        ]
        if self.train_loss is not None:
            lines.append(f"  train  loss {self.train_loss:.4f} (epoch mean)")
        if self.val:
            lines.append(f"  val    {fmt(self.val)}")
        if self.test:
            lines.append(f"  test   {fmt(self.test)}")
        lines.append(f"  session {self.session_dir}")
        return "\n".join(lines)


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        train_loader: DataLoader,
        val_loader: DataLoader | None = None,
        test_loader: DataLoader | None = None,
        project: str = "onthefly",
        run_name: str = "run",
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        device: str | torch.device | None = None,
        amp: bool | str = False,
        grad_clip: float | None = None,
        accumulate_grad_batches: int = 1,
        inputs: Fields | None = None,
        targets: Field | None = None,
        forward_fn: ForwardFn | None = None,
        callbacks: Sequence[Callback] = (),
        keep_alive: bool | Callable[[], bool] = False,
        wait_for_run: bool = False,
        resume_from: str | Path | None = None,
        progress: bool = True,
        grad_norm: bool = False,
        val_samples: bool = False,
        export_dataset: Any = None,
        metrics: Mapping[str, Metric] | None = None,
        val_every_steps: int | None = None,
        max_steps: int | None = None,
        tensorboard_dir: str | Path | None = None,
        session: SessionStore | None = None,
        parent: tuple[int, int | None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) \
                or accumulate_grad_batches < 1:
            raise ConfigError(f"accumulate_grad_batches must be a whole number >= 1, got {accumulate_grad_batches!r}")
        if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float))
                                      or not grad_clip > 0):
            raise ConfigError(f"grad_clip must be a number > 0 (the max gradient norm) or None, got {grad_clip!r}")
        if val_every_steps is not None and (isinstance(val_every_steps, bool) or not isinstance(val_every_steps, int)
                                            or val_every_steps < 1):
            raise ConfigError(f"val_every_steps must be a whole number >= 1 or None, got {val_every_steps!r}")
        if val_every_steps is not None and val_loader is None:
            raise ConfigError("val_every_steps needs a val_loader to validate on")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ConfigError(f"max_steps must be a whole number >= 1 or None, got {max_steps!r}")
        self.max_steps = max_steps
        for name, metric in (metrics or {}).items():
            if not isinstance(name, str) or not name.isidentifier() or not callable(metric):
                raise ConfigError(f"metrics must map names (identifiers) to functions fn(outputs, targets) -> float; "
                                  f"got {name!r}: {metric!r}")
        self.loss = PerSampleLoss(loss_fn)
        self.spec = BatchSpec(inputs, targets, forward_fn)
        # Under torchrun: each rank its share of every epoch, its own GPU, the model in DDP.
        self.world = world()
        if self.world is not None:
            train_loader = distributed_loader(train_loader, self.world)
            if device is None and torch.cuda.is_available():
                device = f"cuda:{self.world.local_rank}"
        # Fail at registration: every loader is checked now, not at the end of the first epoch.
        self.train_loader = TrackedLoader(train_loader, name="train_loader")
        for name, loader in (("val_loader", val_loader), ("test_loader", test_loader)):
            if loader is not None:
                TrackedLoader(loader, name=name)
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.device = pick_device(device)
        # self.model: the user's module (saved, evaluated, copied); the step trains through
        # its DistributedDataParallel wrapper under torchrun (the user's own wrapper, or ours).
        wrapper = model if is_wrapped(model) else None
        self.model = unwrapped(model).to(self.device)
        if wrapper is None and self.world is not None:
            from torch.nn.parallel import DistributedDataParallel

            wrapper = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.accumulate = accumulate_grad_batches
        self.amp = amp
        # amp: float16 with a GradScaler (CUDA) or bfloat16 without one; checked now, not at step 1.
        mode = amp_mode(amp)
        self._amp_dtype = autocast_dtype(self.device, mode) if mode is not None else None
        self.scaler = torch.amp.GradScaler("cuda") if self._amp_dtype == torch.float16 else None
        self.val_every_steps = val_every_steps
        self.non_blocking = train_loader.pin_memory and self.device.type == "cuda"
        self.show_progress = progress
        # Validation and test; with val_samples, every validation's per-sample values too.
        # Validation and test run whole on every rank (the same figures everywhere); rank 0 records them.
        rank_zero = self.world is None or self.world.rank == 0
        evaluator = Evaluator(self.model, self.loss, self.spec, self.device, {"val": val_loader, "test": test_loader},
                              autocast=self._autocast,
                              record=frozenset({"val"} if val_samples and rank_zero else ()),
                              metrics=metrics)
        self.run = Run(
            project=project, run_name=run_name, model=self.model, optimizer=optimizer,
            scheduler=scheduler, scaler=self.scaler, device=self.device, keep_alive=keep_alive,
            wait_for_run=wait_for_run, resume_from=resume_from, callbacks=callbacks, grad_norm=grad_norm,
            evaluator=evaluator, embed=self._embed, train_dataset=train_loader.dataset,
            export_dataset=export_dataset, session=session, parent=parent, tensorboard_dir=tensorboard_dir,
            config={"device": str(self.device), "amp": amp,
                    "amp_dtype": str(self._amp_dtype).removeprefix("torch.") if mode else None,
                    "grad_clip": grad_clip, "val_every_steps": val_every_steps, "metrics": sorted(metrics or {}),
                    "max_steps": max_steps,
                    "accumulate_grad_batches": accumulate_grad_batches,
                    "optimizer": type(optimizer).__name__, "model": type(model).__name__,
                    "per_sample_loss": self.loss.method},
        )
        self._checked_first_step = False
        self._deferred = False  # decided at the first step (see _small_rows)
        self.live = StepObjects(wrapper if wrapper is not None else self.model, optimizer, scheduler, self.scaler)
        # The batches trained since (at most) REPLAY_WINDOW batches ago, for the determinism check.
        self.replayable = ReplayLog(REPLAY_WINDOW)
        # Live data curation (onthefly.actions.curate): a weight per training sample, on the
        # device, applied to each sample's loss; None until a curation card first applies.
        self.sample_weights: torch.Tensor | None = None
        self._curations: list[tuple[int, np.ndarray, float, dict[str, Any]]] = []  # (from step, ...)

    # ---- the step ----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def _forward_and_loss(self, model: nn.Module, batch: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor | None]:
        outputs, targets = self.spec.forward(model, batch)
        if self._deferred:
            return outputs, targets, self.loss.loss_fn(outputs, targets), None
        return self._per_sample_forward(outputs, targets)

    def forward_for(self, kind: str) -> Forward:
        """The forward pass and loss a batch recorded as ``kind`` (see ``ReplayedBatch``) was
        trained with, for training it again."""
        if kind not in ("deferred", "per_sample"):
            raise ValueError(f"a {kind} batch cannot be trained again")

        def forward(model: nn.Module, batch: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor | None]:
            outputs, targets = self.spec.forward(model, batch)
            if kind == "deferred":
                return outputs, targets, self.loss.loss_fn(outputs, targets), None
            return self._per_sample_forward(outputs, targets)

        return forward

    def _per_sample_forward(self, outputs: Any, targets: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor | None]:
        loss, per_sample = self.loss(outputs, targets, batch_size_of(outputs, targets))
        return outputs, targets, loss, per_sample

    def _first_forward(self, model: nn.Module, batch: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor | None]:
        """The first step, with errors turned into messages that name the shapes involved."""
        try:
            outputs, targets = self.spec.forward(model, batch)
        except OnTheFlyError:
            raise
        except Exception as exc:
            raise DataError(
                f"the model failed on the first batch ({describe(batch)}): {type(exc).__name__}: {exc}. "
                "Check that the model's input size matches the data, or pass inputs=/targets=/forward_fn= "
                "to say how a batch feeds the model."
            ) from exc
        try:
            loss, per_sample = self.loss(outputs, targets, batch_size_of(outputs, targets))
        except OnTheFlyError:
            raise
        except Exception as exc:
            raise LossError(
                f"loss_fn(outputs, targets) failed on the first batch: outputs are {describe(outputs)}, "
                f"targets are {describe(targets)}: {type(exc).__name__}: {exc}. Check that the model's "
                "output matches what the loss expects (e.g. CrossEntropyLoss wants [batch, classes] "
                "logits and [batch] class indices)."
            ) from exc
        self._checked_first_step = True
        self._deferred = self.loss.deferrable and _small_rows(outputs) and _small_rows(targets)
        return outputs, targets, loss, None if self._deferred else per_sample

    def schedule_curation(self, from_step: int, indices: np.ndarray, weight: float, note: dict[str, Any]) -> None:
        """Training thread: from step ``from_step`` on, the losses of ``indices`` weigh ``weight``."""
        self._curations.append((from_step, np.asarray(indices, dtype=np.int64), float(weight), note))
        self._curations.sort(key=lambda c: c[0])

    def _apply_curations(self) -> None:
        step = self.run.global_step + 1  # the step about to be trained
        while self._curations and self._curations[0][0] <= step:
            _, indices, weight, note = self._curations.pop(0)
            if self.sample_weights is None:
                size = len(self.train_loader.original.dataset)  # type: ignore[arg-type]
                self.sample_weights = torch.ones(size, device=self.device)
            self.sample_weights[torch.as_tensor(indices, device=self.device)] = weight
            self.run.bus.publish("curation_applied", {**note, "weight": weight, "samples": int(indices.size),
                                                      "from_step": step}, run_id=self.run.run_id, step=step - 1,
                                 epoch=self.run.epoch)

    def _curated_forward(self, model: nn.Module, batch: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor | None]:
        """The forward pass with each sample's loss weighed by its curation weight. The batch's
        indices go to the device without a wait."""
        assert self.sample_weights is not None and self.run._indices is not None
        outputs, targets = self.spec.forward(model, batch)
        index = torch.as_tensor(np.asarray(self.run._indices, dtype=np.int64)).to(self.device, non_blocking=True)
        loss, per_sample = self.loss.weighted(outputs, targets, batch_size_of(outputs, targets),
                                              self.sample_weights[index])
        return outputs, targets, loss, per_sample

    def _train_step(self, batch: Any, boundary: bool) -> None:
        if self._curations:
            self._apply_curations()
        lr = host_lr(self.optimizer.param_groups[0]["lr"])  # the rate this step uses, before a scheduler step
        forward = self._forward_and_loss if self._checked_first_step else self._first_forward
        kind = "deferred" if self._deferred else "per_sample"
        if self.sample_weights is not None and self._checked_first_step and self.run._indices is not None:
            forward, kind = self._curated_forward, "curated"  # curated: every sample's loss, weighed
        outputs, targets, loss, per_sample, factor = self.compute_step(self.live, batch, boundary, forward, live=True)
        # What the determinism check's replay needs to train this batch again (written in place).
        self.replayable.append(self.run.epoch, self.run.batch_in_epoch, self.run._indices, kind, loss)
        if per_sample is None:  # the fast path: per-sample values derived at the next flush
            self.run.step_outputs(outputs, targets, self.loss, loss=loss, boundary=boundary, lr=lr,
                                  grad_norm_factor=factor)
        else:
            self.run.step(per_sample, loss=loss, logits=outputs, targets=targets, boundary=boundary, lr=lr,
                          grad_norm_factor=factor)
        if self.run.fires("on_train_batch_end"):
            self.run.fire("on_train_batch_end", batch, outputs, loss)

    def compute_step(self, objects: StepObjects, batch: Any, boundary: bool, forward: Forward, *,
                     live: bool = False) -> tuple[Any, Any, torch.Tensor, torch.Tensor | None, Any]:
        """One training step on ``objects`` (the run's own, or the determinism check's copies):
        zero the gradients at a window's start, move the batch, forward and loss, backward, and at
        a ``boundary`` the optimizer step. Only the live step reads the gradient-norm factor and
        calls the user's ``on_before_optimizer_step`` hooks. Returns (outputs, targets, loss,
        per-sample loss or None, gradient-norm factor or None)."""
        if objects.zero_grad_next:
            # At the start of an accumulation window, right before the forward pass, as in the
            # canonical loop: freeing gradients just after optimizer.step() instead measured ~15 %
            # slower on CPU (the allocator then re-faults their memory every step).
            objects.optimizer.zero_grad(set_to_none=True)
            objects.zero_grad_next = False
        batch = to_device(batch, self.device, self.non_blocking)
        with self._autocast():
            outputs, targets, loss, per_sample = forward(objects.model, batch)
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        if objects.scaler is not None:
            objects.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        # Before the optimizer step: GradScaler.update() changes the scale in place.
        factor = self._grad_norm_factor(outputs, targets) if live and self.run.grad_norms is not None else None
        if boundary:
            self._optimizer_step(objects, live=live)
        return outputs, targets, loss, per_sample, factor

    def _optimizer_step(self, objects: StepObjects, *, live: bool = True) -> None:
        """The end of an accumulation window: unscale, clip, step, step a per-step scheduler."""
        scaler = objects.scaler
        if self.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(objects.optimizer)
            # Returns the norm as a device tensor; we do not read it (that would sync).
            torch.nn.utils.clip_grad_norm_(objects.model.parameters(), self.grad_clip)
        if self.run.fires("on_before_optimizer_step"):
            if scaler is not None and self.grad_clip is None:
                scaler.unscale_(objects.optimizer)  # the hook sees the true gradients
            if live:
                self.run.fire("on_before_optimizer_step", objects.optimizer)
        if scaler is not None:
            scaler.step(objects.optimizer)
            scaler.update()
        else:
            objects.optimizer.step()
        objects.zero_grad_next = True
        if objects.scheduler is not None and self.scheduler_interval == "step":
            objects.scheduler.step()

    def _grad_norm_factor(self, outputs: Any, targets: Any) -> float | torch.Tensor:
        """What the backpropagated loss was multiplied by, relative to the sum of per-sample losses."""
        factor: float | torch.Tensor = 1.0 / self.accumulate
        if self.loss.reduction != "sum":
            factor = factor / batch_size_of(outputs, targets)
        scale = getattr(self.scaler, "_scale", None)  # a device tensor: reading it would sync
        # factor * scale is a new tensor: the value now, whatever update() does to the scale later.
        return factor * scale if scale is not None else factor

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, max_epochs: int, *, do_test_after: bool = False) -> FitSummary:
        run = self.run
        display = None
        if self.show_progress:
            # Here, not at import: rich (130 ms, 1.5 MiB) only for a terminal display.
            from .progress import ProgressDisplay

            display = ProgressDisplay()
        unsubscribe = run.bus.subscribe(display) if display is not None else None
        error: BaseException | None = None
        n_batches = len(self.train_loader) if self.train_loader.length is not None else None
        try:
            run.fire("on_fit_start")
            on_plan_end = (lambda: run.evaluate("test")) if do_test_after and self.test_loader else None
            reached = self.max_steps is not None and run.global_step >= self.max_steps  # resumed at or past it
            for _epoch in () if reached else run.epochs(max_epochs, on_plan_end=on_plan_end):
                self.model.train()
                for batch in run.batches(self.train_loader, ends_epoch=False):
                    at_end = n_batches is not None and run.batch_in_epoch == n_batches
                    boundary = at_end or run.batch_in_epoch % self.accumulate == 0
                    self._train_step(batch, boundary=boundary)
                    if self.max_steps is not None and boundary and run.global_step >= self.max_steps:
                        reached = True  # at an epoch's last batch, the epoch ends as usual first
                        if not at_end:
                            break
                    if self.val_every_steps is not None and boundary and not at_end \
                            and run.global_step % self.val_every_steps == 0:
                        run.evaluate("val")  # mid-epoch; the epoch's end validates anyway
                if reached and run.batch_in_epoch != n_batches:
                    # max_steps inside an epoch: training ends at this step (a checkpoint resumes here)
                    if self.val_loader is not None:
                        run.evaluate("val")
                    if on_plan_end is not None:
                        on_plan_end()
                    break
                if run.stopping:
                    break
                if not self.live.zero_grad_next:
                    # An unsized loader ended inside an accumulation window: its gradients step
                    # now, as at the end of a sized epoch, never leaking into the next epoch.
                    self._optimizer_step(self.live)
                    run.step_boundary()
                val = run.evaluate("val") if self.val_loader is not None else None
                if self.scheduler is not None and self.scheduler_interval == "epoch":
                    self._step_epoch_scheduler(val)
                run.end_epoch()  # a checkpoint from here on (on_epoch_end) resumes at the next epoch
                run.fire("on_epoch_end")
                if reached:  # max_steps at the epoch's last step
                    if on_plan_end is not None:
                        on_plan_end()
                    break
        except KeyboardInterrupt:
            run.stop()  # Ctrl-C: a clean stop, the session keeps everything so far
        except BaseException as exc:
            error = exc
            with contextlib.suppress(Exception):
                run.fire("on_exception", exc)
            raise
        finally:
            with contextlib.suppress(Exception):
                run.fire("on_fit_end")
            run.close(error)
            if unsubscribe is not None:
                unsubscribe()
            if display is not None:
                display.close()
        return self.summary()

    def _step_epoch_scheduler(self, val: dict[str, float] | None) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Without validation: the epoch's mean training loss, the same in every run (the
            # training thread waits for the epoch's rows, not for the last flush that arrived).
            metric = val["loss"] if val else self.run.epoch_loss(self.run.epoch)
            if metric is not None:
                self.scheduler.step(metric)
        else:
            self.scheduler.step()

    def _embed(self, indices: np.ndarray, layer: str | None) -> tuple[str, np.ndarray]:
        return embeddings(self.model, self.train_loader.original, indices, self.spec, self.device, layer,
                          self._autocast)

    def summary(self) -> FitSummary:
        run = self.run
        return FitSummary(
            status=run.status, session_dir=run.session.dir, run_id=run.run_id, epochs=run.epoch,
            steps=run.global_step, seconds=time.time() - run.started,
            train_loss=run.epoch_loss(), val=run.last_eval.get("val", {}),
            test=run.last_eval.get("test", {}),
        )


# Outputs/targets with at most this many values per sample are buffered whole and per-sample
# values derived at flush time; larger ones (e.g. a language model's vocabulary) are reduced to
# per-sample values at each step instead.
MAX_BUFFERED_ROW = 256


def _small_rows(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1 and math.prod(value.shape[1:]) <= MAX_BUFFERED_ROW
