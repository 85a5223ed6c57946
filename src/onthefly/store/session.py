"""Session folders: creation, liveness, the ephemeral clean-up, listing.

A session is one process's working storage: ``$ONTHEFLY_HOME/sessions/<id>/`` holding
``session.sqlite`` (WAL), ``samples/`` (Parquet) and ``checkpoints/`` (safetensors + tensors-only
files). The owning process holds an exclusive lock on ``session.lock`` for its whole life; the
lock vanishes with the process however it ends, so "alive" never depends on a PID that the
system may have reused.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import torch

from .._version import __version__
from ..errors import StateError, StoreError
from .checkpoints import write_checkpoint
from .db import SCHEMA_VERSION, connect, create_schema
from .samples import SampleChunk, write_table
from .writer import StoreWriter, _Sql

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SessionInfo",
    "SessionStore",
    "clean_sessions",
    "is_alive",
    "list_sessions",
    "onthefly_home",
    "sessions_root",
]

DB_FILE = "session.sqlite"
_HELD_LOCKS: list[IO[str]] = []  # locks of this process's closed sessions, released at exit
LOCK_FILE = "session.lock"


def onthefly_home() -> Path:
    return Path(os.environ.get("ONTHEFLY_HOME") or Path.home() / ".onthefly").expanduser()


def sessions_root(home: Path | None = None) -> Path:
    return (home or onthefly_home()) / "sessions"


def _try_lock(path: Path) -> IO[str] | None:
    """Take the session's exclusive lock; None if another process holds it."""
    handle = open(path, "a+")
    if fcntl is None:  # pragma: no cover - Windows: fall back to the PID written in the file
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def is_alive(session_dir: Path) -> bool:
    """True while the process that owns the session folder is running."""
    lock = session_dir / LOCK_FILE
    if not lock.exists():
        return False
    if fcntl is None:  # pragma: no cover
        try:
            os.kill(int(lock.read_text().strip() or 0), 0)
            return True
        except (OSError, ValueError):
            return False
    handle = _try_lock(lock)
    if handle is None:
        return True
    handle.close()  # closing releases the probe's lock
    return False


@dataclass
class SessionInfo:
    id: str
    path: Path
    project: str
    status: str  # running | finished | failed | stopped | interrupted (process gone while running)
    alive: bool
    created: float
    size_bytes: int


def _read_info(session_dir: Path) -> SessionInfo:
    alive = is_alive(session_dir)
    project, status, created = "?", "unreadable", session_dir.stat().st_mtime
    db = session_dir / DB_FILE
    if db.exists():
        try:
            conn = connect(db, readonly=True)
            try:
                row = conn.execute("SELECT project, status, created FROM session").fetchone()
            finally:
                conn.close()
            if row is not None:
                project, status, created = row["project"], row["status"], row["created"]
        except sqlite3.Error:
            pass  # reported as "unreadable" below
    if status == "running" and not alive:
        status = "interrupted"
    size = sum(p.stat().st_size for p in session_dir.rglob("*") if p.is_file())
    return SessionInfo(session_dir.name, session_dir, project, status, alive, created, size)


def list_sessions(home: Path | None = None) -> list[SessionInfo]:
    root = sessions_root(home)
    if not root.is_dir():
        return []
    return sorted(
        (_read_info(d) for d in root.iterdir() if d.is_dir()), key=lambda info: info.created
    )


def clean_sessions(home: Path | None = None, *, keep: Iterable[Path] = ()) -> list[Path]:
    """Remove the folders of sessions whose process is gone. Live sessions are never touched,
    nor any folder that contains a path in ``keep`` (e.g. a checkpoint being resumed)."""
    root = sessions_root(home)
    if not root.is_dir():
        return []
    kept = [Path(p).resolve() for p in keep]
    removed = []
    for folder in root.iterdir():
        if not folder.is_dir() or is_alive(folder):
            continue
        resolved = folder.resolve()
        if any(k == resolved or resolved in k.parents for k in kept):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class SessionStore:
    """The live session of this process: its folder, database and writer thread."""

    def __init__(self, project: str, *, home: Path | None = None, keep: Iterable[Path] = ()) -> None:
        root = sessions_root(home)
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_sessions(home, keep=keep)
            self.id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
            self.dir = root / self.id
            self.dir.mkdir()
            lock = _try_lock(self.dir / LOCK_FILE)
            if lock is None:  # pragma: no cover - a fresh random folder cannot be locked by others
                raise StoreError(f"session folder {self.dir} is locked by another process")
            self._lock_handle = lock
            lock.write(str(os.getpid()))
            lock.flush()
            self.db_path = self.dir / DB_FILE
            conn = connect(self.db_path)
            create_schema(conn)
            conn.execute(
                "INSERT INTO session (id, project, created, pid, host, version, schema_version, status)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (self.id, project, time.time(), os.getpid(), socket.gethostname(), __version__,
                 SCHEMA_VERSION, "running"),
            )
            conn.commit()
            conn.close()
        except OSError as exc:
            raise StoreError(
                f"cannot create a session under {root}: {exc}. Set ONTHEFLY_HOME to a writable folder."
            ) from exc
        self.project = project
        self._writer = StoreWriter(self.dir, self.db_path)
        self._writer.on_overflow = self._report_overflow
        # Who hears of dropped records; the engine points it at its event bus. Default: a row.
        self.overflow_listener: Callable[[int], object] | None = None
        self._ids_lock = threading.Lock()
        self._seq = 0
        self._next_run = 1
        self._next_checkpoint = 1
        self._next_slice = 1
        self._next_clustering = 1
        self._closed = False

    # ---- runs -----------------------------------------------------------------------
    def new_run(
        self, name: str, *, config: Mapping[str, Any] | None = None, parent_id: int | None = None,
        parent_checkpoint_id: int | None = None,
    ) -> int:
        with self._ids_lock:
            run_id, self._next_run = self._next_run, self._next_run + 1
        self._writer.sql(
            "INSERT INTO runs (id, name, project, parent_id, parent_checkpoint_id, status, created, config)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [(run_id, name, self.project, parent_id, parent_checkpoint_id, "created", time.time(),
              json.dumps(dict(config or {}), default=str))], block=True,  # never dropped
        )
        return run_id

    def set_run_config(self, run_id: int, config: Mapping[str, Any]) -> None:
        """Replace a run's recorded configuration (e.g. once its training loader is known)."""
        self._writer.sql("UPDATE runs SET config = ? WHERE id = ?",
                         [(json.dumps(dict(config), default=str), run_id)], block=True)

    def set_run_status(self, run_id: int, status: str) -> None:
        ended = time.time() if status in ("finished", "failed", "stopped") else None
        self._writer.sql("UPDATE runs SET status = ?, ended = ? WHERE id = ?", [(status, ended, run_id)],
                         block=True)  # never dropped: a run must not look "running" forever

    # ---- records (never block the caller) -----------------------------------------------
    def next_seq(self) -> int:
        """The session-wide event sequence number: every event of every run gets the next one."""
        with self._ids_lock:
            self._seq += 1
            return self._seq

    def _report_overflow(self, dropped: int) -> None:
        payload = {"dropped_records": dropped, "reason": "store queue full (disk too slow)"}
        if self.overflow_listener is not None:
            self.overflow_listener(dropped)
        else:
            self.event(self.next_seq(), None, None, None, "store_overflow", payload, time.time())

    def event(self, seq: int, run_id: int | None, step: int | None, epoch: int | None, kind: str,
              payload: Mapping[str, Any], when: float) -> None:
        """The session's log (commands, status, epoch summaries readers rely on): never dropped."""
        self._writer.sql(
            "INSERT INTO events (seq, run_id, time, step, epoch, kind, payload) VALUES (?,?,?,?,?,?,?)",
            [(seq, run_id, when, step, epoch, kind, json.dumps(dict(payload), default=str))], block=True,
        )

    def metrics(self, rows: list[tuple[int, str, int, int, float, float]]) -> None:
        """Rows of (run_id, name, step, epoch, time, value)."""
        if rows:
            self._writer.sql(
                "INSERT INTO metrics (run_id, name, step, epoch, time, value) VALUES (?,?,?,?,?,?)", rows
            )

    def samples(self, chunk: SampleChunk) -> None:
        self._writer.samples(chunk)

    def close_epoch(self, run_id: int, split: str, epoch: int) -> None:
        self._writer.close_epoch(run_id, split, epoch)

    def after_written(self, callback: Callable[[], object]) -> None:
        """``callback()`` on the writer thread once everything handed over so far is committed."""
        self._writer.after_written(callback)

    # ---- checkpoints (block until written: a checkpoint asked for is never dropped) --------
    def checkpoint(
        self, run_id: int, *, step: int, epoch: int, batch_in_epoch: int,
        model_tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], reason: str,
        folder: Path | None = None,
    ) -> tuple[int, Path]:
        with self._ids_lock:
            ckpt_id, self._next_checkpoint = self._next_checkpoint, self._next_checkpoint + 1
        target = Path(folder) if folder is not None else (
            self.dir / "checkpoints" / f"run-{run_id}" / f"{ckpt_id:05d}-step-{step:09d}"
        )

        def write() -> list[_Sql]:
            size = write_checkpoint(target, model_tensors, state)
            return [_Sql(
                "INSERT INTO checkpoints (id, run_id, step, epoch, batch_in_epoch, path, reason, time, bytes)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                [(ckpt_id, run_id, step, epoch, batch_in_epoch, str(target), reason, time.time(), size)],
            )]

        self._writer.task(write)
        return ckpt_id, target

    # ---- slices and clusterings (block until written) -------------------------------------
    def save_slice(self, *, name: str, run_id: int, epoch: int | None, split: str,
                   definition: Mapping[str, Any], indices: np.ndarray) -> dict[str, Any]:
        """Save a named slice: its definition, and the indices it resolved to (a Parquet file)."""
        with self._ids_lock:
            slice_id, self._next_slice = self._next_slice, self._next_slice + 1
        rel = f"slices/slice-{slice_id:05d}.parquet"
        record = {"id": slice_id, "name": name, "run_id": run_id, "epoch": epoch, "split": split,
                  "definition": dict(definition), "count": len(indices), "path": rel,
                  "created": time.time()}

        def write() -> list[_Sql]:
            write_table(self.dir / rel, pa.table({"index": pa.array(np.asarray(indices, dtype=np.int64))}))
            return [_Sql("INSERT INTO slices (id, name, run_id, epoch, split, definition, count, path, created)"
                         " VALUES (?,?,?,?,?,?,?,?,?)",
                         [(slice_id, name, run_id, epoch, split, json.dumps(record["definition"]),
                           record["count"], rel, record["created"])])]

        try:
            self._writer.task(write)
        except sqlite3.IntegrityError as exc:
            (self.dir / rel).unlink(missing_ok=True)
            raise StateError(f"a slice named {name!r} already exists in this session; pick another "
                             "name or delete that slice first") from exc
        return record

    def delete_slice(self, slice_id: int, path: str) -> None:
        def delete() -> list[_Sql]:
            (self.dir / path).unlink(missing_ok=True)
            return [_Sql("DELETE FROM slices WHERE id = ?", [(slice_id,)])]

        self._writer.task(delete)

    def save_clustering(self, *, run_id: int, epoch: int | None, features: str, k: int,
                        silhouette: float | None, details: Mapping[str, Any], points: pa.Table) -> int:
        """Save a clustering: a summary row, and per sample (index, cluster, x, y) in Parquet."""
        with self._ids_lock:
            clustering_id, self._next_clustering = self._next_clustering, self._next_clustering + 1
        rel = f"clusters/clustering-{clustering_id:05d}.parquet"

        def write() -> list[_Sql]:
            write_table(self.dir / rel, points)
            return [_Sql("INSERT INTO clusterings (id, run_id, epoch, features, k, silhouette, details, path,"
                         " created) VALUES (?,?,?,?,?,?,?,?,?)",
                         [(clustering_id, run_id, epoch, features, k, silhouette,
                           json.dumps(dict(details), default=str), rel, time.time())])]

        self._writer.task(write)
        return clustering_id

    # ---- life cycle ---------------------------------------------------------------------
    @property
    def write_error(self) -> BaseException | None:
        return self._writer.error

    def flush(self, timeout: float = 60) -> bool:
        return self._writer.flush(timeout)

    def close(self, status: str = "finished", error: str | None = None) -> None:
        """Write everything pending, mark the session ended, release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writer.sql(
            "UPDATE session SET status = ?, ended = ?, error = ?", [(status, time.time(), error)],
            block=True,  # the final status is never dropped
        )
        self._writer.close()
        # The lock is held until this process exits, not released here: a later session of the
        # same process (a notebook's second quickstart) must not clean this one away.
        _HELD_LOCKS.append(self._lock_handle)

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("failed" if exc[0] is not None else "finished")
