"""Forks: a short-budget specialist on a slice, and its matched control, from a plan card; and
the Python API of every plan card (propose, edit, discard, approve) and their execution.

An approved fork card becomes an ``execute_plan`` command that the parent run carries out at a
step boundary, on the training thread: the parent waits there while its children train (one run
trains at a time in the process) and then goes on exactly as if it had never been left - its
model, optimizer and loader are not touched and every global RNG is put back.

Each child is built from the parent's objects, not from pickles: a ``copy.deepcopy`` of the
parent's module loaded with the fork point's weights (the parent's current ones, or a
checkpoint's), the same optimizer class with the card's learning rate and weight decay over the
parameters that train (all, the head, or low-rank adapters), and a loader over the parent's
dataset with its collate function and workers, drawing the card's data: the slice only, or all
data with the slice oversampled, and for the control all data - same budget, seed and
hyperparameters, so that the comparison isolates the slice's emphasis. Children record their
per-sample values, curves and checkpoints in the same session; their lineage edges name the
fork step and the card. With the same fork point and card, a fork gives identical weights.

Afterwards the card's criterion is judged: parent (at the fork point), control and specialist
evaluated paired on the slice, the rest of the training data and validation (the test set stays
locked), and the verdict written on the card.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..engine.callbacks import Callback
from ..engine.distributed import RankShare
from ..errors import ConfigError, StateError
from ..store.checkpoints import read_checkpoint
from ..store.reader import SessionReader
from . import compare as comparing
from . import curate as curating
from . import merge as merging
from . import model_weights
from .adapters import add_adapters, train_head_only
from .children import Draws, evaluate, evaluation_sets, optimizer_like, seed_all
from .export import isolated_rng
from .plans import check_card, edit_card, plan_out, require_proposed
from .ranks import on_rank_zero

__all__ = ["approve", "attach", "discard", "edit", "propose"]

REST_SAMPLE = 10_000  # the rest of the training data is judged on at most this many samples
EVERY_RANK = ("fork", "curate")  # the cards carried out under torchrun (on every rank)


# ---- the Python API (any thread of the training process) ----------------------------------------
def propose(run: Any, card: Mapping[str, Any], *, source: str = "user") -> dict[str, Any]:
    """Check a card and save it as proposed; returns its record (``id`` to approve it by)."""
    run.session.flush()
    checked = check_card(SessionReader(run.session.dir), card)
    record = run.session.save_plan(kind=checked["kind"], card=checked, source=source)
    run.bus.publish("plan_proposed", {"plan_id": record["id"], "kind": checked["kind"], "source": source},
                    **_where(run))
    return plan_out(record)


def edit(run: Any, plan_id: int, **changes: Any) -> dict[str, Any]:
    reader = SessionReader(run.session.dir)
    card = edit_card(reader, reader.plan(plan_id), changes)
    run.session.update_plan(plan_id, card=card)
    return plan_out(reader.plan(plan_id))


def discard(run: Any, plan_id: int) -> dict[str, Any]:
    reader = SessionReader(run.session.dir)
    plan = reader.plan(plan_id)
    require_proposed(plan, "discarded")
    run.session.update_plan(plan_id, status="discarded")
    run.bus.publish("plan_discarded", {"plan_id": plan_id}, **_where(run))
    return plan_out(reader.plan(plan_id))


def approve(run: Any, plan_id: int) -> int:
    """Approve a proposed card: checked once more, then carried out by ``run`` at its next step
    boundary. Returns the queued command's id."""
    reader = SessionReader(run.session.dir)
    plan = reader.plan(plan_id)
    require_proposed(plan, "approved")
    check_card(reader, plan["card"])
    merging.keepable(plan)
    run.session.update_plan(plan_id, status="approved")
    return int(run.request("execute_plan", plan_id=plan_id).id)


# ---- carrying a card out (training thread) -------------------------------------------------------
def attach(trainer: Any, *, on_child: Callable[[Any], None] | None = None) -> None:
    """Let ``trainer``'s run carry out approved plan cards and comparisons. ``on_child(run)`` is
    told of each child run as it is made (the dashboard's channel serves it live)."""
    run = trainer.run
    trainer.forks = getattr(trainer, "forks", {})  # run id -> the child's model, kept for comparisons
    trainer.merge_previews = getattr(trainer, "merge_previews", {})  # plan id -> the previewed candidate

    def single_process(what: str) -> None:
        if run.world is not None:
            raise StateError(f"{what} trains in one process; under torchrun (world size {run.world.size}) it is not "
                             "carried out yet: save a checkpoint, export the session (onthefly export) and carry it "
                             "out from a single-process run resumed from it")

    def execute(args: dict[str, Any]) -> dict[str, Any]:
        # Under torchrun every rank carries the card out (a fork's children train on all of them);
        # rank 0 reads it and its slice, and records what came of it.
        plan_id = int(args["plan_id"])
        plan, indices = on_rank_zero(run, lambda: _approved(run, plan_id))
        if plan["kind"] not in EVERY_RANK:
            single_process(f"a {plan['kind']} card")
        slice_indices = np.array(indices if indices is not None else [], dtype=np.int64)  # writable
        lead = run.world is None or run.world.rank == 0
        if lead:
            run.session.update_plan(plan_id, status="running")
            run.bus.publish("plan_started", {"plan_id": plan_id}, **_where(run))
        status = run.controller.status
        try:
            if plan["kind"] == "curate":
                done = curating.execute(trainer, plan, slice_indices)
                outcome: Callable[[], dict[str, Any]] = lambda: done  # noqa: E731
            else:
                run.controller.set_status("paused")  # one run trains at a time: the parent waits here
                try:
                    if plan["kind"] == "merge":
                        done = merging.execute(trainer, plan, on_child)
                    elif plan["kind"] == "gate":
                        from . import mixture as mixing  # torch.export, ONNX: imported when used

                        done = mixing.execute(trainer, plan, on_child)
                    elif plan["kind"] == "benchmark":
                        from . import benchmark as benchmarking

                        done = benchmarking.execute(trainer, plan, on_child)
                    else:
                        trained = _fork(trainer, plan, slice_indices, on_child)
                        done = {}
                finally:
                    run.controller.set_status(status)
                outcome = (lambda: _judged(trainer, plan, trained)) if plan["kind"] == "fork" else lambda: done
            return on_rank_zero(run, lambda: _record(run, plan, outcome()))
        except Exception as exc:
            if lead:
                run.session.update_plan(plan_id, status="failed", error=f"{type(exc).__name__}: {exc}")
                run.bus.publish("plan_finished", {"plan_id": plan_id, "status": "failed", "error": str(exc)},
                                **_where(run))
            raise

    def compare(args: dict[str, Any]) -> dict[str, Any]:
        def work() -> dict[str, Any]:  # rank 0 evaluates (its session names the slices, its process the forks)
            result = compare_runs(trainer, args)
            comparison_id = run.session.save_comparison(args, result)
            run.bus.publish("comparison", {"comparison_id": comparison_id, "runs": args["runs"],
                                           "sets": args["sets"]}, **_where(run))
            return {"comparison": comparison_id}

        return on_rank_zero(run, work)

    def preview(args: dict[str, Any]) -> dict[str, Any]:
        single_process("a merge preview")
        plan = SessionReader(run.session.dir).plan(int(args["plan_id"]))
        require_proposed(plan, "previewed")
        status = run.controller.status
        run.controller.set_status("paused")
        try:
            result = merging.preview(trainer, plan)
        except Exception as exc:  # the card says why there is no preview (the command is rejected too)
            merging.preview_failed(run, plan, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            run.controller.set_status(status)
        run.bus.publish("plan_previewed", result, **_where(run))
        return result

    run.register_action("execute_plan", execute)
    run.register_action("preview_plan", preview)
    run.register_action("compare", compare)


def _where(run: Any) -> dict[str, Any]:
    return {"run_id": run.run_id, "step": run.global_step, "epoch": run.epoch}


def _approved(run: Any, plan_id: int) -> tuple[dict[str, Any], list[int] | None]:
    """The approved card and its slice's indices (None: a card without a slice)."""
    run.session.flush()  # the slice a card names may have been saved a moment ago
    reader = SessionReader(run.session.dir)
    plan = reader.plan(plan_id)
    if plan["status"] != "approved":
        raise StateError(f"plan card {plan_id} is {plan['status']}, not approved")
    if plan["kind"] not in EVERY_RANK:
        return plan, None
    return plan, reader.slice_indices(reader.slice(plan["card"]["slice"])).tolist()


def _record(run: Any, plan: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """What came of a card, written on it (rank 0); the command's result."""
    plan_id = plan["id"]
    if "comparison" in result:
        result["comparison_id"] = run.session.save_comparison(
            {"plan_id": plan_id, "runs": result["runs"], "judging": True}, result["comparison"])
    result = {**(plan["result"] or {}), **result}  # keeps what it was proposed on (autofork's evidence)
    run.session.update_plan(plan_id, status="done", result=result, runs=result["runs"])
    run.bus.publish("plan_finished", {"plan_id": plan_id, "status": "done", "runs": result["runs"],
                                      "verdict": result["verdict"]}, **_where(run))
    return {"plan_id": plan_id, "runs": result["runs"], "verdict": result["verdict"]}


@dataclass
class _Trained:
    """A fork's children, trained (on every rank under torchrun), before they are judged."""

    runs: list[int]
    models: dict[str, nn.Module]  # "fork", "control" -> the child's module
    source: nn.Module  # the parent at the fork point
    slice_indices: np.ndarray
    fork_step: int
    seconds: float
    first_step_seconds: float | None


def _fork(trainer: Any, plan: dict[str, Any], slice_indices: np.ndarray,
          on_child: Callable[[Any], None] | None) -> _Trained:
    """Train the card's specialist (and its control). Under torchrun every rank trains them, as
    it trains the parent: the fork point's weights are rank 0's, each rank draws its share of
    every child epoch, and rank 0 records the lineage."""
    from ..engine.trainer import Trainer

    run, card, where = trainer.run, plan["card"], trainer.run.world
    if card["run_id"] != run.run_id:
        raise ConfigError(f"run_id: this card forks run {card['run_id']}, but it was sent to run {run.run_id}")
    run.recorder.flush()  # the parent's rows so far are in the store before the children add theirs
    run.session.flush()
    tensors: dict[str, torch.Tensor] | None = None

    def fork_point() -> int:  # rank 0: the step of the fork point (reading a checkpoint's weights)
        nonlocal tensors
        if card["checkpoint_id"] is None:
            return int(run.global_step)
        record = SessionReader(run.session.dir).checkpoint(card["checkpoint_id"])
        tensors, _ = read_checkpoint(record["path"])
        return int(record["step"])

    fork_step = on_rank_zero(run, fork_point)
    fork_checkpoint = card["checkpoint_id"]
    if fork_checkpoint is None:
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
        # The fork point is saved (by every rank: its RNG and sampler state): lineage names the
        # weights each child started from (a merge's task vectors are taken from there). A full
        # disk does not stop the fork.
        fork_checkpoint, _ = run.checkpoint_here("fork")
    if where is not None:  # the same start on every rank
        tensors = where.tensors(tensors if where.rank == 0 else None, trainer.model.state_dict())
    assert tensors is not None
    loader = trainer.train_loader.original
    dataset = loader.dataset
    n = len(dataset)
    if slice_indices.size and (slice_indices.min() < 0 or slice_indices.max() >= n):
        raise ConfigError(f"slice {card['slice']!r} holds indices outside the training dataset (0..{n - 1})")
    specialist = _draws(card, slice_indices, n)
    branches = [("fork", card["name"], specialist)]
    if card["control"]:  # the same budget: as many draws per epoch as the specialist, from all the data
        pool, weights, _ = _draws(card, None, n)
        branches.append(("control", f"{card['name']} control", (pool, weights, specialist[2])))
    ranks = where.size if where is not None else 1
    made: list[int] = []
    models: dict[str, nn.Module] = {}
    started = time.perf_counter()
    first_step: dict[str, float] = {}  # branch name -> seconds from the start of the fork to its first step
    with isolated_rng():  # the parent's random streams are exactly as they were afterwards
        for edge_kind, name, (pool, weights, per_epoch) in branches:
            seed_all(card["seed"])
            model = copy.deepcopy(trainer.model)
            model.load_state_dict(tensors)
            if card["trains"] == "adapters":
                add_adapters(model, card["rank"])
            elif card["trains"] == "head":
                train_head_only(model)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = optimizer_like(trainer.optimizer, params, card)
            generator = torch.Generator().manual_seed(card["seed"])
            batch_size = card["batch_size"] or loader.batch_size or 1
            # A budget in steps is optimizer steps: under torchrun each step takes a batch from every rank.
            epochs, samples = (card["budget"], per_epoch) if card["budget_unit"] == "epochs" else \
                (1, card["budget"] * batch_size * ranks)
            sampler: Sampler[int] = Draws(pool, weights, samples, generator)
            if where is not None:
                sampler = RankShare(sampler, where)
            child_loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                                      worker_init_fn=loader.worker_init_fn,
                                      persistent_workers=False)
            child = Trainer(
                model=model, optimizer=optimizer, loss_fn=trainer.loss.loss_fn, train_loader=child_loader,
                val_loader=trainer.val_loader, test_loader=trainer.test_loader, project=run.project,
                run_name=name, device=trainer.device, amp=trainer.amp, grad_clip=trainer.grad_clip,
                accumulate_grad_batches=trainer.accumulate, inputs=trainer.spec.inputs,
                targets=trainer.spec.targets, forward_fn=trainer.spec.forward_fn, progress=False,
                session=run.session, parent=(run.run_id, fork_checkpoint),
                callbacks=(_FirstStep(first_step, name, started),))

            def lineage(child: Any = child, edge_kind: str = edge_kind) -> None:
                child.run.config.update({"plan_id": plan["id"], "fork": edge_kind, "trains": card["trains"]})
                run.session.set_run_config(child.run.run_id, child.run.config)
                run.session.add_edge(child_id=child.run.run_id, parent_id=run.run_id, kind=edge_kind,
                                     step=fork_step, checkpoint_id=fork_checkpoint, plan_id=plan["id"])
                if on_child is not None:
                    on_child(child.run)

            on_rank_zero(run, lineage)
            child.fit(epochs)
            made.append(child.run.run_id)
            models[edge_kind] = model
            trainer.forks[child.run.run_id] = model
        source = copy.deepcopy(trainer.model)
        source.load_state_dict(tensors)
    return _Trained(made, models, source, slice_indices, fork_step, time.perf_counter() - started,
                    first_step.get(card["name"]))


def _judged(trainer: Any, plan: dict[str, Any], trained: _Trained) -> dict[str, Any]:
    """The fork's result: its children and the card's criterion judged (rank 0)."""
    n = len(trainer.train_loader.original.dataset)
    with isolated_rng():
        verdict = _judge(trainer, plan["card"], trained.source, trained.models, trained.slice_indices, n)
    return {"runs": trained.runs, "fork_step": trained.fork_step, "seconds": trained.seconds,
            "first_step_seconds": trained.first_step_seconds, **verdict}


class _FirstStep(Callback):
    """Notes when a child's first step has been trained (seconds since the fork began)."""

    def __init__(self, into: dict[str, float], name: str, started: float) -> None:
        self.into, self.name, self.started = into, name, started

    def on_step_end(self, run: Any) -> None:
        self.into.setdefault(self.name, time.perf_counter() - self.started)


def _draws(card: Mapping[str, Any], slice_indices: np.ndarray | None, n: int) \
        -> tuple[np.ndarray, np.ndarray | None, int]:
    """(pool, weights, samples per epoch) of a branch: the slice's indices; all indices with the
    slice weighted to ``ratio`` of the draws; or all indices (the control)."""
    everything = np.arange(n, dtype=np.int64)
    if slice_indices is None:
        return everything, None, n
    if card["mix"] == "slice":
        return slice_indices, None, len(slice_indices)
    in_slice = np.zeros(n, dtype=bool)
    in_slice[slice_indices] = True
    k = int(in_slice.sum())
    if k == n:
        return everything, None, n
    weights = np.where(in_slice, card["ratio"] / k, (1 - card["ratio"]) / (n - k))
    return everything, weights, n


# ---- judging and comparing ---------------------------------------------------------------------
def _judge(trainer: Any, card: Mapping[str, Any], source: nn.Module, models: dict[str, nn.Module],
           slice_indices: np.ndarray, n: int) -> dict[str, Any]:
    """The card's criterion: the specialist against the control (or the parent at the fork point
    without one) on the slice, the rest of the training data and validation."""
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), slice_indices)
    if rest.size > REST_SAMPLE:
        rest = np.sort(np.random.default_rng(card["seed"]).choice(rest, size=REST_SAMPLE, replace=False))
    train_set = trainer.train_loader.original.dataset
    sets: dict[str, tuple[Any, np.ndarray | None]] = {"slice": (train_set, slice_indices), "rest": (train_set, rest)}
    if trainer.val_loader is not None:
        sets["val"] = (trainer.val_loader.dataset, None)
    entrants = {"parent": source, **{("specialist" if k == "fork" else k): m for k, m in models.items()}}
    results = {label: {name: evaluate(trainer, model, *where) for name, where in sets.items() if where[1] is None
                       or len(where[1])} for label, model in entrants.items()}
    reference = "control" if "control" in entrants else "parent"
    table = comparing.compare(results, reference, seed=card["seed"])
    cells = {(c["run"], c["set"]): c for c in table["cells"]}
    slice_cell = cells.get(("specialist", "slice"))
    gain = _points(slice_cell)
    drops = {name: _points(cells.get(("specialist", name))) for name in sets if name != "slice"}
    # "Everything else" is judged on held-out data when there is some: on the training data the
    # control, which drew those samples more often, has an in-sample advantage.
    judged = ["val"] if "val" in sets else ["rest"]
    met = None
    if gain is not None and all(drops[name] is not None for name in judged):
        met = gain >= card["min_slice_gain_pt"] and all(drops[name] >= -card["max_other_drop_pt"]
                                                        for name in judged)
    return {"comparison": table, "reference": reference,
            "verdict": {"met": met, "slice_gain_pt": gain, "other_change_pt": drops, "others_judged_on": judged,
                        "criterion": {"min_slice_gain_pt": card["min_slice_gain_pt"],
                                      "max_other_drop_pt": card["max_other_drop_pt"]}}}


def _points(cell: Mapping[str, Any] | None) -> float | None:
    diff = (cell or {}).get("diff") or {}
    accuracy = diff.get("accuracy")
    return None if accuracy is None else float(accuracy["value"]) * 100.0


def compare_runs(trainer: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """The "compare" command: the runs' models (the live parent's current weights, forks kept in
    this process, else a run's newest checkpoint) evaluated paired on the sets."""
    run = trainer.run
    run.session.flush()
    reader = SessionReader(run.session.dir)
    if args["reference"] not in args["runs"]:
        raise ConfigError(f"reference: run {args['reference']} is not one of the compared runs {args['runs']}")
    sets = evaluation_sets(trainer, reader, args["sets"])
    models = {run_id: _model_of(trainer, reader, run_id) for run_id in args["runs"]}
    with isolated_rng():
        results = {str(run_id): {name: evaluate(trainer, model, *where) for name, where in sets.items()}
                   for run_id, model in models.items()}
    table = comparing.compare(results, str(args["reference"]), n_boot=args["n_boot"], seed=args["seed"])
    table["names"] = {str(r["id"]): r["name"] for r in reader.runs() if r["id"] in args["runs"]}
    return table


def _model_of(trainer: Any, reader: SessionReader, run_id: int) -> nn.Module:
    if run_id == trainer.run.run_id:
        return trainer.model  # evaluate() restores its mode; nothing else is touched
    if run_id in getattr(trainer, "forks", {}):
        return trainer.forks[run_id]
    record = next((r for r in reader.runs() if r["id"] == run_id), None)
    if record is not None and "gate" in record["config"]:
        from .mixture import rebuild

        return rebuild(trainer, record)  # a mixture made in an earlier process
    checkpoints = reader.checkpoints(run_id)
    if not checkpoints:
        raise ConfigError(f"runs: run {run_id} has no checkpoint and is not in this process")
    tensors, _ = read_checkpoint(checkpoints[-1]["path"])
    folded = model_weights.fold_adapters(model_weights.TensorWeights(tensors))  # an adapter fork: its weights folded
    model = copy.deepcopy(trainer.model)
    try:
        model.load_state_dict({key: folded.get(key) for key in folded.keys()})
    except RuntimeError as exc:
        raise ConfigError(f"runs: run {run_id}'s checkpoint does not fit this model ({exc})") from None
    return model
