"""Overflow on the way to disk: the store writer's queue (a slow disk) and the recorder's transfer
queue (a slow host side). Records are dropped and counted there, never the markers readers rely
on, and the caller never waits."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.engine import run as run_module
from onthefly.engine.transfer import TransferSink
from onthefly.signals import recorder as recorder_module
from onthefly.signals.recorder import HostPacket, SampleRecorder
from onthefly.store import SampleChunk, SessionStore, open_session
from onthefly.store import writer as writer_module
from test_custom_loop import train_step

DEADLINE = 60.0
ROWS = 4  # rows per sample chunk
METRIC = "INSERT INTO metrics (run_id, name, step, epoch, time, value) VALUES (?,?,?,?,?,?)"

Park = Callable[[], threading.Event]


@pytest.fixture
def queue_size() -> int:
    """The store writer's bound on droppable records, small (a test may parametrize it)."""
    return 4


@pytest.fixture
def store(queue_size: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[SessionStore]:
    monkeypatch.setattr(writer_module, "QUEUE_SIZE", queue_size)  # before the writer starts
    store = SessionStore("overflow")
    yield store
    store.close()


@pytest.fixture
def park(store: SessionStore, block: Callable[[Any], threading.Event]) -> Park:
    """Hold this store's writer thread (conftest's ``block``) until the returned event is set."""
    return lambda: block(store._writer)


def chunk(run_id: int, epoch: int, number: int) -> SampleChunk:
    """Rows number*ROWS .. number*ROWS + ROWS - 1 of an epoch, recorded at step ``number``."""
    index = np.arange(number * ROWS, (number + 1) * ROWS, dtype=np.int64)
    return SampleChunk(run_id, "train", epoch, step=np.full(ROWS, number, dtype=np.int64), index=index,
                       loss=np.ones(ROWS, dtype=np.float32), margin=np.zeros(ROWS, dtype=np.float32),
                       pred=np.zeros(ROWS, dtype=np.int64), label=np.zeros(ROWS, dtype=np.int64))


def without_waiting(hand_over: Callable[[], None]) -> None:
    """Run ``hand_over`` on another thread and require it to return while the writer is held:
    a call that waited for room would still be waiting."""
    thread = threading.Thread(target=hand_over)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "handing records over waited for the (held) writer"


def rows_of(store: SessionStore, sql: str) -> list[tuple]:
    conn = sqlite3.connect(store.db_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# ---- the store writer's queue (a slow disk) -----------------------------------------------------
def test_store_overflow_drops_sample_chunks_but_never_the_epoch_close_marker(
    store: SessionStore, park: Park, queue_size: int,
) -> None:
    run_id = store.new_run("r")
    release = park()

    def hand_over() -> None:
        for number in range(queue_size + 2):  # queue_size fit, 2 are dropped
            store.samples(chunk(run_id, 0, number))
        store.close_epoch(run_id, "train", 0)  # on a full queue

    without_waiting(hand_over)
    release.set()
    assert store.flush(DEADLINE)

    # The marker was applied while the session still runs (before it, the epoch's rows wait in
    # memory for more), after every chunk of the epoch that was accepted before it.
    reader = open_session(store.dir)
    table = reader.samples(run_id, epoch=0)
    assert sorted(table.column("index").to_pylist()) == list(range(queue_size * ROWS))
    assert rows_of(store, "SELECT run_id, epoch, split, rows FROM sample_files") == [
        (run_id, 0, "train", queue_size * ROWS)]

    store.metrics([(run_id, "loss", 1, 0, 0.0, 0.0)])  # room again: the drop is reported
    assert store.flush(DEADLINE)
    overflow = reader.events(kind="store_overflow")
    assert [e["payload"]["dropped_records"] for e in overflow] == [2]
    assert store.write_error is None


def test_essential_records_are_queued_in_order_without_waiting_on_a_full_queue(
    store: SessionStore, park: Park, queue_size: int,
) -> None:
    writer = store._writer
    ran = threading.Event()

    def task() -> list:
        ran.set()
        return []

    release = park()

    def hand_over() -> None:
        for step in range(queue_size + 1):  # queue_size fit, 1 is dropped
            writer.sql(METRIC, [(1, "loss", step, 0, 0.0, 0.0)])
        writer.sql(METRIC, [(1, "final", 99, 0, 0.0, 0.0)], block=True)
        writer.task(task, wait=False)

    without_waiting(hand_over)
    assert not ran.is_set()  # queued behind the held writer, not run out of turn
    release.set()
    assert store.flush(DEADLINE)
    assert ran.is_set()
    steps = [step for (step,) in rows_of(store, "SELECT step FROM metrics ORDER BY rowid")]
    assert steps == [*range(queue_size), 99]
    assert writer.dropped == 1  # not reported yet: no droppable record found room since


@pytest.mark.parametrize("queue_size", [1])
def test_overflow_report_is_kept_when_the_queue_is_full_again(store: SessionStore, park: Park) -> None:
    def tick() -> None:
        seq = store.next_seq()
        store.event(seq, None, seq, 0, "tick", {}, 0.0)

    release = park()
    store.metrics([(1, "loss", 1, 0, 0.0, 0.0)])  # takes the one place
    store.metrics([(1, "loss", 2, 0, 0.0, 0.0)])  # dropped
    store.metrics([(1, "loss", 3, 0, 0.0, 0.0)])  # dropped
    release.set()
    assert store.flush(DEADLINE)

    release = park()
    store.metrics([(1, "loss", 4, 0, 0.0, 0.0)])  # the one place again: full, the report waits
    release.set()
    assert store.flush(DEADLINE)
    tick()  # room again: the report goes out with it (events are never dropped)
    assert store.flush(DEADLINE)

    events = open_session(store.dir).events()
    assert sorted(e["kind"] for e in events) == ["store_overflow", "tick"]  # reported once, kept
    assert [e["payload"]["dropped_records"] for e in events if e["kind"] == "store_overflow"] == [2]
    assert [row["step"] for row in open_session(store.dir).metrics(1, "loss")] == [1, 4]


# ---- the recorder's transfer queue (a slow host side) -------------------------------------------
class HeldConsumer:
    """A transfer-thread consumer that holds its first packet until ``release`` is set."""

    def __init__(self) -> None:
        self.packets: list[HostPacket] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, packet: HostPacket) -> None:
        if not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(DEADLINE)
        self.packets.append(packet)


def test_full_transfer_queue_drops_packets_but_never_the_epochs_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "TRANSFER_QUEUE", 2)
    consumer = HeldConsumer()
    recorder = SampleRecorder(torch.device("cpu"), consumer)
    recorder.begin_epoch(1, "train", 0)

    def record_and_flush(step: int) -> None:
        recorder.record(step, [step], torch.tensor([float(step)]), torch.tensor(float(step)), 0.1)
        recorder.flush()

    record_and_flush(1)
    assert consumer.holding.wait(DEADLINE)  # packet 1 is on the transfer thread, held
    for step in range(2, 2 + 2 + 3):  # steps 2 and 3 fill the queue, 4..6 are dropped
        record_and_flush(step)
    assert recorder.dropped_packets == 3
    # The epoch's last packet is never dropped: it waits for room (the training thread calls
    # this; here another thread does, so that the consumer can be let go).
    recorder.record(7, [7], torch.tensor([7.0]), torch.tensor(7.0), 0.1)
    closer = threading.Thread(target=recorder.end_epoch)
    closer.start()
    consumer.release.set()
    closer.join(DEADLINE)
    assert not closer.is_alive()
    recorder.close()

    assert recorder.error is None
    assert [p.steps.tolist() for p in consumer.packets] == [[1], [2], [3], [7]]
    assert [p.closes_epoch for p in consumer.packets] == [False, False, False, True]
    assert recorder.dropped_packets == 3


def test_dropped_transfer_packets_are_published_as_samples_dropped_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recorder_module, "TRANSFER_QUEUE", 2)
    monkeypatch.setattr(run_module, "FLUSH_SECONDS", -1.0)  # flush (and check health) every step
    holding, release = threading.Event(), threading.Event()
    on_packet = TransferSink.__call__

    def held_on_packet(self: TransferSink, packet: HostPacket) -> None:  # on the transfer thread
        if not holding.is_set():
            holding.set()
            assert release.wait(DEADLINE)
        on_packet(self, packet)

    monkeypatch.setattr(TransferSink, "__call__", held_on_packet)
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = DataLoader(toy_data(256), batch_size=32)  # 8 steps
    run = onthefly.start_run(project="overflow", run_name="r", model=model, optimizer=opt, dashboard=False)
    with run:
        for _ in run.epochs(1):
            for batch in run.batches(train):
                train_step(run, model, opt, batch)
                if run.global_step == 1:
                    assert holding.wait(DEADLINE)  # step 1's packet is held; 2, 3 fill the queue
                if run.global_step == 7:  # steps 4..7 were dropped
                    release.set()
                    run.recorder.wait_idle()  # step 8's packet and the epoch's last find room

    assert run.status == "finished"
    assert run.recorder.dropped_packets == 4
    reader = open_session(run.session.dir)
    dropped = reader.events(run.run_id, kind="samples_dropped")
    assert sum(e["payload"]["packets"] for e in dropped) == 4
    # Only the dropped steps' rows are missing, and the epoch still completed.
    steps = set(reader.samples(run.run_id, epoch=0).column("step").to_pylist())
    assert steps == {1, 2, 3, 8}
    assert reader.complete_epochs(run.run_id) == [0]
