"""The evidence endpoints: per-sample tables and histories, clusterings, slices and exports.

Everything is read from the store (heavy views computed on request, off the event loop, in
this server process). What needs the training process goes through the channel: clustering
and an export with the samples' data are commands it carries out at a step boundary (the
user's model and dataset are never touched from here); a new slice is resolved here and its
record written by the training process's store (the session's one writer).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from ..actions import export as exporting
from ..actions import slices as slicing
from ..actions.cluster import scatter_points
from ..actions.curate import curated_weights
from ..engine.channel import encode_array
from ..signals.dynamics import STAT_COLUMNS, FlagRule, flag_counts
from .models import (
    ClusterArgs,
    ClusteringOut,
    CommandAccepted,
    ExportCreate,
    ExportOut,
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


def _page(table: pa.Table, column: str, descending: bool, offset: int, limit: int) -> np.ndarray:
    """The row positions of one page of ``table`` (sorted by index) ordered by ``column``: missing
    values last, ties by index. A partial sort: a page of 50 among a million rows takes a few ms
    where sorting them all took ~150."""
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    key = np.where(np.isfinite(values), -values if descending else values, np.inf)
    end = min(offset + limit, key.size)
    if offset >= end:
        return np.empty(0, dtype=np.int64)
    if end >= key.size // 8:  # a deep page: sort it all (stable: ties stay in index order)
        return np.argsort(key, kind="stable")[offset:end]
    kth = np.partition(key, end - 1)[end - 1]
    below = np.flatnonzero(key < kth)
    below = below[np.argsort(key[below], kind="stable")]
    tied = np.flatnonzero(key == kth)[: end - below.size]  # in index order
    return np.concatenate([below, tied])[offset:end]


def evidence_routes(backend: Any) -> APIRouter:
    router = APIRouter()

    exports: dict[str, dict[str, Any]] = {}  # pending exports asked of the training process
    exports_lock = threading.Lock()

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
            order_ = _page(table, sort, order == "desc", offset, limit)
            rows = jsonable(table.take(pa.array(order_)).to_pylist())
            curated = curated_weights(backend.reader, run_id)
            for row in rows:  # which samples a curation card dropped or reweighted
                row["weight"] = curated.get(row["index"])
            return {"epoch": shown, "epochs": backend.reader.sample_epochs(run_id, split),
                    "total": table.num_rows,
                    "offset": offset, "rows": rows, "flags": counts, "rule": rule.describe(),
                    "grad_norm_method": info_config(run_id).get("grad_norm"),
                    "sample_ids": info_config(run_id).get("sample_ids"), "live_epoch": live_epoch(run_id)}

        return SampleTable.model_validate(await asyncio.to_thread(read))

    def live_epoch(run_id: int) -> int | None:
        state = backend.live_state(run_id)
        if state is None or not state.get("live") or state.get("status") not in ("running", "paused"):
            return None
        return int(state["epoch"])

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
        return await asyncio.to_thread(backend.command, run_id, "cluster", body.model_dump())

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

        def create() -> dict[str, Any]:
            backend.ask("flush")  # what the run recorded so far is in the files before they are read
            slicing.check_new_slice(backend.reader, body.name, body.run_id)
            spec = slicing.parse_definition(body.definition)
            epoch, indices = slicing.resolve_slice(backend.reader, body.run_id, spec, body.epoch)
            record: dict[str, Any] = backend.ask(
                "save_slice", name=body.name, slice_run=body.run_id, epoch=epoch, split="train",
                definition=spec.model_dump(mode="json"), indices=encode_array(np.asarray(indices, dtype=np.int64)))
            return record

        return SliceOut.model_validate(await asyncio.to_thread(create))

    @router.get("/api/slices/{name}", response_model=SliceOut, responses=NOT_FOUND, summary="One saved slice")
    async def get_slice(name: str) -> SliceOut:
        return SliceOut.model_validate(backend.reader.slice(name))

    @router.delete("/api/slices/{name}", status_code=204, responses={**NOT_FOUND, **CONFLICT},
                   summary="Delete a saved slice")
    async def delete_slice(name: str) -> Response:
        record = backend.reader.slice(name)
        await asyncio.to_thread(backend.ask, "delete_slice", slice_id=record["id"], path=record["path"])
        return Response(status_code=204)

    # ---- exports -----------------------------------------------------------------------------
    @router.post("/api/slices/{name}/exports", response_model=ExportOut, status_code=202,
                 responses={**NOT_FOUND, **CONFLICT, **BAD_BODY},
                 summary="Export a slice's rows to a file: without sample data at once; with it, by the "
                         "training process at its next step boundary (poll GET /api/exports/{id})")
    async def create_export(name: str, body: ExportCreate) -> ExportOut:
        saved = backend.reader.slice(name)
        record = exporting.new_export(backend.session_dir, slice_name=name, run_id=saved["run_id"],
                                      epoch=saved["epoch"], fmt=body.format, data=body.data)
        state = backend.live_state(saved["run_id"])
        if body.data and state is not None and state.get("live"):
            args = {"export_id": record["id"], "slice": name, "run_id": saved["run_id"], "epoch": saved["epoch"],
                    "format": body.format, "filename": record["filename"]}
            accepted = await asyncio.to_thread(backend.command, saved["run_id"], "export", args)
            with exports_lock:
                exports[record["id"]] = {**record, "command": accepted.id}
            return ExportOut.model_validate(record)
        note = None if not body.data else "rows carry no sample data: no training process holds the dataset"
        result = await asyncio.to_thread(exporting.run_export, backend.reader, record, None, note=note)
        return ExportOut.model_validate(result)

    @router.get("/api/exports/{export_id}", response_model=ExportOut, responses=NOT_FOUND,
                summary="An export's state: pending, ready (with its row count) or failed (with the error)")
    async def get_export(export_id: str) -> ExportOut:
        return ExportOut.model_validate(export_state(export_id))

    @router.get("/api/exports/{export_id}/file", response_class=FileResponse, responses={**NOT_FOUND, **CONFLICT,
                200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "the slice's rows"}},
                summary="Download a finished export")
    async def export_file(export_id: str) -> FileResponse:
        state = export_state(export_id)
        if state["status"] != "ready":
            raise HTTPException(409, f"export {export_id} is {state['status']}"
                                     + (f": {state['error']}" if state.get("error") else ""))
        return FileResponse(exporting.export_file(backend.session_dir, state), filename=state["filename"],
                            media_type=MEDIA_TYPES[state["format"]])

    def export_state(export_id: str) -> dict[str, Any]:
        finished = exporting.export_record(backend.session_dir, export_id)
        if finished is not None:
            with exports_lock:
                exports.pop(export_id, None)
            return finished
        with exports_lock:
            pending = exports.get(export_id)
        if pending is None:
            raise HTTPException(404, f"no export {export_id} in this session")
        rejected = backend.command_outcome(pending["run_id"], pending["command"])
        if rejected is not None:
            return {**pending, "status": "failed", "error": rejected}
        return pending

    return router


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
