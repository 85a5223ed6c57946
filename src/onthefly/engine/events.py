"""The event bus: how the engine tells the store, the progress display and (later) the server
what happened. Every event gets a session-wide sequence number so a client that reconnects can
ask for exactly what it missed."""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "EventBus", "EventLog", "Subscriber", "event_dict"]


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    run_id: int | None
    step: int | None
    epoch: int | None
    time: float
    payload: Mapping[str, Any] = field(default_factory=dict)
    persist: bool = True  # False for high-rate live updates (their data is in the metrics table)


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out. Subscribers must return quickly (hand work to their own thread).

    ``seq_source`` numbers the events (the session's counter, shared by all its runs)."""

    def __init__(self, seq_source: Callable[[], int] | None = None) -> None:
        self._subscribers: list[Subscriber] = []
        # Re-entrant: a subscriber may publish (the store reporting an overflow).
        self._lock = threading.RLock()
        self._seq = 0
        self._seq_source = seq_source

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers = [*self._subscribers, subscriber]

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [s for s in self._subscribers if s is not subscriber]

        return unsubscribe

    def publish(
        self, kind: str, payload: Mapping[str, Any] | None = None, *, run_id: int | None = None,
        step: int | None = None, epoch: int | None = None, persist: bool = True,
    ) -> Event:
        with self._lock:
            if self._seq_source is not None:
                seq = self._seq_source()
            else:
                self._seq += 1
                seq = self._seq
            event = Event(seq, kind, run_id, step, epoch, time.time(), dict(payload or {}), persist)
            # Delivered under the lock, so every subscriber sees events in sequence order.
            for subscriber in self._subscribers:
                subscriber(event)
        return event


def event_dict(event: Event) -> dict[str, Any]:
    return {"seq": event.seq, "kind": event.kind, "run_id": event.run_id, "step": event.step,
            "epoch": event.epoch, "time": event.time, "payload": dict(event.payload)}


class EventLog:
    """A bounded in-memory log of events (as dicts), read by sequence number: the live feed.

    Every event (including high-rate ``progress`` updates the store does not keep) enters it in
    sequence order; a reader asks for everything after the last sequence number it saw, and what
    has fallen out of the log is read back from the session's database. Thread-safe. As a bus
    subscriber (``bus.subscribe(log)``) it costs the publishing thread one dict and an append."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seqs: deque[int] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:  # an EventBus subscriber
        self.append(event_dict(event))

    def append(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self._seqs and event["seq"] <= self._seqs[-1]:
                return  # already held (a feed re-sent after a reconnect)
            self._events.append(event)
            self._seqs.append(event["seq"])

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seqs[-1] if self._seqs else 0

    def after(self, seq: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        """Events with a sequence number above ``seq`` (at most ``limit``), and the oldest sequence
        number still held (None when empty): anything between ``seq`` and it must come from the store."""
        with self._lock:
            if not self._seqs:
                return [], None
            start = bisect.bisect_right(self._seqs, seq)
            return list(itertools.islice(self._events, start, start + limit)), self._seqs[0]
