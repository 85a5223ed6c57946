"""Gate cards: a gating network trained over frozen experts, and the mixture as a run of the session
with a standalone inference artifact - carried out by a live run's process on its training thread,
between steps (the run waits, as for a fork, and goes on exactly).

The experts (the generalist first, then specialists: runs or checkpoints of the session) are
copies of the live run's module holding each one's weights. Their outputs on the card's held-out
data (validation or a saved slice) are computed once; the gate (``gating``) learns on them with
the experts frozen. The mixture run has an edge of kind "gate" from every expert, a checkpoint
(reason "gate") holding the mixture's weights and, in a ``mixture/`` folder beside them, the
artifact: a ``torch.export`` program, safetensors weights, ONNX where the exporter allows, and a
manifest (experts, routing, lineage ids, FLOP card) - it travels with an exported session, and
``export_moe`` (``onthefly export-moe``) copies it out. The card's result holds the comparison with
every expert (paired, on ``sets``) and the utilisation of every expert overall and per saved slice,
with a warning for an expert that receives (almost) nothing.

The recipe on the mixture run's config (experts by checkpoint id, the gate's settings) is what
``rebuild`` uses to make the mixture again from its files in a later process.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..engine.batch import to_device
from ..errors import ConfigError, NotFoundError, StateError
from ..store.checkpoints import read_checkpoint
from ..store.reader import SessionReader
from . import compare as comparing
from . import flops, moe_export
from .children import evaluate, evaluation_sets
from .export import isolated_rng
from .gating import Gate, Mixture, split_last_linear, train_gate

__all__ = ["ARTIFACT_DIR", "artifact_folder", "execute", "export_moe", "rebuild", "utilisation"]

ARTIFACT_DIR = "mixture"  # inside the mixture run's checkpoint folder
MAX_SLICES = 24  # utilisation is shown per saved slice, for this many at most


# ---- carrying a card out (training thread) -------------------------------------------------------
def execute(trainer: Any, plan: Mapping[str, Any], on_child: Callable[[Any], None] | None) -> dict[str, Any]:
    """Carry out an approved gate card: train the gate, make the mixture run and its artifact."""
    from .merge import checkpoint_for, model_at

    card = plan["card"]
    if card["run_id"] != trainer.run.run_id:
        raise ConfigError(f"run_id: this card is for run {card['run_id']}, but it was sent to run {trainer.run.run_id}")
    started = time.perf_counter()
    with isolated_rng():  # the live run's random streams are exactly as they were afterwards
        resolved = [(dict(e), checkpoint_for(trainer, e, "gate")) for e in card["experts"]]
        experts = [_frozen(model_at(trainer, record)) for _, record in resolved]
        dataset, indices = _held_out(trainer, card)
        inputs, targets = _collect(trainer, dataset, indices)
        torch.manual_seed(card["seed"])
        mixture, training = _train(trainer, card, experts, inputs, targets)
        shares = utilisation(trainer, mixture, card, [r["run_id"] for _, r in resolved])
        compared = _compare(trainer, card, mixture, resolved)
    recipe = {"format": 1, "routing": card["routing"], "gate_input": card["gate_input"], "hidden": card["hidden"],
              "features": int(mixture.gate.mean.numel()), "classes": int(_classes(trainer, mixture, inputs)),
              "experts": [{"run_id": r["run_id"], "checkpoint_id": r["id"], "step": r["step"]} for _, r in resolved],
              "parameters": {k: card[k] for k in ("data", "steps", "batch_size", "lr", "balance", "seed")},
              "held_out_count": int(inputs.shape[0]), "gate_train_flops_per_sample": training.flops_per_sample,
              "gate_loss": _downsampled(training.losses), "balance_loss": _downsampled(training.balance),
              "seconds": round(time.perf_counter() - started, 3)}
    child_id, folder = _mixture_run(trainer, card, mixture, recipe, plan["id"], resolved, on_child)
    artifact = _write_artifact(trainer, mixture, inputs, folder, card, recipe, child_id)
    trainer.forks[child_id] = mixture
    verdict = {"met": compared["worse"] is None, "worse": compared["worse"],
               "dead": [w["run_id"] for w in shares["warnings"]]}
    return {"runs": [child_id], "comparison": compared["table"], "verdict": verdict, "utilisation": shares,
            "gate": {k: recipe[k] for k in ("routing", "gate_input", "hidden", "gate_loss", "balance_loss", "seconds")},
            "artifact": artifact}


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _held_out(trainer: Any, card: Mapping[str, Any]) -> tuple[Any, np.ndarray | None]:
    if card["data"] == "val":
        if trainer.val_loader is None:
            raise ConfigError("data: the gate is trained on held-out data and the live run has no val_loader; "
                              "name a saved slice instead")
        return trainer.val_loader.dataset, None
    reader = SessionReader(trainer.run.session.dir)
    return trainer.train_loader.original.dataset, np.asarray(reader.slice_indices(reader.slice(card["data"])),
                                                             dtype=np.int64)


def _loader(trainer: Any, dataset: Any, indices: np.ndarray | None) -> DataLoader:
    source = trainer.train_loader.original
    return DataLoader(dataset if indices is None else Subset(dataset, indices.tolist()),
                      batch_size=max(source.batch_size or 1, 256), shuffle=False, collate_fn=source.collate_fn)


def model_inputs(trainer: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The one input tensor the model is called with, and the targets, of a batch."""
    args, kwargs, targets = trainer.spec.arguments(batch)
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise ConfigError("experts: a mixture routes models called with one input tensor (model(x)); this model is "
                          f"called with {len(args)} positional and {len(kwargs)} keyword arguments")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ConfigError("experts: the gate routes classifiers, and the targets are not class ids "
                          f"({type(targets).__name__})")
    return args[0], targets


def _collect(trainer: Any, dataset: Any, indices: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out inputs and targets, on the device."""
    if (indices is not None and len(indices) == 0) or len(dataset) == 0:
        raise ConfigError("data: the held-out data is empty; the gate needs samples to learn routing on")
    xs, ys = [], []
    for batch in _loader(trainer, dataset, indices):
        x, y = model_inputs(trainer, batch)
        xs.append(x)
        ys.append(y)
    return to_device(torch.cat(xs), trainer.device, non_blocking=False), \
        to_device(torch.cat(ys).long(), trainer.device, non_blocking=False)


def _logits(models: list[nn.Module], x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Every expert's logits on ``x``: [n, experts, classes]; refused when they differ in shape."""
    outputs = []
    with torch.no_grad():
        for model in models:
            parts = [model(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
            if not all(isinstance(p, torch.Tensor) and p.ndim == 2 for p in parts):
                raise ConfigError("experts: the gate routes classifiers whose outputs are logits of shape "
                                  "[batch, classes]")
            outputs.append(torch.cat(parts).float())
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) > 1:
        raise ConfigError(f"experts: their outputs differ in shape ({sorted(shapes)}); a mixture needs experts "
                          "with the same outputs")
    return torch.stack(outputs, dim=1)


def _train(trainer: Any, card: Mapping[str, Any], experts: list[nn.Module], inputs: torch.Tensor,
           targets: torch.Tensor) -> tuple[Mixture, Any]:
    embedding = split_last_linear(experts[0], inputs[:2]) if card["gate_input"] == "embedding" else None
    logits = _logits(experts, inputs)
    if int(targets.max()) >= logits.shape[2] or int(targets.min()) < 0:
        raise ConfigError(f"data: the held-out targets hold classes outside the experts' {logits.shape[2]}")
    with torch.no_grad():
        features = (embedding[0](inputs) if embedding is not None else inputs).flatten(1).float()
    gate = Gate(features.shape[1], len(experts), card["hidden"], features.mean(0), features.std(0).clamp_min(1e-6))
    gate = gate.to(trainer.device)
    log_probs = torch.log_softmax(logits, dim=2)
    training = train_gate(gate, features, log_probs, targets, steps=card["steps"], batch_size=card["batch_size"],
                          lr=card["lr"], balance=card["balance"], seed=card["seed"])
    k = min(card["batch_size"], features.shape[0])
    counted = flops.train_step_flops(copy.deepcopy(gate), lambda s: torch.log_softmax(s, dim=1).mean(), features[:k])
    training.flops_per_sample = counted.total / k
    return Mixture(gate, experts, card["routing"], embedding).to(trainer.device).eval(), training


def _classes(trainer: Any, mixture: Mixture, inputs: torch.Tensor) -> int:
    with torch.no_grad():
        return int(mixture(inputs[:1]).shape[1])


def _downsampled(values: list[float], points: int = 200) -> list[float]:
    if len(values) <= points:
        return [round(v, 6) for v in values]
    every = len(values) / points
    return [round(values[int(i * every)], 6) for i in range(points)] + [round(values[-1], 6)]


# ---- utilisation ---------------------------------------------------------------------------------
def utilisation(trainer: Any, mixture: Mixture, card: Mapping[str, Any], expert_ids: list[int]) -> dict[str, Any]:
    """The share of samples whose top choice is each expert (and the mean gate probability), on
    the held-out data, the card's sets and every saved slice; a warning for an expert under
    ``min_share`` of the held-out data or of the card's first set."""
    reader = SessionReader(trainer.run.session.dir)
    where: dict[str, tuple[Any, np.ndarray | None]] = {"held-out": _held_out(trainer, card)}
    where.update(evaluation_sets(trainer, reader, card["sets"]))
    for saved in reader.slices()[:MAX_SLICES]:
        if saved["count"] and saved["name"] not in where:
            where[f"slice:{saved['name']}"] = (trainer.train_loader.original.dataset,
                                               np.asarray(reader.slice_indices(saved), dtype=np.int64))
    sets: dict[str, dict[str, Any]] = {}
    for name, (dataset, indices) in where.items():
        chosen, probability = [], []
        with torch.no_grad():
            for batch in _loader(trainer, dataset, indices):
                x, _ = model_inputs(trainer, batch)
                p = mixture.route(to_device(x, trainer.device, non_blocking=False))
                chosen.append(p.argmax(dim=1).cpu())
                probability.append(p.sum(dim=0).cpu())
        top = torch.cat(chosen)
        count = int(top.numel())
        sets[name] = {"count": count,
                      "shares": (torch.bincount(top, minlength=len(expert_ids)).double() / max(count, 1)).tolist(),
                      "mean_probability": (torch.stack(probability).sum(0).double() / max(count, 1)).tolist()}
    judged = ["held-out", card["sets"][0]]
    warnings = []
    for e, run_id in enumerate(expert_ids):
        low = min(sets[name]["shares"][e] for name in judged)
        if low < card["min_share"]:
            gone = ": the gate has (almost) stopped using it" if low < 0.05 else ""
            warnings.append({"run_id": run_id, "share": low,
                             "text": f"expert run {run_id} receives {low * 100:.1f}% of the samples, under the card's "
                                     f"min_share of {card['min_share'] * 100:g}%{gone}"})
    return {"experts": expert_ids, "sets": sets, "warnings": warnings}


# ---- comparing -----------------------------------------------------------------------------------
def _compare(trainer: Any, card: Mapping[str, Any], mixture: Mixture, resolved: list[tuple[dict[str, Any], Any]],
             ) -> dict[str, Any]:
    from .merge import judge_worse, model_at

    reader = SessionReader(trainer.run.session.dir)
    sets = evaluation_sets(trainer, reader, card["sets"])
    entrants: dict[str, nn.Module] = {"mixture": mixture}
    for expert, record in resolved:
        entrants[str(expert["run_id"])] = model_at(trainer, record)
    results = {label: {name: evaluate(trainer, m, *w) for name, w in sets.items()} for label, m in entrants.items()}
    table = comparing.compare(results, "mixture", seed=card["seed"])
    names = {r["id"]: r["name"] for r in reader.runs()}
    table["names"] = {"mixture": card["name"], **{str(e["run_id"]): names.get(e["run_id"], str(e["run_id"]))
                                                  for e, _ in resolved}}
    return {"table": table, "worse": judge_worse(table, list(sets), "mixture", "expert")}


# ---- the mixture run and its artifact ------------------------------------------------------------
def _mixture_run(trainer: Any, card: Mapping[str, Any], mixture: Mixture, recipe: Mapping[str, Any], plan_id: int,
                 resolved: list[tuple[dict[str, Any], Any]], on_child: Callable[[Any], None] | None) \
        -> tuple[int, Path]:
    from ..engine.trainer import Trainer

    run = trainer.run
    optimizer = torch.optim.Adam(mixture.gate.parameters(), lr=card["lr"])
    first = resolved[0][1]
    child = Trainer(model=mixture, optimizer=optimizer, loss_fn=trainer.loss.loss_fn,
                    train_loader=trainer.train_loader.original, val_loader=trainer.val_loader,
                    test_loader=trainer.test_loader, project=run.project, run_name=card["name"],
                    device=trainer.device, inputs=trainer.spec.inputs, targets=trainer.spec.targets,
                    forward_fn=trainer.spec.forward_fn, progress=False, session=run.session,
                    parent=(first["run_id"], first["id"]))
    child.run.config.update({"plan_id": plan_id, "gate": dict(recipe)})
    run.session.set_run_config(child.run.run_id, child.run.config)
    for _, record in resolved:
        run.session.add_edge(child_id=child.run.run_id, parent_id=record["run_id"], kind="gate", step=record["step"],
                             checkpoint_id=record["id"], plan_id=plan_id)
    if on_child is not None:
        on_child(child.run)
    folder = child.run.save_checkpoint(reason="gate")
    child.run.close()
    run.session.flush()  # the checkpoint's folder is written: the artifact goes beside it
    return int(child.run.run_id), Path(folder)


def _write_artifact(trainer: Any, mixture: Mixture, inputs: torch.Tensor, folder: Path, card: Mapping[str, Any],
                    recipe: Mapping[str, Any], child_id: int) -> dict[str, Any]:
    """The artifact in ``folder/mixture`` (a CPU copy of the mixture, any batch size); what the
    card's result says of it. A model torch.export cannot trace leaves the mixture without an
    artifact, and the result says why."""
    portable = copy.deepcopy(mixture).cpu().eval()
    example = inputs[: min(8, inputs.shape[0])].cpu()
    if example.shape[0] < 2:
        example = torch.cat([example, example])
    per_sample = flops.forward_flops(portable, example).scaled(1 / example.shape[0])
    experts = [{"run_id": e["run_id"], "checkpoint_id": e["checkpoint_id"], "step": e["step"]}
               for e in recipe["experts"]]
    manifest = {"kind": "mixture-of-experts", "routing": card["routing"], "gate_input": card["gate_input"],
                "run_id": child_id, "session": trainer.run.session.dir.name, "experts": experts,
                "classes": recipe["classes"],
                "flops": {"inference_per_sample": per_sample.total, "zero_flop_ops": list(per_sample.zero_ops),
                          "note": "every expert is evaluated (a dense mixture); top-1 picks one output"}}
    try:
        written = moe_export.write_artifact(portable, example, folder / ARTIFACT_DIR, manifest=manifest)
    except ConfigError as exc:
        return {"written": False, "error": str(exc)}
    return {"written": True, "folder": str(folder / ARTIFACT_DIR), "onnx": written["onnx"],
            "files": sorted(written["files"]), "flops_per_sample": per_sample.total}


def artifact_folder(reader: SessionReader, run_id: int) -> Path:
    """Where the mixture run's artifact is (NotFoundError / StateError saying why there is none)."""
    runs = {r["id"]: r for r in reader.runs()}
    if run_id not in runs:
        raise NotFoundError(f"run {run_id} is not a run of this session (its runs: {', '.join(map(str, runs))})")
    if "gate" not in runs[run_id]["config"]:
        raise StateError(f"run {run_id} ({runs[run_id]['name']}) is not a mixture of experts; a gate card makes one")
    for record in reversed(reader.checkpoints(run_id)):
        folder = Path(record["path"]) / ARTIFACT_DIR
        if (folder / "manifest.json").is_file():
            return folder
    raise StateError(f"run {run_id} has no artifact: torch.export could not trace its mixture (the gate card's "
                     "result says why)")


def export_moe(session: str | Path | SessionReader, run_id: int, out: str | Path) -> dict[str, Any]:
    """Copy mixture run ``run_id``'s artifact to ``out`` (checked file by file); its manifest."""
    reader = session if isinstance(session, SessionReader) else SessionReader(Path(session))
    return moe_export.copy_artifact(artifact_folder(reader, run_id), Path(out))


def rebuild(trainer: Any, record: Mapping[str, Any]) -> Mixture:
    """Mixture run ``record`` made again from its files: the experts' checkpoints (the recipe's)
    in copies of the live run's module, the gate's weights from the run's checkpoint."""
    from .merge import model_at

    recipe = record["config"]["gate"]
    reader = SessionReader(trainer.run.session.dir)
    experts = [_frozen(model_at(trainer, reader.checkpoint(e["checkpoint_id"])))
               for e in recipe["experts"]]
    checkpoints = reader.checkpoints(record["id"])
    if not checkpoints:
        raise StateError(f"mixture run {record['id']} has no checkpoint")
    tensors, _ = read_checkpoint(checkpoints[-1]["path"])
    ones = torch.ones(recipe["features"])
    gate = Gate(recipe["features"], len(experts), recipe["hidden"], ones * 0, ones)
    embedding = None
    if recipe["gate_input"] == "embedding":  # the split is checked again on a held-out batch
        dataset, indices = _held_out(trainer, {"data": recipe["parameters"]["data"]})
        x, _ = model_inputs(trainer, next(iter(_loader(trainer, dataset, indices))))
        embedding = split_last_linear(experts[0], to_device(x[:2], trainer.device, non_blocking=False))
    mixture = Mixture(gate, experts, recipe["routing"], embedding)
    mixture.load_state_dict(tensors)
    return mixture.to(trainer.device).eval()
