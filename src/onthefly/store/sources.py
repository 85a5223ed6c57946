"""What ``resume_from`` names, found: a checkpoint folder, a session archive (its final model),
one checkpoint of an archive (``"FILE.otf#<checkpoint id>"``), or ``"last"``: the newest checkpoint
of the newest ended session on this machine of the same project (of a run with the same name when
there is one), continued in that session; none yet: training starts fresh, as Lightning's
``ckpt_path="last"`` does.

An archive is imported first (once: an archive whose session is already on this machine reuses
it), and the run continues *in that session*, so its curves go on where they stopped. A plain
checkpoint folder starts a new session, as before. Either way the loss the session recorded for
the step after the checkpoint, if it recorded one, comes along, so that the engine can check the
resumed run's first step against it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError
from .archive import import_session, is_archive, read_manifest
from .db import connect
from .session import DB_FILE, held_here, is_alive, sessions_root

__all__ = ["ResumeSource", "resume_source"]


@dataclass
class ResumeSource:
    checkpoint: Path  # the checkpoint folder to load
    session_dir: Path | None  # the session to continue in (an archive's), None: a new session
    checkpoint_id: int | None  # its id in its session's registry, when it has one
    run_id: int | None  # the run it belongs to
    step: int | None  # the global step it was taken at
    next_loss: tuple[int, float] | None  # (step, train loss) recorded for the step after it


LAST = "last"


def resume_source(spec: str | Path, *, project: str | None = None, run_name: str | None = None) \
        -> ResumeSource | None:
    """The checkpoint ``spec`` names (None only for ``"last"`` with no checkpoint to resume)."""
    text = str(spec)
    if text == LAST and not Path(text).exists():
        return _last(project, run_name)
    archive, _, wanted = text.rpartition("#") if "#" in text else (text, "", "")
    if wanted and is_archive(archive):
        try:
            checkpoint_id = int(wanted)
        except ValueError:
            raise StoreError(f"resume_from={text!r}: after '#' give a checkpoint id (a whole number), "
                             f"got {wanted!r}") from None
        return _from_archive(Path(archive), checkpoint_id)
    path = Path(text)
    if is_archive(path):
        return _from_archive(path, None)
    return _from_folder(path)


def _last(project: str | None, run_name: str | None) -> ResumeSource | None:
    root = sessions_root()
    folders = sorted((p for p in root.iterdir() if (p / DB_FILE).is_file()), reverse=True) if root.is_dir() else []
    for folder in folders:  # session ids begin with their start time: newest first
        if is_alive(folder) and not held_here(folder):
            continue  # still training elsewhere
        try:
            conn = connect(folder / DB_FILE, readonly=True)
            try:
                row = conn.execute("SELECT project FROM session").fetchone()
                if row is None or row[0] != project:
                    continue
                found = conn.execute(
                    "SELECT c.id, c.run_id, c.step, c.path FROM checkpoints c JOIN runs r ON r.id = c.run_id "
                    "ORDER BY (r.name = ?) DESC, c.id DESC LIMIT 1", (run_name,)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            continue
        if found is not None:
            checkpoint_id, run_id, step, path = found
            return ResumeSource(folder / path, folder, int(checkpoint_id), int(run_id), int(step),
                                _next_loss(folder, int(run_id), int(step)))
    return None


def _from_archive(archive: Path, checkpoint_id: int | None) -> ResumeSource:
    manifest = read_manifest(archive)
    session_id = str(manifest["session"]["id"])
    folder = sessions_root() / session_id
    if folder.is_dir():
        if is_alive(folder) and not held_here(folder):
            raise StoreError(f"session {session_id} of {archive} is running on this machine; resume from its "
                             "checkpoints once it has ended")
    else:
        folder = import_session(archive)
    if checkpoint_id is None:
        final = manifest.get("final_checkpoint")
        if not final:
            raise StoreError(f"{archive} holds no checkpoint (its session ended before one was saved), so there "
                             "is no model to resume")
        checkpoint_id = int(final["id"])
    found = _registry_row(folder, checkpoint_id)
    if found is None:
        raise StoreError(f"{archive} has no checkpoint {checkpoint_id}; `onthefly sessions` and the dashboard's "
                         "checkpoints list the ones it holds")
    run_id, step, path = found
    source = folder / path
    return ResumeSource(source, folder, checkpoint_id, run_id, step, _next_loss(folder, run_id, step))


def _from_folder(path: Path) -> ResumeSource:
    session = next((p for p in path.resolve().parents if (p / DB_FILE).is_file()), None)
    if session is None:
        return ResumeSource(path, None, None, None, None, None)
    found = None
    for checkpoint_id, run_id, step, recorded in _rows(session):
        if (session / recorded).resolve() == path.resolve():
            found = (checkpoint_id, run_id, step)
    if found is None:
        return ResumeSource(path, None, None, None, None, None)
    checkpoint_id, run_id, step = found
    return ResumeSource(path, None, checkpoint_id, run_id, step, _next_loss(session, run_id, step))


def _rows(session: Path) -> list[tuple[int, int, int, str]]:
    try:
        conn = connect(session / DB_FILE, readonly=True)
        try:
            return [tuple(r) for r in conn.execute("SELECT id, run_id, step, path FROM checkpoints ORDER BY id")]
        finally:
            conn.close()
    except sqlite3.Error:
        return []  # an unreadable registry: resume from the folder alone


def _registry_row(session: Path, checkpoint_id: int) -> tuple[int, int, str] | None:
    for found_id, run_id, step, path in _rows(session):
        if found_id == checkpoint_id:
            return run_id, step, path
    return None


def _next_loss(session: Path, run_id: int, step: int) -> tuple[int, float] | None:
    try:
        conn = connect(session / DB_FILE, readonly=True)
        try:
            row = conn.execute("SELECT step, value FROM metrics WHERE run_id = ? AND name = 'train_loss' AND step = ? "
                               "ORDER BY time LIMIT 1", (run_id, step + 1)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return (int(row[0]), float(row[1])) if row is not None and row[1] is not None else None
