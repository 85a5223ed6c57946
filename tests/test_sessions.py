"""Portable sessions: export = save, import, resume from an archive exactly, tests after it, the
ephemeral clean-up, and an export that fails cleanly."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import onthefly
from conftest import REPO, toy_data, toy_model
from onthefly.errors import StoreError
from onthefly.store import list_sessions, open_session, read_checkpoint
from onthefly.store.archive import export_session, import_session, read_manifest
from onthefly.store.session import remove_session

TABLES = ("session", "runs", "events", "metrics", "checkpoints", "slices", "clusterings", "sample_files")


def train(epochs: int, *, resume_from: str | Path | None = None, callbacks: tuple[onthefly.Callback, ...] = (),
          test: bool = True, **options: Any) -> tuple[onthefly.FitSummary, torch.nn.Module]:
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    gen = torch.Generator().manual_seed(7)
    summary = onthefly.quickstart(
        project="portable", run_name="base", model=model, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True, generator=gen),
        val_loader=DataLoader(toy_data(64, seed=1), batch_size=32),
        test_loader=DataLoader(toy_data(64, seed=2), batch_size=32) if test else None,
        max_epochs=epochs, do_test_after=test, scheduler=scheduler, resume_from=resume_from,
        callbacks=callbacks, progress=False, **options)
    return summary, model


def rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        conn.close()


def move_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """Another machine: a fresh ONTHEFLY_HOME."""
    home = tmp_path / name
    monkeypatch.setenv("ONTHEFLY_HOME", str(home))
    return home


def test_export_then_import_keeps_every_id_value_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary, _ = train(2)
    folder = summary.session_dir
    result = export_session(folder.name, tmp_path / "base.otf")
    assert result.path.is_file() and result.final_checkpoint is not None

    manifest = read_manifest(result.path)
    assert manifest["format_version"] == 1 and manifest["writer"]["onthefly"] == onthefly.__version__
    assert manifest["session"]["id"] == folder.name
    assert manifest["environment"]["torch"] == torch.__version__
    assert {"cuda", "device", "deterministic_algorithms", "world_size"} <= set(manifest["environment"])
    with tarfile.open(result.path) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and set(names[1:]) == set(manifest["members"])
    for name, entry in manifest["members"].items():
        assert len(entry["sha256"]) == 64 and entry["size"] >= 0, name

    move_home(monkeypatch, tmp_path, "other-machine")
    imported = import_session(result.path)
    assert imported.name == folder.name
    assert [s.imported for s in list_sessions()] == [True]
    for table in TABLES:
        original, copied = rows(folder / "session.sqlite", table), rows(imported / "session.sqlite", table)
        if table == "checkpoints":  # paths are relative to the session folder, the rest is as it was
            original = [r[:5] + r[6:] for r in original]
            copied = [r[:5] + r[6:] for r in copied]
        assert copied == original, table
    before, after = open_session(folder), open_session(imported)
    for split in ("train",):  # the per-sample table, bit for bit (NaN grad norms included)
        a, b = before.samples(1, split=split), after.samples(1, split=split)
        assert a.schema == b.schema and a.num_rows == b.num_rows > 0
        for name in a.column_names:
            assert np.array_equal(a.column(name).to_numpy(zero_copy_only=False),
                                  b.column(name).to_numpy(zero_copy_only=False), equal_nan=a.column(name).type
                                  in (pa.float32(), pa.float64())), name
    weights, _ = read_checkpoint(Path(after.checkpoints()[-1]["path"]))
    original_weights, _ = read_checkpoint(Path(before.checkpoints()[-1]["path"]))
    assert weights.keys() == original_weights.keys()
    assert all(torch.equal(weights[k], original_weights[k]) for k in weights)
    assert Path(after.checkpoints()[-1]["path"]).is_relative_to(imported)
    assert pq.read_table(next((imported / "samples").rglob("*.parquet"))).num_rows > 0


def test_the_final_model_is_always_inside(tmp_path: Path) -> None:
    summary, _ = train(1, test=False)
    manifest = read_manifest(export_session(summary.session_dir, tmp_path / "s.otf").path)
    final = manifest["final_checkpoint"]
    assert (final["reason"], final["step"]) == ("final", summary.steps)
    assert manifest["tested_checkpoint"] is None


def test_every_test_names_its_checkpoint_and_training_goes_on_after_it(tmp_path: Path) -> None:
    class MoreAfterTest(onthefly.Callback):
        """After the planned epoch's test: one more epoch, then another test."""

        def __init__(self) -> None:
            self.sent = False

        def on_epoch_end(self, run: onthefly.Run) -> None:
            if run.epoch == 0 and not self.sent:
                self.sent = True
                run.request("test")
                run.request("train_more", epochs=1)

    summary, _ = train(1, callbacks=(MoreAfterTest(),))
    reader = open_session(summary.session_dir)
    tests = [e for e in reader.events(kind="eval") if e["payload"]["split"] == "test"]
    assert len(tests) == 2
    by_id = {c["id"]: c for c in reader.checkpoints()}
    steps = [by_id[t["payload"]["checkpoint_id"]]["step"] for t in tests]
    assert steps == [8, 16]  # one per epoch of 8 batches: each test tested the weights of its step
    manifest = read_manifest(export_session(reader, tmp_path / "t.otf").path)
    assert manifest["tested_checkpoint"]["id"] == tests[-1]["payload"]["checkpoint_id"]


def test_resume_from_an_archive_is_bit_identical_and_continues_the_same_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, uninterrupted = train(3, test=False)

    move_home(monkeypatch, tmp_path, "first-machine")
    first, _ = train(1, test=False)
    archive = export_session(first.session_dir, tmp_path / "one-epoch.otf").path

    move_home(monkeypatch, tmp_path, "second-machine")
    resumed, model = train(3, resume_from=archive, test=False)
    assert resumed.session_dir.name == first.session_dir.name  # into the same session
    assert resumed.run_id == first.run_id  # the same run goes on: its curves continue
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    reader = open_session(resumed.session_dir)
    steps = [m["step"] for m in reader.metrics(resumed.run_id, "train_loss")]
    assert steps == list(range(1, whole.steps + 1))
    assert [r["id"] for r in reader.runs()] == [first.run_id]
    assert reader.events(kind="resume_unverified")  # nothing recorded after the final checkpoint


def test_resume_from_an_earlier_checkpoint_of_an_archive_checks_its_first_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class SaveAt(onthefly.Callback):
        def on_step_end(self, run: onthefly.Run) -> None:
            if run.global_step == 5:
                run.save_checkpoint(reason="manual")

    first, _ = train(2, callbacks=(SaveAt(),), test=False)
    ckpt = next(c for c in open_session(first.session_dir).checkpoints() if c["step"] == 5)
    archive = export_session(first.session_dir, tmp_path / "two.otf").path

    move_home(monkeypatch, tmp_path, "elsewhere")
    resumed, _ = train(2, resume_from=f"{archive}#{ckpt['id']}", callbacks=(SaveAt(),), test=False)
    reader = open_session(resumed.session_dir)
    runs = reader.runs()
    assert [r["id"] for r in runs] == [first.run_id, resumed.run_id]
    assert (runs[1]["parent_id"], runs[1]["parent_checkpoint_id"]) == (first.run_id, ckpt["id"])  # lineage
    (verified,) = reader.events(kind="resume_verified")
    assert verified["payload"]["step"] == 6
    assert verified["payload"]["loss"] == verified["payload"]["recorded"]
    original = reader.metrics(first.run_id, "train_loss")
    again = reader.metrics(resumed.run_id, "train_loss")
    assert [m["value"] for m in again] == [m["value"] for m in original[5:]]


def test_resume_from_an_archive_without_that_checkpoint_says_which_exist(tmp_path: Path) -> None:
    first, _ = train(1, test=False)
    archive = export_session(first.session_dir, tmp_path / "a.otf").path
    with pytest.raises(StoreError, match="has no checkpoint 99"):
        train(1, resume_from=f"{archive}#99", test=False)


def test_cli_export_import_sessions_and_run_resume(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    script = tmp_path / "train.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import torch
from torch.utils.data import DataLoader
from conftest import toy_data, toy_model
from onthefly import quickstart
torch.manual_seed(0)
model = toy_model()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
summary = quickstart(project="cli", run_name="r", model=model, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(),
                     train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True), max_epochs=int(sys.argv[1]),
                     progress=False, dashboard=False, keep_alive=False)
print("STEPS", summary.steps, summary.session_dir.name, flush=True)
""")

    def cli(*args: str, env: dict[str, str] = subprocess_env) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "onthefly.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300)

    first = cli("run", str(script), "1", "--no-browser")
    assert first.returncode == 0, first.stderr
    session_id = first.stdout.split("STEPS")[1].split()[1]
    out = tmp_path / "saved.otf"
    exported = cli("export", "--out", str(out))  # the latest session by default
    assert exported.returncode == 0, exported.stderr
    assert "final model: checkpoint" in exported.stdout and out.is_file()

    other = {**subprocess_env, "ONTHEFLY_HOME": str(tmp_path / "laptop")}
    report = cli("report", str(out), "--out", str(tmp_path / "report.html"), env=other)
    assert report.returncode == 0, report.stderr
    assert "<svg" in (tmp_path / "report.html").read_text() and not (tmp_path / "laptop" / "sessions").exists()
    imported = cli("import", str(out), env=other)
    assert imported.returncode == 0, imported.stderr
    listed = cli("sessions", env=other)
    assert session_id in listed.stdout and "imported" in listed.stdout
    again = cli("import", str(out), env=other)
    assert again.returncode == 2 and "already on this machine" in again.stderr

    resumed = cli("run", "--resume", str(out), str(script), "2", "--no-browser", env=other)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split("STEPS")[1].split()[:2] == ["16", session_id]
    reader = onthefly.open_session(tmp_path / "laptop" / "sessions" / session_id)
    assert [m["step"] for m in reader.metrics(1, "train_loss")] == list(range(1, 17))

    removed = cli("remove", session_id, env=other)
    assert removed.returncode == 0 and not (tmp_path / "laptop" / "sessions" / session_id).exists()


TRAIN_ONCE = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import torch
from torch.utils.data import DataLoader
from conftest import toy_data, toy_model
from onthefly import quickstart
model = toy_model()
s = quickstart(project="eph", run_name="r", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               loss_fn=torch.nn.CrossEntropyLoss(), train_loader=DataLoader(toy_data(64), batch_size=32),
               max_epochs=1, progress=False, dashboard=False)
print("SESSION", s.session_dir.name)
"""


def test_a_new_session_says_what_it_cleaned_up_and_keeps_what_it_should(
        onthefly_home: Path, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    def session(**env: str) -> tuple[str, str]:
        done = subprocess.run([sys.executable, "-c", TRAIN_ONCE], env={**subprocess_env, **env},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split("SESSION")[1].split()[0], done.stderr

    root = onthefly_home / "sessions"
    first, _ = session()
    second, err = session()
    assert "removed 1 ended session(s)" in err and first in err and "onthefly export" in err
    assert not (root / first).exists()
    third, err = session(ONTHEFLY_KEEP_SESSIONS="1")
    assert "removed" not in err and (root / second).exists()  # the most recent ended one is kept

    archive = export_session(root / third, tmp_path / "keep.otf").path
    remove_session(root / third)
    kept = import_session(archive)
    fourth, err = session()
    assert kept.exists() and third not in err  # imported: the user's saved work, never cleaned up
    assert not (root / second).exists()
    done = subprocess.run([sys.executable, "-c", TRAIN_ONCE], env={**subprocess_env, "ONTHEFLY_KEEP_SESSIONS": "many"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ONTHEFLY_KEEP_SESSIONS must be a whole number" in done.stderr
    assert (root / fourth).exists()


def test_export_of_a_live_session_is_a_consistent_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()
    archives: list[Path] = []

    class Exporter(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            if run.epoch == 1:
                started.set()

    thread = threading.Thread(target=train, args=(4,), kwargs={"callbacks": (Exporter(),), "test": False})
    thread.start()
    assert started.wait(120)
    session_dir = list_sessions()[-1].path
    while thread.is_alive() and len(archives) < 3:  # exports while the training thread writes
        archives.append(export_session(session_dir, tmp_path / f"live-{len(archives)}.otf").path)
    thread.join(120)
    assert archives
    for i, archive in enumerate(archives):
        move_home(monkeypatch, tmp_path, f"check-{i}")
        imported = import_session(archive)
        conn = sqlite3.connect(imported / "session.sqlite")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            registered = {r[0] for r in conn.execute("SELECT path FROM sample_files")}
        finally:
            conn.close()
        on_disk = {p.relative_to(imported).as_posix() for p in (imported / "samples").rglob("*.parquet")}
        assert on_disk == registered  # what the snapshot registers, every file of it, nothing else
        reader = open_session(imported)
        for checkpoint in reader.checkpoints():
            read_checkpoint(Path(checkpoint["path"]))


def test_an_export_that_cannot_be_written_says_so_and_leaves_nothing(tmp_path: Path,
                                                                       subprocess_env: dict[str, str]) -> None:
    summary, _ = train(1, test=False)
    complete = export_session(summary.session_dir, tmp_path / "complete.otf").path.stat().st_size
    largest = max(p.stat().st_size for p in summary.session_dir.rglob("*") if p.is_file())
    limit = (largest + complete) // 2  # every file of the session fits; the archive does not
    assert largest < limit < complete
    out = tmp_path / "out" / "full.otf"
    out.parent.mkdir()
    # A disk that fills up: the file size limit makes writes past it fail with EFBIG.
    child = subprocess.run([sys.executable, "-c", f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from onthefly.store.archive import export_session
from onthefly.errors import StoreError
try:
    export_session({str(summary.session_dir)!r}, {str(out)!r})
except StoreError as exc:
    print("ERROR", exc)
    sys.exit(3)
"""], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, child.stderr
    assert "cannot write the archive" in child.stdout and "Nothing was left behind" in child.stdout
    assert list(out.parent.iterdir()) == []

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    with pytest.raises(StoreError, match="cannot write the archive"):
        export_session(summary.session_dir, not_a_folder / "s.otf")


def test_the_manifest_records_the_training_script(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    script = tmp_path / "my_training.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import torch
from torch.utils.data import DataLoader
from conftest import toy_data, toy_model
from onthefly import quickstart
from onthefly.store.archive import export_session
model = toy_model()
s = quickstart(project="src", run_name="r", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               loss_fn=torch.nn.CrossEntropyLoss(), train_loader=DataLoader(toy_data(), batch_size=64),
               max_epochs=1, progress=False, dashboard=False)
export_session(s.session_dir, {str(tmp_path / 'src.otf')!r})
""")
    done = subprocess.run([sys.executable, str(script)], env=subprocess_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "src.otf")
    assert "session/source/my_training.py" in manifest["members"]
    with tarfile.open(tmp_path / "src.otf") as tar:
        member = tar.extractfile("session/source/my_training.py")
        assert member is not None and member.read() == script.read_bytes()
    assert json.loads(json.dumps(manifest))  # plain JSON throughout


def test_an_imported_model_is_tested_as_it_was_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, model = train(1, test=False)
    archive = export_session(first.session_dir, tmp_path / "done.otf").path
    final = read_manifest(archive)["final_checkpoint"]

    move_home(monkeypatch, tmp_path, "tester")
    tested, again = train(1, resume_from=archive, test=True)  # nothing left to train: only the test
    assert tested.steps == first.steps
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    reader = open_session(tested.session_dir)
    (test,) = [e for e in reader.events(kind="eval") if e["payload"]["split"] == "test"]
    assert test["payload"]["checkpoint_id"] == final["id"]  # the weights it tested: the imported final model
    assert [c["id"] for c in reader.checkpoints()] == [final["id"]]  # nothing new to save
