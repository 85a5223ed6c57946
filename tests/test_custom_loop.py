"""A training loop the user writes, driven through ``onthefly.start_run``: per-sample recording
with dataset indices, control points, checkpoints, metrics, evaluation, and the run's life cycle."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from conftest import toy_data, toy_model
from onthefly import Callback, Run
from onthefly.engine.events import Event
from onthefly.errors import LossError
from onthefly.store import read_checkpoint

DEADLINE = 60.0
SAMPLES = 256
STEPS_PER_EPOCH = 8


def new_run(**options: Any) -> tuple[Run, torch.nn.Module, torch.optim.Optimizer]:
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = onthefly.start_run(project="custom", run_name="loop", model=model, optimizer=opt, **options)
    return run, model, opt


def train_step(run: Run, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")
    opt.zero_grad()
    losses.mean().backward()
    opt.step()
    run.step(losses, logits=logits, targets=y)
    return losses


def loader(dataset: TensorDataset | None = None, **options: Any) -> DataLoader:
    return DataLoader(dataset if dataset is not None else toy_data(SAMPLES), batch_size=32, shuffle=True,
                      **options)


class At(Callback):
    def __init__(self, step: int, kind: str, **args: Any) -> None:
        self.step, self.kind, self.args = step, kind, args

    def on_step_end(self, run: Run) -> None:
        if run.global_step == self.step:
            run.request(self.kind, **self.args)


# ---- per-sample recording ------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_per_sample_losses_are_recorded_with_their_dataset_indices(num_workers: int) -> None:
    dataset = toy_data(SAMPLES)
    index_of = {value: i for i, value in enumerate(dataset.tensors[0][:, 0].tolist())}
    train = loader(dataset, num_workers=num_workers)
    run, model, opt = new_run()
    expected: dict[tuple[int, int], tuple[int, float]] = {}  # (epoch, index) -> (step, loss)
    with run:
        for epoch in run.epochs(2):
            for batch in run.batches(train):
                losses = train_step(run, model, opt, batch)
                for value, loss in zip(batch[0][:, 0].tolist(), losses.tolist(), strict=True):
                    expected[(epoch, index_of[value])] = (run.global_step, loss)

    assert run.status == "finished"
    assert run.global_step == 2 * STEPS_PER_EPOCH
    table = onthefly.open_session(run.session.dir).samples(run.run_id).to_pylist()
    assert len(table) == 2 * SAMPLES
    recorded = {(row["epoch"], row["index"]): (row["step"], row["loss"]) for row in table}
    assert recorded.keys() == expected.keys()
    for key, (step, loss) in expected.items():
        assert recorded[key][0] == step, key
        assert recorded[key][1] == pytest.approx(loss, rel=1e-6), key
    labels = dataset.tensors[1].tolist()
    assert all(row["label"] == labels[row["index"]] for row in table)
    assert all(row["correct"] == (row["pred"] == row["label"]) for row in table)
    assert all(row["margin"] == row["margin"] for row in table)  # a number, not NaN


def test_regression_loop_records_loss_without_classification_columns() -> None:
    gen = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, 1, generator=gen))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with onthefly.start_run(project="custom", run_name="reg", model=model, optimizer=opt) as run:
        for _ in run.epochs(1):
            for x, y in run.batches(loader(dataset)):
                losses = F.mse_loss(model(x), y, reduction="none").mean(dim=1)
                opt.zero_grad()
                losses.mean().backward()
                opt.step()
                run.step(losses)
    table = onthefly.open_session(run.session.dir).samples(run.run_id)
    assert sorted(table.column("index").to_pylist()) == list(range(64))
    assert table.column("label").null_count == 64
    assert table.column("pred").null_count == 64


def test_a_batch_loss_instead_of_per_sample_losses_is_refused() -> None:
    run, model, opt = new_run()
    with pytest.raises(LossError, match="reduction='none'"), run:
        for _ in run.epochs(1):
            for x, y in run.batches(loader()):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.step(loss)
    assert run.status == "failed"


# ---- control points ------------------------------------------------------------------------
def test_stop_from_a_callback_ends_batches_and_epochs() -> None:
    run, model, opt = new_run(callbacks=[At(3, "stop")])
    batches_after_stop = 0
    with run:
        for _ in run.epochs(5):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
                if run.stopping:
                    batches_after_stop += 1
    assert run.global_step == 4
    assert batches_after_stop == 1  # the step at which it took effect, then no further batch
    assert run.status == "stopped"
    reader = onthefly.open_session(run.session.dir)
    assert reader.runs()[0]["status"] == "stopped"
    assert reader.info()["status"] == "stopped"
    (stop,) = reader.events(kind="command_applied")
    assert (stop["payload"]["command"], stop["step"]) == ("stop", 4)


def test_stop_from_another_thread_ends_the_loop() -> None:
    run, model, opt = new_run()
    started = threading.Event()

    def on_event(event: Event) -> None:
        if event.kind == "epoch_started":
            started.set()

    run.bus.subscribe(on_event)

    def stopper() -> None:
        assert started.wait(DEADLINE)
        run.request("stop")

    thread = threading.Thread(target=stopper)
    thread.start()
    max_epochs = 200  # far more than it will get to
    with run:
        for _ in run.epochs(max_epochs):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
    thread.join(DEADLINE)

    assert run.status == "stopped"
    assert run.global_step < max_epochs * STEPS_PER_EPOCH
    (stop,) = onthefly.open_session(run.session.dir).events(kind="command_applied")
    assert stop["payload"]["command"] == "stop"
    assert stop["step"] == run.global_step


def test_pause_holds_the_loop_at_a_step_until_resumed() -> None:
    run, model, opt = new_run(callbacks=[At(2, "pause")])
    paused, resuming = threading.Event(), threading.Event()
    seen_step: list[int] = []

    def on_event(event: Event) -> None:
        if event.kind == "status" and event.payload["status"] == "paused":
            paused.set()

    run.bus.subscribe(on_event)

    def resumer() -> None:
        assert paused.wait(DEADLINE)
        seen_step.append(run.global_step)
        resuming.set()
        run.request("resume")

    thread = threading.Thread(target=resumer)
    thread.start()
    returned_after_resume: list[bool] = []
    with run:
        for _ in run.epochs(1):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
                if run.global_step == 3:  # run.step(...) of step 3 returns only once resumed
                    returned_after_resume.append(resuming.is_set())
    thread.join(DEADLINE)
    assert seen_step == [3]
    assert returned_after_resume == [True]
    assert run.status == "finished"
    assert run.global_step == STEPS_PER_EPOCH


# ---- checkpoints, metrics, evaluation ---------------------------------------------------------
def test_save_checkpoint_is_registered_and_readable() -> None:
    run, model, opt = new_run()
    folders: list[Path] = []
    with run:
        for _ in run.epochs(1):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
                if run.global_step == 5:
                    folders.append(run.save_checkpoint())
                    saved = {k: v.clone() for k, v in model.state_dict().items()}

    row, final = onthefly.open_session(run.session.dir).checkpoints(run.run_id)
    assert final["reason"] == "final"  # the weights the run ended with
    assert Path(row["path"]) == folders[0]
    assert (row["step"], row["epoch"], row["batch_in_epoch"], row["reason"]) == (5, 0, 5, "manual")
    tensors, state = read_checkpoint(folders[0])
    assert all(torch.equal(tensors[k], saved[k]) for k in saved)
    assert state["progress"]["global_step"] == 5


def test_log_metric_is_stored() -> None:
    run, model, opt = new_run()
    with run:
        for _ in run.epochs(1):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
                run.log_metric("my_metric", run.global_step * 0.5)
        run.log_metric("final", 7, step=100)
    reader = onthefly.open_session(run.session.dir)
    rows = reader.metrics(run.run_id, "my_metric")
    assert [(r["step"], r["value"]) for r in rows] == [(s, s * 0.5) for s in range(1, STEPS_PER_EPOCH + 1)]
    assert [(r["step"], r["value"]) for r in reader.metrics(run.run_id, "final")] == [(100, 7.0)]
    assert {"my_metric", "final", "train_loss", "lr"} <= set(reader.metric_names(run.run_id))


def test_evaluate_val_with_loss_fn_and_val_loader() -> None:
    val_set = toy_data(96, seed=1)
    val = DataLoader(val_set, batch_size=40)
    run, model, opt = new_run(loss_fn=torch.nn.CrossEntropyLoss(), val_loader=val)
    with run:
        for _ in run.epochs(1):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
            result = run.evaluate("val")
        assert run.evaluate("test") is None  # no test_loader given

    with torch.no_grad():
        x, y = val_set.tensors
        logits = model(x)
        expected_loss = F.cross_entropy(logits, y).item()
        expected_accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    assert result is not None
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(expected_accuracy)
    assert result["samples"] == 96
    reader = onthefly.open_session(run.session.dir)
    assert [(r["step"], r["value"]) for r in reader.metrics(run.run_id, "val_loss")] == \
        [(STEPS_PER_EPOCH, pytest.approx(expected_loss, rel=1e-5))]
    (event,) = reader.events(kind="eval")
    assert (event["payload"]["split"], event["step"]) == ("val", STEPS_PER_EPOCH)


def test_test_command_in_a_custom_loop() -> None:
    test = DataLoader(toy_data(64, seed=2), batch_size=32)
    run, model, opt = new_run(loss_fn=torch.nn.CrossEntropyLoss(), test_loader=test,
                              callbacks=[At(2, "test")])
    with run:
        for _ in run.epochs(1):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
    (event,) = onthefly.open_session(run.session.dir).events(kind="eval")
    assert (event["payload"]["split"], event["step"], event["payload"]["samples"]) == ("test", 3, 64)


# ---- life cycle ----------------------------------------------------------------------------
def test_context_manager_marks_the_run_finished() -> None:
    run, model, opt = new_run()
    with run:
        for _ in run.epochs(1):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
    assert run.status == "finished"
    reader = onthefly.open_session(run.session.dir)
    assert reader.runs()[0]["status"] == "finished"
    assert reader.info()["status"] == "finished"
    assert [e["payload"]["status"] for e in reader.events(kind="status")] == ["running", "finished"]


def test_context_manager_marks_the_run_failed_with_the_error() -> None:
    run, model, opt = new_run()
    with pytest.raises(ValueError, match="bad batch"), run:
        for _ in run.epochs(1):
            for batch in run.batches(loader()):
                train_step(run, model, opt, batch)
                if run.global_step == 2:
                    raise ValueError("bad batch")
    assert run.status == "failed"
    reader = onthefly.open_session(run.session.dir)
    assert reader.runs()[0]["status"] == "failed"
    assert reader.info()["status"] == "failed"
    assert reader.info()["error"] == "ValueError: bad batch"
    (error,) = reader.events(kind="error")
    assert (error["step"], error["payload"]["message"]) == (2, "bad batch")
    assert onthefly.open_session(run.session.dir).samples(run.run_id).num_rows == 2 * 32
