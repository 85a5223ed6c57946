"""Merges from plan cards, carried out by a live run: the merged run in the lineage with an edge
from every parent, its weights what the method gives on the parents' checkpoints (SWA's average,
task vectors from the fork point, fused adapters), BatchNorm statistics recomputed as swa_utils
does, the recipe on the run, the preview's comparison and the greedy-soup rule, distillation as a
trained student, and refusals that name the problem and write nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.actions import fork as forking
from onthefly.actions import merge as merges
from onthefly.actions import merging, model_weights, recipes
from onthefly.actions import slices as slicing
from onthefly.actions.plans import check_card
from onthefly.errors import ConfigError, NotFoundError, StateError
from onthefly.store import open_session

FORK = {"kind": "fork", "name": "specialist", "run_id": 1, "slice": "hard", "lr": 0.05, "budget": 1, "seed": 3}


def make_trainer(model: nn.Module | None = None, callbacks: tuple[onthefly.Callback, ...] = (),
                 session: Any = None, name: str = "generalist") -> onthefly.Trainer:
    model = model if model is not None else toy_model()
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)),
        val_loader=DataLoader(toy_data(96, seed=1), batch_size=32), project="merges", run_name=name,
        callbacks=callbacks, progress=False, session=session)
    forking.attach(trainer)
    return trainer


class Script(onthefly.Callback):
    """At the end of each listed epoch, do what the script says (on the training thread)."""

    def __init__(self, steps: dict[int, Callable[[onthefly.Run], None]]) -> None:
        self.steps = steps
        self.notes: dict[str, Any] = {}

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if run.epoch in self.steps:
            self.steps[run.epoch](run)


def fork_two(fork: dict[str, Any] | None = None) -> Callable[[onthefly.Run], None]:
    """Fork a specialist and its control (two children of one fork point)."""
    def go(run: onthefly.Run) -> None:
        slicing.save_run_slice(run, "hard", {"kind": "quantile_band", "low": 0.7})
        forking.approve(run, forking.propose(run, {**FORK, **(fork or {})})["id"])
    return go


def merge_card(run: onthefly.Run, **fields: Any) -> dict[str, Any]:
    reader = open_session(run.session.dir)
    fork_plan = next(p for p in reader.plans() if p["kind"] == "fork")
    assert fork_plan["status"] == "done", fork_plan["error"]
    specialist, control = fork_plan["runs"]
    return {"kind": "merge", "name": "merged", "run_id": run.run_id, "method": "linear", "override": True,
            "parents": [{"run_id": specialist}, {"run_id": control}], **fields}


def merged(card_fields: dict[str, Any], fork: dict[str, Any] | None = None, model: nn.Module | None = None,
           preview_first: bool = False) -> tuple[onthefly.Trainer, dict[str, Any]]:
    """Train a generalist, fork two children after epoch 0, merge them with ``card_fields`` after
    epoch 1 (previewed first after epoch 1, approved after epoch 2, when asked)."""
    script = Script({})

    def propose(run: onthefly.Run) -> None:
        script.notes["plan"] = forking.propose(run, merge_card(run, **card_fields))["id"]
        if preview_first:
            merges.request_preview(run, script.notes["plan"])
        else:
            forking.approve(run, script.notes["plan"])

    def approve(run: onthefly.Run) -> None:
        if preview_first:
            try:
                forking.approve(run, script.notes["plan"])
            except StateError as exc:
                script.notes["refused"] = str(exc)

    script.steps = {0: fork_two(fork), 1: propose, 2: approve}
    trainer = make_trainer(model, (script,))
    trainer.fit(4)
    trainer.run.session.flush()
    plan = open_session(trainer.run.session.dir).plan(script.notes["plan"])
    return trainer, {**plan, "notes": script.notes}


def checkpoint_tensors(reader: Any, run_id: int) -> dict[str, torch.Tensor]:
    return load_file(str(recipes.model_file(reader.checkpoints(run_id)[-1])))


def test_a_uniform_soup_is_swa_average_of_its_parents_as_a_new_run_with_an_edge_from_each() -> None:
    trainer, plan = merged({})
    assert plan["status"] == "done", plan["error"]
    reader = open_session(trainer.run.session.dir)
    (child,) = plan["runs"]
    parents = [p["run_id"] for p in plan["card"]["parents"]]
    run = next(r for r in reader.runs() if r["id"] == child)
    assert run["name"] == "merged" and run["status"] == "finished"
    merge_edges = {(e["child"], e["parent"], e["kind"], e["plan_id"]) for e in reader.lineage()["edges"]
                   if e["kind"] == "merge"}
    assert merge_edges == {(child, p, "merge", plan["id"]) for p in parents}

    # The weights: torch.optim.swa_utils.AveragedModel over the parents' final checkpoints.
    averaged = AveragedModel(toy_model())
    for parent in parents:
        model = toy_model()
        model.load_state_dict(checkpoint_tensors(reader, parent))
        averaged.update_parameters(model)
    got = checkpoint_tensors(reader, child)
    for key, value in averaged.module.state_dict().items():
        assert torch.equal(got[key], value), key

    recipe = plan["result"]["recipe"]
    assert recipe["method"] == "linear"
    assert [p["checkpoint_id"] for p in recipe["parents"]] == [reader.checkpoints(p)[-1]["id"] for p in parents]
    assert run["config"]["merge"] == recipe  # the run holds its recipe
    table = plan["result"]["comparison"]
    assert table["reference"] == "merge" and set(table["runs"]) == {"merge", *map(str, parents)}
    assert {c["set"] for c in table["cells"]} == {"val"}


def test_task_arithmetic_takes_task_vectors_from_the_fork_point_and_the_recipe_reproduces_it() -> None:
    trainer, plan = merged({"method": "task_arithmetic", "lambda": 0.7})
    assert plan["status"] == "done", plan["error"]
    reader = open_session(trainer.run.session.dir)
    recipe = plan["result"]["recipe"]
    fork_edge = next(e for e in reader.lineage()["edges"] if e["kind"] == "fork")
    assert recipe["base_checkpoint_id"] == fork_edge["checkpoint_id"] is not None
    base = model_weights.FileWeights(recipes.model_file(reader.checkpoint(recipe["base_checkpoint_id"])))
    parents = [model_weights.FileWeights(recipes.model_file(reader.checkpoint(p["checkpoint_id"])))
               for p in recipe["parents"]]
    expected = merging.task_arithmetic(base, parents, [1.0, 1.0], lambda_=0.7, normalize=True)
    got = checkpoint_tensors(reader, plan["runs"][0])
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_dare_is_deterministic_for_a_seed_and_differs_with_another() -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        trainer, plan = merged({"method": "dare_ties", "density": 0.5, "seed": seed})
        assert plan["status"] == "done", plan["error"]
        return checkpoint_tensors(open_session(trainer.run.session.dir), plan["runs"][0])

    first, again, other = weights(5), weights(5), weights(6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_batchnorm_statistics_are_recomputed_as_swa_utils_update_bn_does() -> None:
    trainer, plan = merged({}, model=WithNorm())
    assert plan["status"] == "done", plan["error"]
    assert plan["result"]["recipe"]["bn_updated"] is True
    reader = open_session(trainer.run.session.dir)
    averaged = AveragedModel(WithNorm())
    for parent in [p["run_id"] for p in plan["card"]["parents"]]:
        model = WithNorm()
        model.load_state_dict(checkpoint_tensors(reader, parent))
        averaged.update_parameters(model)
    torch.optim.swa_utils.update_bn(DataLoader(toy_data(), batch_size=32), averaged.module)
    got = checkpoint_tensors(reader, plan["runs"][0])
    for key, value in averaged.module.state_dict().items():
        assert torch.equal(got[key], value), key


def test_adapter_fusion_adds_the_forks_low_rank_updates_to_their_shared_base() -> None:
    trainer, plan = merged({"method": "adapter_fusion"}, fork={"trains": "adapters", "rank": 2})
    assert plan["status"] == "done", plan["error"]
    reader = open_session(trainer.run.session.dir)
    children = [checkpoint_tensors(reader, p["run_id"]) for p in plan["card"]["parents"]]
    got = checkpoint_tensors(reader, plan["runs"][0])
    for layer in ("0", "2"):
        delta = sum(c[f"{layer}.lora_b"] @ c[f"{layer}.lora_a"] for c in children) / 2
        assert not torch.equal(children[0][f"{layer}.lora_b"], torch.zeros_like(children[0][f"{layer}.lora_b"]))
        torch.testing.assert_close(got[f"{layer}.weight"], children[0][f"{layer}.base.weight"] + delta)
        assert torch.equal(got[f"{layer}.bias"], children[0][f"{layer}.base.bias"])


def test_fisher_weighted_soup_and_its_fisher_estimate() -> None:
    trainer, plan = merged({"method": "fisher", "fisher_samples": 40})
    assert plan["status"] == "done", plan["error"]
    reader = open_session(trainer.run.session.dir)
    got = checkpoint_tensors(reader, plan["runs"][0])
    parents = [checkpoint_tensors(reader, p["run_id"]) for p in plan["card"]["parents"]]
    for key, value in got.items():  # a per-parameter convex combination: between the parents
        low, high = torch.minimum(parents[0][key], parents[1][key]), torch.maximum(parents[0][key], parents[1][key])
        assert bool(((value >= low - 1e-6) & (value <= high + 1e-6)).all()), key
    assert any(not torch.allclose(got[k], (parents[0][k] + parents[1][k]) / 2) for k in got)

    # The estimate: the mean of squared per-sample gradients of the loss, by hand.
    model = toy_model()
    model.load_state_dict(parents[0])
    card = {**plan["card"], "data": "train", "fisher_samples": 5, "seed": 2}
    fisher = merges.estimate_fisher(trainer, card, model)
    data = toy_data()
    chosen = sorted(np.random.default_rng(2).choice(len(data), size=5, replace=False).tolist())
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in chosen:
        x, y = data[i]
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2 / 5
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name])


def test_distillation_trains_a_student_run_on_its_teachers_soft_targets() -> None:
    trainer, plan = merged({"method": "distill", "budget": 6, "temperature": 3.0, "alpha": 0.7, "student": 1})
    assert plan["status"] == "done", plan["error"]
    reader = open_session(trainer.run.session.dir)
    (student,) = plan["runs"]
    assert reader.samples(student).num_rows == 6 * 32  # budget steps of the live run's batch size
    assert {(e["parent"], e["kind"]) for e in reader.lineage()["edges"] if e["child"] == student} == {
        *((p["run_id"], "merge") for p in plan["card"]["parents"]), (1, "student")}
    assert plan["result"]["recipe"]["method"] == "distill"
    student_run = next(r for r in reader.runs() if r["id"] == student)
    start = reader.checkpoint(student_run["config"]["student_checkpoint_id"])
    assert start["run_id"] == 1 and student_run["parent_id"] == 1  # the generalist, no teacher, starts it
    assert {c["run"] for c in plan["result"]["comparison"]["cells"]} >= {"merge"}


def test_a_preview_compares_the_candidate_and_a_merge_worse_than_its_best_parent_is_not_kept() -> None:
    # Merging a trained child with a far-off point (lambda 6 overshoots) loses to the parents.
    trainer, plan = merged({"method": "task_arithmetic", "lambda": 6.0, "override": False}, preview_first=True)
    preview = plan["result"]["preview"]
    assert preview["worse"] is not None and "worse than parent run" in preview["worse"]["text"]
    assert "not kept" in plan["notes"]["refused"] and "override" in plan["notes"]["refused"]
    assert plan["status"] == "proposed" and plan["runs"] == []
    comparison = open_session(trainer.run.session.dir).comparison(preview["comparison_id"])
    assert comparison["request"]["preview"] is True
    assert [r["name"] for r in open_session(trainer.run.session.dir).runs()] == [
        "generalist", "specialist", "specialist control"]  # nothing was made


def test_a_previewed_merge_that_is_kept_is_the_previewed_candidate() -> None:
    _, plan = merged({"method": "linear", "override": True}, preview_first=True)
    assert plan["status"] == "done", plan["error"]
    assert plan["result"]["preview"]["recipe"]["parents"] == plan["result"]["recipe"]["parents"]


# ---- refusals ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session_with_forks() -> onthefly.Trainer:
    """A generalist, its specialist and control (runs 2 and 3), a root run of another
    architecture ("wide", run 4) and one of the same ("another root", run 5)."""
    def others(run: onthefly.Run) -> None:
        wide = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 3))
        make_trainer(wide, session=run.session, name="wide").fit(1)
        make_trainer(session=run.session, name="another root").fit(1)

    trainer = make_trainer(callbacks=(Script({0: fork_two(), 1: others}),))
    trainer.fit(2)
    return trainer


def card_for(trainer: onthefly.Trainer, **fields: Any) -> dict[str, Any]:
    return merge_card(trainer.run, **fields)


def run_named(trainer: onthefly.Trainer, name: str) -> int:
    return next(r["id"] for r in open_session(trainer.run.session.dir).runs() if r["name"] == name)


def test_parents_of_different_architectures_are_refused_naming_the_first_mismatch(
        session_with_forks: onthefly.Trainer) -> None:
    reader = open_session(session_with_forks.run.session.dir)
    card = card_for(session_with_forks)
    card["parents"] = [card["parents"][0], {"run_id": run_named(session_with_forks, "wide")}]
    with pytest.raises(StateError, match=r"'0\.bias' is \(32,\) float32 in run 2 but \(48,\) float32 in run 4"):
        check_card(reader, card)


def test_task_vectors_need_a_common_ancestor(session_with_forks: onthefly.Trainer) -> None:
    reader = open_session(session_with_forks.run.session.dir)
    card = card_for(session_with_forks, method="ties")
    card["parents"] = [card["parents"][0], {"run_id": run_named(session_with_forks, "another root")}]
    with pytest.raises(StateError, match="common ancestor"):
        check_card(reader, card)
    named = reader.checkpoints(1)[0]["id"]
    check_card(reader, {**card, "base_checkpoint_id": named})  # naming a base is allowed


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"method": "adapter_fusion"}, StateError, "has no adapters"),
    ({"parents": [{"run_id": 2}, {"run_id": 2}]}, StateError, "listed twice"),
    ({"parents": [{"run_id": 2}, {"run_id": 99}]}, NotFoundError, "run 99 is not a run"),
    ({"parents": [{"run_id": 2}]}, ConfigError, "parents"),
    ({"data": "nowhere"}, NotFoundError, "data: "),
    ({"sets": ["val", "nowhere"]}, NotFoundError, "sets: "),
    ({"method": "distill", "student": 99}, NotFoundError, "student: run 99 is not a run"),
    ({"method": "soup"}, ConfigError, "method must be"),
    ({"density": 0}, ConfigError, "density must be"),
])
def test_bad_merge_cards_are_refused(session_with_forks: onthefly.Trainer, fields: dict[str, Any],
                                     error: type[Exception], match: str) -> None:
    reader = open_session(session_with_forks.run.session.dir)
    with pytest.raises(error, match=match):
        check_card(reader, card_for(session_with_forks, **fields))
    assert [p["kind"] for p in reader.plans()] == ["fork"]  # nothing written


def test_a_merged_run_trains_further_from_its_checkpoint() -> None:
    trainer, plan = merged({})
    reader = open_session(trainer.run.session.dir)
    checkpoint = reader.checkpoints(plan["runs"][0])[-1]
    assert checkpoint["reason"] == "merge" and checkpoint["step"] == 0
    model = toy_model()
    resumed = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True),
        val_loader=DataLoader(toy_data(96, seed=1), batch_size=32), project="merges", progress=False,
        resume_from=checkpoint["path"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in checkpoint_tensors(reader, plan["runs"][0]).items())
    summary = resumed.fit(1)
    assert summary.status == "finished" and summary.steps == 8


@pytest.mark.parametrize("method", ["linear", "distill"])
def test_the_live_run_goes_on_exactly_as_if_it_had_not_merged(method: str) -> None:
    plain = make_trainer(callbacks=(Script({0: fork_two()}),))
    plain.fit(4)
    trainer, plan = merged({"method": method, "budget": 3})
    assert plan["status"] == "done", plan["error"]
    for key, value in plain.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key


class CheckpointEveryEpoch(onthefly.Callback):
    def on_fit_start(self, run: onthefly.Run) -> None:
        run.save_checkpoint(reason="manual")  # step 0: the untrained weights, a bad ingredient

    def on_epoch_end(self, run: onthefly.Run) -> None:
        run.save_checkpoint(reason="manual")


def test_swa_along_one_trajectory_and_a_greedy_soup_that_leaves_out_what_does_not_help() -> None:
    script = Script({})
    plans: dict[str, int] = {}

    def propose(run: onthefly.Run) -> None:
        run.session.flush()
        ids = [c["id"] for c in open_session(run.session.dir).checkpoints(run.run_id)]  # steps 0, 8, 16, 24
        for name, method, chosen in (("swa", "linear", ids[1:]), ("greedy", "greedy_soup", ids)):
            card = {"kind": "merge", "name": name, "run_id": run.run_id, "method": method, "override": True,
                    "parents": [{"run_id": run.run_id, "checkpoint_id": c} for c in chosen]}
            plans[name] = forking.propose(run, card)["id"]
            forking.approve(run, plans[name])

    script.steps = {2: propose}
    trainer = make_trainer(callbacks=(CheckpointEveryEpoch(), script))
    trainer.fit(4)
    trainer.run.session.flush()
    reader = open_session(trainer.run.session.dir)
    swa, greedy = reader.plan(plans["swa"]), reader.plan(plans["greedy"])
    assert swa["status"] == greedy["status"] == "done", (swa["error"], greedy["error"])

    def averaged(checkpoint_ids: list[int]) -> dict[str, torch.Tensor]:
        average = AveragedModel(toy_model())
        for checkpoint_id in checkpoint_ids:
            model = toy_model()
            model.load_state_dict(load_file(str(recipes.model_file(reader.checkpoint(checkpoint_id)))))
            average.update_parameters(model)
        return average.module.state_dict()

    expected = averaged([p["checkpoint_id"] for p in swa["card"]["parents"]])
    got = checkpoint_tensors(reader, swa["runs"][0])
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    soup = greedy["result"]["recipe"]["soup"]
    steps = soup["steps"]
    assert len(steps) == 4 and steps[0]["added"] is True
    assert [s["alone"] for s in steps] == sorted((s["alone"] for s in steps), reverse=True)  # best first
    untrained = next(s for s in steps if s["checkpoint_id"] == greedy["card"]["parents"][0]["checkpoint_id"])
    assert untrained["added"] is False  # the step-0 weights made the soup worse
    kept = [s["checkpoint_id"] for s in steps if s["added"]]
    assert soup["ingredients"] == kept
    best = steps[0]["soup"]
    for step in steps[1:]:  # the rule: added exactly when the soup's validation score improves
        assert step["added"] == (step["soup"] > best)
        best = max(best, step["soup"]) if step["added"] else best
    expected = averaged(kept)
    got = checkpoint_tensors(reader, greedy["runs"][0])
    assert all(torch.equal(got[k], v) for k, v in expected.items())
