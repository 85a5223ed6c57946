"""Autofork suggestions: a loss tail that stops improving while the rest improves gets a fork card
with its evidence; it is carried out only when the user opted in."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from conftest import toy_data, toy_model
from onthefly.actions import autofork
from onthefly.actions import fork as forking
from onthefly.store import open_session

RULE = autofork.AutoForkRule(patience=2, cooldown=3, min_rest_gain=0.05, max_tail_gain=0.01)


def noisy() -> TensorDataset:
    """Toy data whose last 40 samples have labels that follow nothing: a tail no model learns."""
    data = toy_data(256)
    x, y = data.tensors
    y = y.clone()
    y[-40:] = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(5))
    return TensorDataset(x, y)


class AwaitSuggestion(onthefly.Callback):
    """Before the last epochs, wait (on an event, with a deadline) for the watcher's first card:
    it is made on the watcher's thread, and an approval must reach a step boundary to run."""

    def __init__(self) -> None:
        self.watcher: object = None

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if run.epoch == 3:
            assert self.watcher is not None
            assert self.watcher.suggested.wait(60), "no suggestion by epoch 3"  # type: ignore[attr-defined]


def fit(mode: str) -> tuple[onthefly.Trainer, object]:
    waiter = AwaitSuggestion()
    model = toy_model()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
                               loss_fn=nn.CrossEntropyLoss(),
                               train_loader=DataLoader(noisy(), batch_size=32, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0)),
                               project="auto", run_name="generalist", progress=False,
                               callbacks=(waiter,) if mode != "off" else ())
    forking.attach(trainer)
    watcher = waiter.watcher = autofork.attach(trainer, mode=mode, rule=RULE)  # type: ignore[arg-type]
    trainer.fit(6)
    return trainer, watcher


def test_a_stuck_tail_gets_a_proposed_fork_card_that_waits() -> None:
    trainer, _watcher = fit("suggest")
    reader = open_session(trainer.run.session.dir)
    plans = reader.plans()
    assert plans, "a suggestion"
    assert {p["status"] for p in plans} == {"proposed"} and {p["source"] for p in plans} == {"autofork"}
    evidence = plans[0]["result"]["evidence"]
    assert evidence["rest_gain"] >= RULE.min_rest_gain and evidence["tail_gain"] < RULE.max_tail_gain
    assert evidence["tail_samples"] >= RULE.min_tail
    epochs = [e["epoch"] for e in reader.events(kind="autofork_suggested")]
    assert all(b - a >= RULE.cooldown for a, b in itertools.pairwise(epochs))  # the cooldown
    assert [r["id"] for r in reader.runs()] == [trainer.run.run_id]  # nothing was executed
    assert reader.slice(plans[0]["card"]["slice"])["count"] == evidence["tail_samples"]


def test_with_opt_in_the_suggestion_is_carried_out() -> None:
    trainer, _ = fit("approve")
    reader = open_session(trainer.run.session.dir)
    (plan, *_) = reader.plans()
    assert plan["status"] == "done", plan["error"]
    assert len(plan["runs"]) == 2 and "evidence" in plan["result"] and "verdict" in plan["result"]


def test_off_watches_nothing() -> None:
    trainer, _watcher = fit("off")
    assert open_session(trainer.run.session.dir).plans() == []
    with pytest.raises(ValueError, match="autofork must be"):
        autofork.attach(trainer, mode="sometimes")  # type: ignore[arg-type]
