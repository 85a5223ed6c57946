"""Request and response bodies: the API's contract, validated by pydantic and published in
``/openapi.json``. A bad request is refused with a 422 that says which field is wrong."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "COMMAND_ADAPTER",
    "CommandAccepted",
    "CommandBody",
    "Distribution",
    "EventOut",
    "EventPage",
    "HardSamples",
    "MetricsOut",
    "Problem",
    "RunInfo",
    "SessionOut",
]


class _Strict(BaseModel):
    # strict: a number must be a JSON number, as the schema says (no "0.5", no true as 1).
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("epochs", "group", mode="before", check_fields=False)
    @classmethod
    def _whole_float_to_int(cls, value: Any) -> Any:
        """JSON Schema's integer: 3 and 3.0 are the same number (1.5, true and "3" are not)."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


class RunCommand(_Strict):
    kind: Literal["run"]


class PauseCommand(_Strict):
    kind: Literal["pause"]


class ResumeCommand(_Strict):
    kind: Literal["resume"]


class StopCommand(_Strict):
    kind: Literal["stop"]


class TestCommand(_Strict):
    kind: Literal["test"]


class TrainMoreCommand(_Strict):
    kind: Literal["train_more"]
    epochs: int = Field(ge=1, le=100_000, description="epochs to add to the plan")


class SetLrCommand(_Strict):
    kind: Literal["set_lr"]
    lr: float = Field(gt=0, allow_inf_nan=False, description="new learning rate")
    group: int | None = Field(default=None, ge=0, le=10_000, description="parameter group (default: all)")


class SetWeightDecayCommand(_Strict):
    kind: Literal["set_weight_decay"]
    weight_decay: float = Field(ge=0, allow_inf_nan=False)
    group: int | None = Field(default=None, ge=0, le=10_000)


class CheckpointCommand(_Strict):
    kind: Literal["checkpoint"]


CommandBody = Annotated[
    RunCommand | PauseCommand | ResumeCommand | StopCommand | TestCommand | TrainMoreCommand
    | SetLrCommand | SetWeightDecayCommand | CheckpointCommand,
    Field(discriminator="kind"),
]

from pydantic import TypeAdapter  # noqa: E402

COMMAND_ADAPTER: TypeAdapter[Any] = TypeAdapter(CommandBody)


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
