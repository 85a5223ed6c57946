"""Exact resume from every place a checkpoint can be taken, and from every source of randomness.

Each test trains once with a callback that saves a checkpoint at one point and carries on to the
end (saving changes nothing: that run is the uninterrupted reference), then resumes from the
checkpoint with freshly built objects and trains to the same end. The two must agree bit for bit
(weights, optimizer and scheduler state). tests/test_resume.py does the same across processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

import onthefly
from conftest import toy_data
from test_resume import assert_same_state, assert_same_tensors

EPOCHS = 3
BATCHES = 8  # per epoch: 64 samples in batches of 8


def data() -> TensorDataset:
    return toy_data(n=64)


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build(scheduler: str | None) -> Built:
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched: Any = None
    if scheduler == "epoch":  # the case: a checkpoint in on_epoch_end lost a decay
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    elif scheduler == "step":
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=EPOCHS * BATCHES)
    return Built(model, optimizer, sched)


class SaveAt(onthefly.Callback):
    """Saves one checkpoint at global step ``step`` (on_step_end) or at the end of ``epoch``."""

    def __init__(self, folder: Path, *, step: int | None = None, epoch: int | None = None) -> None:
        self.folder, self.step, self.epoch = folder, step, epoch
        self.saved = False

    def on_step_end(self, run: onthefly.Run) -> None:
        if self.step is not None and run.global_step == self.step:
            run.save_checkpoint(self.folder)
            self.saved = True

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if self.epoch is not None and run.epoch == self.epoch:
            run.save_checkpoint(self.folder)
            self.saved = True


def fit(built: Built, loader: DataLoader, *, scheduler: str | None, callbacks: tuple[onthefly.Callback, ...] = (),
        resume_from: Path | None = None, **options: Any) -> onthefly.FitSummary:
    trainer = onthefly.Trainer(
        model=built.model, optimizer=built.optimizer, loss_fn=nn.CrossEntropyLoss(), train_loader=loader,
        scheduler=built.scheduler, scheduler_interval="step" if scheduler == "step" else "epoch",
        project="points", run_name="r", callbacks=callbacks, resume_from=resume_from, progress=False,
        **options)
    return trainer.fit(EPOCHS)


def assert_same_training(a: Built, b: Built) -> None:
    assert_same_tensors(a.model.state_dict(), b.model.state_dict())
    assert_same_state(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer")
    if a.scheduler is not None:
        assert_same_state(a.scheduler.state_dict(), b.scheduler.state_dict(), "scheduler")


def resumes_exactly(tmp_path: Path, make_loader: Callable[[], DataLoader], *, scheduler: str | None = None,
                    step: int | None = None, epoch: int | None = None, **options: Any) -> onthefly.Run:
    """Train with a checkpoint at one point, resume from it, and compare; returns the resumed run."""
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    reference = build(scheduler)
    save = SaveAt(tmp_path / "ckpt", step=step, epoch=epoch)
    fit(reference, make_loader(), scheduler=scheduler, callbacks=(save,), **options)
    assert save.saved

    torch.manual_seed(99)  # whatever the new process's RNG, the checkpoint's comes back
    random.seed(99)
    np.random.seed(99)
    resumed = build(scheduler)
    trainer = onthefly.Trainer(
        model=resumed.model, optimizer=resumed.optimizer, loss_fn=nn.CrossEntropyLoss(),
        train_loader=make_loader(), scheduler=resumed.scheduler,
        scheduler_interval="step" if scheduler == "step" else "epoch", project="points", run_name="b",
        resume_from=tmp_path / "ckpt", callbacks=(SaveAt(tmp_path / "unused"),), progress=False, **options)
    summary = trainer.fit(EPOCHS)
    assert summary.status == "finished" and summary.steps == EPOCHS * BATCHES
    assert_same_training(resumed, reference)
    return trainer.run


def shuffled() -> DataLoader:
    return DataLoader(data(), batch_size=8, shuffle=True)


# ---- where the checkpoint is taken --------------------------------------------------------
POINTS = {
    "mid-epoch": {"step": BATCHES + 3},
    "last-batch": {"step": BATCHES},  # on_step_end of the epoch's last step: its end still runs
    "on-epoch-end": {"epoch": 0},  # after validation and the scheduler step: the next epoch starts
}


@pytest.mark.parametrize("scheduler", ["epoch", "step"])
@pytest.mark.parametrize("point", sorted(POINTS))
def test_trainer_resumes_exactly_from_every_point(tmp_path: Path, point: str, scheduler: str) -> None:
    val = DataLoader(data(), batch_size=16, shuffle=True)  # validation draws from the RNG too
    resumes_exactly(tmp_path, shuffled, scheduler=scheduler, val_loader=val, **POINTS[point])


def test_a_checkpoint_on_epoch_end_is_saved_as_the_next_epochs_start(tmp_path: Path) -> None:
    built = build("epoch")
    fit(built, shuffled(), scheduler="epoch", callbacks=(SaveAt(tmp_path / "c", epoch=0),))
    _, state = onthefly.store.checkpoints.read_checkpoint(tmp_path / "c")
    assert state["progress"] == {"epoch": 1, "batch_in_epoch": 0, "global_step": BATCHES,
                                 "target_epochs": EPOCHS, "samples_in_epoch": 0}
    assert state["scheduler"]["last_epoch"] == 1  # epoch 0's decay is inside the checkpoint


def custom_loop(built: Built, loader: DataLoader, *, save_after_epoch: int | None = None,
                folder: Path | None = None, resume_from: Path | None = None) -> onthefly.Run:
    """A loop of one's own that steps its scheduler, then saves, after the inner loop."""
    loss_fn = nn.CrossEntropyLoss()
    with onthefly.start_run(project="points", run_name="custom", model=built.model, optimizer=built.optimizer,
                            scheduler=built.scheduler, resume_from=resume_from, dashboard=False) as run:
        for epoch in run.epochs(EPOCHS):
            for x, y in run.batches(loader):
                logits = built.model(x)
                losses = nn.functional.cross_entropy(logits, y, reduction="none")
                built.optimizer.zero_grad()
                loss_fn(logits, y).backward()
                built.optimizer.step()
                run.step(losses, logits=logits, targets=y)
            built.scheduler.step()
            if epoch == save_after_epoch:
                run.save_checkpoint(folder)
    return run


def test_custom_loop_checkpoint_after_the_inner_loop_resumes_at_the_next_epoch(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = build("epoch")
    custom_loop(reference, shuffled(), save_after_epoch=0, folder=tmp_path / "c")
    torch.manual_seed(4)
    resumed = build("epoch")
    run = custom_loop(resumed, shuffled(), resume_from=tmp_path / "c")
    assert run.global_step == EPOCHS * BATCHES
    assert_same_training(resumed, reference)


# ---- every source of randomness a sampler may use -------------------------------------------
class PythonShuffle(Sampler[int]):
    """Shuffles with Python's random module (not torch's generator)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.n))
        random.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


class NumpyShuffle(PythonShuffle):
    def __iter__(self) -> Iterator[int]:
        return iter(np.random.permutation(self.n).tolist())


class StatefulShuffle(PythonShuffle):
    """Keeps its own generator and offers state_dict/load_state_dict (torchdata's protocol)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.rng = np.random.default_rng(7)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rng.permutation(self.n).tolist())

    def state_dict(self) -> dict[str, Any]:
        state = self.rng.bit_generator.state
        return {"key": int(state["state"]["state"]), "inc": int(state["state"]["inc"]),
                "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": state["has_uint32"],
                                        "uinteger": state["uinteger"],
                                        "state": {"state": state["key"], "inc": state["inc"]}}


@pytest.mark.parametrize("sampler", [PythonShuffle, NumpyShuffle, StatefulShuffle])
def test_a_sampler_with_its_own_randomness_resumes_mid_epoch_exactly(tmp_path: Path, sampler: type) -> None:
    def loader() -> DataLoader:
        return DataLoader(data(), batch_size=8, sampler=sampler(64))

    run = resumes_exactly(tmp_path, loader, step=BATCHES + 3)
    # The resumed epoch recorded exactly the samples the reference had not yet trained.
    rows = onthefly.open_session(run.session.dir).samples(run.run_id, epoch=1)
    assert len(rows) == 64 - 3 * 8 and len(set(rows.column("index").to_pylist())) == 64 - 3 * 8


def test_torchdatas_stateful_dataloader_works_and_resumes_exactly(tmp_path: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> DataLoader:
        return StatefulDataLoader(data(), batch_size=8, shuffle=True)

    resumes_exactly(tmp_path, loader, step=BATCHES + 5)


# ---- IterableDataset: positions, not indices --------------------------------------------------
class Stream(IterableDataset):
    """64 samples in a fixed order; with ``stateful``, it can say where it is and continue there."""

    def __init__(self, stateful: bool = False) -> None:
        self.x, self.y = data().tensors
        self.position = 0
        self.loaded = 0  # samples produced, skipped ones included
        if stateful:
            self.state_dict = lambda: {"position": self.position}
            self.load_state_dict = lambda state: setattr(self, "resume_at", state["position"])
        self.resume_at = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self.resume_at = self.resume_at, 0
        for i in range(start, 64):
            self.position = i + 1
            self.loaded += 1
            yield self.x[i], self.y[i]
        self.position = 0


@pytest.mark.parametrize("stateful", [False, True], ids=["replayed", "stateful"])
def test_an_iterable_dataset_resumes_with_its_positions_continued(tmp_path: Path, stateful: bool) -> None:
    streams: list[Stream] = []

    def loader() -> DataLoader:
        streams.append(Stream(stateful))
        return DataLoader(streams[-1], batch_size=8)

    run = resumes_exactly(tmp_path, loader, step=BATCHES + 3)
    rows = onthefly.open_session(run.session.dir).samples(run.run_id, epoch=1)
    assert sorted(rows.column("index").to_pylist()) == list(range(24, 64))  # not 0..39 again
    [record] = [r for r in onthefly.open_session(run.session.dir).runs() if r["id"] == run.run_id]
    assert record["config"]["sample_ids"] == "position"
    events = [e["kind"] for e in onthefly.open_session(run.session.dir).events(run.run_id)]
    if stateful:  # continued from its own state: nothing loaded twice
        assert streams[-1].loaded == 64 - 24 + 64  # the rest of epoch 1, then epoch 2
        assert "resume_fast_forward" not in events
    else:  # fast-forwarded by loading the 3 trained batches, and says so
        assert streams[-1].loaded == 64 + 64
        assert "resume_fast_forward" in events


def test_a_checkpoint_at_the_closing_step_of_an_unsized_epoch_resumes_exactly(tmp_path: Path) -> None:
    """The last accumulation window of an unsized loader steps after its batches ran out, before
    the epoch's end: a checkpoint there is inside the epoch and must still resume."""
    def loader() -> DataLoader:
        return DataLoader(Stream(), batch_size=8)  # 8 batches: windows of 3, 3 and 2

    def train(callbacks: tuple[onthefly.Callback, ...], resume_from: Path | None = None) -> Built:
        built = build(None)
        trainer = onthefly.Trainer(model=built.model, optimizer=built.optimizer, loss_fn=nn.CrossEntropyLoss(),
                                   train_loader=loader(), accumulate_grad_batches=3, callbacks=callbacks,
                                   resume_from=resume_from, progress=False)
        assert trainer.fit(EPOCHS).steps == 3 * EPOCHS
        return built

    reference = train((SaveAt(tmp_path / "ckpt", step=3),))  # the step after epoch 0's batches
    resumed = train((SaveAt(tmp_path / "unused"),), resume_from=tmp_path / "ckpt")
    assert_same_training(resumed, reference)


def test_a_checkpoint_saved_right_after_resuming_is_the_same_point(tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = build("epoch")
    fit(reference, shuffled(), scheduler="epoch", callbacks=(SaveAt(tmp_path / "a", step=BATCHES + 3),))

    class SaveFirst(onthefly.Callback):
        def on_fit_start(self, run: onthefly.Run) -> None:
            run.save_checkpoint(tmp_path / "b")  # before anything is trained again

    once = build("epoch")
    fit(once, shuffled(), scheduler="epoch", callbacks=(SaveFirst(),), resume_from=tmp_path / "a")
    twice = build("epoch")
    fit(twice, shuffled(), scheduler="epoch", callbacks=(SaveFirst(),), resume_from=tmp_path / "b")
    assert_same_training(once, reference)
    assert_same_training(twice, reference)
