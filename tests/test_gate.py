"""Gate cards carried out by a live run: a generalist and a specialist forked on a rare regime,
a gate trained on validation data routes the regime to the specialist, the mixture is a run with
an edge from every expert, its artifact reproduces the session's predictions exactly in a fresh
process that cannot import onthefly, it travels with an exported session, and the refusals say
what is wrong. Then the benchmark card: FLOPs, the monolith at matched compute, the report."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from onthefly.actions import benchmark as benchmarking
from onthefly.actions import fork as forking
from onthefly.actions import mixture as mixing
from onthefly.actions import slices as slicing
from onthefly.actions.plans import check_card
from onthefly.cli import main as cli
from onthefly.errors import ConfigError, NotFoundError, StateError
from onthefly.store import open_session
from onthefly.store.archive import export_session, import_session


def regimes(n: int, seed: int, rare: float = 0.25) -> TensorDataset:
    """Two regimes told apart by the first feature's sign: in the common one the label is the
    argmax of features 1-3, in the rare one the argmin (the opposite rule)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    rare_rows = torch.rand(n, generator=g) < rare
    x[:, 0] = torch.where(rare_rows, -x[:, 0].abs() - 0.5, x[:, 0].abs() + 0.5)
    scores = x[:, 1:4]
    y = torch.where(rare_rows, scores.argmin(dim=1), scores.argmax(dim=1))
    return TensorDataset(x, y)


TRAIN, VAL, TEST = regimes(800, 0), regimes(400, 1), regimes(400, 2)
RARE = [int(i) for i in np.flatnonzero(TRAIN.tensors[0][:, 0].numpy() < 0)]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


class Script(onthefly.Callback):
    def __init__(self, gate: dict[str, Any], benchmark: bool = False) -> None:
        self.gate, self.benchmark = gate, benchmark
        self.notes: dict[str, Any] = {}

    def on_epoch_end(self, run: onthefly.Run) -> None:
        reader = open_session(run.session.dir)
        if run.epoch == 0:
            slicing.save_run_slice(run, "rare", {"kind": "indices", "indices": RARE})
            card = {"kind": "fork", "name": "specialist", "run_id": run.run_id, "slice": "rare", "lr": 0.05,
                    "budget": 6, "seed": 3}
            forking.approve(run, forking.propose(run, card)["id"])
        elif run.epoch == 1:
            fork_plan = next(p for p in reader.plans() if p["kind"] == "fork")
            assert fork_plan["status"] == "done", fork_plan["error"]
            self.notes["specialist"], self.notes["control"] = fork_plan["runs"]
            card = {"kind": "gate", "name": "mixture", "run_id": run.run_id,
                    "experts": [{"run_id": run.run_id}, {"run_id": self.notes["specialist"]}], **self.gate}
            self.notes["gate"] = forking.propose(run, card)["id"]
            forking.approve(run, self.notes["gate"])
        elif run.epoch == 2 and self.benchmark:
            gate_plan = reader.plan(self.notes["gate"])
            assert gate_plan["status"] == "done", gate_plan["error"]
            card = {"kind": "benchmark", "run_id": run.run_id, "mixture": gate_plan["runs"][0]}
            self.notes["benchmark"] = forking.propose(run, card)["id"]
            forking.approve(run, self.notes["benchmark"])


def session_with_mixture(gate: dict[str, Any] | None = None, benchmark: bool = False, epochs: int = 3) \
        -> tuple[onthefly.Trainer, dict[str, Any], Script]:
    script = Script(gate or {}, benchmark)
    net = model()
    trainer = onthefly.Trainer(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(TRAIN, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)),
        val_loader=DataLoader(VAL, batch_size=64), test_loader=DataLoader(TEST, batch_size=64), project="gates",
        run_name="generalist", callbacks=(script,), progress=False)
    forking.attach(trainer)
    trainer.fit(epochs)
    trainer.run.session.flush()
    plan = open_session(trainer.run.session.dir).plan(script.notes["gate"])
    return trainer, plan, script


@pytest.fixture(scope="module")
def made() -> tuple[onthefly.Trainer, dict[str, Any], Script]:
    return session_with_mixture({"sets": ["test", "rare"]}, benchmark=True)


def cell(table: dict[str, Any], run: str, name: str) -> dict[str, Any]:
    return next(c for c in table["cells"] if c["run"] == run and c["set"] == name)


def test_the_mixture_is_a_run_with_an_edge_from_every_expert_and_routes_the_rare_regime_to_the_specialist(
        made: tuple[onthefly.Trainer, dict[str, Any], Script]) -> None:
    trainer, plan, script = made
    assert plan["status"] == "done", plan["error"]
    reader = open_session(trainer.run.session.dir)
    (mixture_id,) = plan["runs"]
    run = next(r for r in reader.runs() if r["id"] == mixture_id)
    assert run["name"] == "mixture"
    recipe = run["config"]["gate"]
    experts = [e["run_id"] for e in recipe["experts"]]
    assert experts == [trainer.run.run_id, script.notes["specialist"]]
    edges = {(e["parent"], e["kind"], e["checkpoint_id"]) for e in reader.lineage()["edges"] if e["child"] == mixture_id}
    assert edges == {(e["run_id"], "gate", e["checkpoint_id"]) for e in recipe["experts"]}
    assert [c["reason"] for c in reader.checkpoints(mixture_id)] == ["gate"]

    shares = plan["result"]["utilisation"]["sets"]
    assert shares["rare"]["shares"][1] > 0.9  # the rare regime goes to the specialist
    assert shares["held-out"]["shares"][0] > 0.6  # the common one to the generalist
    assert plan["result"]["utilisation"]["warnings"] == []

    table = plan["result"]["comparison"]
    generalist = str(trainer.run.run_id)
    assert cell(table, "mixture", "test")["accuracy"] > cell(table, generalist, "test")["accuracy"] + 0.05
    assert cell(table, "mixture", "rare")["accuracy"] > cell(table, generalist, "rare")["accuracy"] + 0.2


def test_the_artifact_reproduces_the_sessions_predictions_exactly_in_a_process_without_onthefly(
        made: tuple[onthefly.Trainer, dict[str, Any], Script], tmp_path: Path) -> None:
    trainer, plan, _ = made
    (mixture_id,) = plan["runs"]
    out = tmp_path / "moe"
    assert cli(["export-moe", str(mixture_id), "--out", str(out), "--session", str(trainer.run.session.dir)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["routing"] == "top1" and [e["run_id"] for e in manifest["experts"]] == [
        e["run_id"] for e in plan["card"]["experts"]]
    assert manifest["flops"]["inference_per_sample"] > 0
    x = TEST.tensors[0]
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    code = textwrap.dedent(f"""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name == "onthefly" or name.startswith("onthefly."):
                    raise ImportError("onthefly is not installed here")
        sys.meta_path.insert(0, Refuse())
        try:
            import onthefly
        except ImportError:
            pass
        else:
            raise SystemExit("onthefly was importable")
        import torch
        from safetensors.torch import load_file, save_file
        program = torch.export.load({str(out / "program.pt2")!r}).module()
        x = load_file({str(tmp_path / "inputs.safetensors")!r})["x"]
        save_file({{"all": program(x), "one": program(x[:1])}}, {str(tmp_path / "outputs.safetensors")!r})
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    mixture = trainer.forks[mixture_id]
    with torch.no_grad():
        expected = mixture(x)
    assert torch.equal(outputs["all"], expected)
    assert torch.equal(outputs["one"], mixture(x[:1]).detach())
    # The mixture rebuilt from its files (a later process) predicts the same.
    rebuilt = mixing.rebuild(trainer, next(r for r in open_session(trainer.run.session.dir).runs()
                                           if r["id"] == mixture_id))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)


def test_the_artifact_travels_with_an_exported_session(made: tuple[onthefly.Trainer, dict[str, Any], Script],
                                                       tmp_path: Path) -> None:
    trainer, plan, _ = made
    (mixture_id,) = plan["runs"]
    archive = tmp_path / "s.otf"
    export_session(trainer.run.session.dir, archive)
    folder = import_session(archive, home=tmp_path / "home")
    manifest = mixing.export_moe(folder, mixture_id, tmp_path / "copied")
    assert (tmp_path / "copied" / "program.pt2").is_file()
    assert manifest["run_id"] == mixture_id


def test_the_benchmark_gives_the_monolith_the_mixtures_compute_and_reports_every_entrant(
        made: tuple[onthefly.Trainer, dict[str, Any], Script], capsys: pytest.CaptureFixture[str]) -> None:
    trainer, plan, script = made
    reader = open_session(trainer.run.session.dir)
    bench = reader.plan(script.notes["benchmark"])
    assert bench["status"] == "done", bench["error"]
    report = bench["result"]["report"]
    compute = report["compute"]
    items = {(i["what"], i["run_id"]) for i in compute["items"]}
    assert ("specialist", script.notes["specialist"]) in items and ("control", script.notes["control"]) in items
    assert any(what == "gate training" for what, _ in items)
    assert compute["budget_flops"] == sum(i["flops"] for i in compute["items"])
    # The monolith trained as many steps as the budget buys, no fewer.
    assert compute["monolith_flops"] >= compute["budget_flops"] > compute["monolith_flops"] - compute["train_step_flops"]
    (monolith,) = bench["runs"]
    assert reader.samples(monolith, split="train").num_rows == compute["monolith_steps"] * compute["batch_size"]
    assert {e["kind"] for e in reader.lineage()["edges"] if e["child"] == monolith} == {"benchmark"}
    assert set(report["comparison"]["runs"]) == {"mixture", "monolith", "merge", "generalist"}
    assert report["sets"] == ["test", "rare"]  # the card's sets and the specialist's slice
    assert set(report["inference"]) == {"mixture", "monolith", "merge", "generalist"}
    assert report["inference"]["mixture"]["flops_per_sample"] > report["inference"]["monolith"]["flops_per_sample"]
    assert "aten.relu" in " ".join(compute["zero_flop_ops"])
    assert "On test:" in report["summary"] and "monolith" in report["summary"]
    # The CLI prints it from the session.
    (mixture_id,) = plan["runs"]
    assert cli(["benchmark", str(mixture_id), "--session", str(trainer.run.session.dir)]) == 0
    printed = capsys.readouterr().out
    assert "monolith" in printed and "matched compute" in printed


def test_an_expert_the_gate_hardly_uses_is_warned_about() -> None:
    trainer, plan, script = session_with_mixture({"min_share": 0.6, "steps": 50, "sets": ["val"]}, epochs=2)
    assert plan["status"] == "done", plan["error"]
    warnings = plan["result"]["utilisation"]["warnings"]
    assert [w["run_id"] for w in warnings] == [script.notes["specialist"]]
    assert "under the card's min_share of 60%" in warnings[0]["text"]
    assert plan["result"]["verdict"]["dead"] == [script.notes["specialist"]]
    with pytest.raises(StateError, match="not been benchmarked"):
        benchmarking.report_of(open_session(trainer.run.session.dir), plan["runs"][0])


def test_refusals_name_the_problem(made: tuple[onthefly.Trainer, dict[str, Any], Script]) -> None:
    trainer, _, script = made
    reader = open_session(trainer.run.session.dir)
    base = {"kind": "gate", "name": "another", "run_id": trainer.run.run_id,
            "experts": [{"run_id": trainer.run.run_id}, {"run_id": script.notes["specialist"]}]}
    with pytest.raises(NotFoundError, match="experts: run 99"):
        check_card(reader, {**base, "experts": [{"run_id": 1}, {"run_id": 99}]})
    with pytest.raises(StateError, match="listed twice"):
        check_card(reader, {**base, "experts": [{"run_id": 1}, {"run_id": 1}]})
    with pytest.raises(ConfigError, match="experts"):
        check_card(reader, {**base, "experts": [{"run_id": 1}]})
    with pytest.raises(NotFoundError, match="data"):
        check_card(reader, {**base, "data": "no such slice"})
    with pytest.raises(StateError, match="not a mixture"):
        check_card(reader, {"kind": "benchmark", "run_id": 1, "mixture": script.notes["specialist"]})
    with pytest.raises(StateError, match="not a mixture"):
        mixing.export_moe(reader, script.notes["specialist"], "/nonexistent/out")
    assert cli(["export-moe", "12345", "--out", "/tmp/x", "--session", str(reader.dir)]) == 2



def test_a_soft_gate_on_the_generalists_embedding_mixes_probabilities_and_exports() -> None:
    trainer, plan, _ = session_with_mixture({"gate_input": "embedding", "routing": "soft", "hidden": 8,
                                             "sets": ["test"]}, epochs=2)
    assert plan["status"] == "done", plan["error"]
    (mixture_id,) = plan["runs"]
    mixture = trainer.forks[mixture_id]
    x = TEST.tensors[0][:50]
    with torch.no_grad():
        out = mixture(x)
        assert torch.allclose(out.exp().sum(dim=1), torch.ones(50), atol=1e-5)  # log-probabilities
        assert mixture.gate.mean.numel() == 32  # the generalist's 32-wide embedding
    assert plan["result"]["artifact"]["written"], plan["result"]["artifact"]
    program = mixing.moe_export.load_artifact(mixing.artifact_folder(open_session(trainer.run.session.dir),
                                                                     mixture_id))
    assert torch.equal(program(x), out)


def test_experts_with_different_output_shapes_are_refused() -> None:
    x = torch.randn(5, 8)
    torch.manual_seed(0)
    three, four = nn.Linear(8, 3), nn.Linear(8, 4)
    with pytest.raises(ConfigError, match="outputs differ in shape"):
        mixing._logits([three, four], x)
    with pytest.raises(ConfigError, match=r"logits of shape \[batch, classes\]"):
        mixing._logits([nn.Sequential(nn.Linear(8, 3), nn.Flatten(0))], x)
