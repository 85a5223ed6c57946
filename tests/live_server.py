"""A dashboard server in this process, serving a real training run: what the server tests talk to.

``LiveSession`` builds a tiny ``Trainer``, attaches the dashboard, runs ``fit`` in a background
thread and records every bus event, so a test can wait for what the engine did (with a deadline)
and compare it with what the server reports.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import torch
from torch import nn
from torch.utils.data import DataLoader
from websockets.sync.client import ClientConnection, connect

import onthefly
import onthefly.launch
from conftest import toy_data, toy_model
from onthefly.engine.channel import RunChannel
from onthefly.engine.events import Event, EventLog
from onthefly.server import DashboardServer
from onthefly.server.link import ChannelLink

DEADLINE = 30.0  # seconds; only reached when something is broken
TRAIN_SAMPLES = 256
BATCH = 32
STEPS_PER_EPOCH = TRAIN_SAMPLES // BATCH


def make_trainer(*, samples: int = TRAIN_SAMPLES, callbacks: tuple[onthefly.Callback, ...] = (),
                 **options: Any) -> onthefly.Trainer:
    model = toy_model()
    return onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(samples), batch_size=BATCH, shuffle=True),
        test_loader=DataLoader(toy_data(64, seed=1), batch_size=BATCH),
        project="server", run_name="r", callbacks=callbacks, keep_alive=True, progress=False, **options,
    )


class BusRecorder:
    """Every event a run publishes (from subscription on), with waits that have a deadline."""

    def __init__(self, run: onthefly.Run) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        run.bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def wait_for(self, predicate: Callable[[Event], bool], what: str, *, after_seq: int = 0,
                 timeout: float = DEADLINE) -> Event:
        """The first event after ``after_seq`` that matches ``predicate``."""
        def found() -> Event | None:
            return next((e for e in self.events if e.seq > after_seq and predicate(e)), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                kinds = [e.kind for e in self.events[-20:]]
                raise AssertionError(f"no {what} within {timeout} s; last events: {kinds}")
            event = found()
            assert event is not None
            return event

    def command_events(self) -> list[Event]:
        return [e for e in self.snapshot() if e.kind in ("command_applied", "command_rejected")]


class InProcessDashboard:
    """The server process's parts (a channel to the run, the link, the server) in this process,
    so a test can reach inside the server (e.g. a small event log)."""

    def __init__(self, run: onthefly.Run, events: EventLog) -> None:
        self.channel = RunChannel()
        self.channel.add_run(run)
        self.channel.start()
        self.link = ChannelLink(self.channel.port, self.channel.token, events)
        self.link.ready.wait(DEADLINE)
        self.server = DashboardServer(run.session.dir, project=run.project, session_id=run.session.id,
                                      link=self.link, events=events)
        self.server.start()
        self.backend, self.port, self.token = self.server.backend, self.server.port, self.server.token

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(drain_timeout=0)
        self.link.close()


class LiveSession:
    """A trainer, its dashboard server and an authenticated HTTP client; ``fit`` runs in a thread.
    The server is the real one (a process of its own) unless ``events`` asks for one in this
    process, keeping its live feed in that log."""

    def __init__(self, trainer: onthefly.Trainer, epochs: int, *, events: EventLog | None = None) -> None:
        self.trainer = trainer
        self.run = trainer.run
        self.bus = BusRecorder(self.run)
        self.server: Any = (onthefly.launch.attach_dashboard(self.run) if events is None
                            else InProcessDashboard(self.run, events))
        self.port: int = self.server.port
        self.token: str = self.server.token
        self.base = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=DEADLINE)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, args=(epochs,), name="fit", daemon=True)
        self._thread.start()

    def _fit(self, epochs: int) -> None:
        try:
            self.trainer.fit(epochs)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    # ---- HTTP ---------------------------------------------------------------------------
    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def command(self, kind: str, run_id: int | None = None, **args: Any) -> httpx.Response:
        return self.http.post(f"/api/runs/{run_id or self.run.run_id}/commands", json={"kind": kind, **args})

    def accepted(self, kind: str, **args: Any) -> int:
        """POST a command that must be accepted; its queue id."""
        response = self.command(kind, **args)
        assert response.status_code == 202, response.text
        return int(response.json()["id"])

    def applied(self, command_id: int) -> Event:
        return self.synced(self.bus.wait_for(
            lambda e: e.kind == "command_applied" and e.payload["id"] == command_id,
            f"command_applied for command {command_id}"))

    def status_event(self, status: str, *, after_seq: int = 0) -> Event:
        return self.synced(self.bus.wait_for(lambda e: e.kind == "status" and e.payload["status"] == status,
                                             f"status {status}", after_seq=after_seq))

    def synced(self, event: Event) -> Event:
        """``event``, once the server process has received it (and the live state read after it:
        the server is a process of its own, a push of the channel behind the engine)."""
        self.wait_until(lambda: self.get("/api/session")["live_seq"] >= event.seq,
                        f"the server receiving event {event.seq}")
        return event

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        """Poll ``condition`` (e.g. an endpoint) until it holds."""
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {timeout} s")
            time.sleep(0.02)

    # ---- WebSocket ------------------------------------------------------------------------
    def ws_url(self, *, token: str | None = None, after_seq: int | None = None) -> str:
        query = [f"token={self.token if token is None else token}"] if token != "" else []
        if after_seq is not None:
            query.append(f"after_seq={after_seq}")
        return f"ws://127.0.0.1:{self.port}/api/stream" + ("?" + "&".join(query) if query else "")

    def stream(self, *, after_seq: int | None = None, **kwargs: Any) -> ClientConnection:
        return connect(self.ws_url(after_seq=after_seq), open_timeout=DEADLINE, **kwargs)

    # ---- the end ------------------------------------------------------------------------
    def join(self) -> None:
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "training did not end"

    def finish(self) -> None:
        """Stop the run (if it is still going), wait for it, stop the server; raise what fit raised."""
        if self._thread.is_alive():
            self.run.request("stop")
        try:
            self.join()
        finally:
            self.server.stop()
            self.http.close()
        if self.error is not None:
            raise self.error


def live(trainer: onthefly.Trainer, epochs: int, *, events: EventLog | None = None) -> Iterator[LiveSession]:
    """The body of a fixture: yield a LiveSession, finish it afterwards."""
    session = LiveSession(trainer, epochs, events=events)
    try:
        yield session
    finally:
        session.finish()


def read_events(ws: ClientConnection, *, until_seq: int, timeout: float = DEADLINE) -> list[dict[str, Any]]:
    """Every event from stream messages until one with ``seq >= until_seq`` arrives."""
    events: list[dict[str, Any]] = []
    end = time.monotonic() + timeout
    while not events or events[-1]["seq"] < until_seq:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"stream did not reach seq {until_seq} within {timeout} s "
                                 f"(last {events[-1]['seq'] if events else None})")
        events.extend(json.loads(ws.recv(timeout=left))["events"])
    return events
