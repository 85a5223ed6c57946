"""The session endpoints that make files of the whole session: its archive (export = save) and
its report. Both are written here, in the server process, from the store; the training process
is only asked (through the channel, as a command it carries out at a step boundary) to save the
weights it holds now, so that the archive's final model is the current one. Training is not
paused for the export: the archive is a snapshot of what the store holds.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ..actions.report import write_report
from ..store.archive import ARCHIVE_SUFFIX, export_session
from .models import ArchiveOut, Problem

__all__ = ["archive_routes"]

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "not in this session"}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "not ready"}}
CHECKPOINT_TIMEOUT = 120.0  # a training step that takes longer than this is not one we wait for


def archive_routes(backend: Any) -> APIRouter:
    router = APIRouter()
    jobs: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def exports_folder() -> Path:
        # Read when asked, not here: the OpenAPI document is made with no backend at all.
        return Path(backend.session_dir) / "exports"

    def build(job: dict[str, Any]) -> None:
        """Worker thread: the current weights of every live run saved, then the archive written."""
        try:
            notes = []
            for run_id in sorted(backend.live_run_ids()):
                state = backend.live_state(run_id) or {}
                if not state.get("live"):
                    continue
                accepted = backend.command(run_id, "checkpoint", {})
                reason = backend.wait_command(run_id, accepted.id, CHECKPOINT_TIMEOUT)
                if reason is not None:
                    notes.append(f"run {run_id}'s current weights were not saved ({reason}); its newest "
                                 "checkpoint is in the archive")
            folder = exports_folder()
            folder.mkdir(exist_ok=True)
            result = export_session(backend.reader, folder / f"{job['id']}{ARCHIVE_SUFFIX}")
            update = {"status": "ready", "bytes": result.bytes, "final_checkpoint": result.final_checkpoint,
                      "note": " ".join(notes) or None}
        except HTTPException as exc:
            update = {"status": "failed", "error": str(exc.detail)}
        except Exception as exc:  # a full disk, a damaged session: said on the page, never a 500
            update = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        with lock:
            job.update(update)

    @router.post("/api/session/archives", response_model=ArchiveOut, status_code=202,
                 summary="Export the session to one archive (.otf): the current weights of live runs are saved "
                         "first; poll GET /api/session/archives/{id}, then download its file")
    async def create_archive() -> ArchiveOut:
        archive_id = secrets.token_hex(16)
        job = {"id": archive_id, "status": "pending", "created": time.time(),
               "filename": f"{backend.project}-{backend.session_id}{ARCHIVE_SUFFIX}".replace("/", "_")}
        with lock:
            jobs[archive_id] = job
        threading.Thread(target=build, args=(job,), name="onthefly-archive", daemon=True).start()
        return ArchiveOut.model_validate(job)

    def job_of(archive_id: str) -> dict[str, Any]:
        with lock:
            job = jobs.get(archive_id)
            if job is None:
                raise HTTPException(404, f"no session archive {archive_id} was made by this server")
            return dict(job)

    @router.get("/api/session/archives/{archive_id}", response_model=ArchiveOut, responses=NOT_FOUND,
                summary="A session archive's state: pending, ready (with its size) or failed (with the error)")
    async def archive_state(archive_id: str) -> ArchiveOut:
        return ArchiveOut.model_validate(job_of(archive_id))

    @router.get("/api/session/archives/{archive_id}/file", response_class=FileResponse,
                responses={**NOT_FOUND, **CONFLICT, 200: {"content": {"application/x-tar": {}},
                                                          "description": "the .otf archive"}},
                summary="Download a ready session archive")
    async def archive_file(archive_id: str) -> FileResponse:
        job = job_of(archive_id)
        if job["status"] != "ready":
            raise HTTPException(409, f"session archive {archive_id} is {job['status']}"
                                     + (f": {job['error']}" if job.get("error") else ""))
        return FileResponse(exports_folder() / f"{archive_id}{ARCHIVE_SUFFIX}", filename=job["filename"],
                            media_type="application/x-tar")

    @router.get("/api/session/report", response_class=FileResponse,
                responses={200: {"content": {"text/html": {}}, "description": "one self-contained HTML file"}},
                summary="A report of the session as it stands: curves, distributions, hard and likely mislabelled "
                        "samples, slices, tests, lineage, events (one HTML file, no network)")
    async def report() -> FileResponse:
        folder = exports_folder()
        folder.mkdir(exist_ok=True)
        path = await asyncio.to_thread(write_report, backend.reader, folder / f"report-{secrets.token_hex(8)}.html")
        return FileResponse(path, filename=f"{backend.project}-{backend.session_id}-report.html".replace("/", "_"),
                            media_type="text/html", background=BackgroundTask(path.unlink, missing_ok=True))

    return router
