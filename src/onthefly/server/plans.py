"""Plan cards, lineage and comparisons over HTTP.

Cards are checked here (their fields, then against the session: the slice, the run, the
checkpoint) and written by the session's one writer through the channel, like slices. Approving
a card queues an ``execute_plan`` command on its run: the training process carries it out at a
step boundary, and the card's status says how it went. A comparison is a ``compare`` command (it
needs the runs' models); its table is stored in the session and read back here.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body
from fastapi.responses import FileResponse
from pydantic import Field
from starlette.background import BackgroundTask

from ..actions.merge import keepable
from ..actions.mixture import artifact_folder, export_moe
from ..actions.plans import (
    BenchmarkCard,
    CurateCard,
    ForkCard,
    GateCard,
    MergeCard,
    check_card,
    edit_card,
    plan_out,
    require_proposed,
)
from ..engine.control import CompareArgs, HealthCheckCommand, VerifySuspectsCommand
from ..errors import ConfigError
from .models import CommandAccepted, ComparisonOut, LineageOut, PlanApproved, PlanOut, Problem

__all__ = ["plan_routes"]


class HealthCheckArgs(HealthCheckCommand):
    """A check-up's areas (all of them by default)."""

    kind: Literal["health_check"] = "health_check"

class VerifySuspectsArgs(VerifySuspectsCommand):
    """Which epoch's flags to verify, with how many out-of-fold models of how many epochs."""

    kind: Literal["verify_suspects"] = "verify_suspects"


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "not in this session"}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "not possible now"}}
BAD: dict[int | str, dict[str, Any]] = {400: {"model": Problem, "description": "a field is wrong (named)"}}


def plan_routes(backend: Any) -> APIRouter:
    router = APIRouter()

    def fresh() -> None:
        if backend.link is not None or backend.store is not None:
            backend.ask("flush")  # the runs and slices recorded so far are in the files before they are read

    @router.get("/api/plans", response_model=list[PlanOut], summary="The session's plan cards, oldest first")
    async def plans() -> list[PlanOut]:
        return [PlanOut.model_validate(plan_out(p)) for p in await asyncio.to_thread(backend.reader.plans)]

    @router.get("/api/plans/{plan_id}", response_model=PlanOut, responses=NOT_FOUND, summary="One plan card")
    async def plan(plan_id: int) -> PlanOut:
        return PlanOut.model_validate(plan_out(backend.reader.plan(plan_id)))

    @router.post("/api/plans", response_model=PlanOut, status_code=201, responses={**BAD, **NOT_FOUND, **CONFLICT},
                 summary="Propose a plan card (checked against the session; nothing happens until it is approved)")
    async def propose(card: Annotated[ForkCard | CurateCard | MergeCard | GateCard | BenchmarkCard, Field(discriminator="kind")]) -> PlanOut:
        def save() -> dict[str, Any]:
            fresh()
            checked = check_card(backend.reader, card.model_dump(mode="json", by_alias=True))
            record: dict[str, Any] = backend.ask("save_plan", kind=checked["kind"], card=checked, source="user")
            return record

        return PlanOut.model_validate(plan_out(await asyncio.to_thread(save)))

    @router.patch("/api/plans/{plan_id}", response_model=PlanOut, responses={**BAD, **NOT_FOUND, **CONFLICT},
                  summary="Edit fields of a proposed card (the whole card is checked again)")
    async def edit(plan_id: int, changes: dict[str, Any] = Body(  # noqa: B008 - FastAPI's way to take a body
            description="the fields to change, e.g. {\"lr\": 0.01, \"budget\": 2}")) -> PlanOut:
        def save() -> dict[str, Any]:
            fresh()
            card = edit_card(backend.reader, backend.reader.plan(plan_id), changes)
            backend.ask("update_plan", plan_id=plan_id, card=card)
            return backend.reader.plan(plan_id)

        return PlanOut.model_validate(plan_out(await asyncio.to_thread(save)))

    @router.post("/api/plans/{plan_id}/discard", response_model=PlanOut, responses={**NOT_FOUND, **CONFLICT},
                 summary="Discard a proposed card")
    async def discard(plan_id: int) -> PlanOut:
        def save() -> dict[str, Any]:
            found = backend.reader.plan(plan_id)
            require_proposed(found, "discarded")
            backend.ask("update_plan", plan_id=plan_id, status="discarded")
            return backend.reader.plan(plan_id)

        return PlanOut.model_validate(plan_out(await asyncio.to_thread(save)))

    @router.post("/api/plans/{plan_id}/approve", response_model=PlanApproved, status_code=202,
                 responses={**BAD, **NOT_FOUND, **CONFLICT},
                 summary="Approve a proposed card: its run carries it out at its next step boundary")
    async def approve(plan_id: int) -> PlanApproved:
        def go() -> dict[str, Any]:
            fresh()
            found = backend.reader.plan(plan_id)
            require_proposed(found, "approved")
            card = check_card(backend.reader, found["card"])
            keepable(found)  # a merge that lost to a parent in its preview needs override
            backend.ask("update_plan", plan_id=plan_id, status="approved")
            try:
                accepted = backend.command(card["run_id"], "execute_plan", {"plan_id": plan_id})
            except BaseException:
                backend.ask("update_plan", plan_id=plan_id, status="proposed")  # nothing will carry it out
                raise
            return {"plan": plan_out(backend.reader.plan(plan_id)), "command": accepted}

        return PlanApproved.model_validate(await asyncio.to_thread(go))

    @router.post("/api/plans/{plan_id}/preview", response_model=CommandAccepted, status_code=202,
                 responses={**BAD, **NOT_FOUND, **CONFLICT},
                 summary="Preview a proposed merge card: its run makes the candidate and compares it with every "
                         "parent (then the card's result.preview holds the comparison; the card stays proposed)")
    async def preview(plan_id: int) -> CommandAccepted:
        def go() -> CommandAccepted:
            fresh()
            found = backend.reader.plan(plan_id)
            if found["kind"] != "merge":
                raise ConfigError(f"plan card {plan_id} is a {found['kind']} card; only merge cards have a preview")
            require_proposed(found, "previewed")
            check_card(backend.reader, found["card"])
            accepted: CommandAccepted = backend.command(found["card"]["run_id"], "preview_plan", {"plan_id": plan_id})
            return accepted

        return await asyncio.to_thread(go)

    @router.get("/api/lineage", response_model=LineageOut,
                summary="The session's runs as a graph: forks (and resumes) as edges with their steps and cards")
    async def lineage() -> LineageOut:
        return LineageOut.model_validate(await asyncio.to_thread(backend.reader.lineage))

    @router.post("/api/runs/{run_id}/comparisons", response_model=CommandAccepted, status_code=202,
                 responses={**BAD, **NOT_FOUND, **CONFLICT},
                 summary="Compare runs on slices, validation and test, paired, against a reference run; carried "
                         "out by run_id's training process (the result: a 'comparison' event, then "
                         "GET /api/comparisons/{id})")
    async def compare(run_id: int, body: CompareArgs) -> CommandAccepted:
        accepted: CommandAccepted = await asyncio.to_thread(backend.command, run_id, "compare",
                                                            body.model_dump(mode="json"))
        return accepted

    @router.post("/api/runs/{run_id}/health", response_model=CommandAccepted, status_code=202,
                 responses={**BAD, **NOT_FOUND, **CONFLICT},
                 summary="Run a health check-up (gradients, activations, numerics, data, configuration, throughput) "
                         "at run_id's next step boundary; its cards arrive as a 'health' event")
    async def health_check(run_id: int, body: HealthCheckArgs) -> CommandAccepted:
        accepted: CommandAccepted = await asyncio.to_thread(backend.command, run_id, "health_check",
                                                            body.model_dump(mode="json", exclude={"kind"}))
        return accepted

    @router.post("/api/runs/{run_id}/verify", response_model=CommandAccepted, status_code=202,
                 responses={**BAD, **NOT_FOUND, **CONFLICT},
                 summary="Verify the samples flagged likely mislabelled with out-of-fold copies of the model, at "
                         "run_id's next step boundary (the run waits); the result is a 'suspects_verified' event "
                         "and a slice of the confirmed samples")
    async def verify(run_id: int, body: VerifySuspectsArgs) -> CommandAccepted:
        accepted: CommandAccepted = await asyncio.to_thread(backend.command, run_id, "verify_suspects",
                                                            body.model_dump(mode="json", exclude={"kind"}))
        return accepted

    @router.get("/api/comparisons", response_model=list[ComparisonOut], summary="Every comparison of the session")
    async def comparisons() -> list[ComparisonOut]:
        return [ComparisonOut.model_validate(c) for c in await asyncio.to_thread(backend.reader.comparisons)]

    @router.get("/api/comparisons/{comparison_id}", response_model=ComparisonOut, responses=NOT_FOUND,
                summary="One comparison's table")
    async def comparison(comparison_id: int) -> ComparisonOut:
        return ComparisonOut.model_validate(await asyncio.to_thread(backend.reader.comparison, comparison_id))

    @router.get("/api/runs/{run_id}/mixture", response_class=FileResponse, responses={
        200: {"content": {"application/x-tar": {}}, "description": "the artifact's folder as one tar file"},
        **NOT_FOUND, **CONFLICT},
        summary="A mixture of experts (a gate card's run) as its standalone inference artifact: torch.export "
                "program, safetensors weights, ONNX where exported, manifest (what onthefly export-moe writes)")
    async def mixture(run_id: int) -> FileResponse:
        def build() -> Path:
            fresh()
            artifact_folder(backend.reader, run_id)  # a 404 / 409 that says why there is none
            scratch = Path(backend.session_dir) / "exports" / f"mixture-{secrets.token_hex(8)}"
            try:
                export_moe(backend.reader, run_id, scratch / "mixture")  # every file checked against the manifest
                with tarfile.open(scratch.with_suffix(".tar"), "w") as tar:
                    tar.add(scratch / "mixture", arcname=f"mixture-run-{run_id}")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return scratch.with_suffix(".tar")

        path = await asyncio.to_thread(build)
        return FileResponse(path, filename=f"{backend.project}-mixture-run-{run_id}.tar".replace("/", "_"),
                            media_type="application/x-tar", background=BackgroundTask(path.unlink, missing_ok=True))

    return router
