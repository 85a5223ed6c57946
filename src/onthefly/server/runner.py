"""Serves one session on 127.0.0.1 (uvicorn in a background thread of the calling process).

The dashboard server process (:mod:`onthefly.server.process`) runs one of these; so can a tool
that reads a finished session, or a benchmark."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from ..engine.events import EventLog
from ..errors import ConfigError
from .app import Backend, create_app
from .auth import AuthMiddleware, cookie_name_for, new_token
from .link import ChannelLink

__all__ = ["DashboardServer", "port_from_env"]

STARTUP_TIMEOUT = 30.0


def port_from_env() -> int:
    text = os.environ.get("ONTHEFLY_PORT", "0")
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"ONTHEFLY_PORT must be a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"ONTHEFLY_PORT must be between 0 and 65535, got {port}")
    return port


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._ready.set()


class DashboardServer:
    """The dashboard and API for one session. ``start()`` returns once it accepts connections."""

    def __init__(self, session_dir: Path, *, project: str, session_id: str, port: int | None = None,
                 host: str = "127.0.0.1", token: str | None = None, link: ChannelLink | None = None,
                 events: EventLog | None = None, store: Any = None) -> None:
        self.token = token or new_token()
        self.backend = Backend(session_dir, project=project, session_id=session_id, link=link, events=events,
                               store=store)
        self.host = host
        self._requested_port = port_from_env() if port is None else port
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def allowed_origins(self) -> set[str]:
        return {f"http://{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/?token={self.token}"

    @property
    def attached(self) -> bool:
        """True while a dashboard (a WebSocket client) is connected."""
        return self.backend.clients > 0

    def start(self) -> str:
        if not 0 <= self._requested_port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self._requested_port}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Small responses go out at once: with Nagle's algorithm a kept-alive connection (as a
        # browser keeps them) stalls ~40 ms on each request waiting for a delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on {self.host}:{self._requested_port}: {exc}. Choose another port "
                "(ONTHEFLY_PORT) or leave it unset for a free one."
            ) from exc
        self.port = sock.getsockname()[1]
        cookie = cookie_name_for(self.port)
        app: Any = create_app(self.backend, self.token, self.allowed_origins, cookie)
        config = uvicorn.Config(AuthMiddleware(app, self.token, self.allowed_origins, cookie), log_level="warning",
                                lifespan="off", ws_ping_interval=20, ws_ping_timeout=20)
        ready = threading.Event()
        self._server = server = _Server(config, ready)

        def run() -> None:
            try:
                server.run(sockets=[sock])
            finally:
                ready.set()  # startup failed: do not leave start() waiting

        self._thread = threading.Thread(target=run, name="onthefly-server", daemon=True)
        self._thread.start()
        if not ready.wait(STARTUP_TIMEOUT) or not server.started:
            raise RuntimeError("the dashboard server did not start; see the messages above")
        return self.url

    def stop(self, drain_timeout: float = 3.0, until_seq: int | None = None) -> None:
        """Stop serving (idempotent), after the connected dashboards have been sent the last
        events (up to ``until_seq``: the run's final status), for at most ``drain_timeout`` seconds."""
        deadline = time.monotonic() + drain_timeout
        while self._thread is not None and not self.backend.drained(until_seq) and time.monotonic() < deadline:
            time.sleep(0.02)  # the stream sends every 100 ms
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
