"""The store's writer thread: the only place that writes the session's database and tables.

The training thread and the transfer thread hand records over through one FIFO queue and never
wait for the disk. The writer drains whatever has gathered, writes it in one SQLite transaction,
and repeats. Only droppable records (sample chunks, SQL rows offered without ``block``) count
against ``QUEUE_SIZE``: when that many are waiting, the next one is dropped and counted, and the
count goes to ``on_overflow`` as soon as there is room again. Essential items (epoch-close markers,
tasks, flush barriers, ``sql(..., block=True)``, the overflow report itself) are always queued, in
order with the rest: they are few, so the queue stays bounded in practice, a slow disk never
stalls training, it never stays silent, and it never loses the marker that completes an epoch.
"""

from __future__ import annotations

import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .db import connect
from .samples import SampleChunk, SampleSink, WrittenPart

__all__ = ["StoreWriter"]

# Droppable records waiting for the writer at most; essential items do not count.
QUEUE_SIZE = 4096
# Records drained into one transaction at most; bounds the time a reader waits on a commit.
BATCH_RECORDS = 512


@dataclass
class _Sql:
    sql: str
    rows: Sequence[Sequence[Any]]


@dataclass
class _Task:
    """File work (a checkpoint) done on the writer thread; ``fn`` returns SQL to record it."""

    fn: Callable[[], list[_Sql]]
    done: threading.Event
    error: BaseException | None = None


@dataclass
class _CloseEpoch:
    run_id: int
    split: str
    epoch: int


@dataclass
class _Barrier:
    done: threading.Event
    then: Callable[[], object] | None = None  # called on the writer thread once committed


_STOP = object()


class StoreWriter:
    """Owns the writer thread. The public methods run on the caller's thread (training, transfer,
    server) and only queue work; everything under "writer thread" runs on ``onthefly-store``."""

    def __init__(self, session_dir: Path, db_path: Path) -> None:
        self._dir = session_dir
        self._db_path = db_path
        # Unbounded: the bound is kept on droppable records only (``_waiting``), so an essential
        # item never waits for room and never has to be dropped. Entries are (droppable, item).
        self._queue: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._sink = SampleSink(session_dir)
        self._waiting = 0  # droppable records queued and not yet taken by the writer thread
        self._dropped = 0
        # Set on the thread that is reporting an overflow: the report is itself a record, and
        # is queued as an essential one (dropping it would lose the count; offering it must not
        # report again).
        self._reporting = threading.local()
        # Called (on the thread that found room again) with the number of records dropped.
        self.on_overflow: Callable[[int], None] | None = None
        self._lock = threading.Lock()  # records come from the training and the transfer thread
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="onthefly-store", daemon=True)
        self._thread.start()

    # ---- called from any thread -------------------------------------------------------
    def sql(self, sql: str, rows: Sequence[Sequence[Any]], *, block: bool = False) -> None:
        """Queue a statement. ``block=True`` for rare records that must not be lost (a session's
        final status): never dropped, and it does not wait for room either. Not per step."""
        if block:
            self._enqueue(_Sql(sql, rows))
        else:
            self._offer(_Sql(sql, rows))

    def samples(self, chunk: SampleChunk) -> None:
        self._offer(chunk)

    def close_epoch(self, run_id: int, split: str, epoch: int) -> None:
        """Queue the marker that writes the epoch's last Parquet part: essential, after the
        epoch's chunks queued before it."""
        self._enqueue(_CloseEpoch(run_id, split, epoch))

    def task(self, fn: Callable[[], list[_Sql]], *, wait: bool = True, timeout: float = 600) -> None:
        """Run file work on the writer thread. Never dropped: a requested checkpoint is always
        written; with ``wait`` the caller waits for it (and for the records queued before it)."""
        if self._closed or not self._thread.is_alive():
            from ..errors import StateError

            raise StateError("the session store is closed (the run has ended): save checkpoints while it "
                             "runs, e.g. from a Callback or with the 'checkpoint' command")
        item = _Task(fn, threading.Event())
        self._enqueue(item)
        if not wait:
            return
        if not item.done.wait(timeout):
            raise TimeoutError(f"the store writer did not finish a task within {timeout} s")
        if item.error is not None:
            raise item.error

    def flush(self, timeout: float = 60) -> bool:
        """Wait until everything handed over so far is written. Returns False on timeout."""
        if self._closed or not self._thread.is_alive():
            return True
        barrier = _Barrier(threading.Event())
        self._enqueue(barrier)
        return barrier.done.wait(timeout)

    def after_written(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (on the writer thread, without waiting here) once everything handed
        over so far is committed: e.g. announce an epoch only when its table can be read."""
        if self._closed or not self._thread.is_alive():
            callback()
            return
        self._enqueue(_Barrier(threading.Event(), callback))

    @property
    def closing(self) -> bool:
        """close() has been called (a wait on the writer thread gives up)."""
        return self._closed

    def close(self, timeout: float = 60) -> None:
        """Write what is pending and stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            self._queue.put((False, _STOP))
            self._thread.join(timeout)

    @property
    def dropped(self) -> int:
        """Records dropped and not yet reported to ``on_overflow``."""
        return self._dropped

    def _enqueue(self, item: Any) -> None:
        """Queue an essential item: never dropped, never waits."""
        if not self._closed:
            self._queue.put((False, item))
            self._report_drops()

    def _offer(self, item: Any) -> None:
        """Queue a droppable record, or drop and count it when ``QUEUE_SIZE`` of them wait."""
        if self._closed:
            return
        if getattr(self._reporting, "active", False):
            self._enqueue(item)  # the overflow report
            return
        with self._lock:
            if self._waiting >= QUEUE_SIZE:
                self._dropped += 1
                return
            self._waiting += 1
        self._queue.put((True, item))
        self._report_drops()

    def _report_drops(self) -> None:
        """Once there is room again, tell ``on_overflow`` how many records were dropped."""
        listener = self.on_overflow
        if listener is None or getattr(self._reporting, "active", False):
            return
        with self._lock:
            if not self._dropped or self._waiting >= QUEUE_SIZE:
                return
            report, self._dropped = self._dropped, 0  # under the lock: never reported twice
        self._reporting.active = True
        try:
            listener(report)
        finally:
            self._reporting.active = False

    # ---- writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        conn = connect(self._db_path)
        try:
            stop = False
            while not stop:
                items = self._take()
                stop = any(item is _STOP for item in items)
                self._write(conn, [i for i in items if i is not _STOP])
            self._write_parts(conn, self._sink.close_all())
            conn.commit()
        finally:
            conn.close()

    def _take(self) -> list[Any]:
        """Wait for the next item, then take what else has gathered (up to ``BATCH_RECORDS``).
        The droppable records taken free their room in the bound."""
        entries = [self._queue.get()]
        while len(entries) < BATCH_RECORDS:
            try:
                entries.append(self._queue.get_nowait())
            except queue.Empty:
                break
        taken = sum(droppable for droppable, _ in entries)
        if taken:
            with self._lock:
                self._waiting -= taken
        return [item for _, item in entries]

    def _write(self, conn: sqlite3.Connection, items: list[Any]) -> None:
        barriers: list[_Barrier] = []
        tasks: list[_Task] = []
        for item in items:
            try:
                if isinstance(item, _Sql):
                    conn.executemany(item.sql, item.rows)
                elif isinstance(item, SampleChunk):
                    self._write_parts(conn, self._sink.add(item))
                elif isinstance(item, _CloseEpoch):
                    self._write_parts(conn, self._sink.close_epoch(item.run_id, item.split, item.epoch))
                elif isinstance(item, _Task):
                    tasks.append(item)  # its caller is released after the commit, not before
                    try:
                        for statement in item.fn():
                            conn.executemany(statement.sql, statement.rows)
                    except Exception as exc:  # handed back to the waiting caller
                        item.error = exc
                elif isinstance(item, _Barrier):
                    barriers.append(item)
            except Exception as exc:
                # A full disk, a broken file, a malformed record: keep what is already committed,
                # say what happened, and go on with the next records (they may fit once space is freed).
                self.error = exc
                print(f"onthefly: could not write to the session store: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
        try:
            conn.commit()
        except sqlite3.Error as exc:
            self.error = exc
            print(f"onthefly: could not commit to the session store: {exc}", file=sys.stderr)
            for task in tasks:
                task.error = task.error or exc
        # Only now may a caller read back what it asked for: it is committed (or failed, and says so).
        for task in tasks:
            task.done.set()
        for barrier in barriers:
            barrier.done.set()
            if barrier.then is not None:
                try:
                    barrier.then()
                except Exception as exc:  # a listener's fault must not stop the writer
                    print(f"onthefly: a store listener failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _write_parts(self, conn: sqlite3.Connection, parts: list[WrittenPart]) -> None:
        if parts:
            conn.executemany(
                "INSERT INTO sample_files (run_id, epoch, split, path, rows, first_step, last_step)"
                " VALUES (?,?,?,?,?,?,?)",
                [(p.run_id, p.epoch, p.split, p.path, p.rows, p.first_step, p.last_step) for p in parts],
            )
