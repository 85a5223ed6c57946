"""Benchmark cards: a mixture against a monolith given the same compute, measured in FLOPs.

What the mixture cost to make, beyond the generalist it started from, is counted with
``torch.utils.flop_counter`` (``flops``): every sample each specialist and each specialist's
matched control trained on (the per-sample rows the session recorded) at the FLOPs of one
training step of the model per sample; the experts' forward passes over the gate's held-out data;
the gate's own training steps. Operators the counter has no formula for count as zero and are
listed. A fork that trained only its head or adapters is costed as a full training step (an upper
bound: the comparison is never tilted toward the mixture).

With that budget the baselines, all from the same starting point (the generalist's checkpoint
named in the mixture's recipe):

1. **monolith**: the generalist trained on, as one model, on all the training data for as many
   steps as the budget buys (a run of the session, edge kind "benchmark"), its optimizer state
   (moments, learning rate) loaded from the generalist's checkpoint, as if it had never stopped;
2. **merge**: the best of the card's weight merges of the same experts (chosen on validation);
   it costs the experts' training, the same as the mixture minus the gate;
3. **generalist**: the generalist alone, at its checkpoint.

Every entrant is evaluated with the one per-sample evaluation, paired, against the mixture, on the
card's sets and the specialists' slices; inference FLOPs and latency (the median of five timed
passes over one batch) per sample for each. The report says which won where, by how much.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..engine.batch import to_device
from ..errors import ConfigError, StateError
from ..store.checkpoints import read_checkpoint
from ..store.reader import SessionReader
from . import compare as comparing
from . import flops, merging, model_weights, recipes
from .children import Draws, evaluate, evaluation_sets, optimizer_like, seed_all
from .export import isolated_rng

__all__ = ["execute", "report_of"]

LATENCY_BATCH = 256


def execute(trainer: Any, plan: Mapping[str, Any], on_child: Callable[[Any], None] | None) -> dict[str, Any]:
    from . import mixture as mixing
    from .merge import model_at

    run, card = trainer.run, plan["card"]
    if card["run_id"] != run.run_id:
        raise ConfigError(f"run_id: this card is for run {card['run_id']}, but it was sent to run {run.run_id}")
    run.recorder.flush()
    run.session.flush()
    reader = SessionReader(run.session.dir)
    record = next(r for r in reader.runs() if r["id"] == card["mixture"])
    recipe = record["config"]["gate"]
    with isolated_rng():
        mixture = trainer.forks.get(card["mixture"]) or mixing.rebuild(trainer, record)
        start = reader.checkpoint(recipe["experts"][0]["checkpoint_id"])
        generalist = model_at(trainer, start)
        batch = next(iter(DataLoader(trainer.train_loader.original.dataset,
                                     batch_size=trainer.train_loader.original.batch_size or 1,
                                     collate_fn=trainer.train_loader.original.collate_fn)))
        costs = _costs(trainer, reader, recipe, generalist, batch)
        budget = sum(item["flops"] for item in costs["items"])
        step_flops = costs["train_step_flops"]
        steps = max(1, math.ceil(budget / step_flops))
        monolith_id, monolith = _monolith(trainer, card, reader, recipe, start, steps, plan["id"], on_child)
        merged, merge_choice = _best_merge(trainer, card, reader, recipe, start)
        entrants = {"mixture": mixture, "monolith": monolith, "merge": merged, "generalist": generalist}
        sets = _sets(trainer, reader, card, recipe)
        results = {label: {name: evaluate(trainer, m, *w) for name, w in sets.items()}
                   for label, m in entrants.items()}
        table = comparing.compare(results, "mixture", seed=card["seed"])
        table["names"] = {"mixture": record["name"], "monolith": f"monolith (run {monolith_id})",
                          "merge": f"merge ({merge_choice['method']})", "generalist": f"generalist (run {start['run_id']})"}
        inference = {label: _inference(trainer, m, batch) for label, m in entrants.items()}
    compute = {"budget_flops": budget, "items": costs["items"], "train_step_flops": step_flops,
               "batch_size": costs["batch_size"], "monolith_steps": steps,
               "monolith_flops": steps * step_flops, "zero_flop_ops": costs["zero_flop_ops"],
               "generalist_flops": costs["generalist_flops"]}
    report = {"format": 1, "mixture": card["mixture"], "monolith_run": monolith_id, "merge": merge_choice,
              "compute": compute, "inference": inference, "comparison": table, "sets": list(sets)}
    report["summary"] = summary(report)
    record["config"]["benchmark"] = report
    run.session.set_run_config(card["mixture"], record["config"])
    trainer.forks[monolith_id] = monolith
    trainer.benchmarked = {**getattr(trainer, "benchmarked", {}), plan["id"]: entrants}  # for callers in-process
    verdict = {"met": _mixture_won(table, next(iter(sets))), "summary": report["summary"]}
    return {"runs": [monolith_id], "comparison": table, "verdict": verdict, "report": report}


def report_of(reader: SessionReader, run_id: int) -> dict[str, Any]:
    """The benchmark report kept on mixture run ``run_id``."""
    record = next((r for r in reader.runs() if r["id"] == run_id), None)
    if record is None:
        raise StateError(f"run {run_id} is not a run of this session")
    if "gate" not in record["config"]:
        raise StateError(f"run {run_id} ({record['name']}) is not a mixture of experts; a gate card makes one")
    if "benchmark" not in record["config"]:
        raise StateError(f"mixture run {run_id} has not been benchmarked: approve a benchmark card for it (in the "
                         "dashboard, or onthefly.actions.fork.propose(run, {'kind': 'benchmark', ...}))")
    return dict(record["config"]["benchmark"])


# ---- compute -------------------------------------------------------------------------------------
def _costs(trainer: Any, reader: SessionReader, recipe: Mapping[str, Any], model: nn.Module, batch: Any) \
        -> dict[str, Any]:
    """What the mixture cost beyond its generalist: item by item, in FLOPs."""
    from .mixture import model_inputs

    x, y = model_inputs(trainer, to_device(batch, trainer.device, non_blocking=False))
    probe = copy.deepcopy(model).train()
    step = flops.train_step_flops(probe, lambda out: trainer.loss(out, y, int(y.shape[0]))[0], x)
    per_sample = step.total / x.shape[0]
    forward = flops.forward_flops(copy.deepcopy(model).eval(), x)
    zero = set(step.zero_ops) | set(forward.zero_ops)
    items = []
    experts = recipe["experts"]
    edges = reader.lineage()["edges"]
    for expert in experts[1:]:
        trained = [(expert["run_id"], "specialist")]
        fork_edge = next((e for e in edges if e["child"] == expert["run_id"] and e["kind"] == "fork"), None)
        if fork_edge is not None:
            trained += [(e["child"], "control") for e in edges if e["kind"] == "control"
                        and e["plan_id"] == fork_edge["plan_id"] and fork_edge["plan_id"] is not None]
        for run_id, what in trained:
            samples = _samples_trained(reader, run_id)
            items.append({"what": what, "run_id": run_id, "samples": samples, "flops": int(samples * per_sample)})
    held_out = int(recipe.get("held_out_count", 0))
    items.append({"what": "experts on the gate's held-out data", "run_id": None, "samples": held_out * len(experts),
                  "flops": int(held_out * len(experts) * forward.total / x.shape[0])})
    gate_samples = recipe["parameters"]["steps"] * min(recipe["parameters"]["batch_size"], max(held_out, 1))
    gate_flops = int(recipe.get("gate_train_flops_per_sample", 0) * gate_samples)
    items.append({"what": "gate training", "run_id": None, "samples": gate_samples, "flops": gate_flops})
    generalist_samples = _samples_trained(reader, experts[0]["run_id"], upto_step=experts[0]["step"])
    return {"items": items, "train_step_flops": step.total, "batch_size": int(x.shape[0]),
            "zero_flop_ops": sorted(zero), "generalist_flops": int(generalist_samples * per_sample)}


def _samples_trained(reader: SessionReader, run_id: int, *, upto_step: int | None = None) -> int:
    """The training samples a run's steps drew (its per-sample rows), up to a step if given."""
    table = reader.samples(run_id, split="train")
    if upto_step is not None and "step" in table.column_names:
        return int(np.sum(np.asarray(table.column("step")) <= upto_step))
    return int(table.num_rows)


# ---- the baselines -------------------------------------------------------------------------------
def _monolith(trainer: Any, card: Mapping[str, Any], reader: SessionReader, recipe: Mapping[str, Any],
              start: Mapping[str, Any], steps: int, plan_id: int, on_child: Callable[[Any], None] | None) \
        -> tuple[int, nn.Module]:
    from ..engine.trainer import Trainer
    from .merge import model_at

    run = trainer.run
    seed_all(card["seed"])
    model = model_at(trainer, start)
    # The generalist trained on: its optimizer as the checkpoint holds it (moments, learning rate).
    optimizer = optimizer_like(trainer.optimizer, list(model.parameters()),
                               {"lr": trainer.optimizer.param_groups[0]["lr"], "weight_decay": None})
    continued = True
    try:
        optimizer.load_state_dict(read_checkpoint(Path(start["path"]))[1]["optimizer"])
    except (KeyError, ValueError, RuntimeError):
        continued = False  # a state that does not map: a fresh optimizer of the same class and settings
    lr = float(optimizer.param_groups[0]["lr"])
    source = trainer.train_loader.original
    batch_size = source.batch_size or 1
    generator = torch.Generator().manual_seed(card["seed"])
    loader = DataLoader(source.dataset, batch_size=batch_size,
                        sampler=Draws(np.arange(len(source.dataset), dtype=np.int64), None, steps * batch_size,
                                      generator),
                        num_workers=source.num_workers, collate_fn=source.collate_fn, pin_memory=source.pin_memory,
                        drop_last=source.drop_last, worker_init_fn=source.worker_init_fn, persistent_workers=False)
    name = _free_name(reader, f"monolith of run {card['mixture']}")
    child = Trainer(model=model, optimizer=optimizer, loss_fn=trainer.loss.loss_fn, train_loader=loader,
                    val_loader=trainer.val_loader, test_loader=trainer.test_loader, project=run.project,
                    run_name=name, device=trainer.device, amp=trainer.amp, grad_clip=trainer.grad_clip,
                    inputs=trainer.spec.inputs, targets=trainer.spec.targets, forward_fn=trainer.spec.forward_fn,
                    progress=False, session=run.session, parent=(start["run_id"], start["id"]))
    child.run.config.update({"plan_id": plan_id, "benchmark": {"baseline": "monolith", "mixture": card["mixture"],
                                                               "steps": steps, "lr": lr,
                                                               "optimizer_continued": continued}})
    run.session.set_run_config(child.run.run_id, child.run.config)
    run.session.add_edge(child_id=child.run.run_id, parent_id=start["run_id"], kind="benchmark", step=start["step"],
                         checkpoint_id=start["id"], plan_id=plan_id)
    if on_child is not None:
        on_child(child.run)
    child.fit(1)
    child.run.save_checkpoint(reason="benchmark")
    model.train(False)
    return int(child.run.run_id), model


def _free_name(reader: SessionReader, name: str) -> str:
    taken = {r["name"] for r in reader.runs()}
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name} ({k})", k + 1
    return candidate


def _best_merge(trainer: Any, card: Mapping[str, Any], reader: SessionReader, recipe: Mapping[str, Any],
                start: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The card's weight merges of the experts (task vectors from their common ancestor in the
    lineage, else the generalist's checkpoint), the best on validation (else on the first set)."""
    from .merge import load_model

    records = [reader.checkpoint(e["checkpoint_id"]) for e in recipe["experts"]]
    judged_name = "val" if trainer.val_loader is not None else card["sets"][0]
    judged = evaluation_sets(trainer, reader, [judged_name])[judged_name]
    tried = []
    opened = [model_weights.FileWeights(recipes.model_file(r)) for r in records]
    try:
        parents = [model_weights.fold_adapters(w) for w in opened]
        common = recipes.common_base(reader, records)  # the fork point the task vectors are taken from
        base = model_weights.TensorWeights(recipes.checkpoint_tensors(common if common is not None else start))
        ones = [1.0] * len(parents)
        for method in card["merges"]:
            if method == "linear":
                tensors = merging.linear(parents, None)
            elif method == "ties":
                tensors = merging.ties(base, parents, ones, density=0.5, lambda_=1.0)
            else:
                tensors = merging.task_arithmetic(base, parents, ones, lambda_=1.0, normalize=True)
            model = load_model(trainer, tensors)
            result = evaluate(trainer, model, *judged)
            score = float(result.correct.mean()) if result.correct is not None else -float(np.mean(result.loss))
            tried.append((score, method, model))
    finally:
        for w in opened:
            w.close()
    score, method, model = max(tried, key=lambda t: t[0])
    return model, {"method": method, "chosen_on": judged_name, "score": score,
                   "tried": {m: s for s, m, _ in tried}, "base_checkpoint_id": (common or start)["id"]}


def _sets(trainer: Any, reader: SessionReader, card: Mapping[str, Any], recipe: Mapping[str, Any]) \
        -> dict[str, tuple[Any, np.ndarray | None]]:
    """The card's sets and each specialist's slice (its fork card's)."""
    names = list(card["sets"])
    plans = {p["id"]: p for p in reader.plans()}
    saved = {s["name"] for s in reader.slices()}
    for expert in recipe["experts"][1:]:
        for edge in reader.lineage()["edges"]:
            if edge["child"] == expert["run_id"] and edge["kind"] == "fork" and edge["plan_id"] in plans:
                name = plans[edge["plan_id"]]["card"]["slice"]
                if name in saved and name not in names:
                    names.append(name)
    return evaluation_sets(trainer, reader, names)


# ---- inference and the report --------------------------------------------------------------------
def _inference(trainer: Any, model: nn.Module, batch: Any) -> dict[str, float]:
    """FLOPs and latency (milliseconds, the median of five passes) per sample over one batch."""
    from .mixture import model_inputs

    x, _ = model_inputs(trainer, to_device(batch, trainer.device, non_blocking=False))
    x = x.repeat((math.ceil(LATENCY_BATCH / x.shape[0]),) + (1,) * (x.ndim - 1))[:LATENCY_BATCH]
    was = model.training
    model.eval()
    counted = flops.forward_flops(model, x)
    times = []
    with torch.no_grad():
        model(x)  # warm up
        for _ in range(5):
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            began = time.perf_counter()
            model(x)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            times.append(time.perf_counter() - began)
    model.train(was)
    return {"flops_per_sample": counted.total / x.shape[0],
            "latency_ms_per_sample": statistics.median(times) * 1000 / x.shape[0]}


def _cell(table: Mapping[str, Any], run: str, name: str) -> Mapping[str, Any]:
    return next(c for c in table["cells"] if c["run"] == run and c["set"] == name)


def _mixture_won(table: Mapping[str, Any], name: str) -> bool | None:
    """The mixture above the monolith on ``name`` with an interval that excludes no difference."""
    diff = (_cell(table, "monolith", name).get("diff") or {}).get("accuracy")
    if not diff or diff["high"] is None:
        return None
    return bool(diff["high"] < 0)  # the monolith minus the mixture, entirely below zero


def summary(report: Mapping[str, Any]) -> str:
    """The report in a few plain sentences: who won on each set, by how much, how sure."""
    table = report["comparison"]
    lines = [f"Matched compute: {report['compute']['budget_flops']:.3g} FLOPs beyond the generalist, given to the "
             f"monolith as {report['compute']['monolith_steps']} training steps."]
    for name in report["sets"]:
        cells = [c for c in table["cells"] if c["set"] == name]
        metric = "accuracy" if cells[0]["accuracy"] is not None else "loss"
        pick = max if metric == "accuracy" else min
        best = pick(cells, key=lambda c: c[metric])
        mixture = _cell(table, "mixture", name)
        parts = []
        for c in cells:
            if c["run"] == "mixture":
                continue
            diff = (c.get("diff") or {}).get(metric)
            gap = (mixture[metric] - c[metric]) * (100 if metric == "accuracy" else 1)
            interval = "" if not diff or diff["low"] is None else (
                f" (95% CI of the difference {-diff['high'] * 100:+.2f} to {-diff['low'] * 100:+.2f})"
                if metric == "accuracy" else "")
            unit = " points" if metric == "accuracy" else ""
            parts.append(f"{gap:+.2f}{unit} vs {c['run']}{interval}")
        value = f"{best[metric] * 100:.2f}%" if metric == "accuracy" else f"{best[metric]:.4g}"
        lines.append(f"On {name}: {best['run']} wins ({metric} {value}); the mixture is " + ", ".join(parts) + ".")
    slices = [name for name in report["sets"] if name not in ("val", "test")]
    if slices:
        lines.append(f"({', '.join(slices)}: slices of the training data, which the specialists trained on.)")
    return " ".join(lines)
