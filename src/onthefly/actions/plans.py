"""Plan cards: every consequential action is first a card a person reads, edits and approves.

A card says what will happen, on which data, from which checkpoint, with which hyperparameters,
budget and seed, and the success criterion stated beforehand, with the sets it will be judged
on. Its fields are declared once, here (pydantic), so the Python API, the HTTP API and the
dashboard's types cannot disagree on a field or a bound. A card moves through

    proposed --(edit)--> proposed --approve--> approved --(training thread)--> running --> done | failed
            \\--discard--> discarded

Cards live in the session's database (they export and import with it). Checks that need the
session (the slice exists and is not empty, the run and checkpoint exist) run when a card is
proposed, edited and approved; a refusal names the field.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from ..engine.control import Wording, check_fields
from ..errors import ConfigError, NotFoundError, StateError
from ..store.reader import SessionReader
from ..strict import StrictModel

__all__ = ["CARD_KINDS", "MERGE_METHODS", "BenchmarkCard", "CurateCard", "Expert", "ForkCard", "GateCard",
           "MergeCard", "MergeParent", "check_card",
           "checkpoint_of", "edit_card", "nonempty_slice", "plan_out", "require_proposed"]

Name = Annotated[str, Wording("a name of letters, digits, spaces, '-', '_' or '.' (at most 64)")]


class ForkCard(StrictModel):
    """Fork a specialist from a run (its current step or one of its checkpoints), trained for a
    short budget on a slice, and (by default) a matched control on all the data with the same
    budget (as many steps), seed and hyperparameters, so that the comparison isolates the slice's
    emphasis. Judged against the control: slice accuracy gain at least ``min_slice_gain_pt``,
    validation accuracy at most ``max_other_drop_pt`` lower."""

    kind: Literal["fork"]
    name: Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _.\-]+$",
                       description="the specialist run's name (the control is '<name> control')")
    run_id: int = Field(ge=1, le=2**31, description="the parent run")
    checkpoint_id: Annotated[int | None, Wording(omitted="the parent's weights at the step it is applied")] = Field(
        default=None, ge=1, le=2**31, description="fork from this checkpoint (default: the parent's current step)")
    slice: str = Field(min_length=1, max_length=64, description="the saved slice to specialise on")
    mix: Literal["slice", "oversample"] = Field(
        default="slice", description="train on the slice only, or on all data with the slice oversampled")
    ratio: float = Field(default=0.5, gt=0.0, lt=1.0, allow_inf_nan=False,
                         description="with mix='oversample': the slice's expected share of each batch")
    budget: int = Field(default=1, ge=1, le=1_000_000, description="how long the fork trains, in budget_unit")
    budget_unit: Literal["epochs", "steps"] = Field(default="epochs", description="what budget counts")
    lr: float = Field(gt=0.0, le=10.0, allow_inf_nan=False, description="learning rate")
    weight_decay: Annotated[float | None, Wording(omitted="the parent's")] = Field(
        default=None, ge=0.0, le=10.0, allow_inf_nan=False, description="weight decay (default: the parent's)")
    batch_size: Annotated[int | None, Wording(omitted="the parent loader's")] = Field(
        default=None, ge=1, le=1_000_000, description="batch size (default: the parent loader's)")
    trains: Literal["all", "head", "adapters"] = Field(
        default="all", description="all parameters, the last layer only, or low-rank adapters on nn.Linear")
    rank: int = Field(default=4, ge=1, le=1024, description="with trains='adapters': the adapters' rank")
    seed: int = Field(default=0, ge=0, le=2**31, description="seed of the fork's data order and initialisation")
    control: bool = Field(default=True, description="also fork a matched control on all the data")
    min_slice_gain_pt: float = Field(
        default=0.0, ge=-100.0, le=100.0, allow_inf_nan=False,
        description="success: slice accuracy at least this many points above the reference's")
    max_other_drop_pt: float = Field(
        default=1.0, ge=0.0, le=100.0, allow_inf_nan=False,
        description="success: accuracy on validation (held out; the rest of the training data without a "
                    "validation set) at most this many points below the reference's")


class CurateCard(StrictModel):
    """Drop a slice from a run's training, reweight it, or restore it (undoing an earlier card),
    from a step on: its samples are still drawn and recorded, their losses weigh ``weight`` (0 when
    dropped) in what is backpropagated."""

    kind: Literal["curate"]
    run_id: int = Field(ge=1, le=2**31, description="the run whose training data is curated")
    slice: str = Field(min_length=1, max_length=64, description="the saved slice to drop or reweight")
    action: Literal["drop", "reweight", "restore"] = Field(description="drop, reweight, or restore to weight 1")
    weight: float = Field(default=2.0, gt=0.0, le=100.0, allow_inf_nan=False,
                          description="with action='reweight': each of the slice's losses counts this much")
    from_step: Annotated[int | None, Wording(omitted="the step at which it is applied")] = Field(
        default=None, ge=0, le=2**53, description="the first step trained with it (default: the next one)")


MergeMethod = Literal["linear", "greedy_soup", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher",
                      "adapter_fusion", "distill"]
MERGE_METHODS: tuple[str, ...] = typing.get_args(MergeMethod)
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SetNames = Annotated[list[str], Wording("a list of 1 to 12 saved slice names, 'val' or 'test'")]


class MergeParent(StrictModel):
    """One ingredient of a merge: a run's weights (a checkpoint, by default its newest; the live
    run's own: its weights when the merge is carried out) and its weight in the recipe."""

    run_id: int = Field(ge=1, le=2**31, description="the run")
    checkpoint_id: Annotated[int | None, Wording(omitted="the live run's current weights, another run's newest "
                                                          "checkpoint")] = Field(
        default=None, ge=1, le=2**31, description="one of the run's checkpoints")
    weight: float = Field(default=1.0, ge=-100.0, le=100.0, allow_inf_nan=False,
                          description="its weight (linear, task vectors, fisher, adapter_fusion; mergekit's 'weight')")


class MergeCard(StrictModel):
    """Merge parents (runs or checkpoints of the session) into a new run with one of the methods;
    method and parameter names follow mergekit's. Before it is approved the candidate can be
    previewed: compared, paired, against every parent on ``sets``; a merge worse than its best
    parent on validation is not kept unless ``override`` (the greedy-soup rule)."""

    kind: Literal["merge"]
    name: Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _.\-]+$",
                       description="the merged run's name")
    run_id: int = Field(ge=1, le=2**31, description="the live run that carries the merge out: its model's "
                                                    "architecture, loss, loaders and device are used")
    parents: Annotated[list[MergeParent], Wording("a list of 2 to 32 parents ({run_id, checkpoint_id, weight})")] = \
        Field(min_length=2, max_length=32, description="the models merged (their weights in the recipe)")
    method: MergeMethod = Field(
        description="linear (SWA / uniform soup with equal weights), greedy_soup, task_arithmetic, ties, dare_linear, "
                    "dare_ties, fisher (Fisher-weighted soup), adapter_fusion, distill")
    normalize: bool = Field(default=True, description="linear, task_arithmetic: divide by the sum of the weights")
    lambda_: float = Field(default=1.0, alias="lambda", ge=-10.0, le=10.0, allow_inf_nan=False,
                           description="task vectors: the scaling of the merged task vector")
    density: float = Field(default=0.5, gt=0.0, le=1.0, allow_inf_nan=False,
                           description="ties, dare_*: the fraction of each task vector kept")
    majority_sign: Literal["total", "frequency"] = Field(
        default="total", description="ties, dare_ties: the sign elected per parameter, by total mass or by count")
    base_checkpoint_id: Annotated[int | None, Wording(omitted="the parents' common fork point in the lineage")] = Field(
        default=None, ge=1, le=2**31, description="task vectors: the weights they are taken from")
    rank: Annotated[int | None, Wording(omitted="no re-factorisation")] = Field(
        default=None, ge=1, le=4096, description="adapter_fusion: re-factorise each fused update to this rank")
    data: str = Field(default="train", min_length=1, max_length=64,
                      description="the data that BatchNorm statistics, Fisher and distillation use: 'train' or a "
                                  "saved slice")
    update_bn: bool = Field(default=True, description="recompute BatchNorm statistics on 'data' after merging")
    fisher_samples: int = Field(default=512, ge=1, le=1_000_000,
                                description="fisher: the samples each parent's diagonal Fisher is estimated on")
    fisher_estimator: Literal["empirical", "sampled"] = Field(
        default="empirical", description="fisher: gradients of the loss at the true labels (empirical) or at "
                                         "labels sampled from the model (the true Fisher)")
    temperature: float = Field(default=2.0, gt=0.0, le=100.0, allow_inf_nan=False,
                               description="distill: the softmax temperature of the soft targets")
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="distill: the weight of the soft targets (1 - alpha on the true labels)")
    budget: int = Field(default=200, ge=1, le=1_000_000, description="distill: the student's training steps")
    lr: Annotated[float | None, Wording(omitted="the live run's")] = Field(
        default=None, gt=0.0, le=10.0, allow_inf_nan=False, description="distill: the student's learning rate")
    student: Annotated[int | None, Wording(omitted="the first parent")] = Field(
        default=None, ge=1, le=2**31, description="distill: the run whose weights the student starts from (a parent, the generalist...)")
    seed: int = Field(default=0, ge=0, le=2**31, description="seed of DARE's masks, Fisher's and distillation's draws")
    sets: SetNames = Field(default=["val"], min_length=1, max_length=12,
                           description="what the candidate is compared with every parent on")
    override: bool = Field(default=False, description="keep the merge even when it is worse than its best parent")


class Expert(StrictModel):
    """One expert of a mixture: a run's weights (a checkpoint, by default its newest; the live
    run's own: its weights when the gate is trained)."""

    run_id: int = Field(ge=1, le=2**31, description="the run")
    checkpoint_id: Annotated[int | None, Wording(omitted="the live run's current weights, another run's newest "
                                                          "checkpoint")] = Field(
        default=None, ge=1, le=2**31, description="one of the run's checkpoints")


class GateCard(StrictModel):
    """Train a light gating network that routes each sample among frozen experts (the generalist
    first, then specialists), on held-out data, and make the mixture a new run: gate plus experts
    as one module, exported as a standalone artifact. Judged against every expert on ``sets``."""

    kind: Literal["gate"]
    name: Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _.\-]+$",
                       description="the mixture run's name")
    run_id: int = Field(ge=1, le=2**31, description="the live run that trains the gate: its model's architecture, "
                                                    "loss, loaders and device are used")
    experts: Annotated[list[Expert], Wording("a list of 2 to 16 experts ({run_id, checkpoint_id}), the generalist "
                                              "first")] = Field(
        min_length=2, max_length=16, description="the experts routed among; the first is the generalist")
    routing: Literal["top1", "soft"] = Field(
        default="top1", description="top1: each sample goes to one expert; soft: the gate's mixture of their "
                                    "probabilities")
    gate_input: Literal["inputs", "embedding"] = Field(
        default="inputs", description="what the gate sees: the model's input tensor (flattened), or the "
                                      "generalist's embedding (the input of its last nn.Linear)")
    hidden: int = Field(default=0, ge=0, le=4096, description="the gate's hidden width (0: a linear gate)")
    data: str = Field(default="val", min_length=1, max_length=64,
                      description="the held-out data the gate is trained on: 'val' or a saved slice")
    steps: int = Field(default=300, ge=1, le=1_000_000, description="the gate's training steps")
    batch_size: int = Field(default=256, ge=1, le=1_000_000, description="the gate's batch size")
    lr: float = Field(default=0.01, gt=0.0, le=10.0, allow_inf_nan=False, description="the gate's learning rate (Adam)")
    balance: float = Field(default=0.01, ge=0.0, le=100.0, allow_inf_nan=False,
                           description="the load-balancing loss's weight (Switch Transformer's; 0: off)")
    min_share: float = Field(default=0.02, ge=0.0, le=1.0, allow_inf_nan=False,
                             description="warn about an expert that receives less than this share of the samples")
    seed: int = Field(default=0, ge=0, le=2**31, description="seed of the gate's initialisation and batches")
    sets: SetNames = Field(default=["test"], min_length=1, max_length=12,
                           description="what the mixture is compared with every expert on")


class BenchmarkCard(StrictModel):
    """Benchmark a mixture at matched compute: the FLOPs its making cost (specialists, their
    controls, the gate) given instead to (1) the generalist trained on as one model, against
    (2) the best weight merge of the same experts and (3) the generalist alone; all evaluated,
    paired, on ``sets`` and the specialists' slices, with inference FLOPs and latency."""

    kind: Literal["benchmark"]
    run_id: int = Field(ge=1, le=2**31, description="the live run that trains the monolith: its model's "
                                                    "architecture, loss, loaders and device are used")
    mixture: int = Field(ge=1, le=2**31, description="the mixture run (made by a gate card)")
    merges: Annotated[list[Literal["linear", "ties", "task_arithmetic"]],
                      Wording("a list of 1 to 3 of 'linear', 'ties', 'task_arithmetic'")] = Field(
        default=["linear", "ties"], min_length=1, max_length=3,
        description="the weight merges tried; the best on validation is the merge baseline")
    sets: SetNames = Field(default=["test"], min_length=1, max_length=12,
                           description="what every entrant is evaluated on (the specialists' slices are added)")
    seed: int = Field(default=0, ge=0, le=2**31, description="seed of the monolith's data order and the intervals")


CARDS: dict[str, type[StrictModel]] = {"fork": ForkCard, "curate": CurateCard, "merge": MergeCard, "gate": GateCard,
                                       "benchmark": BenchmarkCard}
CARD_KINDS = tuple(CARDS)


def check_card(reader: SessionReader, card: Mapping[str, Any]) -> dict[str, Any]:
    """The card checked: fields (types and bounds), then against the session. Returns it with
    every default filled in (and ``kind``). Raises, naming the field: ConfigError (a wrong
    field), NotFoundError (it names what the session lacks), StateError (it conflicts with it)."""
    kind = card.get("kind")
    model = CARDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ConfigError(f"kind must be one of {', '.join(repr(k) for k in CARD_KINDS)}, got {kind!r}")
    assert isinstance(kind, str)
    checked = {"kind": kind, **check_fields(model, card, what=f"a {kind} card")}
    runs = {r["id"]: r for r in reader.runs()}
    # Fields that name something the session lacks: 404; that conflict with it: 409.
    if checked["run_id"] not in runs:
        raise NotFoundError(f"run_id {checked['run_id']} is not a run of this session (its runs: "
                            f"{', '.join(map(str, runs)) or 'none'})")
    if checked.get("checkpoint_id") is not None:
        checkpoint_of(reader, checked["checkpoint_id"], checked["run_id"], "checkpoint_id")
    if "slice" in checked:
        nonempty_slice(reader, checked["slice"], "slice", kind)
    if "name" in checked and checked["name"] in {r["name"] for r in runs.values()}:
        raise StateError(f"name {checked['name']!r} is taken by a run of this session; pick another")
    if kind == "merge":
        from .recipes import check_merge  # the merge's checks read checkpoint files and the lineage

        check_merge(reader, checked, runs)
    elif kind in ("gate", "benchmark"):
        from .recipes import check_benchmark, check_gate

        (check_gate if kind == "gate" else check_benchmark)(reader, checked, runs)
    return checked


def checkpoint_of(reader: SessionReader, checkpoint_id: int, run_id: int, field: str) -> dict[str, Any]:
    """Checkpoint ``checkpoint_id``'s record, which must belong to ``run_id``."""
    try:
        found = reader.checkpoint(checkpoint_id)
    except NotFoundError as exc:
        raise NotFoundError(f"{field}: {exc}") from None
    if found["run_id"] != run_id:
        raise StateError(f"{field}: checkpoint {checkpoint_id} belongs to run {found['run_id']}, not to run {run_id}")
    return found


def nonempty_slice(reader: SessionReader, name: str, field: str, kind: str) -> dict[str, Any]:
    try:
        saved = reader.slice(name)
    except NotFoundError as exc:
        raise NotFoundError(f"{field}: {exc}") from None
    if saved["count"] == 0:
        raise StateError(f"{field}: slice {name!r} is empty: a {kind} card needs samples to act on")
    return saved


def require_proposed(plan: Mapping[str, Any], action: str) -> None:
    """Only a proposed card can be edited, discarded or approved (a StateError: 409 over HTTP)."""
    if plan["status"] != "proposed":
        raise StateError(f"plan card {plan['id']} is {plan['status']}: only a proposed card can be {action}")


def edit_card(reader: SessionReader, plan: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A proposed card with ``changes`` applied, checked again."""
    require_proposed(plan, "edited")
    if "kind" in changes and changes["kind"] != plan["kind"]:
        raise ConfigError(f"kind cannot change (the card is a {plan['kind']} card)")
    return check_card(reader, {**plan["card"], **changes})


def plan_out(plan: Mapping[str, Any]) -> dict[str, Any]:
    """A card's record as the API gives it."""
    return {key: plan[key] for key in ("id", "kind", "status", "card", "result", "error", "runs", "source",
                                       "created", "updated")}
