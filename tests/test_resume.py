"""Exact resume: pause/resume, checkpoint -> new process -> resume, and watching vs plain PyTorch.

Every comparison is bit for bit (``torch.equal``) over every tensor of the model's state_dict and
of the optimizer's (and scheduler's) state. The training (tests/resume_child.py) is built to be
sensitive: a shuffled loader and dropout both read torch's global RNG, validation runs on a
shuffled loader (which draws from that RNG too), and the sanity tests at the end show that a
different seed, or a validation pass that does not put the RNG back, changes the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import onthefly
import resume_child as child
from conftest import PYTHON, REPO
from onthefly.errors import StateError, StoreError
from onthefly.store.checkpoints import read_checkpoint

CHILD = Path(child.__file__)
TOTAL_STEPS = child.EPOCHS * child.BATCHES
EVENT_WAIT_SECONDS = 30  # a deadline for a condition, never a sleep
CHILDREN_SECONDS = 180  # all the child processes together (about 10 s when all is well)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The child processes use one intra-op thread; so does this one while it trains."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


# ---- comparisons ---------------------------------------------------------------------------
Tensors = Mapping[str, torch.Tensor]


def assert_same_tensors(actual: Tensors, expected: Tensors) -> None:
    assert sorted(actual) == sorted(expected)
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"tensors differ: {different}"


def assert_same_state(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested optimizer/scheduler state: tensors with torch.equal, everything else with ==."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: not a tensor"
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and set(actual) == set(expected), f"{where}: keys differ"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{where}: not a list"
        assert len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def differs(a: Tensors, b: Tensors) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in b)


def columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# ---- the plain PyTorch loop that On The Fly must not perturb --------------------------------
def plain_loop(
    *,
    seed: int = child.TRAIN_SEED,
    shuffle: bool = True,
    validate_without_restoring_rng: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    model = child.make_model()
    optimizer = child.make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    loader = child.make_loader(shuffle=shuffle)
    val_loader = child.make_loader(shuffle=True)
    torch.manual_seed(seed)
    for _ in range(child.EPOCHS):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        if validate_without_restoring_rng:  # what a naive evaluation does
            model.eval()
            with torch.no_grad():
                for x, _y in val_loader:
                    model(x)
    return model.state_dict(), optimizer.state_dict()


# ---- 1. pause and resume through the command queue ------------------------------------------
class PauseOnce(onthefly.Callback):
    """At global step ``at_step`` asks for a pause; a second thread resumes once it took effect."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.paused = threading.Event()
        self.status_when_resumed: str | None = None
        self.thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def on_fit_start(self, run: onthefly.Run) -> None:
        self._unsubscribe = run.bus.subscribe(self._on_event)

    def _on_event(self, event: Any) -> None:
        if event.kind == "status" and event.payload["status"] == "paused":
            self.paused.set()

    def on_step_end(self, run: onthefly.Run) -> None:
        if run.global_step == self.at_step:
            run.request("pause")
            self.thread = threading.Thread(target=self._resume_when_paused, args=(run,))
            self.thread.start()

    def _resume_when_paused(self, run: onthefly.Run) -> None:
        if self.paused.wait(EVENT_WAIT_SECONDS):
            self.status_when_resumed = run.status
        run.request("resume")  # also after the deadline, so a failing test cannot hang

    def on_fit_end(self, run: onthefly.Run) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()


def test_pause_and_resume_gives_the_uninterrupted_weights() -> None:
    reference = child.train(scheduler=True)
    at_step = child.BATCHES + 3  # epoch 1, batch 3
    pause = PauseOnce(at_step)
    paused = child.train(scheduler=True, extra_callbacks=(pause,))

    assert pause.thread is not None
    pause.thread.join(EVENT_WAIT_SECONDS)
    assert not pause.thread.is_alive()
    assert pause.status_when_resumed == "paused"
    assert paused.summary.status == "finished" and paused.summary.steps == TOTAL_STEPS
    assert_same_tensors(paused.model.state_dict(), reference.model.state_dict())
    assert_same_state(paused.optimizer.state_dict(), reference.optimizer.state_dict())
    assert paused.scheduler is not None and reference.scheduler is not None
    assert_same_state(paused.scheduler.state_dict(), reference.scheduler.state_dict())

    # Asked for in on_step_end of step k, the pause takes effect at the next step boundary (k + 1),
    # and the resume at that same boundary, while the run waits there.
    events = onthefly.open_session(paused.summary.session_dir).events(paused.summary.run_id)
    statuses = [(e["payload"]["status"], e["step"]) for e in events if e["kind"] == "status"]
    assert statuses == [("running", 0), ("paused", at_step + 1), ("running", at_step + 1),
                        ("finished", TOTAL_STEPS)]
    applied = [(e["payload"]["command"], e["step"], e["epoch"]) for e in events
               if e["kind"] == "command_applied"]
    assert applied == [("pause", at_step + 1, 1), ("resume", at_step + 1, 1)]
    assert not [e for e in events if e["kind"] == "command_rejected"]


# ---- 2 and 4. checkpoint mid-epoch, end the process, resume in a new one ----------------------
@dataclass(frozen=True)
class Case:
    id: str
    workers: int
    scheduler: bool
    at_step: int  # the global step of the checkpoint
    at_epoch_end: bool = False  # taken in on_epoch_end (after validation and the scheduler step)


MID_EPOCH = child.BATCHES + 3  # epoch 1, batch 3
CASES = [
    Case("mid-epoch", 0, False, MID_EPOCH),
    Case("mid-epoch-steplr", 0, True, MID_EPOCH),
    Case("mid-epoch-2-workers", 2, False, MID_EPOCH),
    Case("mid-epoch-2-workers-steplr", 2, True, MID_EPOCH),
    Case("last-batch-of-epoch-steplr", 0, True, child.BATCHES),
    # The ModelCheckpoint habit: resumes at the next epoch, not by running epoch 0's end again.
    Case("on-epoch-end-steplr", 0, True, child.BATCHES, at_epoch_end=True),
    Case("on-epoch-end-2-workers-steplr", 2, True, 2 * child.BATCHES, at_epoch_end=True),
]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """For every case, process A trains, checkpoints at ``at_step`` and dies (``os._exit``);
    then process B resumes from the checkpoint and trains to the end. One child script runs
    them all, each job in a process of its own (see resume_child.py)."""
    root = tmp_path_factory.mktemp("resume")
    jobs = []
    for case in CASES:
        folder = root / case.id
        common = {"workers": case.workers, "scheduler": case.scheduler,
                  "checkpoint": str(folder / "checkpoint")}
        where = ({"at_epoch_end": case.at_step // child.BATCHES - 1} if case.at_epoch_end
                 else {"at_step": case.at_step})
        jobs.append({"mode": "interrupt", "home": str(folder / "home-a"), **where, **common})
        jobs.append({"mode": "resume", "home": str(folder / "home-b"), "out": str(folder / "b"),
                     **common})
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    # The same environment as conftest's subprocess_env (a function-scoped fixture); each job
    # sets its own ONTHEFLY_HOME.
    path = str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": path, "ONTHEFLY_DASHBOARD": "0"}
    log = root / "children.log"
    with open(log, "w") as out:  # a file, not a pipe: loader workers of a killed job may linger
        # A process group of its own, so that a hung job and its loader workers can all be ended.
        proc = subprocess.Popen([PYTHON, str(CHILD), str(jobs_file)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(CHILDREN_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the children did not finish in {CHILDREN_SECONDS} s:\n{log.read_text()}")
    assert proc.returncode == 0, log.read_text()
    return {case.id: root / case.id for case in CASES}


@dataclass
class Reference:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    samples: pa.Table


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], Reference]:
    """Process C: the same training without interruption, in this process, once per setting."""
    cache: dict[tuple[int, bool], Reference] = {}

    def get(case: Case) -> Reference:
        key = (case.workers, case.scheduler)
        if key not in cache:
            home = tmp_path_factory.mktemp("home-c")
            with pytest.MonkeyPatch.context() as patch, one_thread():
                patch.setenv("ONTHEFLY_HOME", str(home))
                trained = child.train(workers=case.workers, scheduler=case.scheduler)
                summary = trained.summary
                samples = onthefly.open_session(summary.session_dir).samples(summary.run_id)
            assert trained.summary.status == "finished" and trained.callback_steps == TOTAL_STEPS
            cache[key] = Reference(
                trained.model.state_dict(), trained.optimizer.state_dict(),
                trained.scheduler.state_dict() if trained.scheduler is not None else None, samples,
            )
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_checkpoint_then_resume_in_a_new_process_is_exact(
    case: Case, resumed: dict[str, Path], uninterrupted: Callable[[Case], Reference],
) -> None:
    folder = resumed[case.id]
    reference = uninterrupted(case)

    checkpoint_weights, state = read_checkpoint(folder / "checkpoint")
    epoch, batch = divmod(case.at_step - 1, child.BATCHES)
    if case.at_epoch_end:  # saved as the start of the next epoch
        epoch, trained, samples = epoch + 1, 0, 0
    else:
        trained, samples = batch + 1, min((batch + 1) * child.BATCH, child.SAMPLES)
    assert state["progress"] == {"epoch": epoch, "batch_in_epoch": trained, "global_step": case.at_step,
                                 "target_epochs": child.EPOCHS, "samples_in_epoch": samples}
    assert differs(checkpoint_weights, reference.model)  # training went on after the checkpoint

    result = json.loads((folder / "b" / "result.json").read_text())
    assert result["status"] == "finished"
    assert (result["epochs"], result["steps"]) == (child.EPOCHS, TOTAL_STEPS)
    assert result["callback_steps"] == TOTAL_STEPS  # the callback's state came back too
    assert_same_tensors(load_file(folder / "b" / "model.safetensors"), reference.model)
    saved = torch.load(folder / "b" / "optimizer.pt", weights_only=True)
    assert_same_state(saved["optimizer"], reference.optimizer, "optimizer")
    assert_same_state(saved["scheduler"], reference.scheduler, "scheduler")

    session = onthefly.open_session(result["session_dir"])
    events = session.events(result["run_id"], kind="resumed_from_checkpoint")
    assert [e["payload"]["global_step"] for e in events] == [case.at_step]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_resumed_run_records_each_remaining_index_once(
    case: Case, resumed: dict[str, Path], uninterrupted: Callable[[Case], Reference],
) -> None:
    everything = list(range(child.SAMPLES))
    full = columns(uninterrupted(case).samples)
    for epoch in range(child.EPOCHS):  # the uninterrupted run: every index once per epoch
        assert sorted(full["index"][full["epoch"] == epoch]) == everything

    result = json.loads((resumed[case.id] / "b" / "result.json").read_text())
    table = onthefly.open_session(result["session_dir"]).samples(result["run_id"])
    rows = columns(table)
    resumed_epoch = (case.at_step - 1) // child.BATCHES
    in_epoch = full["epoch"] == resumed_epoch
    trained_before = full["index"][in_epoch & (full["step"] <= case.at_step)]
    # B's session holds nothing from before the checkpoint (that was process A's session)...
    assert rows["step"].min() == case.at_step + 1
    assert not (rows["epoch"] < resumed_epoch).any()
    # ...the resumed epoch holds exactly the indices not trained before the checkpoint...
    in_resumed = rows["index"][rows["epoch"] == resumed_epoch]
    assert sorted(in_resumed) == sorted(set(everything) - set(trained_before.tolist()))
    assert len(in_resumed) + len(trained_before) == child.SAMPLES
    # ...and every later epoch every index once.
    for epoch in range(resumed_epoch + 1, child.EPOCHS):
        assert sorted(rows["index"][rows["epoch"] == epoch]) == everything

    # Row for row (step, index, loss, margin, prediction) the same as the uninterrupted run.
    after = full["step"] > case.at_step
    for name in ("epoch", "step", "index", "loss", "margin", "pred", "label"):
        assert np.array_equal(rows[name], full[name][after]), f"column {name} differs"


# ---- 3. watching does not change the trajectory ------------------------------------------------
def test_quickstart_with_validation_matches_a_plain_loop() -> None:
    weights, optimizer = plain_loop()
    watched = child.train()
    assert watched.summary.val  # validation ran (and must not have touched the RNG)
    assert_same_tensors(watched.model.state_dict(), weights)
    assert_same_state(watched.optimizer.state_dict(), optimizer)


def test_start_run_custom_loop_matches_a_plain_loop() -> None:
    weights, optimizer_state = plain_loop()
    model = child.make_model()
    optimizer = child.make_optimizer(model)
    loss_fn = nn.CrossEntropyLoss()
    loader = child.make_loader()
    torch.manual_seed(child.TRAIN_SEED)
    with onthefly.start_run(project="resume", run_name="custom", model=model, optimizer=optimizer,
                            loss_fn=loss_fn, val_loader=child.make_loader(shuffle=True)) as run:
        for _epoch in run.epochs(child.EPOCHS):
            model.train()
            for x, y in run.batches(loader):
                optimizer.zero_grad()
                logits = model(x)
                loss = loss_fn(logits, y)
                loss.backward()
                optimizer.step()
                per_sample = nn.functional.cross_entropy(logits.detach(), y, reduction="none")
                run.step(per_sample, loss=loss.detach(), logits=logits, targets=y)
            assert run.evaluate("val") is not None
    assert run.global_step == TOTAL_STEPS
    assert_same_tensors(model.state_dict(), weights)
    assert_same_state(optimizer.state_dict(), optimizer_state)


@pytest.mark.parametrize(("same", "change"), [
    ({}, {"seed": child.TRAIN_SEED + 1}),  # another shuffle order and other dropout masks
    ({"shuffle": False}, {"seed": child.TRAIN_SEED + 1}),  # other dropout masks alone
    ({}, {"validate_without_restoring_rng": True}),  # validation that moves the RNG
], ids=["other-seed", "other-seed-no-shuffle", "validation-moves-rng"])
def test_the_comparisons_can_fail(same: dict[str, Any], change: dict[str, Any]) -> None:
    """The equalities above mean something: each of these changes the final weights."""
    reference, _ = plain_loop(**same)
    other, _ = plain_loop(**same, **change)
    assert differs(other, reference)


# ---- errors ----------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of the child's model with a StepLR scheduler and one StepCounter callback."""
    model = child.make_model()
    optimizer = child.make_optimizer(model)
    with onthefly.start_run(project="resume", run_name="saved", model=model, optimizer=optimizer,
                            scheduler=child.make_scheduler(optimizer),
                            callbacks=[child.StepCounter()]) as run:
        return run.save_checkpoint(tmp_path / "checkpoint")


def _resume(checkpoint: Path, *, hidden: int = 32, scheduler: bool = True,
            callbacks: int = 1) -> onthefly.Run:
    model = child.make_model(hidden=hidden)
    optimizer = child.make_optimizer(model)
    return onthefly.start_run(
        project="resume", run_name="resumed", model=model, optimizer=optimizer,
        scheduler=child.make_scheduler(optimizer) if scheduler else None,
        callbacks=[child.StepCounter() for _ in range(callbacks)],
        resume_from=checkpoint,
    )


def test_resume_fits_the_same_model(checkpoint: Path) -> None:
    with _resume(checkpoint) as run:
        assert run.global_step == 0 and run.epoch == 0


def test_resume_into_a_model_of_another_shape_raises(checkpoint: Path) -> None:
    fits = r"(?s)does not fit this model/optimizer.*size mismatch for 0.weight"
    with pytest.raises(StateError, match=fits):
        _resume(checkpoint, hidden=16)


def test_resume_without_the_scheduler_raises(checkpoint: Path) -> None:
    with pytest.raises(StateError, match="has scheduler state but no scheduler was given"):
        _resume(checkpoint, scheduler=False)


def test_resume_without_the_same_callbacks_raises(checkpoint: Path) -> None:
    saved = r"saved 1 callback state\(s\) but 0 callback\(s\) were given"
    with pytest.raises(StateError, match=saved):
        _resume(checkpoint, callbacks=0)


def test_resume_from_a_folder_without_checkpoint_files_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"not a complete On The Fly checkpoint: missing "
                                         r"model\.safetensors, state\.pt, checkpoint\.json"):
        _resume(tmp_path / "empty")
