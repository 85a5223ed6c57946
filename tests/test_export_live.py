"""An export with the samples' data during training: read on the training thread at a step
boundary, with every RNG put back, so watching never changes the experiment; an iterable
dataset says its rows carry no data; a dataset that fails to read gives a failed export that
says why."""

from __future__ import annotations

import contextlib
import json
import random
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import onthefly
from conftest import toy_data, toy_model
from onthefly.actions import export as exporting
from onthefly.actions import slices as slicing

SAMPLES = 96
BATCH = 16


class Augmented(Dataset):
    """A training dataset whose rows are augmented with every global RNG (as real transforms are)."""

    def __init__(self) -> None:
        self.base = toy_data(SAMPLES)
        self.transform = "noise"  # a transform applies (what the export's note warns about)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        noise = torch.randn_like(x) * 0.05 + random.random() * 0.01 + float(np.random.rand()) * 0.01
        return x + noise, y


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from toy_data(SAMPLES)


class Broken(TensorDataset):
    def __getitem__(self, i: int) -> Any:
        raise OSError(f"disk gone while reading row {i}")


class ExportAt(onthefly.Callback):
    """At ``step``: save a slice and ask for its export with data (as the server does)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.export_id = secrets.token_hex(16)

    def on_step_end(self, run: onthefly.Run) -> None:
        if run.global_step == self.step:
            slicing.save_run_slice(run, "label0", {"kind": "label", "label": 0})
            run.request("export", export_id=self.export_id, slice="label0", run_id=run.run_id, epoch=None,
                        format="csv", filename="label0.csv")


def train(train_set: Any, *, export_at: int | None, export_dataset: Any = None,
          epochs: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, onthefly.Run]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    callbacks = (ExportAt(export_at),) if export_at is not None else ()
    model = toy_model()
    shuffle = not isinstance(train_set, IterableDataset)
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(train_set, batch_size=BATCH, shuffle=shuffle), project="export", run_name="r",
        callbacks=callbacks, progress=False, export_dataset=export_dataset)
    exporting.attach(trainer.run)
    trainer.fit(epochs)
    record = None
    if callbacks:
        record = exporting.export_record(trainer.run.session.dir, callbacks[0].export_id)
    return {k: v.clone() for k, v in model.state_dict().items()}, record, trainer.run


@pytest.mark.parametrize("isolated", [True, False])
def test_an_export_during_training_leaves_the_trajectory_bit_identical(
    isolated: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    baseline, _, _ = train(Augmented(), export_at=None)
    if not isolated:  # the test can fail: without isolation, reading augmented rows moves the RNG
        monkeypatch.setattr(exporting, "isolated_rng", contextlib.nullcontext)
    weights, record, run = train(Augmented(), export_at=SAMPLES // BATCH + 2)
    assert record is not None and record["status"] == "ready", record
    assert record["rows"] > 0 and "augmented" in record["note"]
    rows = pacsv.read_csv(exporting.export_file(run.session.dir, record))
    assert "x_0" in rows.column_names and set(rows.column("label").to_pylist()) == {0}
    same = all(torch.equal(baseline[k], weights[k]) for k in baseline)
    assert same is isolated


def test_an_iterable_dataset_exports_rows_without_data_and_says_so() -> None:
    _, record, run = train(Stream(), export_at=SAMPLES // BATCH + 1, epochs=2)
    assert record is not None and record["status"] == "ready"
    assert "IterableDataset" in record["note"] and "export_dataset=" in record["note"]
    assert "x_0" not in pacsv.read_csv(exporting.export_file(run.session.dir, record)).column_names


def test_export_dataset_gives_the_rows_data_without_augmentation() -> None:
    plain = toy_data(SAMPLES)
    _, record, run = train(Augmented(), export_at=SAMPLES // BATCH + 1, export_dataset=plain, epochs=2)
    assert record is not None and record["status"] == "ready" and record["note"] is None
    rows = pacsv.read_csv(exporting.export_file(run.session.dir, record)).to_pylist()
    x, _ = plain.tensors
    for row in rows:
        assert row["x_0"] == pytest.approx(float(x[row["index"], 0]))  # the view's own values, not noisy ones


def test_a_dataset_that_fails_to_read_gives_a_failed_export_that_says_why() -> None:
    broken = Broken(*toy_data(SAMPLES).tensors)
    _, record, run = train(Augmented(), export_at=SAMPLES // BATCH + 1, export_dataset=broken, epochs=2)
    assert record is not None and record["status"] == "failed"
    assert "disk gone while reading row" in record["error"]
    assert not exporting.export_file(run.session.dir, record).exists()  # no partial file
    events = [e for e in onthefly.open_session(run.session.dir).events(kind="command_applied")
              if e["payload"]["command"] == "export"]
    assert json.dumps(events[0]["payload"]["result"]["status"]) == '"failed"'


def test_epoch_summary_is_published_once_the_epochs_table_can_be_read(block: Any) -> None:
    """A page reads the epoch's table when it sees epoch_summary: the table must be there."""
    seen: list[tuple[int, int]] = []

    class ParkAtEpochEnd(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            if run.epoch == 0 and not hasattr(self, "release"):
                self.release = block(run.session._writer)  # the writer is slow at the epoch's end

        def on_step_end(self, run: onthefly.Run) -> None:
            if hasattr(self, "release"):
                self.release.set()

    model = toy_model()
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(SAMPLES), batch_size=BATCH), project="export", run_name="r",
        callbacks=(ParkAtEpochEnd(),), progress=False)
    reader = onthefly.open_session(trainer.run.session.dir)

    def on_event(event: Any) -> None:
        if event.kind == "epoch_summary":
            seen.append((event.epoch, reader.samples(1, epoch=event.epoch).num_rows))

    trainer.run.bus.subscribe(on_event)
    trainer.fit(2)
    assert [epoch for epoch, _ in seen] == [0, 1]
    assert all(rows == SAMPLES for _, rows in seen), seen  # every sample of the epoch is readable
