"""The live event feed: a bounded in-memory log of the bus's events, read by sequence number.

Every event (including high-rate ``progress`` updates the store does not keep) enters the log in
sequence order. A client asks for everything after the last sequence number it saw; what has
fallen out of the log is read back from the session's database.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import deque
from typing import Any

from ..engine.events import Event

__all__ = ["EventLog", "event_dict"]


def event_dict(event: Event) -> dict[str, Any]:
    return {"seq": event.seq, "kind": event.kind, "run_id": event.run_id, "step": event.step,
            "epoch": event.epoch, "time": event.time, "payload": dict(event.payload)}


class EventLog:
    def __init__(self, capacity: int = 100_000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seqs: deque[int] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:  # an EventBus subscriber
        with self._lock:
            self._events.append(event_dict(event))
            self._seqs.append(event.seq)

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
