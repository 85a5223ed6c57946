"""The server process's end of the channel to the training process (see
:mod:`onthefly.engine.channel`): the live runs' state and event feed as they arrive, and requests
(commands, the live-loss sample, slice records) answered by the training process.

A reader thread (``onthefly-link``) receives everything; any server thread may send a request
and wait for its reply.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..engine.channel import read_lines, send_line
from ..engine.events import EventLog

__all__ = ["ChannelLink", "LinkError"]

REQUEST_TIMEOUT = 30.0


class LinkError(Exception):
    """A request the training process refused (``status`` is the HTTP status to answer with)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChannelLink:
    def __init__(self, port: int, token: str, events: EventLog) -> None:
        self.events = events
        self.states: dict[int, dict[str, Any]] = {}  # run id -> live state, as last pushed
        self.ready = threading.Event()  # the runs' state has arrived once
        self.closing = threading.Event()  # the training process is ending (or gone)
        self.closing_seq = 0  # the last event it sent
        self.feed_start: int | None = None  # the first event the feed carries (older: the store)
        self.on_closing: Callable[[], None] = lambda: None
        self.on_events: Callable[[list[dict[str, Any]]], None] = lambda events: None  # on the link's thread
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._waiting_lock = threading.Lock()
        send_line(self._sock, {"token": token})
        self._thread = threading.Thread(target=self._read, name="onthefly-link", daemon=True)
        self._thread.start()

    @property
    def live(self) -> bool:
        return not self.closing.is_set()

    def request(self, op: str, timeout: float = REQUEST_TIMEOUT, **fields: Any) -> Any:
        """Send a request and wait for its reply; raises LinkError when refused or unanswered."""
        if self.closing.is_set():
            raise LinkError(409, "the training process has ended: this session takes no commands")
        request_id = next(self._ids)
        done: tuple[threading.Event, list[dict[str, Any]]] = (threading.Event(), [])
        with self._waiting_lock:
            self._waiting[request_id] = done
        try:
            self.send({"id": request_id, "op": op, **fields})
            if not done[0].wait(timeout):
                raise LinkError(503, f"the training process did not answer within {timeout:g} s")
        finally:
            with self._waiting_lock:
                self._waiting.pop(request_id, None)
        if not done[1]:
            raise LinkError(409, "the training process has ended: this session takes no commands")
        reply = done[1][0]
        if "error" in reply:
            raise LinkError(int(reply.get("status") or 500), str(reply["error"]))
        return reply.get("result")

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            try:
                send_line(self._sock, message)
            except OSError as exc:
                raise LinkError(409, "the training process has ended: this session takes no commands") from exc

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _read(self) -> None:
        buffer = bytearray()
        try:
            while True:
                data = self._sock.recv(1 << 20)
                if not data:
                    break
                for message in read_lines(buffer, data):
                    self._receive(message)
        except (OSError, ValueError):
            pass
        finally:
            self._ended()

    def _receive(self, message: dict[str, Any]) -> None:
        if "events" in message:
            for event in message["events"]:
                self.events.append(event)
            self.on_events(message["events"])
        elif "runs" in message:
            self.states = {int(k): v for k, v in message["runs"].items()}
            self.ready.set()
        elif "reply" in message:
            with self._waiting_lock:
                waiter = self._waiting.get(message["reply"])
            if waiter is not None:
                waiter[1].append(message)
                waiter[0].set()
        elif "feed_start" in message:
            self.feed_start = int(message["feed_start"])
        elif "closing" in message:
            self.closing_seq = int(message["closing"])
            self._ended()

    def _ended(self) -> None:
        if self.closing.is_set():
            return
        self.states = {k: {**v, "live": False, "commands": []} for k, v in self.states.items()}
        self.closing.set()
        self.ready.set()
        with self._waiting_lock:
            waiting = list(self._waiting.values())
        for event, _ in waiting:
            event.set()  # no reply will come
        self.on_closing()
