"""Crash safety: SIGKILL the training process at seeded moments, then check what it left behind.

Every kill forks this test process (torch is imported already, so a kill costs no 2-3 s of
start-up) into a child that trains a tiny model in an ONTHEFLY_HOME of its own: a checkpoint
every few steps into the session, one every few steps into a fixed folder of the user's (each
write replaces the one before), a Parquet part every epoch; or, once trained, exports its
session in a loop. The parent kills the child with SIGKILL and checks the session folder:

* it opens, and its runs, events and checkpoints can be read;
* its database passes SQLite's integrity check;
* every checkpoint of the registry loads, and the newest one resumes for one more epoch (after
  every ``RESUME_EVERY``-th random kill, and after every kill at a file step);
* every registered Parquet part is there, and every part under its final name reads;
* the archive is complete (it imports) or absent: never a partial file under its final name.

Two kinds of moment:

* a seeded random delay after the child reached its phase (training, or the export loop);
* a file step: the child stops just before or just after the k-th rename of its checkpoint
  writes or its Parquet writes (moments a random delay rarely hits), tells the parent, and is
  killed there.

The child marks, in memory it shares with the parent, when it is inside a checkpoint write, a
Parquet write or an export, so the parent knows where each kill landed (the rest is "step":
the training loop, with validation and the store's SQLite commits).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import signal
import sqlite3
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.store import checkpoints as checkpoint_files
from onthefly.store import samples as sample_files
from onthefly.store import session as store_session
from onthefly.store.archive import export_session, import_session
from onthefly.store.checkpoints import read_checkpoint
from onthefly.store.session import DB_FILE, sessions_root

pytestmark = pytest.mark.slow

SAMPLES, BATCH = 64, 8  # 8 steps an epoch: a Parquet part every 8 steps
FOREVER = 1_000_000  # epochs: a training child runs until it is killed
EXPORT_EPOCHS = 2  # an export child trains this much, then exports until it is killed
TRAIN_KILLS = 75
EXPORT_KILLS = 25
TRAIN_DELAY_SECONDS = (0.0, 0.6)  # after training started
EXPORT_DELAY_SECONDS = (0.0, 0.3)  # after the export loop started (an export takes ~50 ms)
RESUME_EVERY = 10  # random kills: the newest checkpoint of every 10th is resumed
CHILD_WAIT_SECONDS = 60  # a deadline for the child to reach its phase, never a sleep
ARCHIVE = "session.otf"

# Where a kill lands: flags the child sets while inside each (the rest is "step").
CHECKPOINT, PARQUET, EXPORT = range(3)
LANDED = {EXPORT: "export", CHECKPOINT: "checkpoint write", PARQUET: "parquet write"}


@dataclass(frozen=True)
class StopAt:
    """Stop the child before or after the k-th rename of one store module."""

    module: str  # "checkpoints" | "samples"
    rename: int
    when: str  # "before" | "after"

    def __str__(self) -> str:
        return f"{self.when}-{self.module}-rename-{self.rename}"


@dataclass(frozen=True)
class Plan:
    """What a child does; ``home`` is its ONTHEFLY_HOME."""

    mode: str  # "train" | "export"
    home: Path
    every: int = 1  # a checkpoint into the session every `every` steps
    latest_every: int = 4  # one into the fixed folder `home/latest` every `latest_every` steps
    stop_at: StopAt | None = None


class Checkpoints(onthefly.Callback):
    """Saves checkpoints as the plan says; ``started`` is called when training starts."""

    def __init__(self, plan: Plan | None = None, started: Callable[[], None] | None = None) -> None:
        self.plan = plan
        self.started = started
        self.steps = 0

    def on_fit_start(self, run: onthefly.Run) -> None:
        if self.started is not None:
            self.started()

    def on_step_end(self, run: onthefly.Run) -> None:
        self.steps += 1
        if self.plan is None:
            return
        if run.global_step % self.plan.every == 0:
            run.save_checkpoint()
        if run.global_step % self.plan.latest_every == 0:
            run.save_checkpoint(self.plan.home / "latest")  # replaces the one written before

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


def train(callback: Checkpoints, epochs: int, resume_from: Path | None = None) -> onthefly.FitSummary:
    model = toy_model()
    return onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(n=SAMPLES), batch_size=BATCH, shuffle=True),
        val_loader=DataLoader(toy_data(n=32, seed=1), batch_size=16), project="crash", run_name="killed",
        callbacks=[callback], progress=False, resume_from=resume_from,
    ).fit(epochs)


# ---- the child (a forked copy of this process: what it patches, it patches in itself) ----------
def child_main(plan: Plan, conn: Connection, where: Any) -> None:
    try:
        os.environ["ONTHEFLY_HOME"] = str(plan.home)
        # An export's scratch folder, left behind by a kill, stays inside the test's folder.
        (plan.home / "tmp").mkdir(parents=True)
        tempfile.tempdir = str(plan.home / "tmp")
        _mark_writes(where)
        if plan.stop_at is not None:
            _stop_at(plan.stop_at, conn)
        if plan.mode == "train":
            train(Checkpoints(plan, started=lambda: conn.send(("training", None))), FOREVER)
            raise AssertionError("training ended before the kill")
        summary = train(Checkpoints(plan), EXPORT_EPOCHS)
        where[EXPORT] = 1
        conn.send(("export", None))
        while True:
            export_session(summary.session_dir, plan.home / ARCHIVE)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _mark_writes(where: Any) -> None:
    """Flag ``where[CHECKPOINT]`` / ``where[PARQUET]`` while the store writes those files."""

    def marked(flag: int, write: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            where[flag] = 1
            try:
                return write(*args, **kwargs)
            finally:
                where[flag] = 0
        return wrapper

    store_session.write_checkpoint = marked(CHECKPOINT, store_session.write_checkpoint)  # type: ignore[assignment]
    sample_files.write_table = marked(PARQUET, sample_files.write_table)  # type: ignore[assignment]


def _stop_at(stop: StopAt, conn: Connection) -> None:
    """Count the renames of one store module (``os.replace``, and the checkpoints' atomic
    exchange of two names) and stop at the k-th."""
    renames = _StopAtRename(stop, conn)
    if stop.module == "samples":
        sample_files.os = renames  # type: ignore[attr-defined]
        return
    checkpoint_files.os = renames  # type: ignore[attr-defined]
    exchange = checkpoint_files._exchange
    checkpoint_files._exchange = lambda a, b: renames.step(exchange, a, b)  # type: ignore[assignment]


class _StopAtRename:
    """Stands in for ``os`` in one store module: at the k-th rename it tells the parent and
    waits there (before or after the rename) until it is killed."""

    def __init__(self, stop: StopAt, conn: Connection) -> None:
        self._stop = stop
        self._conn = conn
        self._renames = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any) -> None:
        self.step(os.replace, src, dst)

    def step(self, rename: Callable[[Any, Any], Any], src: Any, dst: Any) -> Any:
        self._renames += 1
        here = self._renames == self._stop.rename
        if here and self._stop.when == "before":
            self._wait(rename, src, dst)
        done = rename(src, dst)
        if here and self._stop.when == "after":
            self._wait(rename, src, dst)
        return done

    def _wait(self, rename: Callable[[Any, Any], Any], src: Any, dst: Any) -> None:
        what = f"{getattr(rename, '__name__', 'rename')} {Path(src).name} -> {Path(dst).name}"
        self._conn.send(("stopped", f"{self._stop}: {what}"))
        threading.Event().wait()  # until SIGKILL


# ---- the parent ---------------------------------------------------------------------------------
@dataclass
class Kill:
    plan: Plan
    seed: int | None
    delay: float | None
    landed: str = "?"
    stopped: str = ""

    def __str__(self) -> str:
        moment = f"delay {self.delay:.3f} s" if self.delay is not None else self.stopped
        seed = f"seed {self.seed}, " if self.seed is not None else ""
        return (f"kill ({seed}{self.plan.mode}, checkpoint every {self.plan.every}, {moment}, "
                f"landed in {self.landed})")


def kill_child(kill: Kill, wait_for: str) -> None:
    """Fork a child for ``kill.plan``, wait until it says ``wait_for``, let it run ``kill.delay``
    seconds more and SIGKILL it; records where the kill landed."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    where = ctx.RawArray("i", len(LANDED))  # shared memory: readable after the child died
    child = ctx.Process(target=child_main, args=(kill.plan, send, where), daemon=True)
    child.start()
    send.close()
    try:
        kill.stopped = _wait_for(receive, wait_for, child, kill)
        if kill.delay:
            child.join(kill.delay)  # the experiment: the child runs `delay` s more (unless it ends)
        assert child.exitcode is None, f"{kill}: the child ended by itself: {_last_words(receive)}"
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(CHILD_WAIT_SECONDS)
        assert child.exitcode == -signal.SIGKILL, \
            f"{kill}: the child did not die of SIGKILL ({child.exitcode})"
    finally:
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join()
        receive.close()
    kill.landed = next((name for flag, name in LANDED.items() if where[flag]), "step")


def _wait_for(receive: Connection, wanted: str, child: Any, kill: Kill) -> str:
    deadline = time.monotonic() + CHILD_WAIT_SECONDS
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and receive.poll(left), \
            f"{kill}: the child did not reach {wanted!r} in {CHILD_WAIT_SECONDS} s"
        try:
            message, detail = receive.recv()
        except EOFError:
            child.join(CHILD_WAIT_SECONDS)
            raise AssertionError(f"{kill}: the child ended ({child.exitcode}) before {wanted!r}") from None
        assert message != "error", f"{kill}: the child failed before {wanted!r}:\n{detail}"
        if message == wanted:
            return str(detail or "")


def _last_words(receive: Connection) -> str:
    try:
        while receive.poll(0):
            message, detail = receive.recv()
            if message == "error":
                return str(detail)
    except EOFError:
        pass
    return "(no error reported)"


def check_session(kill: Kill) -> dict[str, Any] | None:
    """The killed session opens, its database is sound, its Parquet parts are whole and every
    registered checkpoint loads. Returns the newest checkpoint's registry row (None: none was
    registered yet)."""
    folders = [p for p in sessions_root(kill.plan.home).iterdir() if p.is_dir()]
    assert len(folders) == 1, f"{kill}: expected one session folder, found {folders}"
    folder = folders[0]
    try:
        reader = onthefly.open_session(folder)
        reader.runs()
        reader.events()
        rows = reader.checkpoints()
    except Exception as exc:
        raise AssertionError(f"{kill}: the session {folder} does not open: {exc}") from exc
    conn = sqlite3.connect(folder / DB_FILE)  # read-write: recovers the WAL, as the next opener would
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        parts = [row[0] for row in conn.execute("SELECT path FROM sample_files")]
    finally:
        conn.close()
    assert integrity == "ok", f"{kill}: the database fails its integrity check: {integrity}"
    missing = [part for part in parts if not (folder / part).is_file()]
    assert not missing, f"{kill}: registered Parquet parts are missing: {missing}"
    for part in (folder / "samples").rglob("*.parquet"):
        try:
            pq.read_table(part)
        except Exception as exc:
            raise AssertionError(f"{kill}: the Parquet part {part} does not read: {exc}") from exc
    for row in rows:
        try:
            read_checkpoint(Path(row["path"]))
        except Exception as exc:
            raise AssertionError(f"{kill}: registered checkpoint {row['id']} (step {row['step']}) "
                                 f"does not load: {exc}") from exc
    return rows[-1] if rows else None


def check_archive(kill: Kill) -> bool:
    """The archive is complete (it imports into another home) or absent; a leftover of the
    write in progress has a temporary name. Returns whether there is an archive."""
    home = kill.plan.home
    named = sorted(p.name for p in home.iterdir() if p.name.endswith(".otf"))
    assert named in ([], [ARCHIVE]), f"{kill}: unexpected archives {named}"
    leftovers = [p.name for p in home.iterdir() if p.name.startswith(f".{ARCHIVE}.")]
    assert all(name.endswith(".tmp") for name in leftovers), f"{kill}: leftovers {leftovers}"
    if not named:
        return False
    try:
        imported = import_session(home / ARCHIVE, home=home / "imported")  # another home
    except Exception as exc:
        raise AssertionError(f"{kill}: the archive under its final name does not import: {exc}") from exc
    assert (imported / DB_FILE).is_file()
    return True


def check_resume(kill: Kill, row: dict[str, Any]) -> None:
    """The checkpoint resumes in a fresh model and optimizer and trains one more epoch."""
    path = Path(row["path"])
    _, state = read_checkpoint(path)
    target = int(state["progress"]["epoch"]) + 1
    try:
        summary = train(Checkpoints(), target, resume_from=path)
    except Exception as exc:
        raise AssertionError(f"{kill}: checkpoint {row['id']} (step {row['step']}) does not "
                             f"resume: {exc}") from exc
    assert (summary.status, summary.epochs) == ("finished", target), f"{kill}: resumed run {summary}"


@pytest.fixture(scope="module", autouse=True)
def _warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Train once here before forking: what torch and the store import on first use is then
    imported once, not in every child."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONTHEFLY_HOME", str(tmp_path_factory.mktemp("warm")))
        train(Checkpoints(), 1)
    yield


def report(name: str, kills: list[Kill], started: float, **extra: int) -> None:
    """How many kills landed where (shown with ``pytest -s``)."""
    landed = collections.Counter(k.landed for k in kills)
    print(f"\n{name}: {len(kills)} kills in {time.perf_counter() - started:.1f} s, landed: "
          f"{dict(sorted(landed.items()))} {extra or ''}")


# ---- the tests ----------------------------------------------------------------------------------
def test_kills_during_training_leave_a_sound_session(tmp_path: Path) -> None:
    started = time.perf_counter()
    kills, resumed = [], 0
    for n in range(TRAIN_KILLS):
        seed = 1000 + n
        rng = random.Random(seed)
        plan = Plan("train", tmp_path / f"kill-{n:03d}", every=rng.choice((1, 2, 3)))
        kill = Kill(plan, seed, rng.uniform(*TRAIN_DELAY_SECONDS))
        kill_child(kill, "training")
        newest = check_session(kill)
        if newest is not None and resumed * RESUME_EVERY <= n:  # every 10th, or the next with one
            check_resume(kill, newest)
            resumed += 1
        kills.append(kill)
    report("training", kills, started, resumed=resumed)
    landed = {k.landed for k in kills}
    # The experiment is worth its time only if it kills inside writes and between them (kills
    # inside Parquet writes are rare here: the file-step test makes sure of those).
    assert {"checkpoint write", "step"} <= landed, f"kills landed only in {landed}"
    assert resumed >= TRAIN_KILLS // RESUME_EVERY


def test_kills_during_export_leave_the_archive_whole_or_absent(tmp_path: Path) -> None:
    started = time.perf_counter()
    kills, archives = [], 0
    for n in range(EXPORT_KILLS):
        seed = 2000 + n
        rng = random.Random(seed)
        plan = Plan("export", tmp_path / f"kill-{n:03d}", every=rng.choice((2, 3)))
        kill = Kill(plan, seed, rng.uniform(*EXPORT_DELAY_SECONDS))
        kill_child(kill, "export")
        newest = check_session(kill)
        archives += check_archive(kill)
        assert newest is not None, f"{kill}: two epochs were trained, yet no checkpoint is registered"
        if n % RESUME_EVERY == 0:
            check_resume(kill, newest)
        kills.append(kill)
    report("export", kills, started, with_archive=archives)
    assert {k.landed for k in kills} == {"export"}


# Every rename of the first checkpoints (with latest_every=2, rename 3 is the fixed folder's
# first write and 6 its replacement: one exchange of names, or two renames where the system has
# no exchange) and of the first Parquet parts (1: the store's warm-up file, 2 and 3: the first
# two epochs' parts).
STOPS = [StopAt("checkpoints", k, when) for k in range(1, 9) for when in ("before", "after")] + [
    StopAt("samples", k, when) for k in range(1, 4) for when in ("before", "after")]


@pytest.mark.parametrize("stop", STOPS, ids=str)
def test_a_kill_at_a_file_step_leaves_a_sound_session(stop: StopAt, tmp_path: Path) -> None:
    kill = Kill(Plan("train", tmp_path / "kill", every=1, latest_every=2, stop_at=stop), None, None)
    kill_child(kill, "stopped")
    newest = check_session(kill)
    if newest is not None:
        check_resume(kill, newest)
