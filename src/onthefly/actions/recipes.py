"""What a merge card's parents are in the session: their checkpoints, their common ancestor, and
whether they can be merged at all - read from the session's files, without the training process.

The server checks a card with this when it is proposed, edited and approved (a refusal names the
first problem and nothing is written); the training process resolves the same way when it carries
the merge out, and writes the resolved recipe (every checkpoint by id) on the merged run, so that
the merge can be made again bit for bit.

Ancestry: a checkpoint of run R at step s descends from R's earlier checkpoints and from the point
R was forked (or resumed) from, recursively. Task vectors are taken from the nearest checkpoint that
every parent descends from (deepest in the lineage, then latest): for forks of one checkpoint, that
checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, NotFoundError, StateError
from ..store.checkpoints import MODEL_FILE
from ..store.reader import SessionReader
from . import model_weights
from .plans import TASK_VECTOR_METHODS, checkpoint_of, nonempty_slice

__all__ = ["ancestors", "check_benchmark", "check_gate", "check_merge", "checkpoint_tensors", "common_base", "model_file", "origin", "parent_checkpoint"]

TRAJECTORY_EDGES = ("fork", "control", "resume")  # a child that continues one parent's weights


def parent_checkpoint(reader: SessionReader, parent: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint a parent names, else its run's newest; None when the run has none (a live
    run that never saved: its weights are taken when the merge is carried out)."""
    if parent.get("checkpoint_id") is not None:
        return checkpoint_of(reader, parent["checkpoint_id"], parent["run_id"], "parents")
    found = reader.checkpoints(parent["run_id"])
    return found[-1] if found else None


def model_file(checkpoint: Mapping[str, Any]) -> Path:
    return Path(checkpoint["path"]) / MODEL_FILE


def checkpoint_tensors(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's model weights as a state dict, low-rank adapters folded into their layers."""
    with model_weights.FileWeights(model_file(checkpoint)) as weights:
        folded = model_weights.fold_adapters(weights)
        return {key: folded.get(key) for key in folded.keys()}


def origin(reader: SessionReader, run_id: int) -> tuple[int, int] | None:
    """(parent run, checkpoint id) that ``run_id`` continued from; None for a root (or a merge)."""
    for edge in reader.lineage()["edges"]:
        if edge["child"] == run_id and edge["kind"] in TRAJECTORY_EDGES and edge["checkpoint_id"] is not None:
            return edge["parent"], edge["checkpoint_id"]
    return None


def ancestors(reader: SessionReader, checkpoint: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(run, up to step) pairs the weights of ``checkpoint`` descend through, nearest first: its
    own run up to its step, then the checkpoint its run started from, and so on."""
    chain = [(checkpoint["run_id"], checkpoint["step"])]
    seen = {checkpoint["run_id"]}
    came = origin(reader, checkpoint["run_id"])
    while came is not None and came[0] not in seen:
        start = reader.checkpoint(came[1])
        chain.append((start["run_id"], start["step"]))
        seen.add(start["run_id"])
        came = origin(reader, start["run_id"])
    return chain


def common_base(reader: SessionReader, parents: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The nearest checkpoint every parent checkpoint descends from (or is), None if there is none."""
    chains = [ancestors(reader, p) for p in parents]
    depth = {run: len(ancestors(reader, {"run_id": run, "step": 0})) for chain in chains for run, _ in chain}
    best: tuple[tuple[int, int, int], dict[str, Any]] | None = None
    for candidate in reader.checkpoints():
        run, step = candidate["run_id"], candidate["step"]
        if all(any(r == run and step <= upto for r, upto in chain) for chain in chains):
            rank = (depth.get(run, 0), step, candidate["id"])
            if best is None or rank > best[0]:
                best = (rank, candidate)
    return None if best is None else best[1]


def check_merge(reader: SessionReader, card: Mapping[str, Any], runs: Mapping[int, Mapping[str, Any]]) -> None:
    """A merge card against the session: its parents, data and sets exist, the parents can be
    merged with the method (same architecture, one adapter layout, a common ancestor for task
    vectors). Raises NotFoundError, StateError or ConfigError naming the field."""
    method = card["method"]
    seen: set[tuple[int, int | None]] = set()
    for parent in card["parents"]:
        if parent["run_id"] not in runs:
            raise NotFoundError(f"parents: run {parent['run_id']} is not a run of this session")
        key = (parent["run_id"], parent["checkpoint_id"])
        if key in seen:
            raise StateError(f"parents: run {key[0]}" + (f" checkpoint {key[1]}" if key[1] else "")
                             + " is listed twice; give it a larger weight instead")
        seen.add(key)
    if card["data"] != "train":
        nonempty_slice(reader, card["data"], "data", "merge")
    for name in card["sets"]:
        if name not in ("val", "test"):
            nonempty_slice(reader, name, "sets", "merge")
    if method == "distill":
        student = card["student"]
        if student is not None and student not in runs:
            raise NotFoundError(f"student: run {student} is not a run of this session")
    resolved = [(p, parent_checkpoint(reader, p)) for p in card["parents"]]
    on_disk = {f"run {p['run_id']}" + (f" checkpoint {c['id']}" if p["checkpoint_id"] else ""): c
               for p, c in resolved if c is not None}
    opened = {name: model_weights.FileWeights(model_file(c)) for name, c in on_disk.items()}
    try:
        _check_weights(reader, card, method, resolved, opened)
    except ConfigError as exc:  # the card is well formed; it conflicts with what the parents are: 409
        raise StateError(str(exc)) from None
    finally:
        for weights in opened.values():
            weights.close()


def check_gate(reader: SessionReader, card: Mapping[str, Any], runs: Mapping[int, Mapping[str, Any]]) -> None:
    """A gate card against the session: its experts exist, each once, with weights of one
    architecture (the live run's module holds each in turn); its data and sets exist."""
    if card["data"] != "val":
        nonempty_slice(reader, card["data"], "data", "gate")
    for name in card["sets"]:
        if name not in ("val", "test"):
            nonempty_slice(reader, name, "sets", "gate")
    seen: set[int] = set()
    for expert in card["experts"]:
        if expert["run_id"] not in runs:
            raise NotFoundError(f"experts: run {expert['run_id']} is not a run of this session")
        if expert["run_id"] in seen:
            raise StateError(f"experts: run {expert['run_id']} is listed twice; an expert is routed to once")
        seen.add(expert["run_id"])
    found = [(e, parent_checkpoint(reader, e)) for e in card["experts"]]
    opened = {f"run {e['run_id']}": model_weights.FileWeights(model_file(c)) for e, c in found if c is not None}
    try:
        model_weights.check_same_architecture({k: model_weights.fold_adapters(w) for k, w in opened.items()})
    except ConfigError as exc:  # the experts' outputs could not be routed among: 409
        raise StateError(f"experts: {exc}") from None
    finally:
        for weights in opened.values():
            weights.close()


def check_benchmark(reader: SessionReader, card: Mapping[str, Any], runs: Mapping[int, Mapping[str, Any]]) -> None:
    """A benchmark card against the session: its mixture is a mixture run, its sets exist."""
    mixture = runs.get(card["mixture"])
    if mixture is None:
        raise NotFoundError(f"mixture: run {card['mixture']} is not a run of this session")
    if "gate" not in (mixture.get("config") or {}):
        raise StateError(f"mixture: run {card['mixture']} ({mixture['name']}) is not a mixture; a gate card makes one")
    for name in card["sets"]:
        if name not in ("val", "test"):
            nonempty_slice(reader, name, "sets", "benchmark")


def _check_weights(reader: SessionReader, card: Mapping[str, Any], method: str,
                   resolved: Sequence[tuple[Mapping[str, Any], dict[str, Any] | None]],
                   opened: Mapping[str, model_weights.Weights]) -> None:
    """The parents' weight files against the method (ConfigError naming the first problem)."""
    if method == "adapter_fusion":
        _check_adapters(opened)
    else:
        model_weights.check_same_architecture({name: model_weights.fold_adapters(w) for name, w in opened.items()})
    if method in TASK_VECTOR_METHODS:
        base = _task_vector_base(reader, card, resolved)
        if base is not None and opened:
            with model_weights.FileWeights(model_file(base)) as weights:
                name = f"the base (checkpoint {base['id']})"
                model_weights.check_same_architecture({name: model_weights.fold_adapters(weights),
                                                 **{k: model_weights.fold_adapters(w) for k, w in opened.items()}})


def _check_adapters(opened: Mapping[str, model_weights.Weights]) -> None:
    layouts = {name: model_weights.adapter_layers(w) for name, w in opened.items()}
    for name, layers in layouts.items():
        if not layers:
            raise ConfigError(f"method: adapter_fusion fuses forks trained with adapters (trains='adapters'); "
                              f"{name} has no adapters. Use linear or task_arithmetic for full-weight forks.")
    first_name, first = next(iter(layouts.items()), ("", []))
    for name, layers in layouts.items():
        if layers != first:
            differ = sorted(set(layers) ^ set(first))
            raise ConfigError(f"parents: adapter layouts differ: {first_name} adapts {first} and {name} {layers} "
                              f"(first difference: {differ[0] if differ else 'their order'})")


def _task_vector_base(reader: SessionReader, card: Mapping[str, Any],
                      resolved: Sequence[tuple[Mapping[str, Any], dict[str, Any] | None]]) -> dict[str, Any] | None:
    """The base checkpoint of a task-vector merge (the card's, else the common ancestor); None
    when a parent has no checkpoint yet (the training process decides then)."""
    if card["base_checkpoint_id"] is not None:
        try:
            return reader.checkpoint(card["base_checkpoint_id"])
        except NotFoundError as exc:
            raise NotFoundError(f"base_checkpoint_id: {exc}") from None
    if any(c is None for _, c in resolved):
        return None
    base = common_base(reader, [c for _, c in resolved if c is not None])
    if base is None:
        raise StateError(f"method: {card['method']} takes task vectors from the parents' common ancestor, and "
                         "these parents have none in the lineage (no checkpoint they all descend from); name one "
                         "with base_checkpoint_id, or use linear")
    return base
