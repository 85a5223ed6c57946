"""Typed hooks with no-op defaults: the way to extend the loop without editing it.

Override only what you need; hooks you do not override cost nothing on the hot path. A callback
with state returns it from ``state_dict`` (tensors, numbers, strings, lists, dicts) and gets it
back in ``load_state_dict`` when a run resumes from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .run import Run

__all__ = ["HOOKS", "Callback", "EarlyStopping", "ModelCheckpoint"]

HOOKS = ("on_fit_start", "on_epoch_start", "on_train_batch_end", "on_before_optimizer_step", "on_step_end",
         "on_validation_end", "on_epoch_end", "on_save_checkpoint", "on_load_checkpoint", "on_exception",
         "on_fit_end")


class Callback:
    def on_fit_start(self, run: Run) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, run: Run) -> None:
        """Before the first batch of each epoch."""

    def on_train_batch_end(self, run: Run, batch: Any, outputs: Any, loss: torch.Tensor) -> None:
        """After each training batch's backward pass (and optimizer step at a window's end):
        the batch as the model got it (on the device), its outputs and the loss backpropagated
        (device tensors: reading them, ``loss.item()``, waits for the device)."""

    def on_before_optimizer_step(self, run: Run, optimizer: torch.optim.Optimizer) -> None:
        """Right before ``optimizer.step()``: gradients are final (unscaled and clipped)."""

    def on_step_end(self, run: Run) -> None:
        """After each optimizer step, after queued commands were applied (``run.global_step``)."""

    def on_validation_end(self, run: Run, metrics: dict[str, float]) -> None:
        """After each validation: its ``loss`` (and ``accuracy``, your ``metrics=``)."""

    def on_epoch_end(self, run: Run) -> None:
        """After each epoch's training batches and validation."""

    def on_save_checkpoint(self, run: Run, folder: Path) -> None:
        """After a checkpoint of the run was written to ``folder``."""

    def on_load_checkpoint(self, run: Run, folder: Path) -> None:
        """After the run was restored from the checkpoint in ``folder`` (a resume)."""

    def on_exception(self, run: Run, error: BaseException) -> None:
        """When training fails with ``error`` (before ``on_fit_end``; the run is then marked failed)."""

    def on_fit_end(self, run: Run) -> None:
        """After training ends, however it ends."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class EarlyStopping(Callback):
    """Stop training when a validation metric has not improved for ``patience`` validations:
    ``monitor`` is "val_loss", "val_accuracy" or "val_<name>" of a ``metrics=`` function; ``mode``
    "min" or "max" (default: max for accuracy, else min); an improvement must beat the best by
    more than ``min_delta``. The stop is a "stop" command (logged, applied at the next step
    boundary) and an ``early_stopping`` event says why; its state travels in checkpoints."""

    def __init__(self, monitor: str = "val_loss", *, patience: int = 3, mode: str | None = None,
                 min_delta: float = 0.0) -> None:
        if not monitor.startswith("val_") or len(monitor) <= 4:
            raise ValueError(f"monitor must name a validation metric such as 'val_loss', got {monitor!r}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a whole number >= 1, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.patience, self.min_delta = monitor, patience, float(min_delta)
        self.mode = mode or ("max" if monitor == "val_accuracy" else "min")
        self.best: float | None = None
        self.waited = 0
        self.stopped = False

    def on_validation_end(self, run: Run, metrics: dict[str, float]) -> None:
        name = self.monitor.removeprefix("val_")
        if name not in metrics:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r} but validation gave "
                             f"{sorted('val_' + k for k in metrics if k != 'samples')}")
        value = float(metrics[name])
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience and not self.stopped:
            self.stopped = True
            run.bus.publish("early_stopping", {"monitor": self.monitor, "best": self.best, "last": value,
                                               "patience": self.patience}, run_id=run.run_id,
                            step=run.global_step, epoch=run.epoch)
            run.request("stop")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "waited": self.waited, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.waited, self.stopped = state["best"], int(state["waited"]), bool(state["stopped"])


class ModelCheckpoint(Callback):
    """Checkpoint every ``every_epochs`` epochs (after validation) and/or every ``every_steps``
    steps, keeping the ``keep_last`` newest and the ``keep_best`` best by ``monitor`` (a
    validation metric, "val_loss" by default for best; ``mode`` as in EarlyStopping); None keeps
    all. The newest is always kept, and so is any checkpoint the session refers to (a fork point,
    a tested model, a merge's parent). Its list travels in checkpoints, so a resumed run goes on
    pruning the same way."""

    def __init__(self, *, every_epochs: int | None = 1, every_steps: int | None = None, keep_last: int | None = None,
                 keep_best: int | None = None, monitor: str = "val_loss", mode: str | None = None) -> None:
        for name, value in (("every_epochs", every_epochs), ("every_steps", every_steps), ("keep_last", keep_last),
                            ("keep_best", keep_best)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, got {value!r}")
        if every_epochs is None and every_steps is None:
            raise ValueError("give every_epochs or every_steps (or both)")
        if not monitor.startswith("val_") or len(monitor) <= 4:
            raise ValueError(f"monitor must name a validation metric such as 'val_loss', got {monitor!r}")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.keep_last, self.keep_best, self.monitor = keep_last, keep_best, monitor
        self.mode = mode or ("max" if monitor == "val_accuracy" else "min")
        self.saved: list[dict[str, Any]] = []  # {"id", "step", "score"}, oldest first: the ones still kept

    def on_step_end(self, run: Run) -> None:
        if self.every_steps is not None and run.global_step % self.every_steps == 0:
            self._save(run)

    def on_epoch_end(self, run: Run) -> None:
        if self.every_epochs is not None and (run.epoch + 1) % self.every_epochs == 0:
            self._save(run)

    def _save(self, run: Run) -> None:
        if self.saved and self.saved[-1]["step"] == run.global_step:
            return  # every_steps and every_epochs met at the same step: one checkpoint
        checkpoint_id, why_not = run.checkpoint_here("periodic")
        if checkpoint_id is None:
            run.bus.publish("checkpoint_failed", {"reason": why_not}, run_id=run.run_id, step=run.global_step,
                            epoch=run.epoch)
            return
        value = run.last_eval.get("val", {}).get(self.monitor.removeprefix("val_"))
        self.saved.append({"id": checkpoint_id, "step": run.global_step, "score": value})
        self._prune(run)

    def _prune(self, run: Run) -> None:
        keep = {self.saved[-1]["id"]}
        if self.keep_last is None and self.keep_best is None:
            return
        if self.keep_last is not None:
            keep.update(c["id"] for c in self.saved[-self.keep_last:])
        if self.keep_best is not None:
            scored = [c for c in self.saved if c["score"] is not None]
            scored.sort(key=lambda c: c["score"], reverse=self.mode == "max")
            keep.update(c["id"] for c in scored[:self.keep_best])
        kept = []
        for record in self.saved:
            if record["id"] in keep or not run.session.prune_checkpoint(record["id"]):
                kept.append(record)
        self.saved = kept

    def state_dict(self) -> dict[str, Any]:
        return {"saved": [dict(c) for c in self.saved]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = [dict(c) for c in state["saved"]]


def overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)
