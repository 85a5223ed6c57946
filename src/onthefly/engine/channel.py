"""The training process's end of the dashboard channel.

The dashboard server runs in its own process (watching must not cost training the GIL or a
core). It reaches this process's runs through one authenticated loopback socket: it sends
commands and asks for the live-loss sample of the epoch in progress; this end pushes the event
feed and each run's live state (status, step, the commands possible now) at most ten times a
second. Nothing else on the machine can send a command: the first line a client sends must
be the channel's token.

Runs on its own threads (``onthefly-channel``, one more per connection), never the training thread. It touches no tensor:
it reads the runs' state properties, queues commands (thread-safe), copies the reservoir (behind
its lock) and asks the session's store to record a slice the server resolved.

Protocol: newline-delimited JSON. Server → here: ``{"token": ...}`` once, then requests
``{"id": n, "op": ..., ...}``. Here → server: ``{"reply": n, "result": ...}`` or
``{"reply": n, "error": message, "status": http_status}``; ``{"events": [...]}``;
``{"runs": {id: state}}``; ``{"feed_start": seq}`` first (older events are in the store only);
``{"closing": last_seq}`` when the process is about to end (the server
answers ``{"op": "drained"}`` once its pages have been sent everything).
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import socket
import threading
import time
from typing import Any

import numpy as np

from ..errors import OnTheFlyError
from .events import EventLog

__all__ = ["PUSH_INTERVAL", "STORE_OPS", "RunChannel", "decode_array", "encode_array", "read_lines", "send_line",
           "store_request"]

PUSH_INTERVAL = 0.1  # seconds between pushes of events and state: at most 10 a second
EVENTS_PER_PUSH = 2000
AUTH_TIMEOUT = 5.0


def encode_array(values: np.ndarray) -> dict[str, Any]:
    values = np.ascontiguousarray(values)
    return {"dtype": values.dtype.str, "data": base64.b64encode(values.tobytes()).decode("ascii")}


def decode_array(encoded: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded["data"]), dtype=np.dtype(encoded["dtype"]))


def _default(value: Any) -> Any:
    """JSON for the values payloads hold besides plain ones (NumPy scalars and arrays)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, default=_default).encode() + b"\n")


def read_lines(buffer: bytearray, data: bytes) -> list[dict[str, Any]]:
    """Add ``data`` to ``buffer``; return the complete messages it now holds (removed from it)."""
    buffer.extend(data)
    messages = []
    while (end := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if line.strip():
            messages.append(json.loads(line))
    return messages


class RunChannel:
    """This process's runs, served to one dashboard server process at a time."""

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(32)
        self.runs: dict[int, Any] = {}  # run id -> engine Run
        self.events = EventLog()
        self.clients = 0  # pages connected to the server (it reports changes)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._drained = threading.Event()
        self._conversations = 0  # authenticated connections (the dashboard server: one)
        self._count_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="onthefly-channel", daemon=True)

    def add_run(self, run: Any) -> None:
        self.runs[run.run_id] = run
        run.bus.subscribe(self.events)

    def start(self) -> None:
        self._thread.start()

    def close(self, drain_timeout: float = 3.0) -> None:
        """Send the last events, let the server deliver them to its pages (at most
        ``drain_timeout`` seconds), then stop serving (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._drained.wait(drain_timeout)
        self._thread.join(drain_timeout + 2)
        self._listener.close()

    # ---- the channel thread --------------------------------------------------------------
    def _serve(self) -> None:
        """Accept connections; each converses on a thread of its own (a client that never sends
        its token holds up nobody)."""
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._connection, args=(conn,), name="onthefly-channel-conn",
                             daemon=True).start()
        with self._count_lock:
            if self._conversations == 0:
                self._drained.set()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            if not self._authenticated(conn):
                return
            with self._count_lock:
                self._conversations += 1
            try:
                self._converse(conn)
            finally:
                with self._count_lock:
                    self._conversations -= 1
                    if self._closing.is_set() and self._conversations == 0:
                        self._drained.set()

    def _authenticated(self, conn: socket.socket) -> bool:
        conn.settimeout(AUTH_TIMEOUT)
        buffer = bytearray()
        try:
            while b"\n" not in buffer and len(buffer) < 4096:
                data = conn.recv(4096)
                if not data:
                    return False
                buffer.extend(data)
            first = json.loads(bytes(buffer[: buffer.find(b"\n")]))
        except (OSError, ValueError):
            return False
        token = first.get("token") if isinstance(first, dict) else None
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.token.encode())

    def _converse(self, conn: socket.socket) -> None:
        conn.settimeout(PUSH_INTERVAL)
        # Where the feed begins: older events are only in the session's store.
        _, oldest = self.events.after(0, 1)
        send_line(conn, {"feed_start": oldest if oldest is not None else self.events.last_seq + 1})
        buffer = bytearray()
        sent_seq = 0
        sent_states: dict[int, dict[str, Any]] = {}
        closing_sent = False
        next_push = 0.0
        while True:
            try:
                data = conn.recv(65536)
                if not data:
                    return  # the server went away; another may connect
                for message in read_lines(buffer, data):
                    if message.get("op") == "drained":
                        return  # the connection's end counts it as drained
                    send_line(conn, self._answer(message))
            except TimeoutError:
                pass
            except (OSError, ValueError):
                return
            now = time.monotonic()
            if now < next_push and not self._closing.is_set():
                continue
            next_push = now + PUSH_INTERVAL
            try:
                # The events first, then the state read after them, sent before them: a page that
                # has an event finds the run's state at least as recent.
                events, _ = self.events.after(sent_seq, EVENTS_PER_PUSH)
                states = {run_id: _state(run) for run_id, run in list(self.runs.items())}
                if states != sent_states:
                    send_line(conn, {"runs": states})
                    sent_states = states
                if events:
                    send_line(conn, {"events": events})
                    sent_seq = events[-1]["seq"]
                if self._closing.is_set() and not closing_sent and sent_seq >= self.events.last_seq:
                    send_line(conn, {"closing": sent_seq})
                    closing_sent = True
            except OSError:
                return

    def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        request_id = message.get("id")
        try:
            return {"reply": request_id, "result": self._handle(message)}
        except OnTheFlyError as exc:
            return {"reply": request_id, "error": str(exc), "status": exc.http_status}
        except _Refused as exc:
            return {"reply": request_id, "error": exc.message, "status": exc.status}
        except Exception as exc:  # a bug here must not end the channel (or training)
            return {"reply": request_id, "error": f"{type(exc).__name__}: {exc}", "status": 500}

    def _run(self, message: dict[str, Any]) -> Any:
        run = self.runs.get(message.get("run_id"))  # type: ignore[arg-type]
        if run is None:
            raise _Refused(409, f"run {message.get('run_id')} is not live in this process: it takes no commands")
        return run

    def _session(self) -> Any:
        """The session's store (one for every run of this process): the session's one writer."""
        for run in list(self.runs.values()):
            return run.session
        raise _Refused(409, "no run of this process is live")

    def _handle(self, message: dict[str, Any]) -> Any:
        op = message.get("op")
        if op == "clients":
            self.clients = int(message.get("count", 0))
            return None
        if op == "command":
            run = self._run(message)
            kind, args = message["kind"], dict(message.get("args") or {})
            possible = run.possible_commands()
            if kind not in possible:
                raise _Refused(409, f"cannot {kind} while the run is {run.status}; "
                                    f"possible now: {', '.join(possible) or 'nothing'}")
            queued = run.request(kind, **args)
            return {"id": queued.id, "kind": queued.kind, "args": queued.args}
        if op == "live_losses":
            live = self._run(message).live_losses()
            if live is None:
                return None
            epoch, reservoir = live
            seen = reservoir.seen  # read before the values: the sample is at least this recent
            return {"epoch": epoch, "seen": seen, "values": encode_array(reservoir.values())}
        if op in STORE_OPS:
            return store_request(self._session(), message)
        raise _Refused(400, f"unknown channel request {op!r}")


# What the server asks of the session's one writer: the training process's store through the
# channel, or, with no training process (``onthefly open``), the serving process's own.
STORE_OPS = frozenset({"save_slice", "delete_slice", "save_plan", "update_plan", "flush"})


def store_request(session: Any, message: dict[str, Any]) -> Any:
    op = message["op"]
    if op == "save_slice":
        record: dict[str, Any] = session.save_slice(
            name=message["name"], run_id=int(message["slice_run"]), epoch=message.get("epoch"),
            split=message["split"], definition=message["definition"], indices=decode_array(message["indices"]))
        return record
    if op == "delete_slice":
        session.delete_slice(int(message["slice_id"]), str(message["path"]))
        return None
    if op == "save_plan":
        return session.save_plan(kind=str(message["kind"]), card=message["card"], source=str(message["source"]))
    if op == "update_plan":
        fields = {k: message[k] for k in ("status", "card", "result", "error", "runs") if k in message}
        session.update_plan(int(message["plan_id"]), **fields)
        return None
    assert op == "flush"
    session.flush()
    return None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _state(run: Any) -> dict[str, Any]:
    """What a page shows of a live run (read from the run's thread-safe properties)."""
    latest = run.latest
    return {"id": run.run_id, "name": run.name, "status": run.status, "live": not run.closed,
            "step": run.global_step, "epoch": run.epoch, "target_epochs": run.target_epochs,
            "batches_per_epoch": run.batches_per_epoch,
            "samples_per_second": latest.get("samples_per_second"), "loss": latest.get("loss"),
            "lr": latest.get("lr"), "commands": run.possible_commands()}
