"""The HTTP/WebSocket API and the dashboard page.

The server knows nothing of training: it reads the session's store, relays the event bus, and
puts validated commands in a run's queue. It never touches a running model's tensors.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from .._version import __version__
from ..engine.channel import STORE_OPS, decode_array, store_request
from ..engine.events import EventLog
from ..errors import OnTheFlyError
from ..store.queries import (
    hardest_samples,
    histogram,
    loss_distribution,
    metric_series,
)
from ..store.reader import SessionReader
from ..store.samples import sample_epochs
from .archives import archive_routes
from .auth import COOKIE, asset_key
from .link import ChannelLink, LinkError
from .models import (
    CommandAccepted,
    CommandBody,
    Distribution,
    EventPage,
    HardSamples,
    MetricsOut,
    Problem,
    RunInfo,
    SessionOut,
    jsonable,
)
from .plans import plan_routes
from .samples import evidence_routes

__all__ = ["DASHBOARD_DIR", "Backend", "create_app", "openapi_document"]

# The built page (ONTHEFLY_DASHBOARD_DIR serves another build, e.g. while developing the page).
DASHBOARD_DIR = Path(os.environ.get("ONTHEFLY_DASHBOARD_DIR") or Path(__file__).resolve().parent.parent / "dashboard")
# The built page's asset references (src="./assets/index-….js", href="./assets/index-….css").
ASSET_URL = re.compile(r'\b(src|href)="(\./assets/[^"?#]+)"')
STREAM_INTERVAL = 0.1  # seconds between WebSocket messages: at most 10 updates per second
STREAM_BATCH = 2000  # events per message at most
SQL_INT_MAX = 2**63 - 1  # steps and sequence numbers are SQLite integers: larger ones are refused (422)
NO_RUN: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "no such run in this session"}}


class Backend:
    """What the server serves: one session's store and, through the channel to the training
    process (when there is one), its live runs and their event feed."""

    def __init__(self, session_dir: Path, *, project: str, session_id: str, link: ChannelLink | None = None,
                 events: EventLog | None = None, store: Any = None) -> None:
        self.reader = SessionReader(session_dir)
        self.session_dir = session_dir
        self.project = project
        self.session_id = session_id
        self.events = events if events is not None else EventLog()
        self.link = link
        # With no training process (``onthefly open``): this process's own store of the session,
        # its one writer (slices); None when the session is read-only here.
        self.store = store
        self.clients = 0
        self.delivered: dict[int, int] = {}  # per connected stream: the last seq sent to it
        self._carry: queue.SimpleQueue[tuple[int, int, str]] = queue.SimpleQueue()
        if link is not None:
            link.on_events = self._on_events
            threading.Thread(target=self._carry_epochs, name="onthefly-carry", daemon=True).start()
        self._rejected: dict[tuple[int, int], str] = {}  # (run, command id) -> why it was rejected
        self._applied: set[tuple[int, int]] = set()  # (run, command id) carried out
        self._scanned_seq = 0
        self._scan_lock = threading.Lock()
        self._arrived = threading.Condition()  # notified as events come in from the training process

    def drained(self, seq: int | None = None) -> bool:
        """True once every connected stream has been sent every event up to ``seq`` (default:
        every event received so far)."""
        last = self.events.last_seq if seq is None else seq
        return all(seq_ >= last for seq_ in list(self.delivered.values()))

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["kind"] == "epoch_summary" and event["run_id"] is not None and event["epoch"] is not None:
                self._carry.put((event["run_id"], event["epoch"], str(event["payload"].get("split", "train"))))
        with self._arrived:
            self._arrived.notify_all()

    def _carry_epochs(self) -> None:
        """Worker thread: as each epoch completes, derive its carried per-sample aggregates, so the
        first look at its table is one file read, not a query over every epoch."""
        while True:
            run_id, epoch, split = self._carry.get()
            try:
                self.reader.carry_dynamics(run_id, epoch, split=split)
            except Exception as exc:  # derived data: a view recomputes it; say why it failed
                print(f"onthefly: could not derive epoch {epoch}'s aggregates: {type(exc).__name__}: {exc}",
                      file=sys.stderr)

    def set_clients(self, count: int) -> None:
        self.clients = count
        if self.link is not None and self.link.live:
            try:
                self.link.send({"op": "clients", "count": count})
            except LinkError:
                pass

    def live_state(self, run_id: int) -> dict[str, Any] | None:
        if self.link is None:
            return None
        return self.link.states.get(run_id)

    def live_run_ids(self) -> set[int]:
        return set(self.link.states) if self.link is not None else set()

    def ask(self, op: str, **fields: Any) -> Any:
        """A request to the training process (commands, the live sample, slice records)."""
        if self.link is None:
            if self.store is not None and op in STORE_OPS:
                return store_request(self.store, {"op": op, **fields})
            raise HTTPException(409, "no training process serves this session: it takes no commands")
        try:
            return self.link.request(op, **fields)
        except LinkError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    def command(self, run_id: int, kind: str, args: dict[str, Any]) -> CommandAccepted:
        state = self.live_state(run_id)
        if state is None or not state.get("live"):
            self.run_info(run_id)  # 404 if unknown
            raise HTTPException(409, f"run {run_id} is not live in this process: it takes no commands")
        return CommandAccepted.model_validate(self.ask("command", run_id=run_id, kind=kind, args=args))

    def command_outcome(self, run_id: int, command_id: int) -> str | None:
        """Why a queued command failed (rejected, or never carried out because the training process
        ended); None while it may still be carried out or once it was."""
        with self._scan_lock:
            while True:
                events, _ = self.events.after(self._scanned_seq, 10_000)
                if not events:
                    break
                for event in events:
                    if event["kind"] == "command_rejected" and event["run_id"] is not None:
                        self._rejected[(event["run_id"], event["payload"].get("id"))] = \
                            str(event["payload"].get("reason"))
                    elif event["kind"] == "command_applied" and event["run_id"] is not None:
                        self._applied.add((event["run_id"], event["payload"].get("id")))
                self._scanned_seq = events[-1]["seq"]
            reason = self._rejected.get((run_id, command_id))
        if reason is None and (self.link is None or not self.link.live):
            return "the training process ended before it carried this out"
        return reason

    def wait_command(self, run_id: int, command_id: int, timeout: float) -> str | None:
        """Wait (on a worker thread) until a command was carried out: None, or why it was not."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                reason = self.command_outcome(run_id, command_id)
                if reason is not None:
                    return reason
                if (run_id, command_id) in self._applied:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"the training process did not carry it out within {timeout:.0f} s"
                self._arrived.wait(left)

    def run_info(self, run_id: int) -> RunInfo:
        state = self.live_state(run_id)
        if state is not None:
            return RunInfo.model_validate(jsonable(state))
        for row in self.reader.runs():
            if row["id"] == run_id:
                return RunInfo(id=run_id, name=row["name"], status=row["status"], live=False, step=0,
                               epoch=0, target_epochs=0, batches_per_epoch=None, samples_per_second=None,
                               loss=None, lr=None, commands=[])
        raise HTTPException(404, f"no run {run_id} in this session")

    def distribution(self, run_id: int, epoch: int | None, bins: int, split: str = "train") -> dict[str, Any]:
        """The live epoch's (approximate, from a uniform sample) or a stored epoch's (exact)."""
        state = self.live_state(run_id)
        live = None
        if state is not None and state.get("live") and split == "train":
            try:
                live = self.ask("live_losses", run_id=run_id)
            except HTTPException:
                live = None  # the run ended meanwhile: its epochs are in the store
        if live is not None and (epoch is None or epoch == live["epoch"]):
            values = decode_array(live["values"])
            epochs = sorted(set(sample_epochs(self.session_dir, run_id)) | {live["epoch"]})
            return histogram(values, epoch=live["epoch"], epochs=epochs, bins=bins, count=live["seen"],
                             exact=values.size == live["seen"], live=True)
        return loss_distribution(self.session_dir, run_id, epoch, bins=bins, split=split)

    def events_after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        events, oldest = self.events.after(seq, limit)
        # Events older than the in-memory feed come from the store. With a training process, the
        # feed begins where its channel's began: a newer event is not missing, only not here yet.
        start = oldest if oldest is not None else (self.link.feed_start if self.link is not None else None)
        if start is None or start > seq + 1:
            stored = [e for e in self.reader.events(after_seq=seq, limit=limit)
                      if start is None or e["seq"] < start]
            events = (stored + events)[:limit]
        return [jsonable(e) for e in events]


def create_app(backend: Backend, token: str, allowed_origins: Callable[[], set[str]],
               cookie_name: str = COOKIE) -> Any:
    app = FastAPI(
        title="On The Fly",
        version=__version__,
        # No Swagger UI / ReDoc pages: they load scripts from a CDN into the page's origin (where
        # the token is readable) and are blank offline. The contract stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        description="Control and observe a PyTorch training session. Every request needs the "
        "session token (Authorization: Bearer, or ?token=).",
    )

    @app.exception_handler(OnTheFlyError)
    async def _user_error(request: Request, exc: OnTheFlyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; list every method the
            # path supports (GET and POST of /api/slices are two routes).
            methods = {m for route in app.router.routes if isinstance(route, Route)
                       and route.matches(request.scope)[0] != Match.NONE for m in (route.methods or ())}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": jsonable(_clean_errors(exc.errors()))}, status_code=422)

    # ---- the page -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(token: str | None = None) -> Any:
        page = DASHBOARD_DIR / "index.html"
        if not page.is_file():
            return HTMLResponse(
                "<h1>On The Fly</h1><p>The dashboard is not built. Run <code>bash scripts/setup.sh</code> "
                "(it builds <code>dashboard/</code> with npm).</p>", status_code=503)
        # The page's assets carry the asset key (which opens them and nothing else): in a
        # cross-site frame (an editor's webview) the browser does not send the strict cookie.
        html = ASSET_URL.sub(lambda m: f'{m[1]}="{m[2]}?key={assets_key}"',
                             await asyncio.to_thread(page.read_text, encoding="utf-8"))
        response = HTMLResponse(html, headers={"Cache-Control": "no-store"})
        # A normal tab's assets and downloads then load without the token in their URLs.
        response.set_cookie(cookie_name, backend_token, httponly=True, samesite="strict")
        return response

    backend_token = token
    assets_key = asset_key(token)
    app.mount("/assets", StaticFiles(directory=DASHBOARD_DIR / "assets", check_dir=False), name="assets")

    # ---- session and runs -------------------------------------------------------------------
    @app.get("/api/session", response_model=SessionOut, summary="The session and its runs")
    async def session() -> SessionOut:
        info = backend.reader.info()
        run_ids = sorted({r["id"] for r in backend.reader.runs()} | backend.live_run_ids())
        return SessionOut(id=backend.session_id, project=backend.project, dir=str(backend.session_dir),
                          pid=int(info.get("pid") or 0), version=__version__,
                          runs=[backend.run_info(i) for i in run_ids], live_seq=backend.events.last_seq)

    @app.get("/api/runs/{run_id}", response_model=RunInfo, responses=NO_RUN, summary="One run's live state")
    async def run_info(run_id: int) -> RunInfo:
        return backend.run_info(run_id)

    @app.get("/api/runs/{run_id}/metrics", response_model=MetricsOut, responses=NO_RUN,
             summary="Metric series, downsampled on the server")
    async def metrics(
        run_id: int,
        names: Annotated[str, Query(max_length=1000, pattern=r"^[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*$",
                                    description="comma-separated metric names")] = "train_loss",
        start_step: Annotated[int | None, Query(ge=0, le=SQL_INT_MAX)] = None,
        end_step: Annotated[int | None, Query(ge=0, le=SQL_INT_MAX)] = None,
        points: Annotated[int, Query(ge=2, le=20_000)] = 2000,
    ) -> MetricsOut:
        backend.run_info(run_id)  # 404 for an unknown run
        def read() -> dict[str, Any]:  # SQLite work off the event loop: the stream keeps flowing
            return {name: metric_series(backend.reader.db_path, run_id, name, start_step=start_step,
                                        end_step=end_step, points=points)
                    for name in dict.fromkeys(names.split(","))}

        series = await asyncio.to_thread(read)
        return MetricsOut.model_validate({"series": series})

    @app.get("/api/events", response_model=EventPage, summary="The event log after a sequence number")
    async def events(after_seq: Annotated[int, Query(ge=0, le=SQL_INT_MAX)] = 0,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> EventPage:
        page = backend.events_after(after_seq, limit)
        last = page[-1]["seq"] if page else max(after_seq, 0)
        return EventPage.model_validate({"events": page, "last_seq": last})

    @app.post("/api/runs/{run_id}/commands", response_model=CommandAccepted, status_code=202,
              summary="Queue a command; it takes effect at the next step boundary",
              responses={**NO_RUN, 409: {"model": Problem, "description": "the run cannot do that now"},
                         400: {"model": Problem, "description": "the body cannot be read (not UTF-8)"}})
    async def command(run_id: int, body: CommandBody) -> CommandAccepted:
        return await asyncio.to_thread(backend.command, run_id, body.kind, body.model_dump(exclude={"kind"}))

    @app.get("/api/runs/{run_id}/distribution", response_model=Distribution, responses=NO_RUN,
             summary="Per-sample loss histogram, quantiles, median and MAD for an epoch "
                     "(the epoch in progress: approximate and live)")
    async def distribution(run_id: int, epoch: Annotated[int | None, Query(ge=0)] = None,
                           bins: Annotated[int, Query(ge=1, le=1000)] = 50,
                           split: Annotated[Literal["train", "val"], Query()] = "train") -> Distribution:
        backend.run_info(run_id)
        result = await asyncio.to_thread(backend.distribution, run_id, epoch, bins, split)
        return Distribution.model_validate(result)

    @app.get("/api/runs/{run_id}/hard-samples", response_model=HardSamples, responses=NO_RUN,
             summary="The k samples with the highest loss in an epoch")
    async def hard_samples(run_id: int, epoch: Annotated[int | None, Query(ge=0)] = None,
                           k: Annotated[int, Query(ge=1, le=1000)] = 20) -> HardSamples:
        backend.run_info(run_id)
        result = await asyncio.to_thread(hardest_samples, backend.session_dir, run_id, epoch, k=k)
        return HardSamples.model_validate(result)

    app.include_router(evidence_routes(backend))
    app.include_router(archive_routes(backend))
    app.include_router(plan_routes(backend))

    # ---- live stream ------------------------------------------------------------------------
    @app.websocket("/api/stream")
    async def stream(websocket: WebSocket, after_seq: int = 0) -> None:
        await websocket.accept()
        backend.set_clients(backend.clients + 1)
        last = max(after_seq, 0)
        key = id(websocket)
        backend.delivered[key] = last
        closed = asyncio.Event()

        async def watch_close() -> None:
            try:
                while True:  # clients send nothing we need (text or binary): only watch for closing
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                closed.set()

        watcher = asyncio.create_task(watch_close())
        try:
            while not closed.is_set():
                batch = backend.events_after(last, STREAM_BATCH)
                if batch:
                    await websocket.send_json({"events": batch})
                    last = backend.delivered[key] = batch[-1]["seq"]
                    if len(batch) == STREAM_BATCH:
                        continue  # catching up: send the next batch at once
                try:
                    await asyncio.wait_for(closed.wait(), STREAM_INTERVAL)
                except asyncio.TimeoutError:
                    pass
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            backend.delivered.pop(key, None)
            backend.set_clients(backend.clients - 1)
            watcher.cancel()

    return app


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document (what ``/openapi.json`` serves), without a session: the
    dashboard's TypeScript types are generated from it."""
    document: dict[str, Any] = create_app(None, "", set).openapi()  # type: ignore[arg-type]
    return document


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the raw input echo (which may not be JSON-serialisable)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors]
