"""Distillation, the merge that trains: a student run learns from the mean of its teachers'
softened class probabilities (Hinton et al.), for the weight-space merges' fallback.

The student is a run of the session like a fork: a copy of the live run's module holding the
weights of ``student`` (a parent, or any run of the session such as the generalist; default the
first parent), the live run's optimizer class with the card's learning rate, ``budget`` steps
on the card's data (drawn with the card's seed), its curves and per-sample values recorded. Its
loss per sample is ``alpha * T**2 * KL(teachers || student at temperature T) + (1 - alpha) *
cross-entropy at the true label``; on validation the student is scored by cross-entropy alone.
The teachers (every parent) are evaluated on the same inputs inside the student's forward (a
forward hook), without gradients, in eval mode. Classification only: teachers and student must
give logits of shape [batch, classes].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError
from .children import Draws, optimizer_like, seed_all

__all__ = ["distill"]


def distill(trainer: Any, card: Mapping[str, Any], resolved: list[tuple[dict[str, Any], dict[str, Any]]], *,
            on_child: Callable[[Any], None] | None, plan_id: int | None) -> tuple[nn.Module, Any]:
    """Train the student run; returns its model and its Run."""
    from ..engine.trainer import Trainer
    from .merge import add_edges, checkpoint_for, data_indices, model_at

    run = trainer.run
    teachers = []
    for _, record in resolved:
        teacher = model_at(trainer, record).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teachers.append(teacher)
    student_run = card["student"] if card["student"] is not None else resolved[0][0]["run_id"]
    start = next((record for parent, record in resolved if parent["run_id"] == student_run), None) \
        or checkpoint_for(trainer, {"run_id": student_run, "checkpoint_id": None})  # a run that is no teacher
    seed_all(card["seed"])
    student = model_at(trainer, start)
    soft = _SoftTargets(teachers, card["temperature"])
    student.register_forward_hook(soft, with_kwargs=True)
    loss_fn = _DistillLoss(student, soft, card["temperature"], card["alpha"])

    source = trainer.train_loader.original
    data = data_indices(trainer, card)
    pool = np.arange(len(source.dataset), dtype=np.int64) if data is None else data
    batch_size = source.batch_size or 1
    generator = torch.Generator().manual_seed(card["seed"])
    loader = DataLoader(source.dataset, batch_size=batch_size,
                        sampler=Draws(pool, None, card["budget"] * batch_size, generator),
                        num_workers=source.num_workers, collate_fn=source.collate_fn, pin_memory=source.pin_memory,
                        drop_last=source.drop_last, worker_init_fn=source.worker_init_fn, persistent_workers=False)
    lr = card["lr"] if card["lr"] is not None else trainer.optimizer.param_groups[0]["lr"]
    optimizer = optimizer_like(trainer.optimizer, list(student.parameters()), {"lr": lr, "weight_decay": None})
    child = Trainer(model=student, optimizer=optimizer, loss_fn=loss_fn, train_loader=loader,
                    val_loader=trainer.val_loader, test_loader=trainer.test_loader, project=run.project,
                    run_name=card["name"], device=trainer.device, amp=trainer.amp, grad_clip=trainer.grad_clip,
                    inputs=trainer.spec.inputs, targets=trainer.spec.targets, forward_fn=trainer.spec.forward_fn,
                    progress=False, session=run.session, parent=(student_run, start["id"]))
    child.run.config.update({"plan_id": plan_id, "distilled_from": [p["run_id"] for p, _ in resolved],
                             "student_checkpoint_id": start["id"]})
    run.session.set_run_config(child.run.run_id, child.run.config)
    add_edges(run, child.run.run_id, resolved, plan_id or 0)
    if all(parent["run_id"] != student_run for parent, _ in resolved):  # where its weights came from
        run.session.add_edge(child_id=child.run.run_id, parent_id=student_run, kind="student", step=start["step"],
                             checkpoint_id=start["id"], plan_id=plan_id)
    if on_child is not None:
        on_child(child.run)
    child.fit(1)
    student.train(False)
    return student, child.run


class _SoftTargets:
    """A forward hook on the student: while it trains, the teachers' mean probabilities at
    temperature T for the same inputs, kept for the loss of this batch."""

    def __init__(self, teachers: list[nn.Module], temperature: float) -> None:
        self.teachers, self.temperature = teachers, temperature
        self.probabilities: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return
        with torch.no_grad():
            mean = None
            for teacher in self.teachers:
                logits = teacher(*args, **kwargs)
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                    raise ConfigError("method: distill needs a classifier whose outputs are logits of shape "
                                      f"[batch, classes]; the teacher gave {type(logits).__name__}")
                p = F.softmax(logits.float() / self.temperature, dim=1)
                mean = p if mean is None else mean + p
            assert mean is not None
            self.probabilities = mean / len(self.teachers)


class _DistillLoss:
    """Per-sample distillation loss while the student trains; cross-entropy when it is evaluated."""

    def __init__(self, student: nn.Module, soft: _SoftTargets, temperature: float, alpha: float) -> None:
        self.student, self.soft, self.temperature, self.alpha = student, soft, temperature, alpha

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(outputs, targets, reduction="none")
        if not self.student.training or self.soft.probabilities is None:
            return hard
        teacher = self.soft.probabilities
        log_student = F.log_softmax(outputs.float() / self.temperature, dim=1)
        kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - log_student)).sum(dim=1)
        return self.alpha * self.temperature ** 2 * kl + (1 - self.alpha) * hard
