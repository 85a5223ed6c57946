"""Commands and run status: what a person (or a test) can ask of a running session.

Each command's arguments are declared once, here, as a pydantic model (fields, bounds,
descriptions). ``CommandQueue.put`` validates with it, and the server's request bodies are these
same models, so the engine and the HTTP contract cannot disagree on a field or a bound. The
engine still knows nothing of HTTP.

Commands go into a queue from any thread; the training thread applies them only at a step
boundary, so a command never lands in the middle of a forward/backward pass.
"""

from __future__ import annotations

import itertools
import threading
import time
import types
import typing
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic.types import AllowInfNan

from ..errors import ConfigError
from ..strict import StrictModel

__all__ = [
    "COMMANDS",
    "COMMAND_KINDS",
    "AnyCommand",
    "ClusterArgs",
    "Command",
    "CommandQueue",
    "CompareArgs",
    "RunStatus",
    "Wording",
    "check_command",
    "check_fields",
]


class RunStatus:
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    IDLE = "idle"  # planned training done, waiting for commands (keep_alive)
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class Wording:
    """How a refusal names what a field takes (``Annotated`` metadata, not in the JSON schema).
    The bounds in the message are read from the field's own ``Field(...)``, never written here."""

    noun: str | None = None  # default: from the type ("a whole number", "a finite number", ...)
    omitted: str | None = None  # what leaving the field out means; None: not mentioned


# ---- the commands: one model each, ``kind`` the discriminator ---------------------------------
ParamGroup = Annotated[int | None, Wording("a parameter-group index"),
                       Field(ge=0, le=10_000, description="parameter group (default: all)")]


class RunCommand(StrictModel):
    """Start training (a run created with wait_for_run waits for this)."""

    kind: Literal["run"]


class PauseCommand(StrictModel):
    """Pause at the next step boundary."""

    kind: Literal["pause"]


class ResumeCommand(StrictModel):
    """Resume a paused run."""

    kind: Literal["resume"]


class StopCommand(StrictModel):
    """Stop for good at the next step boundary."""

    kind: Literal["stop"]


class TestCommand(StrictModel):
    """Evaluate on the test loader now."""

    kind: Literal["test"]


class TrainMoreCommand(StrictModel):
    """Extend the plan by some epochs (also from a run that finished its plan and idles)."""

    kind: Literal["train_more"]
    epochs: int = Field(ge=1, le=100_000, description="epochs to add to the plan")


class SetLrCommand(StrictModel):
    """Set the learning rate from the next step on."""

    kind: Literal["set_lr"]
    lr: float = Field(gt=0.0, allow_inf_nan=False, description="new learning rate")
    group: ParamGroup = None


class SetWeightDecayCommand(StrictModel):
    """Set the weight decay from the next step on."""

    kind: Literal["set_weight_decay"]
    weight_decay: float = Field(ge=0.0, allow_inf_nan=False, description="new weight decay")
    group: ParamGroup = None


class CheckpointCommand(StrictModel):
    """Save a checkpoint in the session folder."""

    kind: Literal["checkpoint"]


class CheckpointAtPath(CheckpointCommand):
    """Save a checkpoint where the caller says. Only code in the training process may choose a
    path: a command from outside it (``AnyCommand``) is a plain CheckpointCommand."""

    path: str | None = Field(default=None, description="folder to write (default: in the session folder)")


class ClusterArgs(StrictModel):
    """Cluster the run's samples on their recorded signals or on the model's embeddings; carried
    out by a handler registered on the run (onthefly.actions.cluster)."""

    features: Literal["signals", "embeddings"] = Field(default="signals", description="what to cluster on")
    k: Annotated[int | None, Wording(omitted="chosen by silhouette")] = Field(
        default=None, ge=2, le=50, description="clusters (default: chosen by silhouette)")
    subset: Literal["all", "hard"] = Field(default="all", description="all samples, or the hard ones only")
    epoch: int | None = Field(default=None, ge=0, le=2**31, description="epoch (default: the latest recorded)")
    layer: Annotated[str | None, Wording("a module name (a string)")] = Field(
        default=None, max_length=500, description="module name for embeddings (default: input of the last Linear)")


class ClusterCommand(ClusterArgs):
    """Cluster the run's samples (the cluster command's arguments, with its kind)."""

    kind: Literal["cluster"]


class ExportCommand(StrictModel):
    """Write a saved slice's rows with the samples' data (the dataset is read on the training
    thread, RNG isolated); carried out by onthefly.actions.export. The server sends it for
    ``POST /api/slices/{name}/exports``: it is not one of the commands a page posts."""

    kind: Literal["export"]
    export_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="the export's random id")
    slice: str = Field(min_length=1, max_length=64, description="the saved slice's name")
    run_id: int = Field(ge=1, le=2**31)
    epoch: int | None = Field(default=None, ge=0, le=2**31)
    format: Literal["csv", "parquet", "json"]
    filename: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,80}$", description="the download's file name")


class ExecutePlanCommand(StrictModel):
    """Carry out an approved plan card (a fork, ...) at a step boundary; sent when a card is
    approved (``POST /api/plans/{id}/approve``, ``onthefly.actions.fork.approve``)."""

    kind: Literal["execute_plan"]
    plan_id: int = Field(ge=1, le=2**31, description="the approved plan card")


class PreviewPlanCommand(StrictModel):
    """Make a proposed merge card's candidate and compare it with its parents, without keeping it
    (``POST /api/plans/{id}/preview``, ``onthefly.actions.merge.request_preview``)."""

    kind: Literal["preview_plan"]
    plan_id: int = Field(ge=1, le=2**31, description="the proposed merge card")


class HealthCheckCommand(StrictModel):
    """Run a health check-up at the next step boundary (``POST /api/runs/{id}/health``,
    ``onthefly.actions.health``); its cards are a ``health`` event."""

    kind: Literal["health_check"]
    areas: Annotated[list[Literal["gradients", "activations", "numerics", "data", "configuration", "throughput",
                                  "determinism"]] | None, Wording(omitted="every area but determinism")] = Field(
        default=None, min_length=1, max_length=7, description="the areas checked (determinism trains a copy twice)")


class VerifySuspectsCommand(StrictModel):
    """Confirm the "likely mislabelled" samples out of sample (``POST /api/runs/{id}/verify``,
    ``onthefly.actions.verify``): short out-of-fold copies of the model train at the next step
    boundary while the run waits; the confirmed samples are saved as a slice and reported in a
    ``suspects_verified`` event."""

    kind: Literal["verify_suspects"]
    epoch: int | None = Field(default=None, ge=0, le=2**31,
                              description="the epoch whose flags are verified (default: the latest complete one)")
    folds: int = Field(default=5, ge=2, le=10, description="out-of-fold models (each holds out 1/folds of the suspects)")
    epochs: int = Field(default=5, ge=1, le=50, description="epochs each out-of-fold model trains")
    slice: str = Field(default="verified mislabelled", pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$",
                       description="the name of the slice the confirmed samples are saved as")


class CompareArgs(StrictModel):
    """Evaluate runs side by side on sets of samples, paired, against a reference run."""

    runs: Annotated[list[int], Wording("a list of 2 to 8 run ids")] = Field(
        min_length=2, max_length=8, description="the runs to compare (their current or final weights)")
    reference: int = Field(ge=1, le=2**31, description="the run every difference is taken against")
    sets: Annotated[list[str], Wording("a list of 1 to 12 saved slice names, 'val' or 'test'")] = Field(
        default_factory=lambda: ["val"], min_length=1, max_length=12,
        description="saved slices of the training data, 'val', 'test'")
    n_boot: int = Field(default=2000, ge=100, le=20_000, description="bootstrap resamples")
    seed: int = Field(default=0, ge=0, le=2**31, description="seed of the bootstrap")


class CompareCommand(CompareArgs):
    kind: Literal["compare"]


AnyCommand = Annotated[
    RunCommand | PauseCommand | ResumeCommand | StopCommand | TestCommand | TrainMoreCommand
    | SetLrCommand | SetWeightDecayCommand | CheckpointCommand | ClusterCommand,
    Field(discriminator="kind"),
]
"""Any one command, as a caller outside the training process (the server) may send it."""


def _kind(model: type[StrictModel]) -> str:
    (kind,) = typing.get_args(model.model_fields["kind"].annotation)
    return str(kind)


# What the queue validates with: every command of AnyCommand, and in-process checkpoints may
# choose a path. Keys in the order a dashboard lists them.
COMMANDS: dict[str, type[StrictModel]] = {
    _kind(model): model for model in typing.get_args(typing.get_args(AnyCommand)[0])}
COMMANDS["checkpoint"] = CheckpointAtPath
COMMANDS["export"] = ExportCommand
COMMANDS["execute_plan"] = ExecutePlanCommand
COMMANDS["preview_plan"] = PreviewPlanCommand
COMMANDS["compare"] = CompareCommand
COMMANDS["health_check"] = HealthCheckCommand
COMMANDS["verify_suspects"] = VerifySuspectsCommand
COMMAND_KINDS: tuple[str, ...] = tuple(COMMANDS)


# ---- validation: the models' verdict, in the project's words ----------------------------------
def check_command(kind: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` checked against ``kind``'s model: a plain dict with every default filled in.
    Raises ConfigError naming each wrong field and what it takes."""
    model = COMMANDS.get(kind)
    if model is None:
        raise ConfigError(f"unknown command {kind!r}; known commands: {', '.join(sorted(COMMANDS))}")
    return check_fields(model, {"kind": kind, **args}, what=kind)


def check_fields(model: type[StrictModel], data: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """``data`` checked against ``model`` (a command's, a plan card's): a plain dict with every
    default filled in, without ``kind``. Raises ConfigError naming each wrong field."""
    try:
        checked = model.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(_refusal(what, model, data, error)) from None
    return checked.model_dump(mode="json", by_alias=True, exclude={"kind"})  # by alias: a card's "lambda"


def _refusal(kind: str, model: type[StrictModel], data: Mapping[str, Any], error: ValidationError) -> str:
    problems: dict[str, str] = {}  # one message per field, in the order pydantic reports them
    extras: list[str] = []
    fields = {info.alias or name: info for name, info in model.model_fields.items()}  # by their JSON names
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        if item["type"] == "extra_forbidden":
            extras.append(name)
        elif name not in fields:
            problems.setdefault(name, item["msg"])
        elif item["type"] == "missing":
            problems.setdefault(name, f"{kind} needs {name}: {_expected(fields[name])}")
        else:
            expected, got = _expected(fields[name]), _shown(data[name])
            problems.setdefault(name, f"{name} must be {expected}, got {got}")
    if extras:
        takes = ", ".join(name for name in fields if name != "kind") or "no arguments"
        problems[""] = f"unexpected argument(s) {sorted(extras)} for {kind}; it takes {takes}"
    return "; ".join(problems.values())


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expected(info: FieldInfo) -> str:
    """What a field takes, in words, from its type and its bounds."""
    wording = next((m for m in info.metadata if isinstance(m, Wording)), Wording())
    kind = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: what X takes
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is list:  # its noun says its length
        words = wording.noun or "a list"
    elif typing.get_origin(kind) is Literal:
        values = [repr(v) for v in typing.get_args(kind)]
        words = " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 2 else values)
    else:
        finite = any(isinstance(m, AllowInfNan) and not m.allow_inf_nan for m in info.metadata)
        nouns: dict[Any, str] = {int: "a whole number", str: "a string", bool: "true or false",
                                 float: "a finite number" if finite else "a number"}
        words = (wording.noun or nouns[kind]) + _bounds(info, float_bounds=kind is float)
    if wording.omitted:
        words += f", or omitted ({wording.omitted})"
    return words


def _bounds(info: FieldInfo, *, float_bounds: bool) -> str:
    low: tuple[str, Any] | None = None
    high: tuple[str, Any] | None = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            low = (">=", m.ge)
        elif isinstance(m, annotated_types.Gt):
            low = (">", m.gt)
        elif isinstance(m, annotated_types.Le):
            high = ("<=", m.le)
        elif isinstance(m, annotated_types.Lt):
            high = ("<", m.lt)
        elif isinstance(m, annotated_types.MaxLen):
            return f" of at most {m.max_length} characters"

    def number(value: Any) -> str:
        return repr(float(value)) if float_bounds else str(value)

    if low is not None and high is not None and (low[0], high[0]) == (">=", "<="):
        return f" from {number(low[1])} to {number(high[1])}"
    return " and".join(f" {op} {number(value)}" for op, value in (b for b in (low, high) if b is not None))


# ---- the queue ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    id: int
    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    issued: float = 0.0


class CommandQueue:
    """Thread-safe FIFO of validated commands. ``pending`` is a lock-free check for the hot path."""

    def __init__(self) -> None:
        self._items: deque[Command] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)

    def put(self, kind: str, **args: Any) -> Command:
        checked = check_command(kind, args)  # before taking an id: a refused command leaves no gap
        command = Command(next(self._ids), kind, checked, time.time())
        with self._cond:
            self._items.append(command)
            self._cond.notify_all()
        return command

    @property
    def pending(self) -> bool:
        return bool(self._items)  # a deque's truth value is safe to read without the lock

    def drain(self) -> list[Command]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
        return items

    def wait(self, timeout: float | None = None) -> list[Command]:
        """Block until at least one command is queued (or the timeout passes); take them all."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._items), timeout)
            items = list(self._items)
            self._items.clear()
        return items
