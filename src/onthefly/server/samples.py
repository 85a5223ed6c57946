"""The evidence endpoints: per-sample tables and histories, clusterings, slices and exports.

Everything is read from the store (heavy views computed on request, off the event loop); the two
things that need the training process - clustering on embeddings and the sample data in an
export - go through the engine's command queue and the run's dataset, never its tensors.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ..actions import export as exporting
from ..actions import slices as slicing
from ..actions.cluster import scatter_points
from ..signals.dynamics import STAT_COLUMNS, FlagRule, flag_counts
from .models import (
    ClusterArgs,
    ClusteringOut,
    CommandAccepted,
    Problem,
    SampleHistory,
    SampleTable,
    SliceCreate,
    SliceOut,
    jsonable,
)

__all__ = ["evidence_routes"]

SORTABLE = tuple(c for c in STAT_COLUMNS if c not in ("hard", "mislabelled", "correct"))
MEDIA_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet", "json": "application/json"}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "not in this session"}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "not possible now"}}
BAD_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "the body cannot be read, or the request cannot be carried out"}}


def _sorted(table: pa.Table, column: str, descending: bool) -> np.ndarray:
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    missing = ~np.isfinite(values)
    key = np.where(missing, 0.0, -values if descending else values)
    # lexsort: the last key is the primary one; missing values go last, ties by index.
    return np.lexsort((table.column("index").to_numpy(), key, missing))


def evidence_routes(backend: Any) -> APIRouter:
    router = APIRouter()

    def store() -> Any:
        if backend.store is None:
            raise HTTPException(409, "this session takes no new slices or clusterings (it is not live)")
        return backend.store

    # ---- per-sample tables -------------------------------------------------------------------
    @router.get("/api/runs/{run_id}/samples", response_model=SampleTable, responses=NOT_FOUND,
                summary="Per-sample signals and flags at an epoch, sorted and filtered")
    async def samples(
        run_id: int,
        epoch: Annotated[int | None, Query(ge=0, le=2**31)] = None,
        sort: Annotated[Literal[SORTABLE], Query()] = "loss",  # type: ignore[valid-type]
        order: Annotated[Literal["desc", "asc"], Query()] = "desc",
        flag: Annotated[Literal["hard", "mislabelled"] | None, Query()] = None,
        label: Annotated[int | None, Query(ge=-(2**53), le=2**53)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
        hard_quantile: Annotated[float, Query(gt=0, lt=1)] = 0.9,
        aum_threshold: Annotated[float, Query(ge=-1e6, le=1e6)] = 0.0,
        split: Annotated[Literal["train", "val"], Query(description="val: with Trainer(val_samples=True)")] = "train",
    ) -> SampleTable:
        backend.run_info(run_id)
        rule = FlagRule(hard_quantile=hard_quantile, aum_threshold=aum_threshold)

        def read() -> dict[str, Any]:
            shown, table = backend.reader.sample_stats_at(run_id, epoch, rule=rule, split=split)
            counts = flag_counts(table)
            if flag is not None:
                table = table.filter(table.column(flag))
            if label is not None:
                table = table.filter(np.asarray(table.column("label").to_numpy(zero_copy_only=False) == label))
            order_ = _sorted(table, sort, order == "desc")[offset : offset + limit]
            rows = jsonable(table.take(pa.array(order_)).to_pylist())
            return {"epoch": shown, "epochs": backend.reader.sample_epochs(run_id, split),
                    "total": table.num_rows,
                    "offset": offset, "rows": rows, "flags": counts, "rule": rule.describe(),
                    "grad_norm_method": info_config(run_id).get("grad_norm"),
                    "sample_ids": info_config(run_id).get("sample_ids")}

        return SampleTable.model_validate(await asyncio.to_thread(read))

    def info_config(run_id: int) -> dict[str, Any]:
        for row in backend.reader.runs():
            if row["id"] == run_id:
                return dict(row["config"])
        return {}

    @router.get("/api/runs/{run_id}/samples/{index}/history", response_model=SampleHistory, responses=NOT_FOUND,
                summary="One sample's recorded values, epoch by epoch")
    async def history(run_id: int, index: Annotated[int, PathParam(ge=0, le=2**53)]) -> SampleHistory:
        backend.run_info(run_id)
        rows = await asyncio.to_thread(backend.reader.sample_history, run_id, index)
        return SampleHistory.model_validate({"index": index, "rows": rows})

    # ---- clusterings -------------------------------------------------------------------------
    @router.post("/api/runs/{run_id}/clusters", response_model=CommandAccepted, status_code=202,
                 responses={**NOT_FOUND, **CONFLICT, **BAD_BODY},
                 summary="Cluster the run's samples (a command: applied at the next step boundary; the "
                         "result is announced by a command_applied event with the clustering id)")
    async def cluster(run_id: int, body: ClusterArgs) -> CommandAccepted:
        run = backend.runs.get(run_id)
        if run is None:
            backend.run_info(run_id)
            raise HTTPException(409, f"run {run_id} is not live in this process: it takes no commands")
        if "cluster" not in run.possible_commands():
            raise HTTPException(409, f"cannot cluster while the run is {run.status}")
        queued = run.request("cluster", **body.model_dump())
        return CommandAccepted(id=queued.id, kind=queued.kind, args=queued.args)

    @router.get("/api/runs/{run_id}/clusters", response_model=list[ClusteringOut], responses=NOT_FOUND,
                summary="The run's clusterings (summaries, without points)")
    async def clusterings(run_id: int) -> list[ClusteringOut]:
        backend.run_info(run_id)
        return [ClusteringOut.model_validate(_clustering(r, None)) for r in backend.reader.clusterings(run_id)]

    @router.get("/api/clusterings/{clustering_id}", response_model=ClusteringOut, responses=NOT_FOUND,
                summary="One clustering with its 2-D points (at most 5,000: a uniform sample)")
    async def clustering(clustering_id: Annotated[int, PathParam(ge=1, le=2**31)]) -> ClusteringOut:
        record = backend.reader.clustering(clustering_id)
        points = await asyncio.to_thread(backend.reader.clustering_points, record)
        return ClusteringOut.model_validate(_clustering(record, scatter_points(points)))

    # ---- slices ------------------------------------------------------------------------------
    @router.get("/api/slices", response_model=list[SliceOut], summary="The session's saved slices")
    async def list_slices() -> list[SliceOut]:
        return [SliceOut.model_validate(r) for r in backend.reader.slices()]

    @router.post("/api/slices", response_model=SliceOut, status_code=201,
                 responses={**NOT_FOUND, **CONFLICT, **BAD_BODY},
                 summary="Resolve a slice definition at a run and epoch, and save it by name")
    async def create_slice(body: SliceCreate) -> SliceOut:
        backend.run_info(body.run_id)
        record = await asyncio.to_thread(slicing.save_slice, store(), body.name, body.run_id, body.definition,
                                         body.epoch)
        return SliceOut.model_validate(record)

    @router.get("/api/slices/{name}", response_model=SliceOut, responses=NOT_FOUND, summary="One saved slice")
    async def get_slice(name: str) -> SliceOut:
        return SliceOut.model_validate(backend.reader.slice(name))

    @router.delete("/api/slices/{name}", status_code=204, responses=NOT_FOUND, summary="Delete a saved slice")
    async def delete_slice(name: str) -> Response:
        await asyncio.to_thread(slicing.delete_slice, store(), name)
        return Response(status_code=204)

    @router.get("/api/slices/{name}/export", responses={**NOT_FOUND, 200: {
        "content": {t: {} for t in MEDIA_TYPES.values()}, "description": "the slice's rows as a file"}},
        response_class=FileResponse, summary="Download a slice as CSV, Parquet or JSON")
    async def export(name: str, format: Annotated[Literal["csv", "parquet", "json"], Query()] = "parquet",
                     data: bool = True) -> FileResponse:
        record = backend.reader.slice(name)
        run = backend.runs.get(record["run_id"])
        dataset = run.train_dataset if data and run is not None else None
        folder = backend.session_dir / "exports"
        folder.mkdir(exist_ok=True)
        target = folder / f"{secrets.token_hex(8)}.{format}"
        await asyncio.to_thread(exporting.write_rows, backend.reader, record["run_id"], record["epoch"],
                                backend.reader.slice_indices(record), target, format, _indexable(dataset))
        filename = re.sub(r"[^A-Za-z0-9_.\-]+", "-", name).strip("-") or "slice"
        return FileResponse(target, media_type=MEDIA_TYPES[format], filename=f"{filename}.{format}",
                            background=BackgroundTask(target.unlink, missing_ok=True))

    return router


def _indexable(dataset: Any) -> Any:
    """Only map-style datasets can be read by index; an iterable dataset's rows carry no data."""
    return dataset if dataset is not None and hasattr(dataset, "__getitem__") else None


def _clustering(record: dict[str, Any], points: pa.Table | None) -> dict[str, Any]:
    details = record["details"]
    out = {"id": record["id"], "run_id": record["run_id"], "epoch": record["epoch"],
           "features": record["features"], "k": record["k"], "silhouette": record["silhouette"],
           "layer": details.get("layer"), "subset": details.get("subset"), "chosen_by": details.get("chosen_by"),
           "method": details.get("method"), "clusters": details.get("clusters", []), "created": record["created"],
           "points": None}
    if points is not None:
        out["points"] = {name: points.column(name).to_pylist() for name in ("index", "cluster", "x", "y")}
    return out
