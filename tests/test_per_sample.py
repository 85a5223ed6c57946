"""Per-sample loss for every training sample, every epoch, whatever the loader and the loss.

Identity is proved, not assumed: the label of sample i is i % CLASSES, and with lr=0 the model
never changes, so every recorded loss can be recomputed independently from the sample's index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

import onthefly
from onthefly.errors import LossError

N, FEATURES, CLASSES, EPOCHS = 60, 5, 4, 2


def features(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))


class Indexed(Dataset):
    """Sample i: (x[i], i % CLASSES)."""

    def __init__(self, n: int = N) -> None:
        self.x = features(n)
        self.y = torch.arange(n) % CLASSES

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Positions(Dataset):
    """Yields its own indices: iterating a loader over it shows the order a sampler draws."""

    def __init__(self, n: int = N) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Stream(IterableDataset):
    def __init__(self, n: int = 30) -> None:
        self.x = features(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self.x)):
            yield self.x[i], torch.tensor(i % CLASSES)


class EvenReversed(Sampler[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return len(range(0, self.n, 2))

    def __iter__(self) -> Iterator[int]:
        return iter(range(0, self.n, 2)[::-1])


class EpochBatches(Sampler[list[int]]):
    """Uneven batches in an order that changes every epoch."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
        sizes, start = [5, 11, 3], 0
        batches: list[list[int]] = []
        while start < self.n:
            size = sizes[len(batches) % len(sizes)]
            batches.append(order[start : start + size])
            start += size
        return batches

    def __len__(self) -> int:
        return len(self._batches(0))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(self.epoch)
        self.epoch += 1
        return iter(batches)


class ReusedList:
    """A batch sampler that refills and yields one list object (some hand-written ones do)."""

    def __init__(self, n: int, batch: int = 8) -> None:
        self.n, self.batch = n, batch

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self) -> Iterator[list[int]]:
        buffer: list[int] = []
        for start in range(0, self.n, self.batch):
            buffer[:] = [self.n - 1 - i for i in range(start, min(start + self.batch, self.n))]
            yield buffer


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LOADERS: dict[str, Callable[[Any], DataLoader]] = {
    "shuffle": lambda ds: DataLoader(ds, batch_size=8, shuffle=True, generator=seeded(1)),
    "shuffle-workers": lambda ds: DataLoader(ds, batch_size=8, shuffle=True, num_workers=2,
                                             generator=seeded(2)),
    "custom-sampler": lambda ds: DataLoader(ds, batch_size=8, sampler=EvenReversed(len(ds))),
    "custom-batch-sampler": lambda ds: DataLoader(ds, batch_sampler=EpochBatches(len(ds))),
    "reused-list-batch-sampler": lambda ds: DataLoader(ds, batch_sampler=ReusedList(len(ds))),
    "drop-last": lambda ds: DataLoader(ds, batch_size=8, shuffle=True, drop_last=True,
                                       generator=seeded(3)),
}


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def frozen_fit(model: nn.Module, loader: DataLoader, loss_fn: Any = None,
               epochs: int = EPOCHS) -> onthefly.FitSummary:
    """Train with lr=0: the model is the same at every step, so losses can be recomputed."""
    return onthefly.quickstart(
        project="per-sample", run_name="run", model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loss_fn=nn.CrossEntropyLoss() if loss_fn is None else loss_fn,
        train_loader=loader, max_epochs=epochs, progress=False,
    )


def samples_of(summary: onthefly.FitSummary) -> pa.Table:
    return onthefly.open_session(summary.session_dir).samples(summary.run_id)


def epoch_rows(samples: pa.Table, epoch: int) -> dict[str, np.ndarray]:
    rows = samples.filter(np.asarray(samples.column("epoch")) == epoch)
    return {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}


def reference_order(make_loader: Callable[[Dataset], DataLoader], epochs: int = EPOCHS) -> list[np.ndarray]:
    """The indices a plain `for batch in loader` draws, epoch by epoch."""
    loader = make_loader(Positions())
    return [np.concatenate([batch.numpy() for batch in loader]) for _ in range(epochs)]


@torch.no_grad()
def recomputed_losses(model: nn.Module) -> np.ndarray:
    return F.cross_entropy(model(features()), torch.arange(N) % CLASSES, reduction="none").numpy()


@pytest.mark.parametrize("loader_name", list(LOADERS))
def test_every_sample_recorded_once_per_epoch_in_the_samplers_order(loader_name: str) -> None:
    model = classifier()
    expected_order = reference_order(LOADERS[loader_name])
    summary = frozen_fit(model, LOADERS[loader_name](Indexed()))

    expected_loss = recomputed_losses(model)
    samples = samples_of(summary)
    assert len(samples) == sum(len(order) for order in expected_order)
    for epoch, order in enumerate(expected_order):
        rows = epoch_rows(samples, epoch)
        assert len(np.unique(rows["index"])) == len(rows["index"])  # once per epoch
        np.testing.assert_array_equal(rows["index"], order)
        np.testing.assert_array_equal(rows["label"], rows["index"] % CLASSES)
        np.testing.assert_allclose(rows["loss"], expected_loss[rows["index"]], rtol=1e-5, atol=1e-6)


def test_shuffle_on_the_global_rng_covers_every_sample_each_epoch() -> None:
    model = classifier()
    summary = frozen_fit(model, DataLoader(Indexed(), batch_size=8, shuffle=True), epochs=3)

    expected_loss = recomputed_losses(model)
    samples = samples_of(summary)
    orders = []
    for epoch in range(3):
        rows = epoch_rows(samples, epoch)
        np.testing.assert_array_equal(np.sort(rows["index"]), np.arange(N))
        np.testing.assert_allclose(rows["loss"], expected_loss[rows["index"]], rtol=1e-5, atol=1e-6)
        orders.append(rows["index"])
    assert not np.array_equal(orders[0], orders[1])  # really shuffled


def test_classification_margin_prediction_and_correctness() -> None:
    model = classifier()
    summary = frozen_fit(model, LOADERS["shuffle"](Indexed()))

    with torch.no_grad():
        logits = model(features())
    labels = torch.arange(N) % CLASSES
    true_logit = logits[torch.arange(N), labels]
    other = logits.clone()
    other[torch.arange(N), labels] = -torch.inf
    margin = (true_logit - other.max(dim=1).values).numpy()
    pred = logits.argmax(dim=1).numpy()
    rows = epoch_rows(samples_of(summary), 1)
    i = rows["index"]
    np.testing.assert_allclose(rows["margin"], margin[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rows["pred"], pred[i])
    np.testing.assert_array_equal(rows["correct"], pred[i] == labels.numpy()[i])
    assert 0 < rows["correct"].sum() < N  # both outcomes are exercised
    assert ((rows["margin"] > 0) == rows["correct"]).all()


class Regression(Dataset):
    """Sample i: target [i, -i, 2i] / N."""

    def __init__(self) -> None:
        self.x = features()
        i = torch.arange(N, dtype=torch.float32)[:, None] / N
        self.y = torch.cat([i, -i, 2 * i], dim=1)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_regression_loss_is_the_mean_over_non_batch_dims_without_class_signals() -> None:
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 3)
    data = Regression()
    summary = frozen_fit(model, LOADERS["shuffle"](data), loss_fn=nn.MSELoss())

    with torch.no_grad():
        expected = ((model(data.x) - data.y) ** 2).mean(dim=1).numpy()
    samples = samples_of(summary)
    assert len(samples) == EPOCHS * N
    for epoch in range(EPOCHS):
        rows = epoch_rows(samples, epoch)
        np.testing.assert_array_equal(np.sort(rows["index"]), np.arange(N))
        np.testing.assert_allclose(rows["loss"], expected[rows["index"]], rtol=1e-5, atol=1e-7)
        assert np.isnan(rows["margin"]).all()
    for name in ("pred", "label", "correct"):
        assert samples.column(name).null_count == len(samples)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_module_per_sample_values_come_from_an_unreduced_copy(reduction: str) -> None:
    model = classifier()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    summary = frozen_fit(model, LOADERS["shuffle"](Indexed()), loss_fn=loss_fn)

    assert loss_fn.reduction == reduction  # the user's module is left as it was
    expected = recomputed_losses(model)
    rows = epoch_rows(samples_of(summary), 0)
    np.testing.assert_array_equal(np.sort(rows["index"]), np.arange(N))
    np.testing.assert_allclose(rows["loss"], expected[rows["index"]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_observing_per_sample_loss_does_not_change_training(reduction: str) -> None:
    """The optimizer sees exactly the user's loss: same weights as a plain loop, bit for bit."""
    data = Indexed()
    plain = classifier()
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    for _ in range(EPOCHS):
        for x, y in DataLoader(data, batch_size=8):
            opt.zero_grad()
            loss_fn(plain(x), y).backward()
            opt.step()

    tracked = classifier()
    onthefly.quickstart(
        project="per-sample", run_name="run", model=tracked,
        optimizer=torch.optim.SGD(tracked.parameters(), lr=0.05, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(reduction=reduction),
        train_loader=DataLoader(data, batch_size=8), max_epochs=EPOCHS, progress=False,
    )
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        assert torch.equal(a, b)


def test_callable_returning_per_sample_values() -> None:
    model = classifier()
    summary = frozen_fit(model, LOADERS["shuffle"](Indexed()),
                         loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))

    assert summary.status == "finished"
    expected = recomputed_losses(model)
    samples = samples_of(summary)
    assert len(samples) == EPOCHS * N
    for epoch in range(EPOCHS):
        rows = epoch_rows(samples, epoch)
        np.testing.assert_array_equal(np.sort(rows["index"]), np.arange(N))
        np.testing.assert_allclose(rows["loss"], expected[rows["index"]], rtol=1e-5, atol=1e-6)
    config = onthefly.open_session(summary.session_dir).runs()[0]["config"]
    assert config["per_sample_loss"] == "per-sample callable"


def test_callable_returning_a_scalar_says_how_to_give_per_sample_values(onthefly_home: Path) -> None:
    with pytest.raises(LossError, match=r"single number.*reduction='none'"):
        frozen_fit(classifier(), LOADERS["shuffle"](Indexed()),
                   loss_fn=lambda out, y: F.cross_entropy(out, y))

    (folder,) = (onthefly_home / "sessions").iterdir()
    (run,) = onthefly.open_session(folder).runs()
    assert run["status"] == "failed"


def test_iterable_dataset_numbers_samples_by_position_in_the_epoch() -> None:
    model = classifier()
    summary = frozen_fit(model, DataLoader(Stream(30), batch_size=8), epochs=3)

    with torch.no_grad():
        expected = F.cross_entropy(model(features(30)), torch.arange(30) % CLASSES, reduction="none")
    samples = samples_of(summary)
    assert len(samples) == 3 * 30
    for epoch in range(3):
        rows = epoch_rows(samples, epoch)
        np.testing.assert_array_equal(rows["index"], np.arange(30))
        np.testing.assert_array_equal(rows["label"], np.arange(30) % CLASSES)
        np.testing.assert_allclose(rows["loss"], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_custom_loop_records_indices_and_per_sample_loss() -> None:
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = LOADERS["shuffle"](Indexed())
    expected_order = reference_order(LOADERS["shuffle"], epochs=3)
    with onthefly.start_run(project="custom", run_name="loop", model=model, optimizer=opt) as run:
        for _ in run.epochs(3):
            for x, y in run.batches(loader):
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                opt.zero_grad()
                losses.mean().backward()
                opt.step()
                run.step(losses, logits=logits, targets=y)

    session = onthefly.open_session(run.session.dir)
    assert session.runs()[0]["status"] == "finished"
    expected = recomputed_losses(model)
    samples = session.samples(run.run_id)
    assert len(samples) == 3 * N
    for epoch, order in enumerate(expected_order):
        rows = epoch_rows(samples, epoch)
        np.testing.assert_array_equal(rows["index"], order)
        np.testing.assert_allclose(rows["loss"], expected[rows["index"]], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(rows["label"], rows["index"] % CLASSES)


BAD_PER_SAMPLE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "scalar": lambda losses: losses.mean(),
    "too-short": lambda losses: losses[:-1],
    "too-long": lambda losses: torch.cat([losses, losses[:1]]),
    "column": lambda losses: losses[:, None],
}


@pytest.mark.parametrize("at_step", [1, 3])
@pytest.mark.parametrize("bad", list(BAD_PER_SAMPLE))
def test_custom_loop_step_rejects_values_that_are_not_one_per_sample(bad: str, at_step: int) -> None:
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LossError, match=r"one loss per sample.*reduction='none'"), \
            onthefly.start_run(project="custom", run_name="loop", model=model, optimizer=opt) as run:
        for _ in run.epochs(1):
            for step, (x, y) in enumerate(run.batches(LOADERS["shuffle"](Indexed())), start=1):
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                opt.zero_grad()
                losses.mean().backward()
                opt.step()
                if step == at_step:
                    losses = BAD_PER_SAMPLE[bad](losses)
                run.step(losses, logits=logits, targets=y)

    session = onthefly.open_session(run.session.dir)
    assert session.runs()[0]["status"] == "failed"
    assert run.global_step == at_step - 1


def test_custom_loop_step_rejects_a_loss_that_is_not_one_value() -> None:
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(LossError, match=r"step\(loss=\.\.\.\) must be the scalar loss you backpropagated, got \(8,\)"), \
            onthefly.start_run(project="custom", run_name="loop", model=model, optimizer=opt) as run:
        for _ in run.epochs(1):
            for x, y in run.batches(LOADERS["shuffle"](Indexed())):
                losses = F.cross_entropy(model(x), y, reduction="none")
                run.step(losses, loss=losses)  # the per-sample values again, not their mean
    assert onthefly.open_session(run.session.dir).runs()[0]["status"] == "failed"


def test_classification_signals_accept_ignored_targets_and_small_integer_labels() -> None:
    from onthefly.signals.per_sample import classification_signals

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5]])
    margin, pred, confidence = classification_signals(logits, torch.tensor([0, -100, 2]))
    assert pred.tolist() == [0, 1, 0]
    assert margin[0].item() == pytest.approx(1.0) and margin[2].item() == pytest.approx(-0.5)
    assert torch.isnan(margin[1]) and torch.isnan(confidence[1])  # ignore_index: no true class
    expected = torch.softmax(logits, dim=1)
    assert confidence[0].item() == pytest.approx(expected[0, 0].item())
    assert confidence[2].item() == pytest.approx(expected[2, 2].item())
    margin_u8, pred_u8, _ = classification_signals(logits, torch.tensor([0, 1, 2], dtype=torch.uint8))
    assert pred_u8.tolist() == [0, 1, 0] and margin_u8[1].item() == pytest.approx(2.0)


def test_recorder_derives_steps_whose_rows_differ_in_shape_separately() -> None:
    """Outputs kept for one flush need not concatenate (e.g. sequences padded per batch)."""
    from onthefly.signals.recorder import LOSS, HostPacket, SampleRecorder

    packets: list[HostPacket] = []
    recorder = SampleRecorder(torch.device("cpu"), packets.append)
    recorder.derive = lambda out, y: (((out - y) ** 2).mean(dim=1), None)
    recorder.begin_epoch(1, "train", 0)
    batches = [torch.randn(4, 3), torch.randn(4, 5), torch.randn(2, 5)]
    for step, out in enumerate(batches, start=1):
        recorder.record_outputs(step, np.arange(4 * step - 4, 4 * step - 4 + len(out)), out, torch.zeros_like(out),
                                out.pow(2).mean(), lr=0.1)
    recorder.close()

    (packet,) = packets
    expected = torch.cat([out.pow(2).mean(dim=1) for out in batches]).numpy()
    np.testing.assert_allclose(packet.rows[:, LOSS], expected, rtol=1e-6)
    np.testing.assert_array_equal(packet.row_steps, [1] * 4 + [2] * 4 + [3] * 2)
    np.testing.assert_array_equal(packet.step_losses, [out.pow(2).mean().item() for out in batches])


def test_recorder_step_losses_of_mixed_scalar_shapes() -> None:
    """Step losses are stacked in one kernel; a loop whose loss is sometimes (1,) still gets one value a step."""
    from onthefly.signals.recorder import HostPacket, SampleRecorder

    packets: list[HostPacket] = []
    recorder = SampleRecorder(torch.device("cpu"), packets.append)
    recorder.begin_epoch(1, "train", 0)
    losses = [torch.tensor(0.5), torch.tensor([1.5]), torch.tensor(2.5)]
    for step, loss in enumerate(losses, start=1):
        recorder.record(step, np.arange(2), torch.ones(2), loss, lr=0.1)
    recorder.close()
    (packet,) = packets
    np.testing.assert_array_equal(packet.step_losses, [0.5, 1.5, 2.5])
    np.testing.assert_array_equal(packet.steps, [1, 2, 3])


def test_recorder_keeps_the_steps_values_not_its_tensors() -> None:
    """Each step's outputs and targets are copied into preallocated rows: a tensor changed (or
    freed) after the step leaves the recorded values as they were, and nothing of the step's own
    memory is held until the flush."""
    from onthefly.signals.recorder import LOSS, HostPacket, SampleRecorder

    packets: list[HostPacket] = []
    recorder = SampleRecorder(torch.device("cpu"), packets.append)
    recorder.derive = lambda out, y: (((out - y) ** 2).mean(dim=1), None)
    recorder.begin_epoch(1, "train", 0)
    expected = []
    for step in range(1, 4):
        out, y = torch.randn(4, 3), torch.randn(4, 3)
        expected.append(((out - y) ** 2).mean(dim=1))
        recorder.record_outputs(step, np.arange(4 * step - 4, 4 * step), out, y, out.sum(), lr=0.1)
        out.zero_()  # e.g. a buffer the model reuses for its next output
        y.fill_(7.0)
    recorder.close()

    (packet,) = packets
    np.testing.assert_allclose(packet.rows[:, LOSS], torch.cat(expected).numpy(), rtol=1e-6)
