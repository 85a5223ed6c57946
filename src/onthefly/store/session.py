"""Session folders: creation, liveness, the ephemeral clean-up, listing.

A session is one process's working storage: ``$ONTHEFLY_HOME/sessions/<id>/`` holding
``session.sqlite`` (WAL), ``samples/`` (Parquet) and ``checkpoints/`` (safetensors + tensors-only
files). The owning process holds an exclusive lock on ``session.lock`` for its whole life; the
lock vanishes with the process however it ends, so "alive" never depends on a PID that the
system may have reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import sys
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
from ..units import human_bytes
from .checkpoints import write_checkpoint
from .columns import numeric_array
from .db import SCHEMA_VERSION, connect, create_schema
from .samples import SampleChunk, write_table
from .writer import StoreWriter, _Sql

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Removed",
    "SessionInfo",
    "SessionStore",
    "clean_sessions",
    "folder_bytes",
    "held_here",
    "is_alive",
    "is_imported",
    "list_sessions",
    "onthefly_home",
    "release_held",
    "remove_session",
    "sessions_root",
]

DB_FILE = "session.sqlite"
# The locks of this process's closed sessions (by folder), released at exit; or taken over when
# this process reopens one of them.
_HELD_LOCKS: dict[Path, IO[str]] = {}
LOCK_FILE = "session.lock"
# Written by `onthefly import`: the folder is the user's saved work, never cleaned up automatically.
IMPORTED_FILE = "imported.json"
ENVIRONMENT_FILE = "environment.json"  # where the session was recorded (torch, CUDA, flags)
SOURCE_DIR = "source"  # the training script's text, kept for traceability (never executed)
MAX_SOURCE_BYTES = 1 << 20


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


def held_here(session_dir: Path) -> bool:
    """True for a session this process ran and closed (it keeps its lock until it exits)."""
    return session_dir.resolve() in _HELD_LOCKS


def release_held(session_dir: Path) -> None:
    """Let go of this process's lock on a closed session about to be deleted or replaced."""
    handle = _HELD_LOCKS.pop(session_dir.resolve(), None)
    if handle is not None:
        handle.close()


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
    imported: bool = False  # added by `onthefly import`: kept until the user removes it


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
    return SessionInfo(session_dir.name, session_dir, project, status, alive, created,
                       folder_bytes(session_dir), is_imported(session_dir))


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):  # a file renamed away while we look
            if p.is_file():
                total += p.stat().st_size
    return total


def is_imported(session_dir: Path) -> bool:
    return (session_dir / IMPORTED_FILE).is_file()


def keep_sessions_from_env() -> int:
    """ONTHEFLY_KEEP_SESSIONS=N keeps the N most recent ended sessions at clean-up (default 0)."""
    text = os.environ.get("ONTHEFLY_KEEP_SESSIONS", "0").strip() or "0"
    try:
        keep = int(text)
    except ValueError:
        raise StoreError(f"ONTHEFLY_KEEP_SESSIONS must be a whole number, got {text!r}") from None
    if keep < 0:
        raise StoreError(f"ONTHEFLY_KEEP_SESSIONS must be 0 or more, got {keep}")
    return keep


def list_sessions(home: Path | None = None) -> list[SessionInfo]:
    root = sessions_root(home)
    if not root.is_dir():
        return []
    return sorted(
        (_read_info(d) for d in root.iterdir() if d.is_dir()), key=lambda info: info.created
    )


@dataclass
class Removed:
    """A session folder the clean-up removed."""

    id: str
    size_bytes: int


def clean_sessions(home: Path | None = None, *, keep: Iterable[Path] = (),
                   keep_recent: int | None = None) -> list[Removed]:
    """Remove the folders of sessions whose process is gone. Never touched: live sessions,
    imported ones (the user's saved work), any folder that contains a path in ``keep`` (e.g. a
    checkpoint being resumed), and the ``keep_recent`` most recent ended sessions (default:
    ONTHEFLY_KEEP_SESSIONS, else 0)."""
    root = sessions_root(home)
    if not root.is_dir():
        return []
    kept = [Path(p).resolve() for p in keep]
    recent = keep_sessions_from_env() if keep_recent is None else keep_recent
    dead = []
    for folder in root.iterdir():
        if not folder.is_dir() or is_imported(folder) or is_alive(folder):
            continue
        resolved = folder.resolve()
        if any(k == resolved or resolved in k.parents for k in kept):
            continue
        dead.append(folder)
    _clean_scratch((home or onthefly_home()) / "tmp")
    dead.sort(key=lambda f: f.name, reverse=True)  # ids begin with their creation time
    removed = []
    for folder in dead[recent:]:
        size = folder_bytes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(Removed(folder.name, size))
    return removed


def _clean_scratch(root: Path) -> None:
    """Remove what a killed export or import left in ``tmp/`` (``<kind>-<pid>-*``, pid gone)."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        parts = folder.name.split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its process still runs
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # pragma: no cover - another user's process: leave it
            continue


def remove_session(session_dir: Path) -> int:
    """Delete a session folder (`onthefly remove`); refuses a live one. Returns the bytes freed."""
    if is_alive(session_dir) and not held_here(session_dir):
        raise StateError(f"session {session_dir.name} is still running (its process holds it); stop it first")
    release_held(session_dir)
    size = folder_bytes(session_dir)
    shutil.rmtree(session_dir)
    return size


def _environment() -> dict[str, Any]:
    import platform

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "python": platform.python_version(), "platform": platform.platform(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
    }


def _save_source(folder: Path) -> None:
    """Keep the text of the script that started training (``__main__``), for traceability."""
    import __main__

    script = getattr(__main__, "__file__", None)
    if not script:
        return
    path = Path(script)
    with contextlib.suppress(OSError):
        if path.suffix == ".py" and path.is_file() and path.stat().st_size <= MAX_SOURCE_BYTES:
            (folder / SOURCE_DIR).mkdir(exist_ok=True)
            (folder / SOURCE_DIR / path.name).write_bytes(path.read_bytes())


# torchrun: how long rank 0 waits for the other ranks to have written an epoch's rows before it
# announces the epoch anyway (and says which ranks were missing), and how often it looks.
RANKS_CLOSE_TIMEOUT = 120.0
RANKS_CLOSE_POLL = 0.005


def _closed_name(run_id: int, split: str, epoch: int) -> str:
    return f"run-{run_id}-{split}-epoch-{epoch:05d}"


class SessionStore:
    """The live session of this process: its folder, database and writer thread.

    ``SessionStore(project)`` starts a new session (and cleans up ended ones);
    :meth:`reopen` takes an existing folder over, e.g. an imported session to train further in."""

    def __init__(self, project: str, *, home: Path | None = None, keep: Iterable[Path] = ()) -> None:
        root = sessions_root(home)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.removed = clean_sessions(home, keep=keep)
            session_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
            folder = root / session_id
            folder.mkdir()
            self._create(folder, project)
            _save_source(folder)
        except OSError as exc:
            raise StoreError(
                f"cannot create a session under {root}: {exc}. Set ONTHEFLY_HOME to a writable folder."
            ) from exc
        self._start(project, next_ids={})
        if self.removed:
            total = sum(r.size_bytes for r in self.removed)
            print(f"onthefly: removed {len(self.removed)} ended session(s) ({human_bytes(total)}): "
                  f"{', '.join(r.id for r in self.removed)}. Sessions are working storage: "
                  "`onthefly export` saves one; ONTHEFLY_KEEP_SESSIONS=N keeps the N most recent.",
                  file=sys.stderr)

    def _create(self, folder: Path, project: str) -> None:
        self._take(folder)
        conn = connect(self.db_path)
        create_schema(conn)
        conn.execute(
            "INSERT INTO session (id, project, created, pid, host, version, schema_version, status)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (folder.name, project, time.time(), os.getpid(), socket.gethostname(), __version__,
             SCHEMA_VERSION, "running"),
        )
        conn.commit()
        conn.close()
        (folder / ENVIRONMENT_FILE).write_text(json.dumps(_environment(), indent=1))

    @classmethod
    def for_rank(cls, folder: Path, project: str) -> SessionStore:
        """A new session in ``folder`` for one rank of a torchrun job (``ranks/rank-R`` inside rank
        0's session): its per-sample rows, events and checkpoints. No clean-up of other sessions."""
        self = cls.__new__(cls)
        self.removed = []
        try:
            folder.mkdir(parents=True)
            self._create(folder, project)
        except OSError as exc:
            raise StoreError(f"cannot create the rank's session in {folder}: {exc}") from exc
        self._start(project, next_ids={})
        return self

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / DB_FILE).is_file()

    @classmethod
    def reopen(cls, folder: Path, *, mark_running: bool = True) -> SessionStore:
        """Take over an ended session's folder (an imported one, say) to record more in it: ids
        continue after the highest recorded ones, and the folder is marked running again (unless
        ``mark_running=False``: `onthefly open` saves slices in it and leaves its status as it was)."""
        folder = Path(folder)
        if not (folder / DB_FILE).is_file():
            raise StoreError(f"{folder} is not an On The Fly session folder (no {DB_FILE})")
        self = cls.__new__(cls)
        self.removed = []
        try:
            self._take(folder)
            conn = connect(self.db_path)
            try:
                create_schema(conn)  # tables a newer version added (CREATE ... IF NOT EXISTS)
                row = conn.execute("SELECT project FROM session").fetchone()
                if row is None:
                    raise StoreError(f"{folder / DB_FILE} has no session row; it is not a usable session")
                next_ids = {
                    table: int(conn.execute(f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()[0]) + 1
                    for table, column in (("runs", "id"), ("checkpoints", "id"), ("slices", "id"),
                                          ("clusterings", "id"), ("events", "seq"), ("plans", "id"),
                                          ("comparisons", "id"))
                }
                if mark_running:
                    conn.execute("UPDATE session SET status = 'running', ended = NULL, error = NULL, pid = ?",
                                 (os.getpid(),))
                    conn.commit()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            self._lock_handle.close()
            raise StoreError(f"cannot reopen the session in {folder}: {exc}") from exc
        self._start(str(row["project"]), next_ids=next_ids)
        self._keeps_status = not mark_running
        return self

    def _take(self, folder: Path) -> None:
        lock = _HELD_LOCKS.pop(folder.resolve(), None) or _try_lock(folder / LOCK_FILE)
        if lock is None:
            raise StoreError(f"session folder {folder} is in use by another process")
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock_handle = lock
        self.dir = folder
        self.id = folder.name
        self.db_path = folder / DB_FILE

    def _start(self, project: str, *, next_ids: Mapping[str, int]) -> None:
        self.project = project
        self._writer = StoreWriter(self.dir, self.db_path)
        self.metric_taps: list[Callable[[list[tuple[int, str, int, int, float, float]]], None]] = []
        self._writer.on_overflow = self._report_overflow
        # Who hears of dropped records; the engine points it at its event bus. Default: a row.
        self.overflow_listener: Callable[[int], object] | None = None
        self._ids_lock = threading.Lock()
        self._seq = next_ids.get("events", 1) - 1
        self._next_run = next_ids.get("runs", 1)
        self._next_checkpoint = next_ids.get("checkpoints", 1)
        self._next_slice = next_ids.get("slices", 1)
        self._next_clustering = next_ids.get("clusterings", 1)
        self._next_plan = next_ids.get("plans", 1)
        self._next_comparison = next_ids.get("comparisons", 1)
        self._closed = False
        self._keeps_status = False

    # ---- runs -----------------------------------------------------------------------
    def new_run(
        self, name: str, *, config: Mapping[str, Any] | None = None, parent_id: int | None = None,
        parent_checkpoint_id: int | None = None, run_id: int | None = None,
    ) -> int:
        """A new run (with the next id, or ``run_id``: a rank's record of rank 0's run)."""
        with self._ids_lock:
            if run_id is None:
                run_id, self._next_run = self._next_run, self._next_run + 1
            else:
                self._next_run = max(self._next_run, run_id + 1)
        self._writer.sql(
            "INSERT INTO runs (id, name, project, parent_id, parent_checkpoint_id, status, created, config)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [(run_id, name, self.project, parent_id, parent_checkpoint_id, "created", time.time(),
              json.dumps(dict(config or {}), default=str))], block=True,  # never dropped
        )
        return run_id

    def run_record(self, run_id: int) -> dict[str, Any] | None:
        """A recorded run's row (for a run resumed into its own session), None if there is none."""
        self.flush()
        conn = connect(self.db_path, readonly=True)
        try:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            return dict(row) if row is not None else None
        finally:
            conn.close()

    def later_than(self, run_id: int, step: int) -> bool:
        """Whether the session recorded anything of the run after ``step`` (a step's loss, a checkpoint)."""
        self.flush()
        conn = connect(self.db_path, readonly=True)
        try:
            row = conn.execute("SELECT EXISTS(SELECT 1 FROM metrics WHERE run_id = ? AND name = 'train_loss' AND "
                               "step > ?) OR EXISTS(SELECT 1 FROM checkpoints WHERE run_id = ? AND step > ?)",
                               (run_id, step, run_id, step)).fetchone()
            return bool(row[0])
        finally:
            conn.close()

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
        """Rows of (run_id, name, step, epoch, time, value); also handed to every ``metric_taps``
        callable (TensorBoard files), which must only queue them."""
        if rows:
            self._writer.sql(
                "INSERT INTO metrics (run_id, name, step, epoch, time, value) VALUES (?,?,?,?,?,?)", rows
            )
            for tap in self.metric_taps:
                tap(rows)

    def samples(self, chunk: SampleChunk) -> None:
        self._writer.samples(chunk)

    def close_epoch(self, run_id: int, split: str, epoch: int) -> None:
        self._writer.close_epoch(run_id, split, epoch)

    def after_written(self, callback: Callable[[], object]) -> None:
        """``callback()`` on the writer thread once everything handed over so far is committed."""
        self._writer.after_written(callback)

    # ---- torchrun: an epoch is closed once every rank has written its rows ---------------------
    def mark_closed(self, run_id: int, split: str, epoch: int) -> None:
        """Rank R > 0: once the epoch's rows are committed, say so in a file rank 0 waits for (no
        rank waits for a disk on its training thread, nor in a collective for another's)."""
        marker = self.dir / "closed" / _closed_name(run_id, split, epoch)

        def touch() -> None:
            marker.parent.mkdir(exist_ok=True)
            marker.touch()

        self._writer.after_written(touch)

    def wait_closed(self, folders: list[Path], run_id: int, split: str, epoch: int,
                    timeout: float = RANKS_CLOSE_TIMEOUT) -> list[Path]:
        """Rank 0's writer thread: wait until each rank's session folder in ``folders`` has
        closed the epoch (``mark_closed``). Returns the folders that had not when ``timeout``
        passed or this store began to close (a rank that failed: the job is ending)."""
        name = _closed_name(run_id, split, epoch)
        deadline = time.monotonic() + timeout
        missing = [f for f in folders if not (f / "closed" / name).exists()]
        while missing and time.monotonic() < deadline and not self._writer.closing:
            time.sleep(RANKS_CLOSE_POLL)  # another process's file: nothing to wait on but the disk
            missing = [f for f in missing if not (f / "closed" / name).exists()]
        return missing

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

        # Inside the session folder the registry keeps the path relative to it: the session stays
        # whole when it moves (export, import); a folder the user chose is kept as given.
        recorded = _relative_to(target, self.dir)

        def write() -> list[_Sql]:
            size = write_checkpoint(target, model_tensors, state)
            return [_Sql(
                "INSERT INTO checkpoints (id, run_id, step, epoch, batch_in_epoch, path, reason, time, bytes)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                [(ckpt_id, run_id, step, epoch, batch_in_epoch, recorded, reason, time.time(), size)],
            )]

        self._writer.task(write)
        return ckpt_id, target

    def prune_checkpoint(self, checkpoint_id: int) -> bool:
        """Remove a checkpoint (its files and its row) unless the session refers to it: a lineage
        edge or a run started from it, an evaluation that names it (a test names the weights it
        tested), a plan card or its result (a merge's recipe). Returns whether it was removed."""
        self.flush()
        conn = connect(self.db_path, readonly=True)
        try:
            row = conn.execute("SELECT path FROM checkpoints WHERE id = ?", (checkpoint_id,)).fetchone()
            if row is None:
                return False
            used = conn.execute(
                "SELECT EXISTS(SELECT 1 FROM edges WHERE checkpoint_id = ?) OR EXISTS(SELECT 1 FROM runs WHERE "
                "parent_checkpoint_id = ?) OR EXISTS(SELECT 1 FROM events WHERE kind = 'eval' AND "
                "json_extract(payload, '$.checkpoint_id') = ?)", (checkpoint_id,) * 3).fetchone()[0]
            plans = conn.execute("SELECT card, result FROM plans").fetchall()
        finally:
            conn.close()
        if used or any(_names_checkpoint(json.loads(text), checkpoint_id) for plan in plans for text in plan
                       if text is not None):
            return False
        folder = Path(row[0]) if Path(row[0]).is_absolute() else self.dir / row[0]

        def delete() -> list[_Sql]:
            shutil.rmtree(folder, ignore_errors=True)
            return [_Sql("DELETE FROM checkpoints WHERE id = ?", [(checkpoint_id,)])]

        self._writer.task(delete)
        return True

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
            write_table(self.dir / rel, pa.Table.from_arrays(
                [numeric_array(np.asarray(indices, dtype=np.int64), pa.int64())], names=["index"]))
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

    # ---- plan cards, lineage edges, comparisons (block until written) ------------------------
    def save_plan(self, *, kind: str, card: Mapping[str, Any], source: str) -> dict[str, Any]:
        """A new plan card (status ``proposed``); ``source``: who proposed it (user, autofork)."""
        with self._ids_lock:
            plan_id, self._next_plan = self._next_plan, self._next_plan + 1
        now = time.time()
        record = {"id": plan_id, "kind": kind, "status": "proposed", "card": dict(card), "result": None,
                  "error": None, "runs": [], "source": source, "created": now, "updated": now}
        self._writer.sql("INSERT INTO plans (id, kind, status, card, result, error, runs, source, created, updated)"
                         " VALUES (?,?,?,?,?,?,?,?,?,?)",
                         [(plan_id, kind, "proposed", json.dumps(record["card"]), None, None, "[]", source, now, now)],
                         block=True)
        self.flush()
        return record

    def update_plan(self, plan_id: int, **fields: Any) -> None:
        """Change a card's ``status``, ``card``, ``result``, ``error`` or ``runs``."""
        allowed = {"status", "card", "result", "error", "runs"}
        if not fields or set(fields) - allowed:
            raise StateError(f"a plan's fields are {sorted(allowed)}, got {sorted(fields)}")
        columns = ", ".join(f"{name} = ?" for name in fields)
        values = [json.dumps(v, default=str) if name in ("card", "result", "runs") and v is not None else v
                  for name, v in fields.items()]
        self._writer.sql(f"UPDATE plans SET {columns}, updated = ? WHERE id = ?",
                         [(*values, time.time(), plan_id)], block=True)
        self.flush()

    def add_edge(self, *, child_id: int, parent_id: int, kind: str, step: int | None,
                 checkpoint_id: int | None, plan_id: int | None) -> None:
        """A lineage edge: ``child_id`` came from ``parent_id`` by ``kind`` (fork, control, merge...)."""
        self._writer.sql("INSERT INTO edges (child_id, parent_id, kind, step, checkpoint_id, plan_id, created)"
                         " VALUES (?,?,?,?,?,?,?)",
                         [(child_id, parent_id, kind, step, checkpoint_id, plan_id, time.time())], block=True)

    def save_comparison(self, request: Mapping[str, Any], result: Mapping[str, Any]) -> int:
        with self._ids_lock:
            comparison_id, self._next_comparison = self._next_comparison, self._next_comparison + 1
        self._writer.sql("INSERT INTO comparisons (id, request, result, created) VALUES (?,?,?,?)",
                         [(comparison_id, json.dumps(dict(request), default=str),
                           json.dumps(dict(result), default=str), time.time())], block=True)
        self.flush()
        return comparison_id

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
        if not self._keeps_status:
            self._writer.sql(
                "UPDATE session SET status = ?, ended = ?, error = ?", [(status, time.time(), error)],
                block=True,  # the final status is never dropped
            )
        self._writer.close()
        # The lock is held until this process exits, not released here: a later session of the
        # same process (a notebook's second quickstart) must not clean this one away.
        _HELD_LOCKS[self.dir.resolve()] = self._lock_handle

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("failed" if exc[0] is not None else "finished")


def _names_checkpoint(value: Any, checkpoint_id: int) -> bool:
    """Whether a card or result (JSON) names the checkpoint under a key ending in checkpoint_id."""
    if isinstance(value, dict):
        return any((key.endswith("checkpoint_id") and item == checkpoint_id) or _names_checkpoint(item, checkpoint_id)
                   for key, item in value.items())
    if isinstance(value, list):
        return any(_names_checkpoint(item, checkpoint_id) for item in value)
    return False


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())

