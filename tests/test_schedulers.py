"""set_lr under every scheduler in torch.optim.lr_scheduler: the new rate holds, as the same
schedule rescaled to pass through it, or the change is refused and nothing is changed.

Each schedule is stepped as the Trainer steps it (optimizer.step(), then scheduler.step()) twice:
once untouched (the reference) and once with ``set_group_lr`` after step ``at``. From then on
every rate must be the reference's, rescaled: ``floor + (reference - floor) * ratio``, with
``ratio = (new - floor) / (current - floor)`` (floor 0, a plain factor, except under a
CosineAnnealing* scheduler with eta_min > 0).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly import Callback, Run
from onthefly.engine.schedules import set_group_lr

STEPS = 40
Build = Callable[[torch.optim.Optimizer], Any]


@dataclass(frozen=True)
class Case:
    build: Build
    at: int  # set_group_lr is called after this step (0-based), before the next one
    floor: float = 0.0  # the eta_min the rescaling keeps


def optimizer(lrs: tuple[float, ...] = (0.1,)) -> torch.optim.SGD:
    # momentum: CyclicLR and OneCycleLR cycle it by default
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, momentum=0.9)


def step(scheduler: Any) -> None:
    if isinstance(scheduler, sched.ReduceLROnPlateau):
        scheduler.step(1.0)  # a metric that never improves: a reduction every patience + 1 steps
    else:
        scheduler.step()


Change = Callable[[torch.optim.Optimizer, Any], None]


def trajectory(case: Case, lrs: tuple[float, ...] = (0.1,),
               change: Change | None = None) -> list[list[float]]:
    """The rates each group uses at each step (and after the last one)."""
    opt = optimizer(lrs)
    scheduler = case.build(opt)
    seen = []
    for i in range(STEPS):
        seen.append([float(g["lr"]) for g in opt.param_groups])
        opt.step()
        step(scheduler)
        if change is not None and i == case.at:
            change(opt, scheduler)
    seen.append([float(g["lr"]) for g in opt.param_groups])
    return seen


def rescaled(reference: list[float], now: float, new: float, floor: float) -> list[Any]:
    ratio = (new - floor) / (now - floor)
    return [pytest.approx(floor + (r - floor) * ratio, rel=1e-9, abs=1e-15) for r in reference]


# Each schedule moves within STEPS, with its restarts, milestones and phase changes after `at`.
CASES: dict[str, Case] = {
    "LambdaLR": Case(lambda o: sched.LambdaLR(
        o, lambda e: min(1.0, (e + 1) / 10) * 0.9 ** max(0, e - 10)), at=5),
    "MultiplicativeLR": Case(lambda o: sched.MultiplicativeLR(
        o, lambda e: 0.8 if e % 4 == 0 else 1.05), at=6),
    "StepLR": Case(lambda o: sched.StepLR(o, step_size=7, gamma=0.5), at=10),
    "MultiStepLR": Case(lambda o: sched.MultiStepLR(o, milestones=[5, 12, 25], gamma=0.3), at=8),
    "ConstantLR": Case(lambda o: sched.ConstantLR(o, factor=0.25, total_iters=15), at=6),
    "LinearLR": Case(lambda o: sched.LinearLR(o, start_factor=0.1, total_iters=20), at=8),
    "ExponentialLR": Case(lambda o: sched.ExponentialLR(o, gamma=0.93), at=10),
    "SequentialLR": Case(lambda o: sched.SequentialLR(
        o, [sched.ConstantLR(o, factor=0.1, total_iters=5), sched.ExponentialLR(o, gamma=0.9)],
        milestones=[12]), at=3),  # the milestone restarts from the (rescaled) base
    "SequentialLR-warmup-cosine": Case(lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.1, total_iters=10), sched.CosineAnnealingLR(o, T_max=10)],
        milestones=[10]), at=4),
    "SequentialLR-warmup-cosine-eta_min": Case(lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.1, total_iters=5),
            sched.CosineAnnealingLR(o, T_max=8, eta_min=0.01)],
        milestones=[5]), at=3, floor=0.01),  # the warmup's last rate: only the cosine is left
    "PolynomialLR": Case(lambda o: sched.PolynomialLR(o, total_iters=30, power=2.0), at=10),
    "CosineAnnealingLR": Case(lambda o: sched.CosineAnnealingLR(o, T_max=8), at=10),
    "CosineAnnealingLR-eta_min": Case(
        lambda o: sched.CosineAnnealingLR(o, T_max=8, eta_min=0.01), at=10, floor=0.01),
    "ChainedScheduler": Case(lambda o: sched.ChainedScheduler(
        [sched.ConstantLR(o, factor=0.5, total_iters=12), sched.ExponentialLR(o, gamma=0.95)],
        optimizer=o), at=6),
    "ReduceLROnPlateau": Case(lambda o: sched.ReduceLROnPlateau(
        o, factor=0.5, patience=2, min_lr=0.004), at=4),  # reaches min_lr: the clamp scales too
    "CyclicLR": Case(lambda o: sched.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=4, step_size_down=6, mode="triangular2"), at=5),
    "OneCycleLR": Case(lambda o: sched.OneCycleLR(
        o, max_lr=0.5, total_steps=STEPS, three_phase=True), at=5),
    "CosineAnnealingWarmRestarts": Case(
        lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=6, T_mult=2), at=3),
    "CosineAnnealingWarmRestarts-eta_min": Case(
        lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=6, T_mult=2, eta_min=0.01), at=3, floor=0.01),
}


def test_the_table_covers_every_torch_scheduler() -> None:
    everyone = {cls for cls in vars(sched).values()
                if isinstance(cls, type) and issubclass(cls, sched.LRScheduler)
                and cls not in (sched.LRScheduler, sched._LRScheduler)}
    assert len(everyone) >= 15
    assert everyone <= {type(case.build(optimizer())) for case in CASES.values()}


@pytest.mark.parametrize("factor", [3.0, 0.5])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_set_lr_holds_as_the_rescaled_schedule(case: Case, factor: float) -> None:
    reference = [lrs[0] for lrs in trajectory(case)]
    asked: list[float] = []

    def change(opt: torch.optim.Optimizer, scheduler: Any) -> None:
        asked.append(factor * opt.param_groups[0]["lr"])
        assert set_group_lr(opt, scheduler, asked[0], None) is None
        assert opt.param_groups[0]["lr"] == asked[0]
        assert float(scheduler.get_last_lr()[0]) == asked[0]

    changed = [lrs[0] for lrs in trajectory(case, change=change)]
    now = case.at + 1  # the first rate used after the change
    assert len(set(reference[now:])) > 1, "the schedule must still move after the change"
    assert changed[:now] == reference[:now]
    assert changed[now] == asked[0]
    assert changed[now + 1:] == rescaled(reference[now + 1:], reference[now], asked[0], case.floor)


TWO_GROUPS: dict[str, Case] = {
    "LambdaLR": Case(lambda o: sched.LambdaLR(o, [lambda e: 0.9**e, lambda e: 1 / (1 + e)]), at=5),
    "CyclicLR": Case(lambda o: sched.CyclicLR(
        o, base_lr=[0.01, 0.02], max_lr=[0.1, 0.3], step_size_up=4, mode="triangular2"), at=5),
    "OneCycleLR": Case(lambda o: sched.OneCycleLR(o, max_lr=[0.5, 1.0], total_steps=STEPS), at=5),
    "CosineAnnealingWarmRestarts-eta_min": Case(
        lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=6, T_mult=2, eta_min=0.01), at=3, floor=0.01),
    "ReduceLROnPlateau": Case(lambda o: sched.ReduceLROnPlateau(
        o, factor=0.5, patience=2, min_lr=[0.004, 0.001]), at=4),
    "SequentialLR": Case(lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.1, total_iters=10), sched.CosineAnnealingLR(o, T_max=10)],
        milestones=[10]), at=4),
}


@pytest.mark.parametrize("group", [1, None], ids=["group-1", "every-group"])
@pytest.mark.parametrize("case", TWO_GROUPS.values(), ids=TWO_GROUPS.keys())
def test_set_lr_on_one_group_leaves_the_others_on_their_schedule(case: Case, group: int | None) -> None:
    lrs = (0.1, 0.2)
    reference = trajectory(case, lrs)
    new = 3 * reference[case.at + 1][1]

    def change(opt: torch.optim.Optimizer, scheduler: Any) -> None:
        assert set_group_lr(opt, scheduler, new, group) is None

    changed = trajectory(case, lrs, change=change)
    now = case.at + 1
    changed_groups = [1] if group == 1 else [0, 1]
    for g in range(2):
        ours, theirs = [lrs[g] for lrs in changed], [lrs[g] for lrs in reference]
        if g not in changed_groups:
            assert ours == theirs  # exactly: nothing of this group's schedule was touched
            continue
        assert ours[:now] == theirs[:now]
        assert ours[now] == new
        assert ours[now + 1:] == rescaled(theirs[now + 1:], theirs[now], new, case.floor)


class HandRolledSchedule:
    """Not a torch scheduler: set_lr cannot know what it recomputes from."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer, self.epoch = optimizer, 0

    def step(self) -> None:
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}


def mixed_sequence(o: torch.optim.Optimizer) -> sched.SequentialLR:
    return sched.SequentialLR(o, [sched.LinearLR(o, start_factor=0.1, total_iters=5),
                                  sched.CosineAnnealingLR(o, T_max=8, eta_min=0.01)], milestones=[5])


REFUSALS: dict[str, tuple[Case, float | None, int | None, str]] = {
    # name: (schedule and when, lr (None: 3x the current one), group, the reason given)
    "rate-at-zero": (Case(lambda o: sched.LambdaLR(o, lambda e: 0.0 if 3 <= e < 6 else 1.0), at=2),
                     0.1, None, "group 0's learning rate is 0 under LambdaLR; a schedule at 0 cannot"),
    "at-eta_min": (Case(lambda o: sched.CosineAnnealingLR(o, T_max=4, eta_min=0.01), at=3), None, None,
                   "group 0's learning rate is not above the eta_min (0.01) of CosineAnnealingLR"),
    "below-eta_min": (Case(lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=6, eta_min=0.01), at=2),
                      0.005, None, "CosineAnnealingWarmRestarts anneals towards eta_min=0.01; "
                                   "ask for a learning rate above it (got 0.005)"),
    "mixed-floors-during-warmup": (Case(mixed_sequence, at=1), None, None,
                                   "SequentialLR(LinearLR, CosineAnnealingLR) combines schedules that "
                                   "anneal towards different floors (eta_min=0.01 and LinearLR"),
    "mixed-floors-chained": (Case(lambda o: sched.ChainedScheduler(
        [sched.ExponentialLR(o, gamma=0.9), sched.CosineAnnealingLR(o, T_max=8, eta_min=0.01)]), at=2),
        None, None, "ChainedScheduler(ExponentialLR, CosineAnnealingLR) combines schedules"),
    "not-a-torch-scheduler": (Case(HandRolledSchedule, at=2), None, None,
                              "the scheduler is a HandRolledSchedule, not a torch.optim.lr_scheduler"),
    "another-optimizer": (Case(lambda o: on_another_optimizer(), at=2), None, None,
                          "the scheduler (StepLR) drives another optimizer"),
    "no-such-group": (Case(lambda o: sched.StepLR(o, step_size=3), at=2), None, 3,
                      "the optimizer has 1 parameter group(s); there is no group 3"),
    "rate-not-positive": (Case(lambda o: sched.StepLR(o, step_size=3), at=2), 0.0, None,
                          "lr must be a finite number > 0, got 0.0"),
}


def on_another_optimizer() -> sched.StepLR:
    other = optimizer()
    scheduler = sched.StepLR(other, step_size=3)
    other.step()  # as its training would, before the scheduler steps
    return scheduler


def snapshot(opt: torch.optim.Optimizer, scheduler: Any) -> tuple[Any, Any]:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return copy.deepcopy(groups), copy.deepcopy(scheduler.state_dict())


@pytest.mark.parametrize(("case", "lr", "group", "reason"), REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_set_lr_changes_nothing(case: Case, lr: float | None, group: int | None,
                                         reason: str) -> None:
    outcome: list[str | None] = []

    def change(opt: torch.optim.Optimizer, scheduler: Any) -> None:
        before = snapshot(opt, scheduler)
        outcome.append(set_group_lr(opt, scheduler, 3 * opt.param_groups[0]["lr"] if lr is None else lr,
                                    group))
        assert snapshot(opt, scheduler) == before

    assert trajectory(case, change=change) == trajectory(case)
    assert outcome[0] is not None
    assert reason in outcome[0]


def test_the_mixed_sequence_takes_the_change_once_only_the_cosine_is_left() -> None:
    opt = optimizer()
    scheduler = mixed_sequence(opt)
    for _ in range(3):
        opt.step()
        scheduler.step()
    assert set_group_lr(opt, scheduler, 0.05, None) is not None  # LinearLR computes the next rate
    opt.step()
    scheduler.step()
    assert set_group_lr(opt, scheduler, 0.05, None) is None  # the next rate is the cosine's first


def test_without_a_scheduler_the_rate_is_set() -> None:
    opt = optimizer((0.1, 0.2))
    assert set_group_lr(opt, None, 0.5, 0) is None
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.2]


def test_a_tensor_rate_is_filled_in_place() -> None:
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=torch.tensor(0.1))
    scheduler = sched.LambdaLR(opt, lambda e: 0.5**e)
    opt.step()
    scheduler.step()
    rate = opt.param_groups[0]["lr"]
    assert set_group_lr(opt, scheduler, 0.2, None) is None
    assert opt.param_groups[0]["lr"] is rate
    assert float(rate) == pytest.approx(0.2)
    opt.step()
    scheduler.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1)


# ---- through the engine ------------------------------------------------------------------------
class SetLrAt(Callback):
    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr

    def on_step_end(self, run: Run) -> None:
        if run.global_step == self.step:
            run.request("set_lr", lr=self.lr)


def test_set_lr_holds_under_a_per_step_lambda_scheduler_in_the_trainer() -> None:
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = lambda e: 0.9**e  # noqa: E731
    trainer = onthefly.Trainer(
        model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32), project="schedules", run_name="r",
        scheduler=sched.LambdaLR(opt, decay), scheduler_interval="step",
        callbacks=(SetLrAt(3, lr=0.5),), progress=False,
    )
    summary = trainer.fit(1)

    session = onthefly.open_session(summary.session_dir)
    (applied,) = [e for e in session.events(summary.run_id)
                  if e["kind"] in ("command_applied", "command_rejected")]
    assert (applied["kind"], applied["step"]) == ("command_applied", 4)
    used = {row["step"]: row["value"] for row in session.metrics(summary.run_id, "lr")}
    reference = {step: 0.1 * decay(step - 1) for step in range(1, 9)}  # step s uses epoch s - 1
    ratio = 0.5 / reference[5]
    assert used == {step: pytest.approx(reference[step] * (1 if step <= 4 else ratio), rel=1e-9)
                    for step in range(1, 9)}
