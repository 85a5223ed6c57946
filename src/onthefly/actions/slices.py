"""Slices: named sets of samples, saved in the session with their definition and the indices
they resolved to at a given run and epoch.

A definition is one of (JSON, as the API takes it):

* ``{"kind": "loss_band", "low": 1.2, "high": null}`` - per-sample loss in [low, high] at the
  epoch (a missing bound is open);
* ``{"kind": "quantile_band", "low": 0.9, "high": 1.0}`` - the same with quantiles of the
  epoch's losses as bounds (this one is the top decile);
* ``{"kind": "cluster", "clustering": 3, "cluster": 1}`` - one cluster of a saved clustering;
* ``{"kind": "label", "label": 7}``;
* ``{"kind": "indices", "indices": [4, 8, 15]}`` - a hand-picked list;
* ``{"kind": "flag", "flag": "hard"}`` or ``"mislabelled"``;
* ``{"kind": "filter", "where": [{"signal": "loss", "op": ">", "value": "p90"},
  {"signal": "margin", "op": "<", "value": 0}]}`` - every condition holds; a value may be a
  number or a quantile of that signal (p50, p90, p95, p99).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from ..errors import ConfigError, NotFoundError, StateError
from ..signals.quantiles import QUANTILES
from ..store.reader import SessionReader
from ..store.session import SessionStore
from ..strict import StrictModel

__all__ = ["SLICE_NAME", "SliceDefinition", "delete_slice", "parse_definition", "resolve_slice", "save_run_slice",
           "save_slice"]

SLICE_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$"
MAX_LISTED = 1_000_000
SIGNALS = ("loss", "margin", "confidence", "grad_norm", "aum", "forgetting", "confidence_mean", "variability",
           "label", "pred", "epochs")


class _Definition(StrictModel):
    pass


class LossBand(_Definition):
    kind: Literal["loss_band"]
    low: float | None = Field(default=None, allow_inf_nan=False, description="lower bound (inclusive)")
    high: float | None = Field(default=None, allow_inf_nan=False,
                               description="upper bound (inclusive); a band with high < low is empty")


class QuantileBand(_Definition):
    kind: Literal["quantile_band"]
    low: float = Field(default=0.0, ge=0.0, le=1.0, description="lower quantile (inclusive)")
    high: float = Field(default=1.0, ge=0.0, le=1.0, description="upper quantile (inclusive)")


class ClusterSlice(_Definition):
    kind: Literal["cluster"]
    clustering: int = Field(ge=1, le=2**31, description="a saved clustering's id")
    cluster: int = Field(ge=0, le=10_000)


class LabelSlice(_Definition):
    kind: Literal["label"]
    label: int = Field(ge=-(2**53), le=2**53)


class IndexList(_Definition):
    kind: Literal["indices"]
    indices: list[Annotated[int, Field(ge=0, le=2**53)]] = Field(min_length=1, max_length=MAX_LISTED)


class FlagSlice(_Definition):
    kind: Literal["flag"]
    flag: Literal["hard", "mislabelled"]


class Condition(_Definition):
    signal: Literal[SIGNALS]  # type: ignore[valid-type]
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: Annotated[float, Field(allow_inf_nan=False)] | Literal["p50", "p90", "p95", "p99"] = Field(
        description="a number, or a quantile of the signal")


class FilterSlice(_Definition):
    kind: Literal["filter"]
    where: list[Condition] = Field(min_length=1, max_length=16)


SliceDefinition = Annotated[
    LossBand | QuantileBand | ClusterSlice | LabelSlice | IndexList | FlagSlice | FilterSlice, Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(SliceDefinition)


def parse_definition(definition: Any) -> Any:
    """Validate a definition given as a dict (or a model); raises ConfigError saying what is wrong."""
    if isinstance(definition, BaseModel):
        definition = definition.model_dump()
    try:
        return _ADAPTER.validate_python(definition)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'definition'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"not a valid slice definition ({problems}). See onthefly.actions.slices for "
                          "the kinds: loss_band, quantile_band, cluster, label, indices, flag, filter.") from exc


_OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal, "==": np.equal,
        "!=": np.not_equal}


def resolve_slice(reader: SessionReader, run_id: int, definition: Any, epoch: int | None = None,
                  *, split: str = "train") -> tuple[int | None, np.ndarray]:
    """(epoch, sorted sample indices) that ``definition`` selects in a run at an epoch (default:
    the latest with per-sample data; a cluster slice uses its clustering's epoch)."""
    spec = parse_definition(definition)
    if isinstance(spec, ClusterSlice):
        record = reader.clustering(spec.clustering)
        if record["run_id"] != run_id:
            raise NotFoundError(f"clustering {spec.clustering} belongs to run {record['run_id']}, not run {run_id}")
        if spec.cluster >= record["k"]:
            raise NotFoundError(f"clustering {spec.clustering} has clusters 0..{record['k'] - 1}, not {spec.cluster}")
        points = reader.clustering_points(record)
        mask = points.column("cluster").to_numpy() == spec.cluster
        return record["epoch"], np.sort(points.column("index").to_numpy()[mask])
    epoch, table = reader.sample_stats_at(run_id, epoch, split=split)
    if table.num_rows == 0:
        raise StateError(f"run {run_id} has no per-sample values at epoch {epoch} yet: train an epoch first")
    index = table.column("index").to_numpy()
    if isinstance(spec, IndexList):
        wanted = np.unique(np.asarray(spec.indices, dtype=np.int64))
        unknown = np.setdiff1d(wanted, index)
        if unknown.size:
            raise NotFoundError(f"{unknown.size} of the listed indices are not samples of run {run_id} at epoch "
                              f"{epoch} (e.g. {', '.join(map(str, unknown[:5]))})")
        return epoch, wanted
    return epoch, index[_mask(spec, table)]


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _mask(spec: Any, table: pa.Table) -> np.ndarray:
    if isinstance(spec, (LossBand, QuantileBand)):
        loss = _column(table, "loss")
        finite = np.isfinite(loss)
        low, high = spec.low, spec.high
        if isinstance(spec, QuantileBand) and finite.any():
            low, high = (float(q) for q in np.quantile(loss[finite], [spec.low, spec.high]))
        mask = finite.copy()
        if low is not None:
            mask &= loss >= low
        if high is not None:
            mask &= loss <= high
        return mask
    if isinstance(spec, LabelSlice):
        return table.column("label").to_numpy(zero_copy_only=False) == spec.label
    if isinstance(spec, FlagSlice):
        return table.column(spec.flag).to_numpy(zero_copy_only=False).astype(bool)
    assert isinstance(spec, FilterSlice)
    mask = np.ones(table.num_rows, dtype=bool)
    for condition in spec.where:
        values = _column(table, condition.signal)
        threshold = condition.value
        if isinstance(threshold, str):
            finite = values[np.isfinite(values)]
            threshold = float(np.quantile(finite, QUANTILES[threshold])) if finite.size else np.nan
        with np.errstate(invalid="ignore"):
            mask &= _OPS[condition.op](values, threshold)
    return mask


def check_new_slice(reader: SessionReader, name: str, run_id: int) -> None:
    """Refuse a slice name that is malformed or taken, or a run the session does not have."""
    if not isinstance(name, str) or not re.match(SLICE_NAME, name):
        raise ConfigError(f"a slice name is 1-64 letters, digits, spaces, '_', '-' or '.', starting with a "
                          f"letter or digit; got {name!r}")
    if any(s["name"] == name for s in reader.slices()):
        raise StateError(f"a slice named {name!r} already exists in this session; pick another name or "
                         "delete that slice first")
    if run_id not in {r["id"] for r in reader.runs()}:
        raise NotFoundError(f"no run {run_id} in this session")


def save_slice(store: SessionStore, name: str, run_id: int, definition: Any, epoch: int | None = None,
               *, split: str = "train") -> dict[str, Any]:
    """Resolve ``definition`` and save it as slice ``name`` in the live session ``store``."""
    store.flush()  # what the run recorded so far (its runs row, its samples) is in the files before they are read
    reader = SessionReader(store.dir)
    check_new_slice(reader, name, run_id)
    spec = parse_definition(definition)
    epoch, indices = resolve_slice(reader, run_id, spec, epoch, split=split)
    return store.save_slice(name=name, run_id=run_id, epoch=epoch, split=split,
                            definition=spec.model_dump(), indices=indices)


def save_run_slice(run: Any, name: str, definition: Any, epoch: int | None = None) -> dict[str, Any]:
    """:func:`save_slice` from the training thread of ``run`` (a callback, an epoch end): waits
    until the rows trained so far have reached the store, so the slice sees the epoch just ended."""
    run.recorder.wait_idle()
    return save_slice(run.session, name, run.run_id, definition, epoch)


def delete_slice(store: SessionStore, name: str) -> None:
    record = SessionReader(store.dir).slice(name)
    store.delete_slice(record["id"], record["path"])


