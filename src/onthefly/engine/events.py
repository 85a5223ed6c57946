"""The event bus: how the engine tells the store, the progress display and (later) the server
what happened. Every event gets a session-wide sequence number so a client that reconnects can
ask for exactly what it missed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "EventBus", "Subscriber"]


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
