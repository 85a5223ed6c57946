"""Merges from plan cards: SWA and soups (uniform, weighted, greedy), task arithmetic, TIES, DARE,
Fisher-weighted soups, adapter fusion and distillation, carried out by a live run's process on its
training thread, between steps (the run waits, as for a fork, and goes on exactly).

A merge card names its parents (runs or checkpoints of the session) and a method with mergekit's
parameter names. ``preview`` makes the candidate and compares it, paired, with every parent on the
card's sets (validation and slices) before anyone approves it; the card shows the table and warns
when the candidate is worse than its best parent on validation. Approving it makes the merged run:
a new run in the lineage with an edge from every parent, its weights in a checkpoint, and on its
config the resolved recipe (every parent and the base by checkpoint id, every parameter), so that
the same recipe gives the same weights bit for bit. A merge worse than its best parent is not kept
unless the card says ``override`` (the greedy-soup rule).

Weight-space methods stream the parents from their safetensors files (``merging``); the live run's
own weights are saved as a checkpoint first, so that the recipe names a file. BatchNorm statistics
of the result are recomputed on the card's data as ``torch.optim.swa_utils.update_bn`` does (one
pass, cumulative averages). Fisher: the diagonal of each parent's Fisher, estimated from
``fisher_samples`` per-sample gradients (one backward pass each) on the card's data, with the
true labels (empirical) or labels drawn from the model (sampled). Distillation trains a student run
(``budget`` steps on the card's data) on the mean of the teachers' softened probabilities; it is
itself the merge, so it has no preview: its comparison is on the card once it has trained.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..engine.batch import to_device
from ..errors import ConfigError, StateError
from ..store.reader import SessionReader
from . import compare as comparing
from . import merging, model_weights, recipes
from .children import evaluate, evaluation_sets, optimizer_like
from .export import isolated_rng
from .plans import TASK_VECTOR_METHODS

__all__ = ["add_edges", "checkpoint_for", "data_indices", "estimate_fisher", "execute", "judge_worse", "keepable",
           "load_model", "model_at", "preview", "preview_failed",
           "request_preview", "update_bn"]


# ---- the Python API (any thread of the training process) ----------------------------------------
def request_preview(run: Any, plan_id: int) -> int:
    """Queue the preview of a proposed merge card on ``run`` (its carrying-out run); the card's
    ``result.preview`` holds the comparison once it is done. Returns the command's id."""
    plan = SessionReader(run.session.dir).plan(plan_id)
    if plan["kind"] != "merge":
        raise ConfigError(f"plan card {plan_id} is a {plan['kind']} card; only merge cards have a preview")
    if plan["status"] != "proposed":
        raise StateError(f"plan card {plan_id} is {plan['status']}: only a proposed card can be previewed")
    return int(run.request("preview_plan", plan_id=plan_id).id)


def keepable(plan: Mapping[str, Any]) -> None:
    """The greedy-soup rule at approval: a merge whose preview lost to a parent is refused
    (StateError) unless the card says ``override``."""
    preview_result = (plan.get("result") or {}).get("preview")
    if plan["kind"] != "merge" or not preview_result or plan["card"]["override"]:
        return
    if preview_result.get("card") == _card_key(plan["card"]) and preview_result.get("worse"):
        raise StateError(f"plan card {plan['id']}: {preview_result['worse']['text']}; the merge is not kept "
                         "(set override to keep it anyway)")


# ---- carrying a card out (training thread) -------------------------------------------------------
def preview(trainer: Any, plan: Mapping[str, Any]) -> dict[str, Any]:
    """Make the candidate of a proposed merge card and compare it with its parents; saved on the
    card as ``result.preview`` (the card stays proposed)."""
    run, card = trainer.run, plan["card"]
    if card["method"] == "distill":
        raise ConfigError("method: a distillation trains its student, so it has no preview; approve the card "
                          "and its comparison with the parents is on the card once the student has trained")
    with isolated_rng():
        resolved = _resolve(trainer, card)
        model, details = _candidate(trainer, card, resolved)
        compared = _compare(trainer, card, model, resolved)
    trainer.merge_previews[plan["id"]] = (_card_key(card), resolved, model, details)
    comparison_id = run.session.save_comparison({"plan_id": plan["id"], "preview": True,
                                                 "runs": [p["run_id"] for p, _ in resolved]}, compared["table"])
    summary = {"card": _card_key(card), "comparison_id": comparison_id, "worse": compared["worse"],
               "recipe": _recipe(card, resolved, details)}
    run.session.update_plan(plan["id"], result={**(plan["result"] or {}), "preview": summary})
    return {"plan_id": plan["id"], "comparison_id": comparison_id, "worse": compared["worse"]}


def preview_failed(run: Any, plan: Mapping[str, Any], error: str) -> None:
    """Say on the card why its preview could not be made."""
    run.session.update_plan(plan["id"], result={**(plan["result"] or {}),
                                                "preview": {"card": _card_key(plan["card"]), "error": error}})


def execute(trainer: Any, plan: Mapping[str, Any], on_child: Callable[[Any], None] | None) -> dict[str, Any]:
    """Carry out an approved merge card: the merged run, its edges, checkpoint and recipe."""
    run, card = trainer.run, plan["card"]
    cached = trainer.merge_previews.pop(plan["id"], None)
    with isolated_rng():  # the live run's random streams are exactly as they were afterwards
        if cached is not None and cached[0] == _card_key(card):
            _, resolved, model, details = cached  # what was previewed is what is kept (deterministic anyway)
        else:
            resolved = _resolve(trainer, card)
            model, details = _candidate(trainer, card, resolved, on_child=on_child, plan_id=plan["id"])
        compared = _compare(trainer, card, model, resolved)
        if compared["worse"] is not None and not card["override"] and card["method"] != "distill":
            raise StateError(f"{compared['worse']['text']}; the merge is not kept (set override to keep it anyway)")
        recipe = _recipe(card, resolved, details)
        student = details.pop("student_run", None)
        if student is None:
            child_id = _merged_run(trainer, card, model, recipe, plan["id"], resolved, on_child)
        else:  # the distilled student is already a run: its config gets the recipe
            child_id = int(student.run_id)
            student.config["merge"] = recipe
            run.session.set_run_config(child_id, student.config)
    trainer.forks[child_id] = model
    verdict = {"met": compared["worse"] is None, "worse": compared["worse"]}
    return {"runs": [child_id], "recipe": recipe, "comparison": compared["table"], "verdict": verdict}


def _card_key(card: Mapping[str, Any]) -> str:
    """The card as the preview saw it (a changed card needs a new preview)."""
    return json.dumps({k: v for k, v in card.items() if k not in ("name", "override")}, sort_keys=True)


# ---- parents ------------------------------------------------------------------------------------
Resolved = list[tuple[dict[str, Any], dict[str, Any]]]  # (parent as on the card, its checkpoint record)


def _resolve(trainer: Any, card: Mapping[str, Any]) -> Resolved:
    """Every parent's checkpoint: the one it names, for the live run its weights now (saved as a
    checkpoint, so the recipe names a file), for another run its newest."""
    return [(dict(parent), checkpoint_for(trainer, parent)) for parent in card["parents"]]


def checkpoint_for(trainer: Any, parent: Mapping[str, Any], reason: str = "merge") -> dict[str, Any]:
    """The checkpoint record of one parent (see ``_resolve``)."""
    run = trainer.run
    if parent["checkpoint_id"] is None and parent["run_id"] == run.run_id:
        checkpoint_id, why_not = run.checkpoint_here(reason)
        if checkpoint_id is None:
            raise StateError(f"parents: cannot save run {run.run_id}'s weights for the {reason}: {why_not}")
        run.session.flush()
        return SessionReader(run.session.dir).checkpoint(checkpoint_id)
    run.session.flush()
    found = recipes.parent_checkpoint(SessionReader(run.session.dir), parent)
    if found is None:
        raise ConfigError(f"parents: run {parent['run_id']} has no checkpoint to {reason} (and is not the "
                          f"live run {run.run_id})")
    return found


def _label(parent: Mapping[str, Any], resolved: Resolved) -> str:
    """A parent's name in comparisons: its run id (and checkpoint when a run is there twice)."""
    twice = sum(p["run_id"] == parent["run_id"] for p, _ in resolved) > 1
    return f"{parent['run_id']}" + (f"@{parent['checkpoint_id']}" if twice and parent["checkpoint_id"] else "")


def _open(resolved: Resolved) -> list[model_weights.FileWeights]:
    """The parents' weight files, opened lazily (close them)."""
    return [model_weights.FileWeights(recipes.model_file(record)) for _, record in resolved]


def load_model(trainer: Any, tensors: Mapping[str, torch.Tensor] | model_weights.Weights) -> nn.Module:
    """A copy of the live run's module holding ``tensors``, on its device."""
    model = copy.deepcopy(trainer.model)
    state = ({k: tensors.get(k) for k in tensors.keys()} if not isinstance(tensors, Mapping) else tensors)
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as exc:
        raise ConfigError(f"parents: the merged weights do not fit run {trainer.run.run_id}'s model ({exc})") \
            from None
    return model.to(trainer.device)


def model_at(trainer: Any, checkpoint: Mapping[str, Any]) -> nn.Module:
    """A copy of the live run's module holding ``checkpoint``'s weights (adapters folded)."""
    return load_model(trainer, recipes.checkpoint_tensors(checkpoint))


# ---- the candidate ------------------------------------------------------------------------------
def _candidate(trainer: Any, card: Mapping[str, Any], resolved: Resolved, *,
               on_child: Callable[[Any], None] | None = None, plan_id: int | None = None) \
        -> tuple[nn.Module, dict[str, Any]]:
    """The merged model (on the device) and what the recipe records besides the card."""
    method = card["method"]
    weights = [float(p["weight"]) for p, _ in resolved]
    uniform = None if card["normalize"] and len(set(weights)) == 1 else weights  # equal weights: SWA's average
    details: dict[str, Any] = {}
    if method == "distill":
        from .distill import distill  # trains a student run: its own module

        model, details["student_run"] = distill(trainer, card, resolved, on_child=on_child, plan_id=plan_id)
        return model, details
    if method == "greedy_soup":
        model, details["soup"] = _greedy_soup(trainer, card, resolved)
        return model, details
    opened = _open(resolved)
    parents = opened if method == "adapter_fusion" else [model_weights.fold_adapters(w) for w in opened]
    try:
        if method == "linear":
            tensors = merging.linear(parents, uniform, normalize=card["normalize"])
        elif method in TASK_VECTOR_METHODS:
            base_record = _base(trainer, card, resolved)
            details["base_checkpoint_id"] = base_record["id"]
            base = model_weights.fold_adapters(model_weights.FileWeights(recipes.model_file(base_record)))
            tensors = _task_vectors(card, base, parents, weights)
        elif method == "fisher":
            fishers = [model_weights.TensorWeights(estimate_fisher(trainer, card, load_model(trainer, p))) for p in parents]
            tensors = merging.fisher_weighted(parents, fishers, weights)
        elif method == "adapter_fusion":
            tensors = merging.fuse_adapters(parents, None if len(set(weights)) == 1 else weights, rank=card["rank"])
        else:  # pragma: no cover - the card's Literal lists every method
            raise ConfigError(f"method: unknown merge method {method!r}")
    finally:
        for file in opened:
            file.close()
    model = load_model(trainer, tensors)
    if card["update_bn"]:
        details["bn_updated"] = update_bn(trainer, model, data_indices(trainer, card))
    return model, details


def _task_vectors(card: Mapping[str, Any], base: model_weights.Weights, parents: Sequence[model_weights.Weights],
                  weights: list[float]) -> dict[str, torch.Tensor]:
    method, scale = card["method"], card["lambda"]
    if method == "task_arithmetic":
        return merging.task_arithmetic(base, parents, weights, lambda_=scale, normalize=card["normalize"])
    if method == "ties":
        return merging.ties(base, parents, weights, density=card["density"], lambda_=scale,
                            majority_sign_method=card["majority_sign"])
    if method == "dare_linear":
        return merging.dare_linear(base, parents, weights, density=card["density"], lambda_=scale, seed=card["seed"])
    return merging.dare_ties(base, parents, weights, density=card["density"], lambda_=scale, seed=card["seed"],
                             majority_sign_method=card["majority_sign"])


def _base(trainer: Any, card: Mapping[str, Any], resolved: Resolved) -> dict[str, Any]:
    reader = SessionReader(trainer.run.session.dir)
    if card["base_checkpoint_id"] is not None:
        return reader.checkpoint(card["base_checkpoint_id"])
    base = recipes.common_base(reader, [record for _, record in resolved])
    if base is None:
        raise StateError(f"method: {card['method']} takes task vectors from the parents' common ancestor, and these "
                         "parents have none in the lineage; name one with base_checkpoint_id, or use linear")
    return base


def _greedy_soup(trainer: Any, card: Mapping[str, Any], resolved: Resolved) -> tuple[nn.Module, dict[str, Any]]:
    """Wortsman et al.'s greedy soup: ingredients by validation score, best first; each is added
    to the soup (a uniform average) only when the soup's validation score improves."""
    if trainer.val_loader is None:
        raise ConfigError("method: greedy_soup chooses its ingredients on held-out data, and the live run has no "
                          "val_loader")
    data = data_indices(trainer, card)
    scores = []
    for parent, record in resolved:
        model = model_at(trainer, record)
        scores.append((_val_score(trainer, model), parent, record))
    scores.sort(key=lambda s: -s[0])  # a stable sort: ties keep the card's order
    soup: Resolved = [(scores[0][1], scores[0][2])]
    best_model = _load_soup(trainer, card, soup, data)
    best = _val_score(trainer, best_model)
    steps = [{"run_id": scores[0][1]["run_id"], "checkpoint_id": scores[0][2]["id"], "alone": scores[0][0],
              "soup": best, "added": True}]
    for alone, parent, record in scores[1:]:
        trial = [*soup, (parent, record)]
        model = _load_soup(trainer, card, trial, data)
        score = _val_score(trainer, model)
        added = score > best
        steps.append({"run_id": parent["run_id"], "checkpoint_id": record["id"], "alone": alone, "soup": score,
                      "added": added})
        if added:
            soup, best, best_model = trial, score, model
    return best_model, {"ingredients": [r["id"] for _, r in soup], "steps": steps,
                        "score": "val accuracy (minus val loss for a task that is not classification)"}


def _load_soup(trainer: Any, card: Mapping[str, Any], soup: Resolved, data: np.ndarray | None) -> nn.Module:
    opened = _open(soup)
    try:
        model = load_model(trainer, merging.linear([model_weights.fold_adapters(w) for w in opened], None))
    finally:
        for weights in opened:
            weights.close()
    if card["update_bn"]:
        update_bn(trainer, model, data)
    return model


def _val_score(trainer: Any, model: nn.Module) -> float:
    result = _evaluate(trainer, model, trainer.val_loader.dataset, None)
    if result.correct is not None:
        return float(result.correct.mean())
    return -float(np.mean(result.loss))


# ---- data-dependent steps ----------------------------------------------------------------------
def data_indices(trainer: Any, card: Mapping[str, Any]) -> np.ndarray | None:
    """The card's data as indices of the training dataset (None: all of it)."""
    if card["data"] == "train":
        return None
    reader = SessionReader(trainer.run.session.dir)
    return np.asarray(reader.slice_indices(reader.slice(card["data"])), dtype=np.int64)


def _loader(trainer: Any, indices: np.ndarray | None, *, batch_size: int | None = None) -> DataLoader:
    """The training data (or ``indices`` of it) in order, with the live run's collate function."""
    source = trainer.train_loader.original
    dataset = source.dataset if indices is None else Subset(source.dataset, indices.tolist())
    if len(dataset) == 0:
        raise ConfigError("data: the merge's data is empty (BatchNorm statistics and Fisher need samples)")
    return DataLoader(dataset, batch_size=batch_size or source.batch_size or 1, shuffle=False,
                      collate_fn=source.collate_fn)


def update_bn(trainer: Any, model: nn.Module, indices: np.ndarray | None) -> bool:
    """Recompute every BatchNorm's running statistics on the data, as
    ``torch.optim.swa_utils.update_bn``: reset, momentum None (a cumulative average), one pass in
    train mode without gradients, momenta and mode put back. False when the model has none."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    with torch.no_grad():
        for batch in _loader(trainer, indices):
            trainer.spec.forward(model, to_device(batch, trainer.device, non_blocking=False))
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.train(was_training)
    return True


def estimate_fisher(trainer: Any, card: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``model``'s parameters: the mean of squared per-sample gradients of
    the log-likelihood over ``fisher_samples`` samples of the card's data (drawn with the card's
    seed), at the true labels (empirical) or at labels sampled from the model's softmax."""
    data = data_indices(trainer, card)
    size = len(trainer.train_loader.original.dataset) if data is None else len(data)
    pool = np.arange(size) if data is None else data
    generator = np.random.default_rng(card["seed"])
    chosen = np.sort(generator.choice(pool, size=min(card["fisher_samples"], size), replace=False))
    sampler = torch.Generator().manual_seed(card["seed"])
    params = {name: p for name, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    model.eval()  # the Fisher of the model as it predicts (no dropout, BatchNorm's running statistics)
    count = 0
    for batch in _loader(trainer, chosen.astype(np.int64), batch_size=1):
        outputs, targets = trainer.spec.forward(model, to_device(batch, trainer.device, non_blocking=False))
        if card["fisher_estimator"] == "sampled":
            if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2:
                raise ConfigError("fisher_estimator: 'sampled' draws labels from the model's class probabilities "
                                  f"and needs logits of shape [batch, classes]; got {type(outputs).__name__}. "
                                  "Use 'empirical'.")
            drawn = torch.multinomial(F.softmax(outputs.detach().float().cpu(), dim=1), 1, generator=sampler)
            loss = F.cross_entropy(outputs, drawn.view(-1).to(outputs.device))
        else:
            loss = trainer.loss(outputs, targets, 1)[0]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                total[name] += grad.detach().float() ** 2
        count += 1
    return {name: (value / count).cpu() for name, value in total.items()}


# ---- comparing and keeping ---------------------------------------------------------------------
def _evaluate(trainer: Any, model: nn.Module, dataset: Any, indices: np.ndarray | None) -> comparing.PerSample:
    return evaluate(trainer, model, dataset, indices)  # the same per-sample evaluation as every comparison


def _compare(trainer: Any, card: Mapping[str, Any], model: nn.Module, resolved: Resolved) -> dict[str, Any]:
    """The candidate against every parent on the card's sets, paired (the candidate is the
    reference: a parent's difference above 0 is a parent better than the merge)."""
    reader = SessionReader(trainer.run.session.dir)
    sets = evaluation_sets(trainer, reader, card["sets"])
    entrants: dict[str, nn.Module] = {"merge": model}
    for parent, record in resolved:
        entrants[_label(parent, resolved)] = model_at(trainer, record)
    results = {label: {name: _evaluate(trainer, m, *where) for name, where in sets.items()}
               for label, m in entrants.items()}
    table = comparing.compare(results, "merge", seed=card["seed"])
    table["names"] = {"merge": card["name"], **{_label(p, resolved): next(
        (r["name"] for r in reader.runs() if r["id"] == p["run_id"]), str(p["run_id"])) for p, _ in resolved}}
    return {"table": table, "worse": judge_worse(table, list(sets))}


def judge_worse(table: Mapping[str, Any], sets: list[str], reference: str = "merge", other: str = "parent") \
        -> dict[str, Any] | None:
    """The best ``other`` (a parent, an expert) when it beats ``reference`` on validation (else the
    first set): accuracy for a classifier, else the mean loss."""
    judged = "val" if "val" in sets else sets[0]
    cells = [c for c in table["cells"] if c["set"] == judged]
    merged = next(c for c in cells if c["run"] == reference)
    metric = "accuracy" if merged["accuracy"] is not None else "loss"
    parents = [c for c in cells if c["run"] != reference and c[metric] is not None]
    if merged[metric] is None or not parents:
        return None
    if metric == "accuracy":
        best = max(parents, key=lambda c: c["accuracy"])
        if best["accuracy"] <= merged["accuracy"]:
            return None
        gap = (best["accuracy"] - merged["accuracy"]) * 100
        text = (f"the {reference} is worse than {other} run {best['run']} on {judged}: accuracy "
                f"{merged['accuracy'] * 100:.2f}% against {best['accuracy'] * 100:.2f}% ({gap:.2f} points)")
    else:
        best = min(parents, key=lambda c: c["loss"])
        if best["loss"] >= merged["loss"]:
            return None
        gap = merged["loss"] - best["loss"]
        text = (f"the {reference} is worse than {other} run {best['run']} on {judged}: loss {merged['loss']:.4g} against "
                f"{best['loss']:.4g}")
    interval = (best.get("diff") or {}).get(metric)
    return {"run": best["run"], "set": judged, "metric": metric, "gap": gap, "interval": interval, "text": text}


def _recipe(card: Mapping[str, Any], resolved: Resolved, details: Mapping[str, Any]) -> dict[str, Any]:
    """What makes the merge again bit for bit: the card's method and parameters, every parent by
    checkpoint id (and the base), what the method chose (a greedy soup's ingredients)."""
    parameters = {k: v for k, v in card.items() if k not in ("kind", "name", "run_id", "parents", "sets", "override")}
    return {"format": 1, "method": card["method"], "parameters": parameters,
            "parents": [{"run_id": p["run_id"], "checkpoint_id": r["id"], "step": r["step"], "weight": p["weight"]}
                        for p, r in resolved],
            **{k: v for k, v in details.items() if k != "student_run"}}


def _merged_run(trainer: Any, card: Mapping[str, Any], model: nn.Module, recipe: Mapping[str, Any], plan_id: int,
                resolved: Resolved, on_child: Callable[[Any], None] | None) -> int:
    """The merged model as a run of the session: a checkpoint at step 0 with the state a resume
    needs (the live run's optimizer class over its parameters, its loaders), then finished."""
    from ..engine.trainer import Trainer

    run = trainer.run
    optimizer = optimizer_like(trainer.optimizer, list(model.parameters()),
                                {"lr": trainer.optimizer.param_groups[0]["lr"], "weight_decay": None})
    first = resolved[0]
    child = Trainer(model=model, optimizer=optimizer, loss_fn=trainer.loss.loss_fn,
                    train_loader=trainer.train_loader.original, val_loader=trainer.val_loader,
                    test_loader=trainer.test_loader, project=run.project, run_name=card["name"],
                    device=trainer.device, amp=trainer.amp, grad_clip=trainer.grad_clip,
                    accumulate_grad_batches=trainer.accumulate, inputs=trainer.spec.inputs,
                    targets=trainer.spec.targets, forward_fn=trainer.spec.forward_fn, progress=False,
                    session=run.session, parent=(first[0]["run_id"], first[1]["id"]))
    child.run.config.update({"plan_id": plan_id, "merge": dict(recipe)})
    run.session.set_run_config(child.run.run_id, child.run.config)
    add_edges(run, child.run.run_id, resolved, plan_id)
    if on_child is not None:
        on_child(child.run)
    child.run.save_checkpoint(reason="merge")
    child.run.close()
    return int(child.run.run_id)


def add_edges(run: Any, child_id: int, resolved: Resolved, plan_id: int) -> None:
    for _, record in resolved:
        run.session.add_edge(child_id=child_id, parent_id=record["run_id"], kind="merge", step=record["step"],
                             checkpoint_id=record["id"], plan_id=plan_id)
