"""Forks from plan cards: the specialist and its matched control train in the same session, the
parent goes on bit-identically, forks are deterministic, adapters train only the adapters, and
invalid cards are refused with messages that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.actions import fork as forking
from onthefly.actions import slices as slicing
from onthefly.actions.adapters import LowRankAdapter
from onthefly.errors import ConfigError, OnTheFlyError, StateError
from onthefly.store import open_session

CARD = {"kind": "fork", "name": "specialist", "run_id": 1, "slice": "hard", "lr": 0.05, "budget": 2,
        "budget_unit": "epochs", "seed": 3}


def make_trainer(callbacks: tuple[onthefly.Callback, ...] = ()) -> onthefly.Trainer:
    model = toy_model()
    gen = torch.Generator().manual_seed(1)
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True, generator=gen),
        val_loader=DataLoader(toy_data(96, seed=1), batch_size=32), project="forks", run_name="generalist",
        callbacks=callbacks, progress=False)
    forking.attach(trainer)
    return trainer


class ForkAt(onthefly.Callback):
    """At the end of ``epoch``: save the loss tail as a slice, propose ``card``, approve it."""

    def __init__(self, epoch: int, card: dict[str, Any], *, checkpoint_at_epoch: int | None = None) -> None:
        self.epoch, self.card, self.checkpoint_at = epoch, card, checkpoint_at_epoch
        self.plan_id: int | None = None
        self.checkpoint_id: int | None = None

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if run.epoch == self.checkpoint_at:
            run.save_checkpoint(reason="manual")
            run.session.flush()
            self.checkpoint_id = open_session(run.session.dir).checkpoints()[-1]["id"]
        if run.epoch == self.epoch and self.plan_id is None:
            slicing.save_run_slice(run, "hard", {"kind": "quantile_band", "low": 0.8})
            card = dict(self.card, run_id=run.run_id)
            if self.checkpoint_id is not None:
                card["checkpoint_id"] = self.checkpoint_id
            self.plan_id = forking.propose(run, card)["id"]
            forking.approve(run, self.plan_id)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_fork_trains_specialist_and_control_and_the_parent_goes_on_exactly() -> None:
    plain = make_trainer()
    plain.fit(3)
    untouched = weights(plain.model)

    fork = ForkAt(1, CARD)
    trainer = make_trainer((fork,))
    trainer.fit(3)
    for key, value in untouched.items():
        assert torch.equal(trainer.model.state_dict()[key], value), key  # as if never left

    reader = open_session(trainer.run.session.dir)
    plan = reader.plan(fork.plan_id)  # type: ignore[arg-type]
    assert plan["status"] == "done", plan["error"]
    specialist, control = plan["runs"]
    runs = {r["id"]: r for r in reader.runs()}
    assert runs[specialist]["name"] == "specialist" and runs[control]["name"] == "specialist control"
    assert runs[specialist]["parent_id"] == trainer.run.run_id and runs[specialist]["status"] == "finished"
    lineage = reader.lineage()
    assert {(e["child"], e["parent"], e["kind"], e["step"], e["plan_id"]) for e in lineage["edges"]} == {
        (specialist, 1, "fork", 16, fork.plan_id), (control, 1, "control", 16, fork.plan_id)}
    # The specialist trained on the slice only (2 epochs of it); the control on everything.
    hard = set(reader.slice_indices(reader.slice("hard")).tolist())
    trained = reader.samples(specialist)
    assert set(trained.column("index").to_pylist()) == hard
    assert trained.num_rows == 2 * len(hard)
    assert reader.samples(control).num_rows == 2 * len(hard)  # the same budget, drawn from all the data
    assert len(set(reader.samples(control).column("index").to_pylist()) - hard) > 0
    result = plan["result"]
    assert result["reference"] == "control"
    verdict = result["verdict"]
    assert verdict["met"] in (True, False) and verdict["slice_gain_pt"] is not None
    assert verdict["others_judged_on"] == ["val"]
    assert 0 < result["first_step_seconds"] < result["seconds"]
    assert {c["set"] for c in result["comparison"]["cells"]} == {"slice", "rest", "val"}
    assert [e["payload"]["status"] for e in reader.events(kind="plan_finished")] == ["done"]
    parent_status = [e["payload"]["status"] for e in reader.events(run_id=1, kind="status")]
    assert parent_status[:4] == ["running", "paused", "running", "finished"]  # it waited while they trained


def test_the_same_card_twice_gives_identical_weights() -> None:
    def specialist() -> dict[str, torch.Tensor]:
        trainer = make_trainer((ForkAt(0, dict(CARD, control=False)),))
        trainer.fit(1)
        (child,) = trainer.forks.values()
        return weights(child)

    first, second = specialist(), specialist()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_fork_from_an_older_checkpoint_starts_from_its_weights() -> None:
    fork = ForkAt(2, dict(CARD, control=False, budget=3, budget_unit="steps"), checkpoint_at_epoch=0)
    trainer = make_trainer((fork,))
    trainer.fit(3)
    reader = open_session(trainer.run.session.dir)
    plan = reader.plan(fork.plan_id)  # type: ignore[arg-type]
    assert plan["status"] == "done", plan["error"]
    (child,) = plan["runs"]
    edge = next(e for e in reader.lineage()["edges"] if e["child"] == child)
    assert (edge["step"], edge["checkpoint_id"]) == (8, fork.checkpoint_id)
    assert [m["step"] for m in reader.metrics(child, "train_loss")] == [1, 2, 3]  # a budget of 3 steps


def test_an_adapter_fork_trains_only_the_adapters() -> None:
    trainer = make_trainer((ForkAt(0, dict(CARD, control=False, trains="adapters", rank=2)),))
    trainer.fit(1)
    source = weights(trainer.model)
    (child,) = trainer.forks.values()
    adapters = [m for m in child.modules() if isinstance(m, LowRankAdapter)]
    assert len(adapters) == 2
    for name, module in child.named_modules():
        if isinstance(module, LowRankAdapter):
            original = name.replace(".base", "")
            assert torch.equal(module.base.weight, source[f"{original}.weight"])  # frozen
            assert module.lora_b.abs().sum() > 0  # trained (B starts at zero)


def test_invalid_cards_are_refused_naming_the_field(tmp_path: Path) -> None:
    refusals: dict[str, str] = {}

    class Try(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            run.recorder.wait_idle()  # the epoch's rows are with the store
            slicing.save_slice(run.session, "hard", run.run_id, {"kind": "quantile_band", "low": 0.8})
            slicing.save_slice(run.session, "nothing", run.run_id, {"kind": "label", "label": 99})
            for label, changes in {
                "budget": {"budget": -1}, "lr": {"lr": 0}, "lr-nan": {"lr": float("nan")},
                "run": {"run_id": 42}, "checkpoint": {"checkpoint_id": 99}, "slice": {"slice": "missing"},
                "empty": {"slice": "nothing"}, "unit": {"budget_unit": "hours"}, "extra": {"colour": "red"},
                "taken": {"name": "generalist"},
            }.items():
                with pytest.raises(OnTheFlyError) as info:
                    forking.propose(run, {**CARD, **changes})
                refusals[label] = str(info.value)

    trainer = make_trainer((Try(),))
    trainer.fit(1)
    assert "budget must be a whole number from 1" in refusals["budget"]
    assert "lr must be a finite number > 0.0" in refusals["lr"] and "lr must be" in refusals["lr-nan"]
    assert "run_id 42 is not a run of this session" in refusals["run"]
    assert "checkpoint_id: no checkpoint 99" in refusals["checkpoint"]
    assert "slice: no slice named 'missing'" in refusals["slice"]
    assert "slice 'nothing' is empty" in refusals["empty"]
    assert "budget_unit must be 'epochs' or 'steps'" in refusals["unit"]
    assert "unexpected argument(s) ['colour']" in refusals["extra"]
    assert "name 'generalist' is taken" in refusals["taken"]
    assert open_session(trainer.run.session.dir).plans() == []  # nothing was saved


def test_cards_are_edited_discarded_and_never_approved_twice() -> None:
    seen: dict[str, Any] = {}

    class Cards(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            run.recorder.wait_idle()  # the epoch's rows are with the store
            slicing.save_slice(run.session, "hard", run.run_id, {"kind": "quantile_band", "low": 0.8})
            plan = forking.propose(run, dict(CARD, run_id=run.run_id))
            edited = forking.edit(run, plan["id"], lr=0.01, budget=1)
            seen["edited"] = edited["card"]
            with pytest.raises(ConfigError, match="lr must be"):
                forking.edit(run, plan["id"], lr=-1)
            forking.discard(run, plan["id"])
            with pytest.raises(StateError, match="only a proposed card can be approved"):
                forking.approve(run, plan["id"])
            seen["status"] = open_session(run.session.dir).plan(plan["id"])["status"]

    make_trainer((Cards(),)).fit(1)
    assert (seen["edited"]["lr"], seen["edited"]["budget"]) == (0.01, 1)
    assert seen["status"] == "discarded"


def test_the_report_shows_the_plan_cards_lineage_and_comparison(tmp_path: Path) -> None:
    from onthefly.actions.report import write_report

    fork = ForkAt(0, CARD)
    trainer = make_trainer((fork,))
    trainer.fit(1)
    html = write_report(open_session(trainer.run.session.dir), tmp_path / "r.html").read_text()
    for section in ('id="plans"', 'id="lineage-edges"', 'id="comparisons"'):
        assert section in html
    assert "specialist control" in html and "fork" in html and "reference" in html
