"""Plan cards, lineage and comparisons over HTTP against a real training process: propose a fork
card, edit it, approve it; the specialist and its control train and appear in the lineage; a
comparison of parent, control and specialist comes back with paired intervals."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from live_server import LiveSession, live, make_trainer
from onthefly.actions import fork as forking


@pytest.fixture
def idle() -> Iterator[LiveSession]:
    for session in live(make_trainer(wait_for_run=True), 2):
        forking.attach(session.trainer, on_child=session.server.add_run)
        session.bus.wait_for(lambda e: e.kind == "waiting", "the run waiting for 'run'")
        session.accepted("run")
        session.status_event("idle")
        yield session


def card(**changes: Any) -> dict[str, Any]:
    return {"kind": "fork", "name": "tail", "run_id": 1, "slice": "tail", "lr": 0.05, "budget": 1, "seed": 1,
            **changes}


def test_a_fork_card_from_proposal_to_lineage_and_comparison(idle: LiveSession) -> None:
    made = idle.http.post("/api/slices", json={"name": "tail", "run_id": 1,
                                               "definition": {"kind": "quantile_band", "low": 0.8}})
    assert made.status_code == 201, made.text
    proposed = idle.http.post("/api/plans", json=card())
    assert proposed.status_code == 201, proposed.text
    plan = proposed.json()
    assert plan["status"] == "proposed" and plan["card"]["control"] is True and plan["card"]["trains"] == "all"
    edited = idle.http.patch(f"/api/plans/{plan['id']}", json={"lr": 0.02, "budget": 2})
    assert edited.status_code == 200, edited.text
    assert (edited.json()["card"]["lr"], edited.json()["card"]["budget"]) == (0.02, 2)

    approved = idle.http.post(f"/api/plans/{plan['id']}/approve")
    assert approved.status_code == 202, approved.text
    assert approved.json()["plan"]["status"] in ("approved", "running", "done")  # an idle run applies it at once
    idle.wait_until(lambda: idle.get(f"/api/plans/{plan['id']}")["status"] in ("done", "failed"), "the fork")
    done = idle.get(f"/api/plans/{plan['id']}")
    assert done["status"] == "done", done["error"]
    specialist, control = done["runs"]
    assert done["result"]["verdict"]["slice_gain_pt"] is not None

    lineage = idle.get("/api/lineage")
    assert [n["id"] for n in lineage["nodes"]] == [1, specialist, control]
    assert {(e["child"], e["kind"], e["plan_id"]) for e in lineage["edges"]} == {
        (specialist, "fork", plan["id"]), (control, "control", plan["id"])}
    assert idle.get(f"/api/runs/{specialist}")["status"] == "finished"

    again = idle.http.post(f"/api/plans/{plan['id']}/approve")
    assert again.status_code == 409 and "only a proposed card" in again.text

    asked = idle.http.post("/api/runs/1/comparisons", json={"runs": [1, control, specialist], "reference": control,
                                                            "sets": ["tail", "test"]})
    assert asked.status_code == 202, asked.text
    idle.wait_until(lambda: len(idle.get("/api/comparisons")) == 2, "the comparison")
    judging, comparison = idle.get("/api/comparisons")  # the card's own judging table came first
    assert judging["request"]["plan_id"] == plan["id"] and judging["id"] == done["result"]["comparison_id"]
    cells = {(c["run"], c["set"]): c for c in comparison["result"]["cells"]}
    assert set(cells) == {(str(r), s) for r in (1, control, specialist) for s in ("tail", "test")}
    tail = cells[(str(specialist), "tail")]
    assert tail["n"] == idle.get("/api/slices/tail")["count"]
    assert "diff" in tail and "mcnemar" in tail


@pytest.mark.parametrize(("changes", "status", "message"), [
    ({"budget": 0}, 422, "budget"),
    ({"lr": -1}, 422, "lr"),
    ({"slice": "nowhere"}, 404, "slice: no slice named 'nowhere'"),
    ({"run_id": 7}, 404, "run_id 7 is not a run of this session"),
    ({"checkpoint_id": 99}, 404, "checkpoint_id: no checkpoint 99"),
    ({"name": "r"}, 409, "name 'r' is taken"),
])
def test_invalid_cards_are_refused_over_http(idle: LiveSession, changes: dict[str, Any], status: int,
                                             message: str) -> None:
    idle.http.post("/api/slices", json={"name": "tail", "run_id": 1,
                                        "definition": {"kind": "quantile_band", "low": 0.8}})
    refused = idle.http.post("/api/plans", json=card(**changes))
    assert refused.status_code == status, refused.text
    assert message in refused.text
    assert idle.get("/api/plans") == []


def test_a_merge_card_over_http_previewed_then_approved(idle: LiveSession) -> None:
    idle.http.post("/api/slices", json={"name": "tail", "run_id": 1,
                                        "definition": {"kind": "quantile_band", "low": 0.8}})
    fork = idle.http.post("/api/plans", json=card()).json()
    idle.http.post(f"/api/plans/{fork['id']}/approve")
    idle.wait_until(lambda: idle.get(f"/api/plans/{fork['id']}")["status"] in ("done", "failed"), "the fork")
    specialist, control = idle.get(f"/api/plans/{fork['id']}")["runs"]

    merge = {"kind": "merge", "name": "soup", "run_id": 1, "method": "ties", "density": 0.6, "lambda": 0.8,
             "parents": [{"run_id": specialist}, {"run_id": control, "weight": 2}], "sets": ["val", "tail"]}
    proposed = idle.http.post("/api/plans", json=merge)
    assert proposed.status_code == 201, proposed.text
    plan = proposed.json()
    assert plan["card"]["lambda"] == 0.8 and plan["card"]["majority_sign"] == "total"
    assert idle.http.post(f"/api/plans/{fork['id']}/preview").status_code == 400  # a fork card has none

    previewed = idle.http.post(f"/api/plans/{plan['id']}/preview")
    assert previewed.status_code == 202, previewed.text
    idle.wait_until(lambda: (idle.get(f"/api/plans/{plan['id']}")["result"] or {}).get("preview"), "the preview")
    failed = idle.get(f"/api/plans/{plan['id']}")["result"]["preview"]
    assert "the live run has no val_loader" in failed["error"]  # this run has none: the card says so
    assert idle.http.patch(f"/api/plans/{plan['id']}", json={"sets": ["tail"]}).status_code == 200
    assert idle.http.post(f"/api/plans/{plan['id']}/preview").status_code == 202
    idle.wait_until(lambda: "comparison_id" in idle.get(f"/api/plans/{plan['id']}")["result"]["preview"],
                    "the preview")
    preview = idle.get(f"/api/plans/{plan['id']}")["result"]["preview"]
    table = idle.get(f"/api/comparisons/{preview['comparison_id']}")["result"]
    assert set(table["runs"]) == {"merge", str(specialist), str(control)} and table["sets"] == ["tail"]
    assert idle.get(f"/api/plans/{plan['id']}")["status"] == "proposed"

    if preview["worse"] is not None:  # the greedy-soup rule: refused until the card says override
        refused = idle.http.post(f"/api/plans/{plan['id']}/approve")
        assert refused.status_code == 409 and "override" in refused.text
        assert idle.http.patch(f"/api/plans/{plan['id']}", json={"override": True}).status_code == 200
    approved = idle.http.post(f"/api/plans/{plan['id']}/approve")
    assert approved.status_code == 202, approved.text
    idle.wait_until(lambda: idle.get(f"/api/plans/{plan['id']}")["status"] in ("done", "failed"), "the merge")
    done = idle.get(f"/api/plans/{plan['id']}")
    assert done["status"] == "done", done["error"]
    (merged,) = done["runs"]
    assert done["result"]["recipe"]["base_checkpoint_id"] is not None  # the fork point
    edges = {(e["parent"], e["kind"]) for e in idle.get("/api/lineage")["edges"] if e["child"] == merged}
    assert edges == {(specialist, "merge"), (control, "merge")}
    assert idle.get(f"/api/runs/{merged}")["status"] == "finished"


@pytest.mark.parametrize(("changes", "status", "message"), [
    ({"method": "blend"}, 422, "method"),
    ({"parents": [{"run_id": 1}]}, 422, "parents"),
    ({"parents": [{"run_id": 1}, {"run_id": 9}]}, 404, "parents: run 9 is not a run"),
    ({"parents": [{"run_id": 1}, {"run_id": 1}]}, 409, "listed twice"),
    ({"lambda": 99}, 422, "lambda"),
])
def test_invalid_merge_cards_are_refused_over_http(idle: LiveSession, changes: dict[str, Any], status: int,
                                                   message: str) -> None:
    merge = {"kind": "merge", "name": "soup", "run_id": 1, "method": "linear",
             "parents": [{"run_id": 1}, {"run_id": 1, "checkpoint_id": None, "weight": 2}], **changes}
    refused = idle.http.post("/api/plans", json=merge)
    assert refused.status_code == status, refused.text
    assert message in refused.text
    assert idle.get("/api/plans") == []


@pytest.mark.parametrize(("changes", "status", "message"), [
    ({"routing": "top3"}, 422, "routing"),
    ({"experts": [{"run_id": 1}]}, 422, "experts"),
    ({"experts": [{"run_id": 1}, {"run_id": 9}]}, 404, "experts: run 9 is not a run"),
    ({"experts": [{"run_id": 1}, {"run_id": 1}]}, 409, "listed twice"),
    ({"data": "nowhere"}, 404, "data"),
    ({"balance": -1}, 422, "balance"),
])
def test_invalid_gate_cards_are_refused_over_http(idle: LiveSession, changes: dict[str, Any], status: int,
                                                  message: str) -> None:
    gate = {"kind": "gate", "name": "mixture", "run_id": 1, "experts": [{"run_id": 1}, {"run_id": 2}], **changes}
    refused = idle.http.post("/api/plans", json=gate)
    assert refused.status_code == status, refused.text
    assert message in refused.text
    assert idle.get("/api/plans") == []


def test_a_run_that_is_no_mixture_has_no_artifact_and_no_benchmark(idle: LiveSession) -> None:
    refused = idle.http.get("/api/runs/1/mixture")
    assert refused.status_code == 409 and "not a mixture" in refused.text
    assert idle.http.get("/api/runs/77/mixture").status_code == 404
    bench = idle.http.post("/api/plans", json={"kind": "benchmark", "run_id": 1, "mixture": 1})
    assert bench.status_code == 409 and "not a mixture" in bench.text
