"""Training options (schedulers, AMP, clipping, accumulation, device, validation) and bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
import onthefly.engine.run
from onthefly.errors import ConfigError, DataError, LossError

FEATURES, CLASSES = 6, 3


def data(n: int = 32, seed: int = 0, features: int = FEATURES) -> TensorDataset:
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, torch.arange(n) % CLASSES)


def model(seed: int = 0, outputs: int = CLASSES) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, outputs))


def fit(net: nn.Module, loader: DataLoader, *, epochs: int = 2, lr: float = 0.1,
        optimizer: Any = None, loss_fn: Any = None, **options: Any) -> onthefly.FitSummary:
    return onthefly.quickstart(
        project="options", run_name="run", model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr) if optimizer is None else optimizer,
        loss_fn=nn.CrossEntropyLoss() if loss_fn is None else loss_fn,
        train_loader=loader, max_epochs=epochs, progress=False, **options,
    )


def lrs(summary: onthefly.FitSummary) -> list[tuple[int, float]]:
    rows = onthefly.open_session(summary.session_dir).metrics(summary.run_id, "lr")
    return [(row["step"], row["value"]) for row in rows]


def the_session(home: Path) -> onthefly.store.SessionReader:
    (folder,) = (home / "sessions").iterdir()
    return onthefly.open_session(folder)


# ---- learning-rate schedulers ---------------------------------------------------------------

def test_epoch_scheduler_changes_lr_at_the_epoch_boundary() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    summary = fit(net, DataLoader(data(32), batch_size=8), epochs=3, optimizer=opt, scheduler=scheduler)

    assert lrs(summary) == [(step, pytest.approx(0.1 * 0.5 ** ((step - 1) // 4))) for step in range(1, 13)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_step_scheduler_steps_after_every_optimizer_step() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    summary = fit(net, DataLoader(data(32), batch_size=8), epochs=2, optimizer=opt,
                  scheduler=scheduler, scheduler_interval="step")

    recorded = lrs(summary)
    assert [step for step, _ in recorded] == list(range(1, 9))
    for (_, before), (_, after) in itertools.pairwise(recorded):
        assert after == pytest.approx(before * 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**8)


def test_reduce_on_plateau_reads_the_validation_loss() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # Only a drop of 100 counts as progress: epoch 0 sets the best, epoch 1 is a plateau.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=0, threshold=100.0, threshold_mode="abs")
    summary = fit(net, DataLoader(data(32), batch_size=8), epochs=3, optimizer=opt,
                  scheduler=scheduler, val_loader=DataLoader(data(16, seed=1), batch_size=8))

    val_loss = onthefly.open_session(summary.session_dir).metrics(summary.run_id, "val_loss")
    assert scheduler.best == val_loss[0]["value"]  # the scheduler was given the val loss
    assert lrs(summary) == [(step, pytest.approx(0.1 if step <= 8 else 0.05)) for step in range(1, 13)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


# ---- AMP, clipping, accumulation --------------------------------------------------------------

def test_amp_on_cpu_runs_under_bfloat16_and_records_per_sample_values() -> None:
    net = model()
    dtypes = set()
    net[0].register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    summary = fit(net, DataLoader(data(32), batch_size=8, shuffle=True), lr=0.0, amp=True, device="cpu")

    assert summary.status == "finished"
    assert dtypes == {torch.bfloat16}
    session = onthefly.open_session(summary.session_dir)
    assert session.runs()[0]["config"]["amp"] is True
    samples = session.samples(summary.run_id)
    index = samples.column("index").to_numpy()
    loss = samples.column("loss").to_numpy()
    assert sorted(index.tolist()) == sorted(list(range(32)) * 2)
    x, y = data(32).tensors
    with torch.no_grad():
        expected = F.cross_entropy(net(x), y, reduction="none").numpy()
    np.testing.assert_allclose(loss, expected[index], rtol=0.05, atol=0.02)  # bf16 precision


def plain_loop(net: nn.Module, loader: DataLoader, epochs: int, *, lr: float,
               clip: float | None = None, accumulate: int = 1) -> int:
    """The textbook loop the options must reproduce exactly; returns the optimizer steps."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    steps = 0
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader, start=1):
            loss = F.cross_entropy(net(x), y)
            (loss / accumulate if accumulate > 1 else loss).backward()
            if i % accumulate == 0 or i == len(loader):
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                opt.step()
                opt.zero_grad()
                steps += 1
    return steps


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_grad_clip_clips_like_a_plain_loop() -> None:
    loader = DataLoader(data(32), batch_size=8)
    clipped, unclipped = model(), model()
    plain_loop(clipped, loader, 2, lr=0.5, clip=0.5)
    plain_loop(unclipped, loader, 2, lr=0.5)

    tracked = model()
    fit(tracked, loader, lr=0.5, optimizer=torch.optim.SGD(tracked.parameters(), lr=0.5, momentum=0.9),
        grad_clip=0.5)

    assert_same_weights(tracked, clipped)
    # Clipping had an effect: the weights differ from an unclipped run.
    assert not all(torch.equal(p, q) for p, q in zip(clipped.parameters(), unclipped.parameters(), strict=True))


@pytest.mark.parametrize("n", [64, 56], ids=["even-batches", "odd-batches"])
def test_accumulate_grad_batches_matches_a_plain_accumulating_loop(n: int) -> None:
    loader = DataLoader(data(n), batch_size=8)
    reference = model()
    plain_steps = plain_loop(reference, loader, 2, lr=0.1, accumulate=2)

    tracked = model()
    summary = fit(tracked, loader, optimizer=torch.optim.SGD(tracked.parameters(), lr=0.1, momentum=0.9),
                  accumulate_grad_batches=2)

    assert_same_weights(tracked, reference)
    assert summary.steps == plain_steps == 2 * math.ceil(len(loader) / 2)
    samples = onthefly.open_session(summary.session_dir).samples(summary.run_id)
    assert len(samples) == 2 * n  # every micro-batch is recorded


# ---- device -------------------------------------------------------------------------------

def test_device_cpu_override() -> None:
    net = model()
    summary = fit(net, DataLoader(data(16), batch_size=8), device="cpu")

    assert summary.status == "finished"
    assert next(net.parameters()).device.type == "cpu"
    assert onthefly.open_session(summary.session_dir).runs()[0]["config"]["device"] == "cpu"


def test_device_cuda_trains_there_or_says_it_is_unavailable() -> None:
    net = model()
    loader = DataLoader(data(16), batch_size=8)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device='cuda'.*CUDA is not available.*device='cpu'"):
            fit(net, loader, device="cuda")
        return
    summary = fit(net, loader, device="cuda")
    assert summary.status == "finished"
    assert next(net.parameters()).device.type == "cuda"
    assert len(onthefly.open_session(summary.session_dir).samples(summary.run_id)) == 32


# ---- bad input ----------------------------------------------------------------------------

def nan_at(index: int, n: int = 32) -> TensorDataset:
    x, y = data(n).tensors
    x = x.clone()
    x[index, 0] = float("nan")
    return TensorDataset(x, y)


def wide_targets(n: int = 16) -> TensorDataset:
    return TensorDataset(data(n).tensors[0], torch.zeros(n, 2))


def class_seven(n: int = 16) -> TensorDataset:
    return TensorDataset(data(n).tensors[0], torch.full((n,), 7))


FIT_FAILURES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("class-out-of-range", {"net": lambda: model(outputs=5), "dataset": class_seven},
     LossError, r"outputs are a tensor of shape \(8, 5\), targets are a tensor of shape \(8,\)"),
    ("mse-shape-mismatch", {"net": lambda: model(outputs=3), "dataset": wide_targets,
                            "loss_fn": nn.MSELoss()},
     LossError, r"outputs are a tensor of shape \(8, 3\), targets are a tensor of shape \(8, 2\)"),
    ("input-size-mismatch", {"net": model, "dataset": lambda: data(16, features=4)},
     DataError, r"model failed on the first batch.*input size matches the data"),
    ("nan-in-first-batch", {"net": model, "dataset": lambda: nan_at(3)},
     LossError, r"not finite.*very first step"),
    ("max-epochs-negative", {"epochs": -1}, ConfigError, r"max_epochs must be a whole number >= 0, got -1"),
    ("max-epochs-float", {"epochs": 1.5}, ConfigError, r"max_epochs .* got 1.5"),
    ("max-epochs-bool", {"epochs": True}, ConfigError, r"max_epochs .* got True"),
]


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")
@pytest.mark.parametrize(("case", "spec", "error", "message"), FIT_FAILURES, ids=[c[0] for c in FIT_FAILURES])
def test_bad_input_at_fit_fails_clearly_and_keeps_the_session(
        onthefly_home: Path, case: str, spec: dict[str, Any], error: type[Exception], message: str) -> None:
    net = spec.get("net", model)()
    loader = DataLoader(spec.get("dataset", data)(), batch_size=8)
    with pytest.raises(error, match=message):
        fit(net, loader, epochs=spec.get("epochs", 2), loss_fn=spec.get("loss_fn"))

    session = the_session(onthefly_home)
    (run,) = session.runs()
    assert run["status"] == "failed"
    assert session.info()["status"] == "failed"
    assert len(session.samples(run["id"])) == 0  # nothing was recorded before the failure
    (event,) = session.events(kind="error")
    assert event["payload"]["type"] == error.__name__


def empty_loader() -> DataLoader:
    return DataLoader(data(0), batch_size=8)


CONSTRUCTION_FAILURES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("empty-train-loader", {"train_loader": empty_loader}, DataError,
     r"train_loader is empty.*dataset of 0 samples"),
    ("drop-last-empties-loader",
     {"train_loader": lambda: DataLoader(data(5), batch_size=8, drop_last=True)}, DataError,
     r"train_loader is empty.*batch_size=8, drop_last=True.*lower batch_size"),
    ("empty-val-loader", {"val_loader": empty_loader}, DataError, r"val_loader is empty"),
    ("not-a-loader", {"train_loader": lambda: [(torch.zeros(2, FEATURES), torch.zeros(2))]},
     DataError, r"train_loader must be a torch.utils.data.DataLoader, got list"),
    ("accumulate-zero", {"accumulate_grad_batches": 0}, ConfigError, r"accumulate_grad_batches .* got 0"),
    ("accumulate-float", {"accumulate_grad_batches": 2.0}, ConfigError, r"accumulate_grad_batches .* got 2.0"),
    ("accumulate-bool", {"accumulate_grad_batches": True}, ConfigError, r"accumulate_grad_batches .* got True"),
    ("grad-clip-zero", {"grad_clip": 0}, ConfigError, r"grad_clip must be a number > 0 .* got 0"),
    ("grad-clip-negative", {"grad_clip": -1.0}, ConfigError, r"grad_clip .* got -1.0"),
    ("grad-clip-nan", {"grad_clip": float("nan")}, ConfigError, r"grad_clip .* got nan"),
    ("grad-clip-string", {"grad_clip": "1"}, ConfigError, r"grad_clip .* got '1'"),
    ("scheduler-interval", {"scheduler_interval": "batch"}, ConfigError,
     r"scheduler_interval must be 'epoch' or 'step', got 'batch'"),
    ("optimizer-type", {"optimizer": lambda: [torch.zeros(1, requires_grad=True)]}, ConfigError,
     r"optimizer must be a torch.optim.Optimizer, got list.*torch.optim.Adam\(model.parameters"),
    ("device-name", {"device": "not-a-device"}, ConfigError, r"device='not-a-device' is not a device name"),
]


@pytest.mark.parametrize(("case", "options", "error", "message"), CONSTRUCTION_FAILURES,
                         ids=[c[0] for c in CONSTRUCTION_FAILURES])
def test_bad_options_fail_at_construction(onthefly_home: Path, case: str, options: dict[str, Any],
                                          error: type[Exception], message: str) -> None:
    net = model()
    kwargs: dict[str, Any] = {
        "model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1),
        "loss_fn": nn.CrossEntropyLoss(), "train_loader": DataLoader(data(16), batch_size=8),
        "progress": False,
    }
    kwargs.update({k: v() if callable(v) else v for k, v in options.items()})
    with pytest.raises(error, match=message):
        onthefly.Trainer(**kwargs)

    # Nothing was trained; whatever session folder exists is readable.
    for folder in (onthefly_home / "sessions").glob("*"):
        for run in onthefly.open_session(folder).runs():
            assert run["status"] != "running"


def test_non_finite_loss_later_in_training_fails_the_run(onthefly_home: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Check health at every step boundary, so the test does not depend on how fast steps are.
    monkeypatch.setattr(onthefly.engine.run, "FLUSH_SECONDS", 0.0)
    loader = DataLoader(nan_at(21), batch_size=8)  # step 3 of the first epoch; then weights go NaN
    with pytest.raises(LossError, match=r"non-finite \(NaN or inf\) for 1 sample\(s\) at step 3.*grad_clip"):
        fit(model(), loader, epochs=100)

    session = the_session(onthefly_home)
    (run,) = session.runs()
    assert run["status"] == "failed"
    (error,) = session.events(kind="error")
    assert 3 <= error["step"] < 400  # within a flush interval, not at the end of the plan
    samples = session.samples(run["id"])
    steps = samples.column("step").to_numpy()
    loss = samples.column("loss").to_numpy()
    index = samples.column("index").to_numpy()
    assert np.isfinite(loss[steps < 3]).all()
    # At step 3 only sample 21 is NaN; after it the weights are NaN and so is every loss.
    np.testing.assert_array_equal(np.isnan(loss[steps == 3]), index[steps == 3] == 21)
    assert np.isnan(loss[steps > 3]).all()


def test_non_finite_loss_at_the_end_of_a_short_run_still_fails_it(onthefly_home: Path) -> None:
    loader = DataLoader(nan_at(29), batch_size=8)  # the last step of a one-epoch run
    with pytest.raises(LossError, match=r"non-finite.*at step 4"):
        fit(model(), loader, epochs=1)

    (run,) = the_session(onthefly_home).runs()
    assert run["status"] == "failed"


# ---- validation and test ------------------------------------------------------------------

@torch.no_grad()
def expected_eval(net: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    x, y = dataset.tensors
    logits = net(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("do_test_after", [True, False])
def test_validation_every_epoch_and_test_once_at_the_end(do_test_after: bool) -> None:
    net = model()
    val, test = data(24, seed=1), data(20, seed=2)
    summary = onthefly.quickstart(
        project="options", run_name="run", model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(data(32), batch_size=8), val_loader=DataLoader(val, batch_size=8),
        test_loader=DataLoader(test, batch_size=8), max_epochs=3, do_test_after=do_test_after,
        progress=False,
    )

    session = onthefly.open_session(summary.session_dir)
    val_loss, val_accuracy = expected_eval(net, val)
    for name, value in (("val_loss", val_loss), ("val_accuracy", val_accuracy)):
        rows = session.metrics(summary.run_id, name)
        assert [row["epoch"] for row in rows] == [0, 1, 2]
        assert [row["step"] for row in rows] == [4, 8, 12]
        assert [row["value"] for row in rows] == pytest.approx([value] * 3, rel=1e-5)
    assert summary.val["loss"] == pytest.approx(val_loss, rel=1e-5)

    test_loss, test_accuracy = expected_eval(net, test)
    if do_test_after:
        for name, value in (("test_loss", test_loss), ("test_accuracy", test_accuracy)):
            (row,) = session.metrics(summary.run_id, name)
            assert row["step"] == 12
            assert row["value"] == pytest.approx(value, rel=1e-5)
        assert summary.test["accuracy"] == pytest.approx(test_accuracy)
    else:
        assert session.metrics(summary.run_id, "test_loss") == []
        assert summary.test == {}
    splits = [event["payload"]["split"] for event in session.events(kind="eval")]
    assert splits == ["val"] * 3 + (["test"] if do_test_after else [])


def test_a_learning_rate_kept_as_a_tensor_is_recorded_step_by_step() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=torch.tensor(0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # updates the tensor in place
    summary = fit(net, DataLoader(data(32), batch_size=8), optimizer=opt, scheduler=sched,
                  scheduler_interval="step", epochs=1)
    assert [lr for _, lr in lrs(summary)] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
