"""Nothing recorded silently wrong: the engine faults a user's real setup used to hit.

Each test fails on the engine before these fixes: a loop that bypasses run.batches, a loss with
cross-sample terms, ReduceLROnPlateau without validation, gradient norms under a growing loss
scale, float64 on the device in evaluation, accumulation over an unsized loader, and an epoch
start with loader workers waiting for a slow disk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import onthefly
from conftest import toy_data, toy_model
from onthefly.errors import DataError

DEADLINE = 30.0


def losses_of(summary_or_run: Any, epoch: int | None = None) -> dict[str, np.ndarray]:
    folder = getattr(summary_or_run, "session_dir", None) or summary_or_run.session.dir
    table = onthefly.open_session(folder).samples(summary_or_run.run_id, epoch=epoch)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# ---- 4. a loop that iterates its loader directly ------------------------------------------------
def test_a_step_outside_run_batches_fails_at_once_and_names_the_fix() -> None:
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(toy_data(64), batch_size=16, shuffle=True)
    with onthefly.start_run(project="x", run_name="r", model=model, optimizer=opt, dashboard=False) as run:
        for _epoch in run.epochs(1):
            x, y = next(iter(loader))
            losses = F.cross_entropy(model(x), y, reduction="none")
            with pytest.raises(DataError, match=r"outside run\.batches\(loader\).*indices=idx"):
                run.step(losses)


def test_a_loop_of_its_own_can_pass_the_indices() -> None:
    data = toy_data(64)
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with onthefly.start_run(project="x", run_name="r", model=model, optimizer=opt, dashboard=False) as run:
        for _epoch in run.epochs(2):
            for idx in torch.randperm(64).split(16):
                x, y = data[idx]
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                opt.zero_grad()
                losses.mean().backward()
                opt.step()
                run.step(losses, logits=logits, targets=y, indices=idx)
    rows = losses_of(run)
    for epoch in (0, 1):  # every sample once an epoch, under its own index
        assert sorted(rows["index"][rows["epoch"] == epoch]) == list(range(64))
    assert np.array_equal(rows["label"], data.tensors[1].numpy()[rows["index"]])


def test_a_buffer_the_loop_reuses_is_copied_and_a_read_only_one_kept() -> None:
    data = toy_data(32)
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buffer = np.empty(16, dtype=np.int64)
    with onthefly.start_run(project="x", run_name="r", model=model, optimizer=opt, dashboard=False) as run:
        for _epoch in run.epochs(1):
            for first in (0, 16):
                buffer[:] = np.arange(first, first + 16)  # the same buffer for every batch
                x, y = data[torch.from_numpy(buffer)]
                losses = F.cross_entropy(model(x), y, reduction="none")
                run.step(losses, indices=buffer)
            read_only = np.arange(16, dtype=np.int64)
            read_only.flags.writeable = False
            assert run._take_indices(read_only) is read_only  # nobody can change it: kept as it is
            assert run._take_indices(buffer) is not buffer
    assert sorted(losses_of(run)["index"]) == list(range(32))


# ---- 5. a loss with a cross-sample term ---------------------------------------------------------
class InBatchContrastive(nn.Module):
    """Supervised in-batch contrastive loss: each sample against every other in its batch. Has a
    ``reduction`` attribute like torch's losses, but its per-sample values depend on the batch."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(embeddings, dim=1)
        sims = (z @ z.T) / 0.5
        self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
        sims = sims.masked_fill(self_mask, float("-inf"))
        positive = (labels[:, None] == labels[None, :]) & ~self_mask
        log_prob = sims.log_softmax(dim=1)
        per = -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1))
        return per if self.reduction == "none" else per.mean() if self.reduction == "mean" else per.sum()


def test_a_loss_with_cross_sample_terms_gets_per_batch_values() -> None:
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 2  # every batch of 8 holds 4 of each class
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = toy_model(classes=4)
    loss_fn = InBatchContrastive()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                               loss_fn=loss_fn, train_loader=loader, progress=False)
    summary = trainer.fit(1)
    rows = losses_of(summary)
    with torch.no_grad():  # lr 0: the model never changes, so each batch's values can be recomputed
        expected = torch.cat([InBatchContrastive("none")(model(xb), yb) for xb, yb in loader]).numpy()
    np.testing.assert_allclose(rows["loss"][np.argsort(rows["index"])], expected, rtol=1e-5)


def test_torchs_elementwise_losses_are_still_derived_in_bulk() -> None:
    assert onthefly.signals.per_sample.PerSampleLoss(nn.CrossEntropyLoss()).deferrable
    assert not onthefly.signals.per_sample.PerSampleLoss(InBatchContrastive()).deferrable


# ---- 6. ReduceLROnPlateau without validation, and the summary's training loss ----------------
class RecordingPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer, patience=0, factor=0.5)
        self.seen: list[float] = []

    def step(self, metrics: Any, epoch: Any = None) -> None:  # type: ignore[override]
        self.seen.append(float(metrics))
        super().step(metrics)


def test_reduce_on_plateau_without_validation_gets_the_exact_epoch_mean() -> None:
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = RecordingPlateau(opt)
    summary = onthefly.Trainer(
        model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), scheduler=scheduler, progress=False,
        train_loader=DataLoader(toy_data(256), batch_size=16, shuffle=True)).fit(3)
    rows = losses_of(summary)
    means = [float(sum(map(Fraction, rows["loss"][rows["epoch"] == e].astype(np.float64).tolist())) / 256)
             for e in range(3)]  # exact, then rounded once
    assert scheduler.seen == means  # each epoch's own mean, not the last step's loss
    assert summary.train_loss == means[-1]
    assert "(epoch mean)" in str(summary)


# ---- 8. gradient norms under a loss scale that grows -----------------------------------------------
def test_grad_norms_under_a_growing_loss_scale_match_the_unscaled_ones() -> None:
    def run(scaler: torch.amp.GradScaler | None) -> np.ndarray:
        model = toy_model()
        trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   loss_fn=nn.CrossEntropyLoss(), grad_norm=True, progress=False,
                                   train_loader=DataLoader(toy_data(64), batch_size=8))
        trainer.scaler = trainer.run.scaler = scaler  # a CPU GradScaler stands in for CUDA's
        rows = losses_of(trainer.fit(1))
        return rows["grad_norm"][np.argsort(rows["index"])]

    # growth_interval=1: the scale doubles after every step, as after a run of good steps.
    scaled = run(torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1))
    plain = run(None)
    assert np.isfinite(plain).all()
    np.testing.assert_allclose(scaled, plain, rtol=1e-4)


# ---- 9. evaluation uses only dtypes every device has ---------------------------------------------
class DtypesOnDevice(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.float64: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                self.float64.append(str(func))
        return out


def test_evaluation_makes_no_float64_tensor_on_the_device() -> None:
    """MPS has no float64: evaluation must not use it on the device (here: the CPU stands in)."""
    model = toy_model()
    data = toy_data(64)
    with onthefly.start_run(project="x", run_name="r", model=model, dashboard=False,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
                            val_loader=DataLoader(data, batch_size=16)) as run:
        with DtypesOnDevice() as mode:
            result = run.evaluate("val")
    assert not mode.float64, f"float64 tensors made by {sorted(set(mode.float64))}"
    x, y = data.tensors
    with torch.no_grad():
        assert result is not None and result["loss"] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


# ---- 10. accumulation over a loader without a length ------------------------------------------------
class Stream(IterableDataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(zip(*self.data.tensors, strict=True))


def test_accumulation_over_an_unsized_loader_steps_the_last_window_in_its_epoch() -> None:
    data = toy_data(40)  # 5 batches of 8: windows of 2, 2 and 1
    reference = toy_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for i, (x, y) in enumerate(DataLoader(Stream(data), batch_size=8), start=1):
            (F.cross_entropy(reference(x), y) / 2).backward()
            if i % 2 == 0:
                opt.step()
                opt.zero_grad()
        opt.step()  # the epoch's last, shorter window
        opt.zero_grad()

    model = toy_model()
    summary = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(Stream(data), batch_size=8),
        accumulate_grad_batches=2, progress=False).fit(2)
    assert summary.steps == 6
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    rows = losses_of(summary)
    assert sorted(set(rows["step"][rows["epoch"] == 0].tolist())) == [1, 2, 3]


# ---- 11. an epoch start with loader workers never waits for the disk --------------------------------
class HoldTheDisk(onthefly.Callback):
    """Parks the session's writer thread (a disk that does not answer) from the first step on."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def on_fit_start(self, run: onthefly.Run) -> None:
        def stall() -> list[Any]:
            self.release.wait(2 * DEADLINE)
            return []

        run.session._writer.task(stall, wait=False)


def test_epoch_start_with_workers_does_not_wait_for_a_stalled_disk() -> None:
    model = toy_model()
    hold = HoldTheDisk()
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(64), batch_size=16, shuffle=True, num_workers=1),
        callbacks=[hold], progress=False)
    done = threading.Event()
    outcome: list[Any] = []

    def train() -> None:
        try:
            outcome.append(trainer.fit(3))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    # fit() closes the run at the end, which does wait for the disk (so does epoch_summary, which
    # is announced once the epoch's table is written): stop waiting at the last epoch's start
    # instead, while the writer is still parked.
    epochs_done = threading.Event()

    unsubscribe = trainer.run.bus.subscribe(
        lambda event: epochs_done.set() if event.kind == "epoch_started" and event.epoch == 2 else None)
    thread = threading.Thread(target=train)
    thread.start()
    try:
        trained_all = epochs_done.wait(DEADLINE)
    finally:
        hold.release.set()
        thread.join(DEADLINE)
        unsubscribe()
    assert trained_all, "an epoch start waited for the stalled disk"
    assert done.is_set() and isinstance(outcome[0], onthefly.FitSummary)
    assert len(losses_of(outcome[0])["index"]) == 3 * 64  # nothing was lost while the disk stalled


def test_the_exact_sum_is_the_same_in_any_order_and_chunking() -> None:
    from onthefly.engine.transfer import ExactSum

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(0, 3, 5000), -rng.random(100), [1e-45, 3.4e38, 0.0]]).astype(np.float32)
    exact = float(sum(map(Fraction, values.astype(np.float64).tolist())) / len(values))
    whole, pieces = ExactSum(), ExactSum()
    whole.add(values)
    for part in np.array_split(rng.permutation(values), 7):
        pieces.add(part)
    assert whole.mean() == pieces.mean() == exact
    restored = ExactSum(pieces.bins.copy(), pieces.count, pieces.nonfinite)  # as a checkpoint carries it
    restored.add(np.array([np.nan], dtype=np.float32))
    assert np.isnan(restored.mean())
