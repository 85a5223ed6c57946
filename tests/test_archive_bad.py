"""Importing a bad session archive: every kind is refused with a message that names the fault,
nothing is written outside the import's temporary folder (which is removed), and no pickle runs.

Each test rewrites one good archive (exported once from a real session) in memory: members can be
renamed, retyped, edited, added or dropped, the manifest edited or left stale, and the tar written
back with :mod:`tarfile`."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import pytest
import torch

from onthefly.errors import StoreError
from onthefly.store import archive as archive_module
from onthefly.store.archive import FORMAT_VERSION, export_session, import_session
from test_sessions import train

DB = "session/session.sqlite"
ENVIRONMENT = "session/environment.json"


# ---- the good archive and a rewriter ------------------------------------------------------------
@pytest.fixture(scope="module")
def good_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real session (a short run with its test checkpoint), exported once for the module."""
    folder = tmp_path_factory.mktemp("good")
    with pytest.MonkeyPatch.context() as mp:  # the per-test ONTHEFLY_HOME is not set up yet here
        mp.setenv("ONTHEFLY_HOME", str(folder / "home"))
        mp.setenv("ONTHEFLY_DASHBOARD", "0")
        summary, _ = train(1)
        return export_session(summary.session_dir, folder / "good.otf").path


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    stream: IO[bytes] | None = None  # written instead of ``data`` (lazily, ``size`` bytes)
    size: int | None = None


@dataclass
class Archive:
    """A session archive held in memory: its manifest and its members in order."""

    manifest: dict[str, Any]
    members: list[Member] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Archive:
        with tarfile.open(path) as tar:
            infos = tar.getmembers()
            data = [tar.extractfile(info).read() for info in infos]  # type: ignore[union-attr]
        assert infos[0].name == "manifest.json"
        return cls(json.loads(data[0]), [Member(i.name, d) for i, d in zip(infos[1:], data[1:], strict=True)])

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def member_ending(self, suffix: str) -> Member:
        return next(m for m in self.members if m.name.endswith(suffix))

    def replace_data(self, name: str, data: bytes) -> None:
        """New bytes for a member, with the manifest's size and SHA-256 kept right."""
        self.member(name).data = data
        self.describe(name, data)

    def add(self, member: Member, *, listed: bool = True) -> None:
        self.members.append(member)
        if listed:
            self.describe(member.name, member.data)

    def describe(self, name: str, data: bytes) -> None:
        """List ``name`` in the manifest with the size and SHA-256 of ``data``."""
        self.manifest["members"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def write(self, path: Path, *, manifest: bytes | None = None, manifest_first: bool = True) -> Path:
        manifest_member = Member("manifest.json", json.dumps(self.manifest).encode() if manifest is None else manifest)
        members = [manifest_member, *self.members] if manifest_first else [*self.members, manifest_member]
        with open(path, "wb") as raw:
            sparse = cast(IO[bytes], SparseWriter(raw))
            with tarfile.open(fileobj=sparse, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for m in members:
                    info = tarfile.TarInfo(m.name)
                    info.type, info.linkname, info.mode, info.mtime = m.type, m.linkname, 0o644, 1_700_000_000
                    if m.stream is not None:
                        assert m.size is not None
                        info.size = m.size
                        tar.addfile(info, m.stream)
                    elif info.isreg():
                        info.size = len(m.data)
                        tar.addfile(info, io.BytesIO(m.data))
                    else:
                        tar.addfile(info)
            raw.truncate(raw.tell())  # a trailing hole still counts in the file's length
        return path


class SparseWriter:
    """A write-only file that leaves holes for runs of zeros: a 200 MB member of zeros costs no disk."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def write(self, data: bytes) -> int:
        if data.count(0) == len(data):
            self.raw.seek(len(data), os.SEEK_CUR)
        else:
            self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.raw.tell()


class Zeros(io.RawIOBase):
    """``size`` zero bytes, made as they are read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def bad(good_archive: Path) -> Archive:
    return Archive.read(good_archive)


def refuse(path: Path, match: str) -> str:
    with pytest.raises(StoreError, match=match) as refused:
        import_session(path)
    return str(refused.value)


@contextlib.contextmanager
def untouched_after(tmp_path: Path) -> Iterator[None]:
    """Around an import that must fail: afterwards no session was added, the import's temporary
    folder is empty, and nothing else under ``tmp_path`` appeared (only the empty ``sessions`` and
    ``tmp`` folders of ONTHEFLY_HOME may)."""
    home = Path(os.environ["ONTHEFLY_HOME"])
    before = set(tmp_path.rglob("*"))
    yield
    sessions, scratch = home / "sessions", home / "tmp"
    assert not sessions.exists() or not any(sessions.iterdir()), list(sessions.iterdir())
    assert not scratch.exists() or not any(scratch.iterdir()), list(scratch.iterdir())
    assert set(tmp_path.rglob("*")) - before <= {home, sessions, scratch}
    assert not (Path.cwd() / "escaped.txt").exists()


# ---- a control: the rewriter itself makes importable archives -----------------------------------
def test_the_rewritten_good_archive_imports(bad: Archive, tmp_path: Path, onthefly_home: Path) -> None:
    folder = import_session(bad.write(tmp_path / "same.otf"))
    assert folder.parent == onthefly_home / "sessions" and (folder / "session.sqlite").is_file()
    assert not any((onthefly_home / "tmp").iterdir())


# ---- names and kinds of members -----------------------------------------------------------------
@pytest.mark.parametrize("listed", [True, False], ids=["listed", "unlisted"])
@pytest.mark.parametrize("name", ["absolute", "../../escaped.txt", "../escaped.txt", "samples/../../../escaped.txt",
                                  "session/../../escaped.txt", "session/./session.sqlite", "session//x",
                                  "session", "other/x", "session\\..\\..\\escaped.txt"])
def test_a_member_outside_the_session_folder_is_refused(bad: Archive, tmp_path: Path, name: str, listed: bool
                                                        ) -> None:
    target = tmp_path / "abs-escaped.txt"
    name = str(target) if name == "absolute" else name
    bad.add(Member(name, b"escaped"), listed=listed)
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, rf"member {re.escape(repr(name))} escapes the session folder")
    assert not target.exists() and not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize(("kind", "linkname", "match"), [
    (tarfile.SYMTYPE, "/etc/passwd", r"member 'session/link' is a link \(symbolic\); archives hold plain files"),
    (tarfile.SYMTYPE, "../../outside.txt", r"member 'session/link' is a link \(symbolic\)"),
    (tarfile.LNKTYPE, "outside", r"member 'session/link' is a link \(hard\); archives hold plain files"),
    (tarfile.LNKTYPE, DB, r"member 'session/link' is a link \(hard\)"),
    (tarfile.FIFOTYPE, "", r"member 'session/link' is not a plain file"),
    (tarfile.CHRTYPE, "", r"member 'session/link' is not a plain file"),
    (tarfile.DIRTYPE, "", r"member 'session/link' is not a plain file"),
], ids=["symlink-absolute", "symlink-relative", "hardlink-outside", "hardlink-member", "fifo", "device", "folder"])
def test_a_link_or_special_member_is_refused(bad: Archive, tmp_path: Path, kind: bytes, linkname: str,
                                             match: str) -> None:
    outside = tmp_path / "outside"
    outside.write_text("keep me")
    linkname = str(outside) if linkname == "outside" else linkname
    bad.add(Member("session/link", type=kind, linkname=linkname))  # listed: only its kind can refuse it
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, match)
    assert outside.read_text() == "keep me" and not (tmp_path / "outside.txt").exists()


def test_a_member_missing_from_the_manifest_is_refused(bad: Archive, tmp_path: Path) -> None:
    bad.add(Member("session/extra.txt", b"not listed"), listed=False)
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, r"member 'session/extra.txt' is not in the manifest")


def test_a_member_twice_is_refused(bad: Archive, tmp_path: Path) -> None:
    bad.members.append(copy.deepcopy(bad.member(ENVIRONMENT)))
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, rf"member '{ENVIRONMENT}' appears twice")


@pytest.mark.parametrize("nested_first", [False, True])
def test_a_member_inside_another_member_is_refused(bad: Archive, tmp_path: Path, nested_first: bool) -> None:
    nested = Member(f"{ENVIRONMENT}/inner", b"a file where a file already is")
    bad.add(nested)
    if nested_first:
        bad.members.insert(0, bad.members.pop())
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, rf"member '{ENVIRONMENT}/inner' lies inside the member '{ENVIRONMENT}'")


@pytest.mark.parametrize("name", ["session/imported.json", "session/imported.json/x", "session/session.lock",
                                  "session/session.lock/x"])
def test_a_member_where_the_store_writes_its_own_file_is_refused(bad: Archive, tmp_path: Path, name: str) -> None:
    bad.add(Member(name, b"{}"))  # a folder there would break the import's record or the session's lock
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, rf"member '{name}' takes the place of (imported\.json|session\.lock), which this machine's "
                     "store writes itself")


def test_a_member_of_the_manifest_missing_from_the_archive_is_refused(bad: Archive, tmp_path: Path) -> None:
    bad.members.remove(bad.member(ENVIRONMENT))
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, rf"1 member\(s\) of the manifest are missing, e\.g\. '{ENVIRONMENT}'")


# ---- the manifest -------------------------------------------------------------------------------
def test_an_archive_without_a_manifest_is_refused(bad: Archive, tmp_path: Path) -> None:
    path = bad.write(tmp_path / "bad.otf", manifest_first=False)
    with untouched_after(tmp_path):
        refuse(path, rf"its first member should be manifest\.json, found '{DB}'")


@pytest.mark.parametrize(("manifest", "match"), [
    (b"{not json", r"manifest\.json is not JSON"),
    (b"\xff\xfe\x00garbage", r"manifest\.json is not JSON"),
    (b"", r"manifest\.json is not JSON"),
    (b"[1, 2]", r"manifest\.json is not a JSON object"),
    (b'{"format": "zip"}', r"manifest\.json does not describe an On The Fly session \(format 'zip'\)"),
])
def test_a_manifest_that_is_not_one_is_refused(bad: Archive, tmp_path: Path, manifest: bytes, match: str) -> None:
    path = bad.write(tmp_path / "bad.otf", manifest=manifest)
    with untouched_after(tmp_path):
        refuse(path, match)


@pytest.mark.parametrize(("edit", "match"), [
    ({"format_version": 0}, r"its format version 0 is not a positive whole number"),
    ({"format_version": "1"}, r"its format version '1' is not a positive whole number"),
    ({"members": []}, r"manifest\.json lacks its members table or the session's id"),
    ({"session": {"id": 7}}, r"manifest\.json lacks its members table or the session's id"),
    ({"session": {"id": "../x"}}, r"the session id '\.\./x' is not a plain folder name"),
    ({"session": {"id": ".."}}, r"the session id '\.\.' is not a plain folder name"),
    ({"members": {DB: {"size": -1, "sha256": "0" * 64}}}, rf"the manifest's entry for '{DB}' needs a size and a SHA"),
    ({"members": {DB: {"size": 1}}}, rf"the manifest's entry for '{DB}' needs a size and a SHA"),
    ({"members": {ENVIRONMENT: {"size": 0, "sha256": "0" * 64}}}, rf"the manifest lists no {DB}"),
], ids=["version-0", "version-str", "members-list", "id-int", "id-path", "id-dotdot", "size-negative", "no-sha",
        "no-database"])
def test_a_manifest_with_bad_fields_is_refused(bad: Archive, tmp_path: Path, edit: dict[str, Any], match: str
                                              ) -> None:
    bad.manifest.update(edit)
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, match)


@pytest.mark.parametrize("writer", [{"onthefly": "9.0.0"}, "not a table", None])
def test_a_newer_format_says_to_upgrade(bad: Archive, tmp_path: Path, writer: object) -> None:
    bad.manifest["format_version"] = FORMAT_VERSION + 1
    bad.manifest["writer"] = writer
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, rf"has archive format {FORMAT_VERSION + 1}, written by onthefly .*reads format "
                     rf"{FORMAT_VERSION} and older\. Upgrade onthefly-ai to import it\.")


# ---- sizes, checksums, truncation, not an archive -----------------------------------------------
@pytest.mark.parametrize("name", [DB, ENVIRONMENT, "state.pt"])
def test_a_changed_byte_fails_the_checksum(bad: Archive, tmp_path: Path, name: str) -> None:
    member = bad.member_ending(name)
    flipped = bytearray(member.data)
    flipped[len(flipped) // 2] ^= 0x01
    member.data = bytes(flipped)  # the manifest keeps the old SHA-256
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, rf"member '{member.name}' does not match its SHA-256 in the manifest \(damaged or altered\)")


def test_a_member_larger_than_the_manifest_says_is_refused_before_it_is_read(
        bad: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huge = 200 << 20
    member = bad.member(ENVIRONMENT)
    member.stream, member.size = cast(IO[bytes], Zeros(huge)), huge  # the manifest still says a few hundred bytes
    listed = bad.manifest["members"][ENVIRONMENT]["size"]
    path = bad.write(tmp_path / "bomb.otf")
    assert path.stat().st_size > huge  # the archive really holds it (as a hole on disk)
    read: list[str] = []
    real_read = archive_module._read_exactly

    def spy(stream: IO[bytes], size: int, archive: Path, name: str, *args: Any, **kwargs: Any) -> bytes:
        read.append(name)
        return real_read(stream, size, archive, name, *args, **kwargs)

    monkeypatch.setattr(archive_module, "_read_exactly", spy)
    with untouched_after(tmp_path):
        refuse(path, rf"member '{ENVIRONMENT}' is {huge} bytes where the manifest says {listed}")
    assert ENVIRONMENT not in read and DB in read  # refused on its header: not one byte of it was read


@pytest.mark.parametrize("cut", ["half", "in-the-manifest", "in-a-header", "in-a-member", "at-a-member",
                                 "in-the-last-member", "before-the-end-blocks"])
def test_a_truncated_archive_is_refused(good_archive: Path, tmp_path: Path, cut: str) -> None:
    data = good_archive.read_bytes()
    with tarfile.open(good_archive) as tar:
        manifest, db, third, *_, last = tar.getmembers()
    assert db.name == DB
    missing = r"\d+ member\(s\) of the manifest are missing, e\.g\. '.*' \(the file is truncated\?\)"
    at, match = {
        "half": (len(data) // 2, rf"it is truncated or damaged in {DB} \(unexpected end of data\)"),
        "in-the-manifest": (manifest.offset_data + 100, r"it is truncated or damaged in manifest\.json"),
        "in-a-header": (db.offset + 100, missing),  # tarfile reads a cut header as the end of the archive
        "in-a-member": (db.offset_data + 1000, rf"it is truncated or damaged in {DB}"),
        "at-a-member": (third.offset, missing),
        "in-the-last-member": (last.offset_data + last.size // 2, rf"it is truncated or damaged in {last.name}"),
        "before-the-end-blocks": (last.offset_data + last.size, r"it is truncated or damaged \(unexpected end"),
    }[cut]
    path = tmp_path / "cut.otf"
    path.write_bytes(data[:at])
    with untouched_after(tmp_path):
        message = refuse(path, rf"is not a usable session archive: {match}")
    assert not message.startswith("cannot write")  # a cut archive is not a full disk


@pytest.mark.parametrize(("content", "match"), [
    (random.Random(0).randbytes(4096), r"is not an On The Fly session archive \(not a tar file: invalid header\)"),
    (random.Random(1).randbytes(100), r"is not an On The Fly session archive \(not a tar file: truncated header\)"),
    (b"", r"is not an On The Fly session archive \(not a tar file: empty file\)"),
    (bytes(10240), r"its first member should be manifest\.json, found nothing"),
], ids=["random", "random-short", "empty", "empty-tar"])
def test_a_file_that_is_not_an_archive_is_refused(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "not-an-archive.otf"
    path.write_bytes(content)
    with untouched_after(tmp_path):
        refuse(path, match)


def test_a_missing_archive_is_refused(tmp_path: Path) -> None:
    with untouched_after(tmp_path):
        refuse(tmp_path / "nowhere.otf", r"cannot read .*nowhere\.otf")


# ---- the contents -------------------------------------------------------------------------------
def test_a_checkpoint_that_would_run_code_is_refused_unread(bad: Archive, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"step": 8, "weights": torch.zeros(3), "evil": RunsCode(pwned)}, payload)
    live = tmp_path / "live"  # the payload is real: loading a twin with pickle enabled runs its command
    twin = io.BytesIO()
    torch.save({"evil": RunsCode(live)}, twin)
    twin.seek(0)
    torch.load(twin, weights_only=False)
    assert live.is_file()
    state = bad.member_ending("/state.pt")
    bad.replace_data(state.name, payload.getvalue())  # size and SHA-256 right: only the content check is left
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, r"state\.pt holds pickled objects \(posix\.system\); checkpoints hold tensors, numbers and "
                     r"strings only, and import never unpickles")
    assert not pwned.exists()


def test_a_state_file_that_is_not_a_torch_file_is_refused(bad: Archive, tmp_path: Path) -> None:
    state = bad.member_ending("/state.pt")
    bad.replace_data(state.name, b"not a zip, not a pickle")
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, r"state\.pt is not a tensors-only state file")


@pytest.mark.parametrize(("damage", "match"), [
    ("garbage", r"its database cannot be read \(file is not a database\)"),
    ("page-header", r"its database cannot be read \(database disk image is malformed\)"),
])
def test_a_database_that_is_not_sound_is_refused(bad: Archive, tmp_path: Path, damage: str, match: str) -> None:
    db = bytearray(bad.member(DB).data)
    if damage == "garbage":
        db[:] = b"SQLite format 3\x00" + bytes(4080)
    else:
        page = int.from_bytes(db[16:18], "big")
        db[page:page + 8] = b"\xff" * 8  # the b-tree header of page 2
    bad.replace_data(DB, bytes(db))  # size and SHA-256 right: only SQLite can tell
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, match)


def test_a_database_of_another_session_is_refused(bad: Archive, tmp_path: Path) -> None:
    bad.manifest["session"]["id"] = "20240101-000000-someone-else"  # members and checksums untouched
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        refuse(path, r"its database belongs to another session than the manifest names")


# ---- the command line ---------------------------------------------------------------------------
def test_cli_import_of_a_bad_archive_exits_2_with_the_message(bad: Archive, tmp_path: Path,
                                                              subprocess_env: dict[str, str]) -> None:
    member = bad.member(DB)
    member.data = member.data[:-1] + bytes([member.data[-1] ^ 1])
    path = bad.write(tmp_path / "bad.otf")
    with untouched_after(tmp_path):
        done = subprocess.run([sys.executable, "-m", "onthefly.cli", "import", str(path)], capture_output=True,
                              text=True, env={**subprocess_env, "COLUMNS": "1000"}, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"error: {path} is not a usable session archive: member '{DB}' does not match its SHA-256" in done.stderr
    assert "Traceback" not in done.stderr
