"""Request and response bodies: the API's contract, validated by pydantic and published in
``/openapi.json``. A bad request is refused with a 422 that says which field is wrong."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from ..actions.plans import BenchmarkCard, CurateCard, ForkCard, GateCard, MergeCard
from ..actions.slices import SLICE_NAME, SliceDefinition
from ..engine.control import AnyCommand, ClusterArgs
from ..strict import StrictModel

__all__ = [
    "COMMAND_ADAPTER",
    "ArchiveOut",
    "ArchivedCheckpoint",
    "ClusterArgs",
    "ClusteringOut",
    "CommandAccepted",
    "CommandBody",
    "ComparisonOut",
    "Distribution",
    "EventOut",
    "EventPage",
    "ExportCreate",
    "ExportOut",
    "HardSamples",
    "LineageEdge",
    "LineageNode",
    "LineageOut",
    "MetricsOut",
    "PlanApproved",
    "PlanOut",
    "Problem",
    "RunInfo",
    "SampleHistory",
    "SampleTable",
    "SessionOut",
    "SliceCreate",
    "SliceOut",
    "jsonable",
]


class _Strict(StrictModel):
    pass


# The commands' bodies are the engine's own models (fields, bounds, descriptions declared once,
# in engine.control): what the API accepts is by construction what the queue accepts.
CommandBody = AnyCommand
COMMAND_ADAPTER: TypeAdapter[Any] = TypeAdapter(CommandBody)


def jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class Problem(BaseModel):
    detail: str


class CommandAccepted(BaseModel):
    id: int
    kind: str
    args: dict[str, Any]


class RunInfo(BaseModel):
    id: int
    name: str
    status: str
    live: bool
    step: int
    epoch: int
    target_epochs: int
    batches_per_epoch: int | None
    samples_per_second: float | None
    loss: float | None
    lr: float | None
    commands: list[str]


class SessionOut(BaseModel):
    id: str
    project: str
    dir: str
    pid: int
    version: str
    runs: list[RunInfo]
    live_seq: int = Field(default=0, description="the newest event this server has received from the "
                          "training process (the runs' live state is at least that recent)")


class Series(BaseModel):
    step: list[int]
    value: list[float | None]
    min: list[float | None]
    max: list[float | None]
    total: int


class MetricsOut(BaseModel):
    series: dict[str, Series]


class EventOut(BaseModel):
    seq: int
    kind: str
    run_id: int | None
    step: int | None
    epoch: int | None
    time: float
    payload: dict[str, Any]


class EventPage(BaseModel):
    events: list[EventOut]
    last_seq: int


class Quantiles(BaseModel):
    p50: float
    p90: float
    p95: float
    p99: float


class Distribution(BaseModel):
    epoch: int | None
    epochs: list[int]
    live: bool = Field(description="true: the epoch in progress, from a uniform sample of its losses so far")
    exact: bool = Field(description="false: quantiles estimated from a uniform sample (live epoch)")
    count: int
    edges: list[float]
    counts: list[int]
    quantiles: Quantiles | None
    mean: float | None
    median: float | None
    mad: float | None = Field(description="median absolute deviation from the median")


class HardSample(BaseModel):
    index: int
    loss: float | None
    label: int | None
    pred: int | None
    margin: float | None
    correct: bool | None


class HardSamples(BaseModel):
    epoch: int | None
    rows: list[HardSample]


# ---- evidence: per-sample tables, clusterings, slices ---------------------------------------
class SampleRow(BaseModel):
    index: int
    label: int | None
    pred: int | None
    correct: bool | None
    loss: float | None
    margin: float | None
    confidence: float | None = Field(description="probability given to the labelled class")
    grad_norm: float | None
    epochs: int = Field(description="epochs in which the sample was seen")
    aum: float | None = Field(description="area under the margin: mean margin over epochs")
    forgetting: int = Field(description="forgetting events: correct, then wrong in the next epoch")
    confidence_mean: float | None = Field(description="dataset cartography: mean confidence over epochs")
    variability: float | None = Field(description="dataset cartography: std of confidence over epochs")
    hard: bool
    mislabelled: bool = Field(description="likely mislabelled (see rule)")
    weight: float | None = Field(default=None, description="its curation weight in training now (0: dropped); "
                                                           "None: never curated")


class SampleTable(BaseModel):
    epoch: int | None
    epochs: list[int]
    total: int = Field(description="rows that pass the filters")
    offset: int
    rows: list[SampleRow]
    flags: dict[str, int] = Field(description="how many samples carry each flag at this epoch")
    rule: dict[str, str] = Field(description="how the flags are decided")
    grad_norm_method: str | None = Field(description="how per-sample gradient norms were measured (None: off)")
    sample_ids: str | None = Field(
        default=None, description="what a row's index is: 'index' (the dataset's) or 'position' (an "
        "IterableDataset's order within the epoch; AUM and forgetting then assume that order is fixed)")
    live_epoch: int | None = Field(
        default=None, description="the epoch the run is training now (its table fills when it ends); "
        "None when the run is not training")


class HistoryRow(BaseModel):
    epoch: int
    step: int
    loss: float | None
    margin: float | None
    pred: int | None
    label: int | None
    correct: bool | None
    confidence: float | None
    grad_norm: float | None


class SampleHistory(BaseModel):
    index: int
    rows: list[HistoryRow]


class ClusterSummary(BaseModel):
    cluster: int
    size: int
    mean_loss: float | None
    labels: dict[str, int]


class ClusterPoints(BaseModel):
    index: list[int]
    cluster: list[int]
    x: list[float]
    y: list[float]


class ClusteringOut(BaseModel):
    id: int
    run_id: int
    epoch: int | None
    features: str
    k: int
    silhouette: float | None
    layer: str | None
    subset: str | None
    chosen_by: str | None
    method: str | None
    clusters: list[ClusterSummary]
    created: float
    points: ClusterPoints | None


class SliceCreate(_Strict):
    name: str = Field(pattern=SLICE_NAME, description="1-64 letters, digits, spaces, '_', '-', '.'")
    run_id: int = Field(ge=1, le=2**31)
    epoch: int | None = Field(default=None, ge=0, le=2**31, description="default: the latest complete epoch")
    definition: SliceDefinition


class ExportCreate(_Strict):
    format: Literal["csv", "parquet", "json"] = "parquet"
    data: bool = Field(default=True, description="with each sample's own data (read by the training process "
                       "at a step boundary, from its export_dataset or training dataset)")


class ExportOut(BaseModel):
    id: str = Field(description="random: the download URL cannot be guessed")
    slice: str
    run_id: int
    epoch: int | None
    format: Literal["csv", "parquet", "json"]
    data: bool
    status: Literal["pending", "ready", "failed"]
    rows: int | None = None
    error: str | None = None
    note: str | None = Field(default=None, description="e.g. why the rows carry no sample data")
    filename: str


class ArchivedCheckpoint(BaseModel):
    """A checkpoint as an archive's manifest registers it (store.archive's registry row)."""

    id: int
    run_id: int
    step: int
    epoch: int
    path: str = Field(description="inside the archive's session folder")
    reason: str


class ArchiveOut(BaseModel):
    id: str = Field(description="random: the download URL cannot be guessed")
    status: Literal["pending", "ready", "failed"]
    filename: str
    created: float
    bytes: int | None = None
    final_checkpoint: ArchivedCheckpoint | None = Field(
        default=None, description="the final model in the archive (None: the session saved no checkpoint)")
    error: str | None = None
    note: str | None = None


class PlanOut(BaseModel):
    id: int
    kind: Literal["fork", "curate", "merge", "gate", "benchmark"]
    status: Literal["proposed", "approved", "running", "done", "failed", "discarded"]
    card: ForkCard | CurateCard | MergeCard | GateCard | BenchmarkCard = Field(discriminator="kind")
    result: dict[str, Any] | None = Field(default=None, description="what came of it, against its criterion")
    error: str | None = None
    runs: list[int] = Field(description="the runs it made")
    source: str = Field(description="who proposed it: user or autofork")
    created: float
    updated: float


class PlanApproved(BaseModel):
    plan: PlanOut
    command: CommandAccepted = Field(description="the execute_plan command the run carries out at a step boundary")


class LineageNode(BaseModel):
    id: int
    name: str
    status: str
    created: float
    parent_id: int | None


class LineageEdge(BaseModel):
    child: int
    parent: int
    kind: str = Field(description="fork, control, resume (later: merge, gate)")
    step: int | None = Field(description="the parent's step at the fork")
    checkpoint_id: int | None
    plan_id: int | None


class LineageOut(BaseModel):
    nodes: list[LineageNode]
    edges: list[LineageEdge]


class ComparisonOut(BaseModel):
    id: int
    request: dict[str, Any]
    result: dict[str, Any] = Field(description="cells per (run, set): n, loss, accuracy, per-class accuracy, and "
                                               "against the reference: differences with paired bootstrap intervals, "
                                               "McNemar's test, samples fixed and broken")
    created: float


class SliceOut(BaseModel):
    id: int
    name: str
    run_id: int
    epoch: int | None
    split: str
    definition: dict[str, Any]
    count: int
    created: float
