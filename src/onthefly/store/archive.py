"""Session archives (``.otf``): export = save, import = open it again anywhere.

An archive is an uncompressed POSIX tar (checkpoints and Parquet are compressed already, and a
tar streams at disk speed). Its first member is ``manifest.json``: the format version, the
writing version, the environment the session was recorded in, the session's id and final model,
and the size and SHA-256 of every other member. The members live under ``session/``: a
consistent snapshot of the database (SQLite's backup API, taken while training may be writing),
the per-sample Parquet parts and the slices and clusterings it registers, every checkpoint of
its registry, the environment and the training script's text (kept, never executed).

Import trusts nothing in the file: only regular members under ``session/`` that the manifest
lists, no absolute paths, ``..``, links or devices; sizes are checked before and while reading
(a member larger than the manifest says is refused before its bytes are read); checksums after;
checkpoints' state files must hold tensors only (their pickle is scanned, never run); the
database must pass SQLite's integrity check. Everything is written into a temporary folder and
renamed into the sessions folder only when all of it is good.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from .._version import __version__
from ..errors import StoreError
from .checkpoints import STATE_FILE
from .reader import SessionReader, open_session
from .session import (
    DB_FILE,
    ENVIRONMENT_FILE,
    IMPORTED_FILE,
    LOCK_FILE,
    SOURCE_DIR,
    held_here,
    is_alive,
    onthefly_home,
    release_held,
    sessions_root,
)

__all__ = [
    "ARCHIVE_SUFFIX",
    "FORMAT_VERSION",
    "ExportResult",
    "export_session",
    "import_session",
    "is_archive",
    "read_manifest",
]

ARCHIVE_SUFFIX = ".otf"
FORMAT = "onthefly-session"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROOT = "session"  # every member but the manifest lives under it
MAX_MANIFEST_BYTES = 64 << 20
CHUNK = 1 << 20
HASH_AHEAD = 4  # chunks read ahead of the hashing thread
RESERVED = (IMPORTED_FILE, LOCK_FILE)  # written by this machine's store, never taken from an archive


@dataclass
class ExportResult:
    path: Path
    bytes: int
    members: int
    final_checkpoint: dict[str, Any] | None  # the final model's registry row (None: no checkpoint)


# Inside a torchrun job's session: the other ranks' sessions (their rows, events, checkpoints).
RANKS_DIR = "ranks"


def is_archive(path: str | Path) -> bool:
    """True for a file that names itself an On The Fly archive (``.otf``) or is a tar."""
    p = Path(path)
    return p.is_file() and (p.suffix == ARCHIVE_SUFFIX or tarfile.is_tarfile(p))


# ---- export -------------------------------------------------------------------------------------
def export_session(session: str | Path | SessionReader, out: str | Path) -> ExportResult:
    """Write ``session`` (an id, a folder or a reader; live or ended) to the archive ``out``.

    The database is snapshot first; the archive holds what that snapshot registers, so a session
    still training exports consistently without being paused. Written under a temporary name and
    renamed when complete: a failure (a full disk, a folder that cannot be written) raises
    :class:`StoreError` and leaves no partial file. The final model is the newest checkpoint of
    the registry (a finished run saves one when it ends, a test saves the weights it tested)."""
    reader = session if isinstance(session, SessionReader) else open_session(session)
    out = Path(out)
    if out.is_dir():
        raise StoreError(f"{out} is a folder; give the archive's file name, e.g. {out / (reader.dir.name + ARCHIVE_SUFFIX)}")
    with _scratch("export") as scratch:
        snapshot = scratch / DB_FILE
        _snapshot_db(reader.db_path, snapshot)
        members, final, tested = _members(reader.dir, snapshot)
        for rank in sorted((reader.dir / RANKS_DIR).glob("rank-*")):  # a torchrun job's other ranks
            if not (rank / DB_FILE).is_file():
                continue
            rank_snapshot = scratch / RANKS_DIR / rank.name / DB_FILE
            rank_snapshot.parent.mkdir(parents=True)
            _snapshot_db(rank / DB_FILE, rank_snapshot)
            inner, _, _ = _members(rank, rank_snapshot)
            members.update({f"{ROOT}/{RANKS_DIR}/{rank.name}/{name.removeprefix(ROOT + '/')}": source
                            for name, source in inner.items()})
        sizes = {name: src.stat().st_size for name, src in members.items()}
        info = SessionReader(scratch).info()
        entries = {name: {"size": sizes[name], "sha256": "0" * 64} for name in members}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "writer": {"onthefly": __version__},
            "exported": time.time(),
            "environment": _read_json(reader.dir / ENVIRONMENT_FILE),
            "session": {key: info.get(key) for key in ("id", "project", "created", "ended", "status", "host",
                                                        "version", "schema_version")},
            "final_checkpoint": final,
            "tested_checkpoint": tested,
            "members": entries,
        }
        # Hashing (one thread: hashlib releases the GIL) runs while the kernel copies the members;
        # the manifest goes first with placeholder digests of the same length, filled in at the end.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="onthefly-hash") as pool:
            digests = {name: pool.submit(_sha256, source) for name, source in members.items()}

            def complete() -> dict[str, Any]:
                for name, digest in digests.items():
                    entries[name]["sha256"] = digest.result()
                return manifest

            _write_atomically(out, manifest, members, complete)
    return ExportResult(out, out.stat().st_size, len(members), final)


def _snapshot_db(source: Path, target: Path) -> None:
    """A consistent copy of the database while its writer may be committing (SQLite backup)."""
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30.0)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            dst.commit()
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot snapshot the session database {source}: {exc}") from exc


def _members(folder: Path, snapshot: Path) -> tuple[dict[str, Path], dict[str, Any] | None, dict[str, Any] | None]:
    """Archive name -> source file, for everything the snapshot registers. Checkpoints outside
    the session folder are taken in under ``checkpoints/external/`` (the snapshot says so)."""
    members: dict[str, Path] = {f"{ROOT}/{DB_FILE}": snapshot}

    def add(rel: str, source: Path) -> None:
        if not source.is_file():
            raise StoreError(f"the session registers {rel}, but {source} is missing; the session folder "
                             "was changed by hand or a disk lost it")
        members[f"{ROOT}/{rel}"] = source

    conn = sqlite3.connect(snapshot)
    try:
        for (rel,) in conn.execute("SELECT path FROM sample_files UNION SELECT path FROM slices "
                                   "UNION SELECT path FROM clusterings"):
            add(rel, folder / rel)
        registry = []
        for ckpt_id, run_id, step, epoch, path, reason in conn.execute(
                "SELECT id, run_id, step, epoch, path, reason FROM checkpoints ORDER BY id").fetchall():
            source = Path(path) if Path(path).is_absolute() else folder / path
            rel = _inside(source, folder) or f"checkpoints/external/checkpoint-{ckpt_id:05d}"
            if not source.is_dir():
                raise StoreError(f"checkpoint {ckpt_id} of the registry is missing ({source}); it was deleted "
                                 "after it was saved")
            # Its files, and those of its folders (a mixture's inference artifact lies beside its weights).
            for file in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
                add(f"{rel}/{file.relative_to(source).as_posix()}", file)
            if rel != path:  # the archive's registry is relative to the session folder
                conn.execute("UPDATE checkpoints SET path = ? WHERE id = ?", (rel, ckpt_id))
            registry.append({"id": ckpt_id, "run_id": run_id, "step": step, "epoch": epoch, "path": rel,
                             "reason": reason})
        tested = conn.execute("SELECT json_extract(payload, '$.checkpoint_id') FROM events WHERE kind = 'eval' "
                              "AND json_extract(payload, '$.split') = 'test' AND "
                              "json_extract(payload, '$.checkpoint_id') IS NOT NULL ORDER BY seq DESC LIMIT 1"
                              ).fetchone()
        conn.commit()
    finally:
        conn.close()
    for rel in (ENVIRONMENT_FILE,):
        if (folder / rel).is_file():
            add(rel, folder / rel)
    if (folder / SOURCE_DIR).is_dir():
        for file in sorted((folder / SOURCE_DIR).iterdir()):
            if file.is_file():
                add(f"{SOURCE_DIR}/{file.name}", file)
    final = registry[-1] if registry else None
    tested_row = next((r for r in registry if tested is not None and r["id"] == tested[0]), None)
    return members, final, tested_row


def _inside(path: Path, folder: Path) -> str | None:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _scratch(kind: str) -> Iterator[Path]:
    """A temporary folder under ``$ONTHEFLY_HOME/tmp`` named after this process, so that a later
    session removes what a killed export or import left behind."""
    root = onthefly_home() / "tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))
    except OSError as exc:
        raise StoreError(f"cannot create a temporary folder under {root}: {exc}. Set ONTHEFLY_HOME to a "
                         "writable folder.") from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_atomically(out: Path, manifest: dict[str, Any], members: dict[str, Path],
                      complete: Callable[[], dict[str, Any]]) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise StoreError(f"cannot write the archive {out}: {exc}. Choose a folder you can write to.") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb", buffering=0) as raw:
            _TarWriter(raw).write(manifest, members, complete)
            os.fsync(raw.fileno())  # export = save: on the disk before it takes the archive's name
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StoreError):
            raise StoreError(f"cannot write the archive {out}: {exc}. Nothing was left behind; free some space "
                             "or choose another folder.") from exc
        raise


class _TarWriter:
    """A POSIX (pax) tar written straight to a file: tarfile makes each header, the kernel copies
    each member's bytes (``os.sendfile``), so a 100 MB checkpoint is not pushed through Python in
    10 kB pieces as ``tarfile.addfile`` does."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.written = 0

    def write(self, manifest: dict[str, Any], members: dict[str, Path],
              complete: Callable[[], dict[str, Any]]) -> None:
        """The manifest first, as it is now, then every member; then ``complete()``'s manifest
        (the same length: only fixed-length digests change) over the first one."""
        data = json.dumps(manifest, indent=1).encode()
        self._header(MANIFEST, len(data), int(time.time()))
        manifest_at = self.written
        self._out(data)
        self._pad(len(data))
        for name, source in members.items():
            size = manifest["members"][name]["size"]
            with open(source, "rb") as f:
                self._header(name, size, int(os.fstat(f.fileno()).st_mtime))
                self._copy(f, size, source)
            self._pad(size)
        self._out(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
        self._out(bytes(-self.written % tarfile.RECORDSIZE))
        final = json.dumps(complete(), indent=1).encode()
        assert len(final) == len(data), "a digest changed the manifest's length"
        os.pwrite(self.raw.fileno(), final, manifest_at)

    def _header(self, name: str, size: int, mtime: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, 0o644
        self._out(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _copy(self, f: IO[bytes], size: int, source: Path) -> None:
        left = size
        while left:
            try:
                sent = os.sendfile(self.raw.fileno(), f.fileno(), None, min(left, 1 << 30))
                self.written += sent
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):
                    raise  # a full disk, a write error: said as such
                chunk = f.read(min(left, CHUNK))  # these files cannot sendfile: copy through here
                sent = len(chunk)
                self._out(chunk)
            if not sent:
                raise StoreError(f"{source} became shorter while it was being exported; export again")
            left -= sent

    def _pad(self, size: int) -> None:
        self._out(bytes(-size % tarfile.BLOCKSIZE))

    def _out(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = self.raw.write(view)
            view = view[done or 0:]
        self.written += len(data)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- import -------------------------------------------------------------------------------------
def read_manifest(archive: str | Path) -> dict[str, Any]:
    """The manifest of an archive, checked (format, version, members), without reading the rest."""
    with _open_tar(Path(archive)) as tar:
        return _manifest(tar, Path(archive))


def import_session(archive: str | Path, *, home: Path | None = None, replace: bool = False) -> Path:
    """Add the session in ``archive`` to this machine's sessions (kept until the user removes
    it); returns its folder. Its id is the one it was recorded with: a session of that id that
    is already here is refused unless ``replace`` (never one that is running)."""
    archive = Path(archive)
    root = sessions_root(home)
    scratch_root = (home or onthefly_home()) / "tmp"
    try:
        scratch_root.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"import-{os.getpid()}-", dir=scratch_root))
    except OSError as exc:
        raise StoreError(f"cannot import into {root}: {exc}. Set ONTHEFLY_HOME to a writable folder.") from exc
    try:
        manifest = _extract(archive, scratch)
        session_id = str(manifest["session"]["id"])
        _check_session(scratch, manifest, archive)
        (scratch / IMPORTED_FILE).write_text(json.dumps(
            {"archive": str(archive.resolve()), "imported": time.time(), "manifest": {
                k: manifest[k] for k in ("format_version", "writer", "exported", "environment",
                                         "final_checkpoint", "tested_checkpoint")}}, indent=1))
        target = root / session_id
        if target.exists():
            if is_alive(target) and not held_here(target):
                raise StoreError(f"session {session_id} is running on this machine; it cannot be replaced")
            if not replace:
                raise StoreError(f"session {session_id} is already on this machine ({target}); open it with "
                                 f"`onthefly open {session_id}`, or remove it first (`onthefly remove {session_id}`)")
            release_held(target)
            shutil.rmtree(target)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target


@contextlib.contextmanager
def _open_tar(archive: Path, *, seekable: bool = False) -> Iterator[tarfile.TarFile]:
    """The archive's members in order; ``seekable`` reads each member's bytes straight from the
    file (the streamed mode passes them through 10 kB buffers), and skips past a member's data
    without reading it."""
    try:
        raw = open(archive, "rb")
    except OSError as exc:
        raise StoreError(f"cannot read {archive}: {exc}") from exc
    try:
        try:
            tar = tarfile.open(fileobj=raw, mode="r:" if seekable else "r|")
        except tarfile.TarError as exc:
            raise StoreError(f"{archive} is not an On The Fly session archive (not a tar file: {exc})") from exc
        yield tar
    finally:
        raw.close()


def _bad(archive: Path, what: str) -> StoreError:
    return StoreError(f"{archive} is not a usable session archive: {what}. Nothing was imported.")


def _manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    first = _next(tar, archive)
    if first is None or first.name != MANIFEST:
        raise _bad(archive, f"its first member should be {MANIFEST}, found "
                            f"{'nothing' if first is None else repr(first.name)}")
    if not first.isreg() or first.size > MAX_MANIFEST_BYTES:
        raise _bad(archive, f"{MANIFEST} is not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
    stream = tar.extractfile(first)
    assert stream is not None  # a regular member
    try:
        manifest = json.loads(_read_exactly(stream, first.size, archive, MANIFEST))
    except ValueError as exc:
        raise _bad(archive, f"{MANIFEST} is not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(archive, f"{MANIFEST} does not describe an On The Fly session (format {manifest.get('format')!r})"
                   if isinstance(manifest, dict) else f"{MANIFEST} is not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _bad(archive, f"its format version {version!r} is not a positive whole number")
    if version > FORMAT_VERSION:
        writer = manifest.get("writer")
        raise StoreError(f"{archive} has archive format {version}, written by onthefly "
                         f"{writer.get('onthefly', '?') if isinstance(writer, dict) else '?'}; this onthefly "
                         f"({__version__}) reads "
                         f"format {FORMAT_VERSION} and older. Upgrade onthefly-ai to import it.")
    members = manifest.get("members")
    session = manifest.get("session")
    if not isinstance(members, dict) or not isinstance(session, dict) or not isinstance(session.get("id"), str):
        raise _bad(archive, f"{MANIFEST} lacks its members table or the session's id")
    if not _safe_id(session["id"]):
        raise _bad(archive, f"the session id {session['id']!r} is not a plain folder name")
    for name, entry in members.items():
        _check_name(name, archive)
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            raise _bad(archive, f"the manifest's entry for {name!r} needs a size and a SHA-256")
    for name in members:  # a file where another member needs a folder: refused here, not as a failed write
        parent = next((str(p) for p in PurePosixPath(name).parents if str(p) in members), None)
        if parent is not None:
            raise _bad(archive, f"member {name!r} lies inside the member {parent!r}")
    if f"{ROOT}/{DB_FILE}" not in members:
        raise _bad(archive, f"the manifest lists no {ROOT}/{DB_FILE}")
    return manifest


def _safe_id(value: str) -> bool:
    return bool(value) and value not in (".", "..") and all(c.isalnum() or c in "-_." for c in value)


def _check_name(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name)
    if (not isinstance(name, str) or name.startswith("/") or "\\" in name or path.is_absolute()
            or any(part in ("..", ".", "") for part in name.split("/")) or path.parts[:1] != (ROOT,)
            or len(path.parts) < 2):
        # '.' and empty parts do not escape, but they alias another member's file (session/./x is session/x)
        raise _bad(archive, f"member {name!r} escapes the session folder or is not a plain path in it (absolute, "
                            f"'..', '.', an empty part, a backslash, or not under {ROOT}/)")
    if path.parts[1] in RESERVED:
        raise _bad(archive, f"member {name!r} takes the place of {path.parts[1]}, which this machine's store writes "
                            "itself")
    return path


def _next(tar: tarfile.TarFile, archive: Path) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _bad(archive, f"it is truncated or damaged ({exc})") from exc


def _read_exactly(stream: IO[bytes], size: int, archive: Path, name: str,
                  sink: IO[bytes] | None = None, digest: Any = None, hasher: ThreadPoolExecutor | None = None) -> bytes:
    """Read a member's ``size`` bytes (and not one more), hashing and writing as it goes. With a
    ``hasher`` (one thread), chunks are hashed there while this thread reads and writes the next
    ones: hashlib and file I/O release the GIL, so the two overlap on two cores."""
    parts = []
    left = size
    pending: collections.deque[Future[None]] = collections.deque()
    try:
        while left:
            chunk = stream.read(min(CHUNK, left))
            if not chunk:
                raise _bad(archive, f"it is truncated: {name} ends {left} bytes early")
            left -= len(chunk)
            if digest is not None and hasher is not None and size > CHUNK:
                pending.append(hasher.submit(digest.update, chunk))  # one worker: in order
                if len(pending) > HASH_AHEAD:
                    pending.popleft().result()
            elif digest is not None:
                digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
            else:
                parts.append(chunk)
    except (tarfile.TarError, EOFError) as exc:
        raise _bad(archive, f"it is truncated or damaged in {name} ({exc})") from exc
    finally:
        for future in pending:
            future.result()
    return b"".join(parts)


def _extract(archive: Path, target: Path) -> dict[str, Any]:
    with _open_tar(archive, seekable=True) as tar, ThreadPoolExecutor(1, thread_name_prefix="onthefly-hash") as hasher:
        manifest = _manifest(tar, archive)
        expected: dict[str, dict[str, Any]] = manifest["members"]
        seen: set[str] = set()
        while (member := _next(tar, archive)) is not None:
            name = member.name
            _check_name(name, archive)
            if member.issym() or member.islnk():
                raise _bad(archive, f"member {name!r} is a link ({'symbolic' if member.issym() else 'hard'}); "
                                    "archives hold plain files only")
            if not member.isreg():
                raise _bad(archive, f"member {name!r} is not a plain file")
            if name not in expected:
                raise _bad(archive, f"member {name!r} is not in the manifest")
            if name in seen:
                raise _bad(archive, f"member {name!r} appears twice")
            entry = expected[name]
            if member.size != entry["size"]:  # before reading a byte of it: the bomb guard
                raise _bad(archive, f"member {name!r} is {member.size} bytes where the manifest says {entry['size']}")
            dest = target / PurePosixPath(name).relative_to(ROOT)
            stream = tar.extractfile(member)
            assert stream is not None
            digest = hashlib.sha256()
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "xb") as sink:
                    _read_exactly(stream, entry["size"], archive, name, sink, digest, hasher)
            except StoreError:  # a StoreError is an OSError: a damaged archive, not a failed write
                raise
            except OSError as exc:
                raise StoreError(f"cannot write {dest} while importing {archive}: {exc}") from exc
            if digest.hexdigest() != entry["sha256"]:
                raise _bad(archive, f"member {name!r} does not match its SHA-256 in the manifest (damaged or altered)")
            seen.add(name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise _bad(archive, f"{len(missing)} member(s) of the manifest are missing, e.g. {missing[0]!r} "
                                "(the file is truncated?)")
    return manifest


def _check_session(folder: Path, manifest: dict[str, Any], archive: Path) -> None:
    """The contents are what they claim: a sound database of this session (and of each of a
    torchrun job's other ranks), tensors-only checkpoints."""
    session_id, paths = _read_db(folder, "its database", archive)
    if session_id != manifest["session"]["id"]:
        raise _bad(archive, "its database belongs to another session than the manifest names")
    _check_checkpoints(folder, paths, archive)
    for rank in sorted((folder / RANKS_DIR).glob("rank-*")):
        _, ranked = _read_db(rank, f"the database of {RANKS_DIR}/{rank.name}", archive)
        _check_checkpoints(rank, ranked, archive)


def _read_db(folder: Path, what: str, archive: Path) -> tuple[str | None, list[str]]:
    """(session id, checkpoint paths) of the database in ``folder``, which must pass SQLite's
    integrity check."""
    try:
        conn = sqlite3.connect(f"file:{folder / DB_FILE}?mode=ro", uri=True)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            row = conn.execute("SELECT id FROM session").fetchone()
            paths = [r[0] for r in conn.execute("SELECT path FROM checkpoints")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _bad(archive, f"{what} cannot be read ({exc})") from exc
    if check != "ok":
        raise _bad(archive, f"{what} fails SQLite's integrity check ({check})")
    return (None if row is None else str(row[0])), paths


def _check_checkpoints(folder: Path, paths: list[str], archive: Path) -> None:
    """Every registered checkpoint inside ``folder``, its state file tensors-only."""
    import torch.serialization

    for rel in paths:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise _bad(archive, f"its checkpoint registry points outside the session ({rel!r})")
        state = folder / rel / STATE_FILE
        if not state.is_file():
            raise _bad(archive, f"checkpoint {rel} of its registry is not in the archive")
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(state))
        except Exception as exc:  # not a torch file at all
            raise _bad(archive, f"{rel}/{STATE_FILE} is not a tensors-only state file ({type(exc).__name__}: {exc})") \
                from exc
        if unsafe:
            raise _bad(archive, f"{rel}/{STATE_FILE} holds pickled objects ({', '.join(unsafe[:3])}); "
                                "checkpoints hold tensors, numbers and strings only, and import never unpickles")
