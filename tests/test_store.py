"""The session store: folder layout and file formats, the writer thread, checkpoints, the
ephemeral clean-up of dead sessions, and what is left after a crash or a failure."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import PYTHON, toy_data, toy_model
from onthefly import Callback, Run
from onthefly.errors import StoreError
from onthefly.store import (
    SessionStore,
    is_alive,
    list_sessions,
    open_session,
    read_checkpoint,
    write_checkpoint,
)
from onthefly.store import writer as writer_module
from onthefly.store.db import connect, create_schema
from onthefly.store.writer import BATCH_RECORDS, StoreWriter

DEADLINE = 60.0
TABLES = {"session", "runs", "events", "metrics", "checkpoints", "sample_files"}


def train(epochs: int = 2, callbacks: tuple[Callback, ...] = ()) -> onthefly.FitSummary:
    model = toy_model()
    return onthefly.quickstart(
        project="store", run_name="r", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True),
        max_epochs=epochs, callbacks=callbacks, progress=False,
    )


class CheckpointAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step
        self.folder: Path | None = None

    def on_step_end(self, run: Run) -> None:
        if run.global_step == self.step:
            self.folder = run.save_checkpoint()


# ---- folder layout and formats -------------------------------------------------------------
def test_session_folder_layout_and_formats(onthefly_home: Path) -> None:
    checkpoint = CheckpointAt(5)
    summary = train(2, callbacks=(checkpoint,))
    folder = summary.session_dir

    assert folder.parent == onthefly_home / "sessions"
    db = folder / "session.sqlite"
    assert db.is_file()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        sample_files = conn.execute("SELECT epoch, split, path, rows FROM sample_files ORDER BY epoch").fetchall()
    finally:
        conn.close()
    assert tables >= TABLES

    # Per-sample tables: one row per sample per epoch, readable by pyarrow and by DuckDB.
    files = sorted((folder / "samples").rglob("*.parquet"))
    assert files
    assert sum(pq.read_table(f).num_rows for f in files) == 256 * 2
    assert [(e, s, r) for e, s, _, r in sample_files] == [(0, "train", 256), (1, "train", 256)]
    assert {folder / p for *_, p, _ in sample_files} == set(files)
    pattern = f"{folder}/samples/**/*.parquet"
    assert duckdb.sql(f"select count(*) from read_parquet('{pattern}')").fetchall() == [(512,)]
    per_epoch = duckdb.sql(
        f"select epoch, count(*), count(distinct index), min(index), max(index) "
        f"from read_parquet('{pattern}') group by epoch order by epoch"
    ).fetchall()
    assert per_epoch == [(0, 256, 256, 0, 255), (1, 256, 256, 0, 255)]

    # Checkpoints: weights in safetensors, the rest in a tensors-only file; the final model is
    # always saved when the run ends.
    row, final = open_session(folder).checkpoints()
    assert (final["reason"], final["step"]) == ("final", summary.steps)
    assert Path(row["path"]) == checkpoint.folder
    assert row["path"].startswith(str(folder / "checkpoints"))
    assert row["step"] == 5
    weights = load_file(str(Path(row["path"]) / "model.safetensors"))
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert weights["0.weight"].shape == (32, 20)
    state = torch.load(Path(row["path"]) / "state.pt", weights_only=True)
    assert state["progress"]["global_step"] == 5
    assert set(state["optimizer"]) == {"state", "param_groups"}


# ---- the writer thread ---------------------------------------------------------------------
@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "session.sqlite"
    conn = connect(path)
    create_schema(conn)
    conn.close()
    return path


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def make_writer(db: Path) -> Iterator[Callable[[], StoreWriter]]:
    """Writers on the test database, closed at teardown (after ``block`` has let them go)."""
    writers: list[StoreWriter] = []

    def make() -> StoreWriter:
        writers.append(StoreWriter(db.parent, db))
        return writers[-1]

    yield make
    for writer in writers:
        writer.close()


METRIC = "INSERT INTO metrics (run_id, name, step, epoch, time, value) VALUES (?,?,?,?,?,?)"


def test_writer_batches_many_records_into_few_transactions(
    db: Path, make_writer: Callable[[], StoreWriter], block: Callable[[StoreWriter], threading.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches: list[int] = []
    original = StoreWriter._write

    def counting(self: StoreWriter, conn: sqlite3.Connection, items: list) -> None:
        batches.append(len(items))
        original(self, conn, items)

    monkeypatch.setattr(StoreWriter, "_write", counting)
    writer = make_writer()
    release = block(writer)
    records = 3000
    for i in range(records):  # the writer is busy: each call must return at once
        writer.sql(METRIC, [(1, "loss", i, 0, 0.0, float(i))])
    assert writer.dropped == 0
    release.set()
    assert writer.flush(DEADLINE)
    assert count(db, "SELECT count(*) FROM metrics") == records
    assert count(db, "SELECT sum(step) FROM metrics") == records * (records - 1) // 2
    written = batches[1:]  # the first batch was the parked task
    assert max(written) == BATCH_RECORDS
    assert len(written) <= -(-records // BATCH_RECORDS) + 1  # + the flush barrier's batch


def test_full_writer_queue_drops_and_counts_and_reports_once_room_returns(
    db: Path, make_writer: Callable[[], StoreWriter], block: Callable[[StoreWriter], threading.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writer_module, "QUEUE_SIZE", 8)
    writer = make_writer()
    reports: list[int] = []
    writer.on_overflow = reports.append
    release = block(writer)
    for i in range(8 + 5):  # 8 fit, 5 are dropped; none of these calls waits
        writer.sql(METRIC, [(1, "loss", i, 0, 0.0, 0.0)])
    assert writer.dropped == 5
    release.set()
    assert writer.flush(DEADLINE)
    assert reports == []
    writer.sql(METRIC, [(1, "loss", 100, 0, 0.0, 0.0)])  # room again: the drop is reported
    assert writer.flush(DEADLINE)
    assert writer.dropped == 0
    assert count(db, "SELECT count(*) FROM metrics") == 9
    assert reports == [5]


def test_overflow_report_does_not_displace_the_sessions_own_events(
    block: Callable[[StoreWriter], threading.Event], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writer_module, "QUEUE_SIZE", 8)
    store = SessionStore("p")
    release = block(store._writer)
    for step in range(8):  # fills the queue
        store.metrics([(1, "loss", step, 0, 0.0, 0.0)])
    store.metrics([(1, "loss", step, 0, 0.0, 0.0) for step in range(8, 11)])  # dropped
    for _ in range(1, 9):  # the session's log is never dropped, not even now
        seq = store.next_seq()
        store.event(seq, None, seq, 0, "tick", {}, 0.0)
    release.set()
    assert store.flush(DEADLINE)
    for _ in range(9, 12):  # the session's numbering goes on
        seq = store.next_seq()
        store.event(seq, None, seq, 0, "tick", {}, 0.0)
    store.close()

    assert store.write_error is None
    events = open_session(store.dir).events()
    ticks = [e["seq"] for e in events if e["kind"] == "tick"]
    assert len(ticks) == 11 and ticks == sorted(set(ticks))
    overflow = [e for e in events if e["kind"] == "store_overflow"]
    assert [e["payload"]["dropped_records"] for e in overflow] == [1]


def test_writer_close_is_idempotent_and_later_records_are_ignored(
    db: Path, make_writer: Callable[[], StoreWriter],
) -> None:
    writer = make_writer()
    writer.sql(METRIC, [(1, "loss", 1, 0, 0.0, 0.0)])
    writer.close()
    writer.close()
    writer.sql(METRIC, [(1, "loss", 2, 0, 0.0, 0.0)])
    assert writer.flush(1)
    assert count(db, "SELECT count(*) FROM metrics") == 1


# ---- checkpoint files ------------------------------------------------------------------------
def test_write_checkpoint_refuses_objects_that_need_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    state = {"optimizer": {"hooks": [1, object()]}}
    with pytest.raises(StoreError, match=re.escape("state['optimizer']['hooks'][1] holds a builtins.object")):
        write_checkpoint(folder, {"w": torch.zeros(2)}, state)
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_checkpoint_refuses_keys_that_are_not_str_or_int(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=re.escape("state['a'] has a key of type tuple")):
        write_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"a": {(1, 2): 3}})


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    state = {"step": 3, "nested": {"t": torch.ones(2), "names": ["a", "b"], "none": None}}
    size = write_checkpoint(tmp_path / "ckpt", tensors, state)
    assert size > 0
    loaded, loaded_state = read_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], tensors["w"])
    assert loaded_state["step"] == 3
    assert torch.equal(loaded_state["nested"]["t"], torch.ones(2))
    assert loaded_state["nested"]["names"] == ["a", "b"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    write_checkpoint(folder, {"w": torch.zeros(2)}, {"step": 1})
    return folder


def test_read_checkpoint_on_an_incomplete_folder(checkpoint: Path) -> None:
    (checkpoint / "state.pt").unlink()
    with pytest.raises(StoreError, match=r"not a complete On The Fly checkpoint: missing state\.pt"):
        read_checkpoint(checkpoint)


def test_read_checkpoint_on_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=re.escape("missing model.safetensors, state.pt, checkpoint.json")):
        read_checkpoint(tmp_path)


def test_read_checkpoint_on_a_corrupt_file(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StoreError, match="cannot read the checkpoint"):
        read_checkpoint(checkpoint)


class Payload:
    """Unpickling this would run code of our choosing; a checkpoint must never do that."""


def test_read_checkpoint_never_unpickles_objects(checkpoint: Path) -> None:
    torch.save({"step": 1, "evil": Payload()}, checkpoint / "state.pt")
    with pytest.raises(StoreError, match="cannot read the checkpoint"):
        read_checkpoint(checkpoint)


# ---- ephemeral sessions ------------------------------------------------------------------------
# Each child imports first, then creates its session when told to ("go" on stdin), prints its
# folder, and - when live - keeps it open until the next line arrives.
CHILD = """
import sys
from onthefly.store import SessionStore
sys.stdin.readline()
store = SessionStore("p")
print(store.dir, flush=True)
if sys.argv[1] == "live":
    sys.stdin.readline()
store.close()
"""


@pytest.fixture
def children(subprocess_env: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=DEADLINE)


def spawn(children: list[subprocess.Popen[str]], env: dict[str, str], mode: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([PYTHON, "-c", CHILD, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    children.append(child)
    return child


def tell(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()


def folder_of(child: subprocess.Popen[str]) -> Path:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"child exited with {child.wait(DEADLINE)} before printing its session"
    return Path(line.strip())


def test_new_session_removes_dead_sessions_but_never_live_ones(
    children: list[subprocess.Popen[str]], subprocess_env: dict[str, str],
) -> None:
    live_a = spawn(children, subprocess_env, "live")
    live_b = spawn(children, subprocess_env, "live")
    dead = spawn(children, subprocess_env, "dead")
    tell(live_a)
    folder_a = folder_of(live_a)
    tell(live_b)
    folder_b = folder_of(live_b)
    tell(dead)  # created while A and B live: its own clean-up must leave them alone
    folder_dead = folder_of(dead)
    assert dead.wait(DEADLINE) == 0
    assert folder_a.is_dir() and folder_b.is_dir() and folder_dead.is_dir()
    assert not is_alive(folder_dead)

    mine = SessionStore("p")
    assert not folder_dead.exists()
    assert folder_a.is_dir() and folder_b.is_dir()
    listed = {s.path: s for s in list_sessions()}
    assert set(listed) == {folder_a, folder_b, mine.dir}
    assert all(s.alive and s.status == "running" for s in listed.values())
    assert {listed[folder_a].project, listed[folder_b].project} == {"p"}

    for child in (live_a, live_b):
        tell(child)
        assert child.wait(DEADLINE) == 0
    listed = {s.path: s for s in list_sessions()}
    assert (listed[folder_a].alive, listed[folder_a].status) == (False, "finished")
    assert (listed[folder_b].alive, listed[folder_b].status) == (False, "finished")
    assert listed[mine.dir].alive

    mine.close()  # ended, but its process (this one) lives on: it stays
    newest = SessionStore("p")
    try:
        assert [s.path for s in list_sessions()] == [mine.dir, newest.dir]
        assert not folder_a.exists() and not folder_b.exists() and mine.dir.is_dir()
    finally:
        newest.close()


CRASH = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch import nn
from torch.utils.data import DataLoader
import onthefly
from conftest import toy_data, toy_model

class Crash(onthefly.Callback):
    def on_step_end(self, run):
        if run.global_step == 1:
            print(run.session.dir, flush=True)
        if run.global_step == 12:  # in the second epoch
            run.recorder.wait_idle()  # what was handed over so far reaches the store ...
            run.session.flush()
            os._exit(1)  # ... then the process dies without closing anything

model = toy_model()
onthefly.quickstart(project="crash", run_name="r", model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
                    train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True), max_epochs=3,
                    callbacks=[Crash()], progress=False)
"""


def test_session_of_a_crashed_process_is_readable_and_interrupted(subprocess_env: dict[str, str]) -> None:
    tests_dir = str(Path(__file__).parent)
    child = subprocess.run([PYTHON, "-c", CRASH, tests_dir], capture_output=True, text=True,
                           env=subprocess_env, timeout=DEADLINE)
    assert child.returncode == 1, child.stderr
    folder = Path(child.stdout.strip())

    (info,) = list_sessions()
    assert info.path == folder
    assert (info.status, info.alive, info.project) == ("interrupted", False, "crash")
    reader = open_session(folder)
    assert reader.info()["status"] == "running"  # what the process last wrote
    assert reader.runs()[0]["status"] == "running"
    first_epoch = reader.samples(1, epoch=0)
    assert first_epoch.num_rows == 256
    assert sorted(first_epoch.column("index").to_pylist()) == list(range(256))
    steps = [row["step"] for row in reader.metrics(1, "train_loss")]
    assert steps == list(range(1, 12 + 1))
    assert [e["payload"]["status"] for e in reader.events(kind="status")] == ["running"]


# ---- life cycle --------------------------------------------------------------------------------
def test_session_close_is_idempotent_and_keeps_the_folder_while_its_process_lives() -> None:
    store = SessionStore("p")
    assert is_alive(store.dir)
    store.close("stopped")
    store.close("failed")
    # Closed, but its process (this one) still runs: a later session must not clean it away.
    assert is_alive(store.dir)
    later = SessionStore("p")
    later.close()
    assert store.dir.is_dir()
    assert open_session(store.dir).info()["status"] == "stopped"
    statuses = {info.path: (info.status, info.alive) for info in list_sessions()}
    assert statuses[store.dir] == ("stopped", True)


def test_session_used_as_a_context_manager_records_failure() -> None:
    with pytest.raises(KeyError), SessionStore("p") as store:
        raise KeyError("x")
    assert open_session(store.dir).info()["status"] == "failed"


def test_failing_training_run_leaves_failed_status_and_the_error() -> None:
    class Boom(Callback):
        def on_step_end(self, run: Run) -> None:
            if run.global_step == 3:
                raise RuntimeError("boom at step 3")

    with pytest.raises(RuntimeError, match="boom at step 3"):
        train(1, callbacks=(Boom(),))

    (info,) = list_sessions()
    assert (info.status, info.alive) == ("failed", True)  # this process still runs
    reader = open_session(info.path)
    assert reader.info()["status"] == "failed"
    assert reader.info()["error"] == "RuntimeError: boom at step 3"
    assert reader.runs()[0]["status"] == "failed"
    (error,) = reader.events(kind="error")
    assert error["step"] == 3
    assert error["payload"] == {"type": "RuntimeError", "message": "boom at step 3"}


def test_open_session_by_id_and_unknown_session() -> None:
    summary = train(1)
    assert open_session(summary.session_dir.name).dir == summary.session_dir
    with pytest.raises(StoreError, match="no session 'nope'"):
        open_session("nope")


def test_session_store_in_an_unwritable_home_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ONTHEFLY_HOME", str(blocker))  # a file where a folder is needed
    with pytest.raises(StoreError, match="Set ONTHEFLY_HOME to a writable folder"):
        SessionStore("p")



def test_write_checkpoint_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="is not an On The Fly checkpoint; refusing to replace it"):
        write_checkpoint(precious, {"w": torch.zeros(2)}, {"step": 1})
    assert (precious / "notes.txt").read_text() == "keep me"
    # An earlier checkpoint in the same folder is replaced.
    target = tmp_path / "ckpt"
    write_checkpoint(target, {"w": torch.zeros(2)}, {"step": 1})
    write_checkpoint(target, {"w": torch.ones(2)}, {"step": 2})
    tensors, state = read_checkpoint(target)
    assert torch.equal(tensors["w"], torch.ones(2)) and state == {"step": 2}


def test_saving_a_checkpoint_after_the_run_has_ended_says_why() -> None:
    from onthefly.errors import StateError

    model = toy_model()
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32), progress=False)
    trainer.fit(1)
    with pytest.raises(StateError, match="the session store is closed"):
        trainer.run.save_checkpoint()


def test_a_saved_slice_or_clustering_is_readable_as_soon_as_the_call_returns() -> None:
    """The writer releases a task's caller only after the commit, so reading back never misses it."""
    import pyarrow as pa

    from onthefly.store import SessionReader

    store = SessionStore("p")
    try:
        run_id = store.new_run("r")
        reader = SessionReader(store.dir)
        for i in range(25):
            # Metrics queued first make the slice's task share a transaction with other records.
            store.metrics([(run_id, "m", i, 0, 0.0, 1.0)] * 50)
            record = store.save_slice(name=f"s{i}", run_id=run_id, epoch=0, split="train",
                                      definition={"kind": "label", "label": i}, indices=np.arange(i + 1))
            assert reader.slice(f"s{i}")["id"] == record["id"]
            assert reader.slice_indices(record).tolist() == list(range(i + 1))
            clustering = store.save_clustering(
                run_id=run_id, epoch=0, features="signals", k=2, silhouette=0.5, details={},
                points=pa.table({"index": [0, 1], "cluster": [0, 1], "x": [0.0, 1.0], "y": [0.0, 1.0]}))
            assert reader.clustering(clustering)["k"] == 2
    finally:
        store.close()


def test_sample_stats_of_a_finished_epoch_are_computed_once(tmp_path: Path) -> None:
    from onthefly.store.dynamics import sample_stats
    from onthefly.store.samples import SampleChunk, SampleSink

    sink = SampleSink(tmp_path)

    def add(epoch: int) -> None:
        n = 4
        sink.add(SampleChunk(run_id=1, split="train", epoch=epoch, step=np.arange(n), index=np.arange(n),
                             loss=np.arange(n, dtype=np.float32), margin=np.zeros(n, np.float32),
                             pred=np.zeros(n, np.int64), label=np.zeros(n, np.int64)))
        sink.close_epoch(1, "train", epoch)

    add(0)
    first = sample_stats(tmp_path, 1)
    assert sample_stats(tmp_path, 1)[1] is first[1]  # cached
    add(1)  # a new part: a new answer
    second = sample_stats(tmp_path, 1)
    assert second[0] == 1 and second[1] is not first[1] and second[1].column("epochs").to_pylist() == [2] * 4
    assert sample_stats(tmp_path, 1, epoch=0)[1].column("epochs").to_pylist() == [1] * 4


def test_the_reader_answers_every_per_sample_view_of_a_run() -> None:
    import pyarrow as pa

    summary = train(epochs=2)
    reader = open_session(summary.session_dir)
    run = summary.run_id
    assert reader.sample_epochs(run) == [0, 1]
    epoch, table = reader.sample_stats_at(run)  # default: the latest complete epoch
    assert epoch == 1 and table.num_rows == 256 and set(table.column("epochs").to_pylist()) == {2}
    finite = table.drop_columns(["grad_norm"])  # no grad norms recorded: NaN, never equal to itself
    assert reader.sample_stats(run).drop_columns(["grad_norm"]).equals(finite)
    shown, batches = reader.iter_sample_stats(run, 1, indices=np.array([5, 3]), batch_rows=1)
    streamed = pa.Table.from_batches(list(batches))
    assert shown == 1 and streamed.column("index").to_pylist() == [3, 5]
    assert streamed.drop_columns(["grad_norm"]).equals(finite.take(pa.array([3, 5])))
    history = reader.sample_history(run, 3)
    assert [r["epoch"] for r in history] == [0, 1]
    assert history[1]["loss"] == pytest.approx(table.column("loss")[3].as_py())
    distribution = reader.loss_distribution(run, bins=8)
    assert distribution["epoch"] == 1 and sum(distribution["counts"]) == 256
    hardest = reader.hardest_samples(run, k=3)
    top = sorted(table.column("loss").to_pylist(), reverse=True)[:3]
    assert hardest["epoch"] == 1 and [r["loss"] for r in hardest["rows"]] == pytest.approx(top)
    carried = summary.session_dir / "samples" / f"run-{run}" / "train" / "carried-00001.arrow"
    carried.unlink(missing_ok=True)
    reader.carry_dynamics(run)  # what the server does when an epoch completes: the next look is one file
    assert carried.is_file()
    series = reader.metric_series(run, "train_loss", points=4)
    assert len(series["step"]) <= 4 and series["total"] == len(reader.metrics(run, "train_loss")) > 4


def test_each_part_carries_a_bloom_filter_of_its_sample_indices(tmp_path: Path) -> None:
    """One sample's history looks for it in every part: the filter lets a reader skip the others."""
    import pyarrow.parquet as pq

    from onthefly.store.samples import SampleChunk, SampleSink

    sink = SampleSink(tmp_path)
    sink.add(SampleChunk(run_id=1, split="train", epoch=0, step=np.arange(4), index=np.array([7, 1, 5, 3]),
                         loss=np.ones(4, np.float32), margin=np.ones(4, np.float32), pred=np.zeros(4, np.int64),
                         label=np.zeros(4, np.int64)))
    (part,) = sink.close_epoch(1, "train", 0)
    group = pq.ParquetFile(tmp_path / part.path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert columns["index"].bloom_filter_length > 0
    assert columns["loss"].bloom_filter_offset is None  # only where a lookup needs it


def test_chunks_of_an_epoch_become_one_part_with_every_row_and_column(tmp_path: Path) -> None:
    from onthefly.store.samples import SampleChunk, SampleSink, read_samples

    sink = SampleSink(tmp_path)
    sink.add(SampleChunk(run_id=1, split="train", epoch=0, step=np.array([1, 1]), index=np.array([5, 3]),
                         loss=np.array([0.5, 1.5], np.float32), margin=np.array([1.0, -1.0], np.float32),
                         pred=np.array([2, 0]), label=np.array([2, 1])))  # no confidence, no grad norm
    sink.add(SampleChunk(run_id=1, split="train", epoch=0, step=np.array([2]), index=np.array([4]),
                         loss=np.array([0.25], np.float32), margin=np.array([2.0], np.float32),
                         pred=np.array([1]), label=np.array([1]), confidence=np.array([0.9], np.float32),
                         grad_norm=np.array([3.0], np.float32)))
    (part,) = sink.close_epoch(1, "train", 0)

    rows = read_samples(tmp_path, 1).to_pydict()
    assert (part.rows, part.first_step, part.last_step) == (3, 1, 2)
    assert rows["index"] == [5, 3, 4] and rows["step"] == [1, 1, 2]
    assert rows["loss"] == [0.5, 1.5, 0.25] and rows["correct"] == [True, False, True]
    assert np.isnan(rows["confidence"][:2]).all() and rows["confidence"][2] == pytest.approx(0.9)
    assert np.isnan(rows["grad_norm"][:2]).all() and rows["grad_norm"][2] == 3.0
