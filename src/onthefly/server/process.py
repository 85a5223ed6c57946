"""The dashboard server in its own process, started by the training process.

Watching must not slow training: a server that shares the training process competes with the
training thread for the GIL and the cores (measured: an open page cost the demo 21-35 % of its
speed). So, as TensorBoard, MLflow's UI and Aim do, the server runs in a process of its own, at
a lower scheduling priority, reading the session store (SQLite in WAL mode and Parquet allow
concurrent readers). The training process keeps only the channel's end
(:class:`~onthefly.engine.channel.RunChannel`): commands in, the event feed and live state out.

Training process: :class:`DashboardProcess` (``start()`` returns once the server accepts
connections, ``stop()`` once the pages were sent the last events and the process has ended).
Server process: ``python -m onthefly.server``, configured by one JSON line on its stdin (the
tokens never appear on a command line); it ends when the training process closes the channel,
or when its stdin reaches end of file (the training process is gone, even killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..engine.channel import RunChannel
from ..engine.events import EventLog
from ..errors import ConfigError
from .auth import new_token

__all__ = ["NICENESS", "DashboardProcess", "serve_from_stdin"]

STARTUP_TIMEOUT = 60.0  # the server process imports FastAPI, DuckDB, pyarrow: seconds on a cold disk
NICENESS = 10  # the server process yields the cores to training
SERVER_DUCKDB_THREADS = 1


class DashboardProcess:
    """The dashboard for this process's runs, served by a child process."""

    def __init__(self, session_dir: Path, *, project: str, session_id: str, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        from .runner import port_from_env

        self.session_dir, self.project, self.session_id = session_dir, project, session_id
        self.token = new_token()
        self.host = host
        self.port = 0
        self._requested_port = port_from_env() if port is None else port
        self.channel = RunChannel()
        self._process: subprocess.Popen[str] | None = None
        self._stopped = False

    @classmethod
    def for_run(cls, run: Any, *, port: int | None = None) -> DashboardProcess:
        server = cls(run.session.dir, project=run.project, session_id=run.session.id, port=port)
        server.add_run(run)
        return server

    def add_run(self, run: Any) -> None:
        self.channel.add_run(run)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/?token={self.token}"

    @property
    def attached(self) -> bool:
        """True while a dashboard page (a WebSocket client) is connected."""
        return self.channel.clients > 0

    @property
    def pid(self) -> int | None:
        """The server process's id."""
        return self._process.pid if self._process is not None else None

    def start(self, *, announce: bool = True) -> str:
        if not 0 <= self._requested_port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self._requested_port}")
        self.channel.start()
        package_root = str(Path(__file__).resolve().parents[2])  # where `import onthefly` found us
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        config = {"session_dir": str(self.session_dir), "project": self.project, "session_id": self.session_id,
                  "port": self._requested_port, "host": self.host, "token": self.token,
                  "channel": {"port": self.channel.port, "token": self.channel.token}}
        self._process = process = subprocess.Popen(
            [sys.executable, "-m", "onthefly.server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, text=True, encoding="utf-8")
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(config) + "\n")
        process.stdin.flush()  # stdin stays open: its end of file tells the server we are gone
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(process.stdout.readline()),  # type: ignore[union-attr]
                                  name="onthefly-server-start", daemon=True)
        reader.start()
        reader.join(STARTUP_TIMEOUT)
        try:
            reply = json.loads(answer[0]) if answer and answer[0].strip() else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or "port" not in reply:
            self.stop()
            if isinstance(reply, dict) and "error" in reply:
                raise ConfigError(str(reply["error"]))
            raise RuntimeError("the dashboard server process did not start; see the messages above")
        self.port = int(reply["port"])
        if announce:
            self.announce()
        return self.url

    def announce(self) -> None:
        print(f"On The Fly dashboard: {self.url}", file=sys.stderr, flush=True)
        if os.environ.get("ONTHEFLY_HANDSHAKE") == "json":
            line = json.dumps({"onthefly": {"url": self.url, "token": self.token, "pid": os.getpid()}})
            print(line, flush=True)

    def stop(self, drain_timeout: float = 3.0) -> None:
        """Stop serving (idempotent): the pages are sent the last events (the run's final
        status), for at most ``drain_timeout`` seconds, then the server process ends."""
        if self._stopped:
            return
        self._stopped = True
        self.channel.close(drain_timeout)
        process = self._process
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(10)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second Ctrl-C: stop now, quietly
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()


def serve_from_stdin() -> int:
    """The server process: read the configuration line, serve until told to end."""
    from ..store import duck
    from .link import ChannelLink, LinkError
    from .runner import DashboardServer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process; it ends us
    if hasattr(os, "nice"):
        try:
            os.nice(NICENESS)
        except OSError:
            pass
    duck.THREADS = SERVER_DUCKDB_THREADS
    config = json.loads(sys.stdin.readline())
    events = EventLog()
    link = ChannelLink(config["channel"]["port"], config["channel"]["token"], events)
    link.ready.wait(STARTUP_TIMEOUT)  # serve nothing before the runs' live state is here
    server = DashboardServer(Path(config["session_dir"]), project=config["project"],
                             session_id=config["session_id"], port=int(config["port"]), host=config["host"],
                             token=config["token"], link=link, events=events)
    try:
        server.start()
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        link.close()
        return 1
    print(json.dumps({"port": server.port}), flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nobody reads our stdout any more

    end = threading.Event()
    link.on_closing = end.set
    if link.closing.is_set():
        end.set()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at end of file: the training process closed it, or is gone
        end.set()

    threading.Thread(target=watch_stdin, name="onthefly-stdin", daemon=True).start()
    end.wait()
    if link.closing.is_set():
        # The pages get the last events (the run's final status) before we go.
        server.stop(drain_timeout=3.0, until_seq=link.closing_seq)
        try:
            link.send({"op": "drained"})
        except LinkError:
            pass  # the training process is already gone: nobody waits for this
    else:
        server.stop(drain_timeout=0.0)
    link.close()
    return 0
