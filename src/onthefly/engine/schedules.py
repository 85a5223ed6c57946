"""Changing a parameter group's learning rate so that its scheduler keeps the change.

Writing ``group["lr"]`` is not enough under a scheduler: the closed-form ones (LambdaLR, CyclicLR,
OneCycleLR, CosineAnnealingWarmRestarts) recompute every rate from bases they stored, and the
chainable ones (StepLR, ExponentialLR, ...) go back to their ``base_lrs`` at a SequentialLR
milestone, CosineAnnealingLR at a restart. :func:`set_group_lr` rescales the schedule instead, so
that it passes through the new rate now and keeps its shape from there on:

* every rate the schedule would have given becomes ``factor`` times as large,
  ``factor = lr / current lr`` (the bases, OneCycleLR's ``max_lr``/``min_lr``, CyclicLR's
  ``max_lrs`` and ReduceLROnPlateau's ``min_lrs`` are multiplied by it);
* under CosineAnnealingLR / CosineAnnealingWarmRestarts with ``eta_min`` > 0, which anneal towards
  that one absolute number for every group, the distance above ``eta_min`` is rescaled instead:
  ``x -> eta_min + (x - eta_min) * (lr - eta_min) / (current - eta_min)``.

When neither keeps the change (a rate of 0, ``lr`` at or below ``eta_min``, a SequentialLR or
ChainedScheduler that mixes both kinds, a scheduler that is not torch's), nothing is changed and
the reason is returned. No torch scheduler reads or writes ``weight_decay``, so that setting needs
none of this.

Runs on the training thread, at a step boundary (the command controller applies set_lr); it reads ``float(lr)``, a host
sync when the rates are device tensors, once per command.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator, MutableSequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import lr_scheduler as sched

__all__ = ["set_group_lr"]

# Schedulers that anneal towards an absolute eta_min, one number shared by every group.
_FLOORED = (sched.CosineAnnealingLR, sched.CosineAnnealingWarmRestarts)
# Schedulers whose only rule is their children's.
_CONTAINERS = (sched.SequentialLR, sched.ChainedScheduler)
# The per-group values OneCycleLR reads at every step.
_ONE_CYCLE_KEYS = ("initial_lr", "max_lr", "min_lr")


class _Refused(Exception):
    """Internal: the reason a change cannot hold; turned into the returned message."""


@dataclass(frozen=True)
class _Rescale:
    """The affine map that takes a group's schedule through the new rate (floor 0: a factor)."""

    floor: float
    ratio: float

    def __call__(self, value: float) -> float:
        return self.floor + (value - self.floor) * self.ratio


# A planned write, container[key] = value (a param group's key or a per-group list's index),
# computed before anything is changed.
_Write = tuple[Any, "str | int", float]


def set_group_lr(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float,
                 group: int | None) -> str | None:
    """Set the learning rate of parameter group ``group`` (``None``: every group) to ``lr`` so
    that it holds under ``scheduler`` (``None`` or any ``torch.optim.lr_scheduler`` scheduler,
    ReduceLROnPlateau included): the group's rate is ``lr`` now, and the schedule goes on as the
    same schedule rescaled to pass through it (see the module docstring).

    Returns ``None`` when done, else why it was refused (naming the scheduler), having changed
    nothing."""
    try:
        writes = _plan(optimizer, scheduler, lr, group)
    except _Refused as refused:
        return str(refused)
    for container, key, value in writes:
        _write(container, key, value)
    return None


def _plan(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float,
          group: int | None) -> list[_Write]:
    """Every write the change needs, computed from the current state; raises _Refused."""
    groups = optimizer.param_groups
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise _Refused(f"lr must be a finite number > 0, got {lr!r}")
    if group is not None and not 0 <= group < len(groups):
        raise _Refused(f"the optimizer has {len(groups)} parameter group(s); there is no group {group}")
    lr = float(lr)
    targets = range(len(groups)) if group is None else [group]
    if scheduler is None:
        return [(groups[i], "lr", lr) for i in targets]

    name = _describe(scheduler)
    nodes = list(_walk(scheduler, optimizer))
    floors = sorted({float(node.eta_min) for node in nodes if isinstance(node, _FLOORED)})
    unfloored = [node for node in nodes if not isinstance(node, (*_FLOORED, *_CONTAINERS))]
    if len(floors) > 1 or (floors and floors[0] != 0 and unfloored):
        kinds = ", ".join(f"eta_min={f:g}" for f in floors)
        others = f" and {type(unfloored[0]).__name__}, which scales towards 0" if unfloored else ""
        raise _Refused(
            f"{name} combines schedules that anneal towards different floors ({kinds}{others}), "
            "so no one rescaling keeps all of them; set eta_min=0, or change the rate once only "
            "one of them is left to run"
        )
    floor = floors[0] if floors else 0.0
    one_cycle = any(isinstance(node, sched.OneCycleLR) for node in nodes)

    writes: list[_Write] = []
    for i in targets:
        current = float(groups[i]["lr"])
        rescale = _rescale(name, i, current, lr, floor)
        writes.append((groups[i], "lr", lr))
        # initial_lr is where schedulers (and SequentialLR) start from; OneCycleLR reads all three.
        for key in _ONE_CYCLE_KEYS if one_cycle else ("initial_lr",):
            if key in groups[i]:
                writes.append((groups[i], key, rescale(float(groups[i][key]))))
        for node in nodes:
            for values in _per_group_lists(node):
                if i < len(values):
                    old = float(values[i])
                    writes.append((values, i, lr if old == current else rescale(old)))
    return _unique(writes)


def _walk(scheduler: Any, optimizer: torch.optim.Optimizer) -> Iterator[Any]:
    """The scheduler and every child whose rule can still move the rate."""
    if not isinstance(scheduler, (sched.LRScheduler, sched.ReduceLROnPlateau)):
        raise _Refused(
            f"the scheduler is a {type(scheduler).__name__}, not a torch.optim.lr_scheduler "
            "scheduler, so there is no telling whether it would undo a new rate at its next step; "
            "change the rate through that scheduler instead"
        )
    if getattr(scheduler, "optimizer", None) is not optimizer:
        raise _Refused(f"the scheduler ({type(scheduler).__name__}) drives another optimizer")
    yield scheduler
    children: list[Any] = []
    if isinstance(scheduler, sched.SequentialLR):
        # The child that computes the next rate and the ones after it; earlier ones never run
        # again (the next rate of one that continues from the current rate is the new one).
        children = scheduler._schedulers[bisect_right(scheduler._milestones, scheduler.last_epoch + 1):]
    elif isinstance(scheduler, sched.ChainedScheduler):
        children = list(scheduler._schedulers)
    for child in children:
        yield from _walk(child, optimizer)


def _rescale(name: str, group: int, current: float, lr: float, floor: float) -> _Rescale:
    if floor == 0:
        if current == 0:
            raise _Refused(
                f"group {group}'s learning rate is 0 under {name}; a schedule at 0 cannot be "
                f"rescaled to pass through {lr:g}"
            )
        return _Rescale(0.0, lr / current)
    if lr <= floor:
        raise _Refused(
            f"{name} anneals towards eta_min={floor:g}; ask for a learning rate above it "
            f"(got {lr:g}), or use eta_min=0"
        )
    if current <= floor:
        raise _Refused(
            f"group {group}'s learning rate is not above the eta_min ({floor:g}) of {name}, so there is no "
            "schedule above it to rescale; change it once the schedule has moved off eta_min"
        )
    return _Rescale(floor, (lr - floor) / (current - floor))


def _per_group_lists(node: Any) -> Iterator[MutableSequence[Any]]:
    """The lists, one entry per group, from which ``node`` computes or reports rates."""
    names = ["base_lrs", "_last_lr"]
    if isinstance(node, sched.CyclicLR):
        names.append("max_lrs")
    if isinstance(node, sched.ReduceLROnPlateau):
        names.append("min_lrs")  # the clamp scales too, so every later rate is factor x
    for attribute in names:
        values = getattr(node, attribute, None)
        if isinstance(values, list):
            yield values


def _unique(writes: list[_Write]) -> list[_Write]:
    """One write per slot: a SequentialLR's _last_lr is its active child's list."""
    seen: set[tuple[int, str | int]] = set()
    kept = []
    for container, key, value in writes:
        if (id(container), key) not in seen:
            seen.add((id(container), key))
            kept.append((container, key, value))
    return kept


def _write(container: Any, key: str | int, value: float) -> None:
    old = container[key]
    if isinstance(old, torch.Tensor) and key == "lr":
        old.fill_(value)  # in place, as torch does: a compiled or capturable step holds this tensor
    elif isinstance(old, torch.Tensor):
        container[key] = torch.full_like(old, value)  # a new tensor: the old one may be the user's
    else:
        container[key] = value


def _describe(scheduler: Any) -> str:
    children = getattr(scheduler, "_schedulers", None) if isinstance(scheduler, _CONTAINERS) else None
    if children is None:
        return type(scheduler).__name__
    return f"{type(scheduler).__name__}({', '.join(_describe(c) for c in children)})"
