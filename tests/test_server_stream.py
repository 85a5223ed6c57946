"""The WebSocket feed: every event once, in sequence order, coalesced to at most ~10 messages a
second; a client that reconnects with the last sequence number it saw misses nothing; a late
client gets the whole history, older events read back from the store."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from live_server import DEADLINE, LiveSession, live, make_trainer, read_events
from onthefly.engine.events import Event, EventLog

WINDOW = 2.0  # seconds of training during which stream messages are counted
MAX_MESSAGES_PER_SECOND = 12  # the server sends at most 10; a little slack for scheduling


@pytest.fixture
def training() -> Iterator[LiveSession]:
    """A run training for far longer than any test waits; finish() stops it."""
    for session in live(make_trainer(), 10_000):
        session.bus.wait_for(lambda e: e.kind == "progress", "training progress")
        yield session


def as_json(event: Event) -> dict[str, Any]:
    """A bus event as the server sends it: JSON, where a NaN or infinity is null."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return {k: finite(v) for k, v in value.items()} if isinstance(value, dict) else value

    return json.loads(json.dumps(finite({"seq": event.seq, "kind": event.kind, "run_id": event.run_id,
                                         "step": event.step, "epoch": event.epoch, "time": event.time,
                                         "payload": dict(event.payload)}), default=str))


def assert_consecutive(events: list[dict[str, Any]], first: int) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(first, first + len(seqs))), seqs


def assert_same_as_published(events: list[dict[str, Any]], session: LiveSession) -> None:
    """Each received event is the one the bus published with that number (run_created, published
    before anyone subscribed, is checked by kind)."""
    published = {e.seq: e for e in session.bus.snapshot()}
    for event in events:
        if event["seq"] in published:
            assert event == as_json(published[event["seq"]])
        else:
            assert event["seq"] == 1 and event["kind"] == "run_created"


def test_the_stream_sends_every_event_in_order_at_most_ten_messages_a_second(training: LiveSession) -> None:
    # Training alone may publish only a few events a second on a busy machine; a second publisher
    # on the same bus makes far more events than the stream may send messages, so they must coalesce.
    quiet = threading.Event()

    def chatter() -> None:
        while not quiet.wait(0.002):
            training.run.bus.publish("note", {"from": "test"}, run_id=1, persist=False)

    messages: list[dict[str, Any]] = []
    publisher = threading.Thread(target=chatter, daemon=True)
    with training.stream(after_seq=0) as ws:
        publisher.start()
        start = time.monotonic()
        try:
            while time.monotonic() - start < WINDOW:
                messages.append(json.loads(ws.recv(timeout=DEADLINE)))
        finally:
            elapsed = time.monotonic() - start
            quiet.set()
            publisher.join(DEADLINE)
    events = [e for m in messages for e in m["events"]]
    assert all(m["events"] for m in messages)  # no empty messages
    assert_consecutive(events, 1)
    assert_same_as_published(events, training)
    # The bound means something only if there were more events than it allows messages.
    assert len(events) > 2 * MAX_MESSAGES_PER_SECOND * elapsed, (len(events), elapsed)
    assert len(messages) <= MAX_MESSAGES_PER_SECOND * elapsed, (len(messages), elapsed)
    kinds = {e["kind"] for e in events}
    assert {"run_created", "status", "epoch_started", "progress", "note"} <= kinds


def test_a_client_that_reconnects_after_its_last_seq_gets_every_event_once(training: LiveSession) -> None:
    with training.stream(after_seq=0) as ws:
        before = read_events(ws, until_seq=training.bus.snapshot()[-1].seq)
    last_seen = before[-1]["seq"]
    # While nobody listens, the run goes on and commands add events.
    ids = [training.accepted("set_lr", lr=lr) for lr in (0.09, 0.08, 0.07)]
    for command_id in ids:
        training.applied(command_id)
    done = training.bus.wait_for(lambda e: e.kind == "epoch_summary", "an epoch ending while disconnected",
                                 after_seq=last_seen)
    assert done.seq > last_seen
    with training.stream(after_seq=last_seen) as ws:
        after = read_events(ws, until_seq=training.bus.snapshot()[-1].seq)
        training.accepted("stop")
        training.join()  # the run is closed: run_finished is its last event
        final = training.bus.snapshot()[-1]
        assert final.kind == "run_finished"
        after += read_events(ws, until_seq=final.seq) if after[-1]["seq"] < final.seq else []
    assert after[0]["seq"] == last_seen + 1
    everything = before + after
    assert_consecutive(everything, 1)  # no duplicates, nothing missing
    assert everything[-1]["seq"] == final.seq
    assert_same_as_published(everything, training)
    applied = [e["payload"]["id"] for e in after if e["kind"] == "command_applied"]
    assert applied[:3] == ids


@pytest.fixture
def small_log() -> Iterator[LiveSession]:
    """A run whose server keeps only the last 5 events in memory; it trains one epoch, applies a
    few commands and stops, so its whole history is known."""
    for session in live(make_trainer(wait_for_run=True), 1, events=EventLog(capacity=5)):
        session.bus.wait_for(lambda e: e.kind == "waiting", "the run waiting for 'run'")
        session.accepted("run")
        session.status_event("idle")
        for lr in (0.05, 0.04, 0.03):
            session.applied(session.accepted("set_lr", lr=lr))
        session.accepted("stop")
        session.join()  # closed: everything written to the store
        session.synced(session.bus.snapshot()[-1])  # and pushed to the server
        yield session


@pytest.mark.parametrize("after_seq", [0, 1, 4, "last-7", "last-2"])
def test_a_late_client_gets_the_history_that_left_the_memory_log_from_the_store(
    small_log: LiveSession, after_seq: int | str,
) -> None:
    published = small_log.bus.snapshot()
    last = published[-1].seq
    in_memory, oldest = small_log.server.backend.events.after(0, 100)
    assert len(in_memory) == 5 and oldest == last - 4  # most of the history is only in the store
    start = last - int(after_seq.split("-")[1]) if isinstance(after_seq, str) else after_seq
    # The store keeps every event but the high-rate progress updates (their data is in the metrics).
    kept = {e.seq for e in published if e.persist} | {1} | {e["seq"] for e in in_memory}
    expected = [seq for seq in sorted(kept) if seq > start]
    with small_log.stream(after_seq=start) as ws:
        received = read_events(ws, until_seq=last)
    assert [e["seq"] for e in received] == expected
    assert received[-1]["kind"] == "run_finished"
    assert_same_as_published(received, small_log)
    if start == 0:
        assert received[0]["kind"] == "run_created"
        lrs = [e["payload"]["args"]["lr"] for e in received
               if e["kind"] == "command_applied" and e["payload"]["command"] == "set_lr"]
        assert lrs == [0.05, 0.04, 0.03]
