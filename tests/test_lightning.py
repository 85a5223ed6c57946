"""The Lightning callback with the real ``lightning`` package on the CPU: a tiny LightningModule
(one nn.Linear) on a TensorDataset, trained by ``lightning.Trainer`` with ``OnTheFlyCallback``.
Per-sample rows carry the dataset index of every sample (shuffled, with workers), control
commands take effect at batch boundaries, metrics are recorded, and the run's life cycle follows
the fit."""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import onthefly
from onthefly.engine.events import Event
from onthefly.errors import ConfigError, LossError
from onthefly.store import read_checkpoint

pytest.importorskip("lightning")  # a dev dependency; the package never needs it
import lightning as L  # after the skip: imported only where it is installed

from onthefly.integrations.lightning import OnTheFlyCallback

pytestmark = [  # Lightning's advice on a tiny test set-up, and a deprecation inside Lightning
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

DEADLINE = 60.0
SAMPLES, BATCH = 128, 16
STEPS_PER_EPOCH = SAMPLES // BATCH


def dataset(n: int = SAMPLES, seed: int = 0) -> TensorDataset:
    """Feature 0 of sample i is i: a batch says which samples it holds, whatever the order."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return TensorDataset(x, (x[:, 1:4].argmax(dim=1)).long())


def loader(n: int = SAMPLES, **options: Any) -> DataLoader:
    return DataLoader(dataset(n), batch_size=BATCH, shuffle=True, **options)


class Tiny(L.LightningModule):
    """``returns``: "per_sample" (the one-line change), "plain" (a scalar loss) or "bad" (a
    scalar where per-sample losses belong). Remembers what each step saw."""

    def __init__(self, returns: str = "per_sample", lr: float = 0.1, scheduler: bool = False,
                 fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 3)
        self.returns, self.lr, self.scheduler, self.fail_at = returns, lr, scheduler, fail_at
        self.seen: list[tuple[int, list[int], list[float]]] = []  # (epoch, sample ids, losses)
        self.lrs: list[float] = []  # the lr each step trained with
        self.weight_decays: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.fail_at is not None and len(self.seen) + 1 == self.fail_at:
            raise ValueError("bad batch")
        x, y = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        optimizer = self.trainer.optimizers[0]
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.weight_decays.append(optimizer.param_groups[0]["weight_decay"])
        self.seen.append((self.current_epoch, x[:, 0].long().tolist(), losses.tolist()))
        if self.returns == "plain":
            return losses.mean()
        if self.returns == "bad":
            return {"loss": losses.mean(), "per_sample_loss": losses.mean()}
        return {"loss": losses.mean(), "per_sample_loss": losses, "logits": logits}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_train_epoch_end(self) -> None:
        self.log("epoch_marker", float(self.current_epoch))  # logged after the callback's own hook

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return optimizer
        constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # recomputes lr each step
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": constant, "interval": "step"}}


class At(L.Callback):
    """Asks the run for a command once ``step`` optimizer steps are done (placed before the
    On The Fly callback, so it takes effect at that same batch boundary)."""

    def __init__(self, otf: OnTheFlyCallback, step: int, kind: str, **args: Any) -> None:
        self.otf, self.step, self.kind, self.args = otf, step, kind, args

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.otf.run is not None:
            self.otf.run.request(self.kind, **self.args)


def otf(**options: Any) -> OnTheFlyCallback:
    return OnTheFlyCallback(project="lit", run_name="tiny", dashboard=options.pop("dashboard", False), **options)


def fit(module: Tiny, callback: OnTheFlyCallback, *, before: Callable[[OnTheFlyCallback], list[Any]] | None = None,
        max_epochs: int = 2, train: DataLoader | None = None, val: DataLoader | None = None,
        **trainer_options: Any) -> Any:
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[*(before(callback) if before else []), callback], **trainer_options)
    trainer.fit(module, train if train is not None else loader(), val)
    return trainer


def session(callback: OnTheFlyCallback) -> Any:
    assert callback.run is not None
    return onthefly.open_session(callback.run.session.dir)


def statuses(callback: OnTheFlyCallback) -> list[str]:
    return [e["payload"]["status"] for e in session(callback).events(kind="status")]


# ---- per-sample rows -------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [{}, {"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}])
def test_per_sample_rows_carry_each_samples_dataset_index(workers: dict[str, Any]) -> None:
    module, callback = Tiny(), otf()
    fit(module, callback, train=loader(**workers))

    assert callback.run is not None and callback.run.status == "finished"
    assert callback.run.global_step == 2 * STEPS_PER_EPOCH
    expected: dict[tuple[int, int], tuple[int, float]] = {}  # (epoch, index) -> (step, loss)
    for step, (epoch, ids, losses) in enumerate(module.seen, start=1):
        expected.update({(epoch, i): (step, loss) for i, loss in zip(ids, losses, strict=True)})
    rows = session(callback).samples(callback.run.run_id).to_pylist()
    assert len(rows) == 2 * SAMPLES  # every sample once per epoch
    recorded = {(r["epoch"], r["index"]): (r["step"], r["loss"]) for r in rows}
    assert recorded.keys() == expected.keys()
    for key, (step, loss) in expected.items():
        assert recorded[key] == (step, pytest.approx(loss, rel=1e-6)), key
    assert module.seen[0][1] != list(range(BATCH))  # shuffled: the check above means something
    labels = dataset().tensors[1].tolist()
    assert all(r["label"] == labels[r["index"]] and r["margin"] == r["margin"] for r in rows)  # logits gave margins


def test_an_iterable_dataset_is_numbered_by_position() -> None:
    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            return iter(zip(*dataset().tensors, strict=True))

    callback = otf()
    fit(Tiny(), callback, train=DataLoader(Stream(), batch_size=BATCH), max_epochs=1)
    assert callback.run is not None
    rows = session(callback).samples(callback.run.run_id)
    assert rows.column("index").to_pylist() == list(range(SAMPLES))
    assert session(callback).runs()[0]["config"]["sample_ids"] == "position"


def test_per_sample_losses_from_combined_train_loaders_are_not_recorded_and_it_says_why() -> None:
    class TwoLoaders(Tiny):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return super().training_step(batch["a"], batch_idx)  # Lightning gives one batch of each

    callback = otf()
    fit(TwoLoaders(), callback, train={"a": loader(), "b": loader()}, max_epochs=1)  # type: ignore[arg-type]
    assert callback.run is not None and callback.run.status == "finished"
    reader = session(callback)
    assert reader.samples(callback.run.run_id).num_rows == 0
    (event,) = reader.events(kind="samples_untracked")
    assert "combines 2 train loaders" in event["payload"]["reason"]
    assert len(reader.metrics(callback.run.run_id, "train_loss")) == STEPS_PER_EPOCH  # the curve still is


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_plain_loss_records_the_loss_curve_and_no_rows(accumulate: int) -> None:
    module, callback = Tiny(returns="plain"), otf()
    fit(module, callback, accumulate_grad_batches=accumulate)

    assert callback.run is not None and callback.run.status == "finished"
    steps = 2 * STEPS_PER_EPOCH // accumulate
    assert callback.run.global_step == steps
    reader = session(callback)
    assert reader.samples(callback.run.run_id).num_rows == 0
    batch_means = [sum(losses) / len(losses) for _, _, losses in module.seen]
    step_means = [sum(batch_means[i:i + accumulate]) / accumulate for i in range(0, len(batch_means), accumulate)]
    curve = reader.metrics(callback.run.run_id, "train_loss")
    assert [r["step"] for r in curve] == list(range(1, steps + 1))
    assert [r["value"] for r in curve] == pytest.approx(step_means, rel=1e-5)  # as trained, not divided


def test_a_scalar_where_per_sample_losses_belong_fails_at_the_first_step() -> None:
    callback = otf()
    with pytest.raises(LossError, match="one loss per sample"):
        fit(Tiny(returns="bad"), callback)
    assert callback.run is not None and callback.run.status == "failed"


# ---- control -----------------------------------------------------------------------------------
def test_pause_from_another_thread_waits_at_a_batch_boundary_until_resumed() -> None:
    module, callback = Tiny(), otf()
    third_step, requested, paused, resuming = (threading.Event() for _ in range(4))
    started: list[tuple[int, bool]] = []  # (steps done, resumed yet) as each batch begins
    held: list[int] = []

    class Signal(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            assert callback.run is not None
            callback.run.bus.subscribe(lambda e: paused.set()
                                       if e.kind == "status" and e.payload["status"] == "paused" else None)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
            started.append((trainer.global_step, resuming.is_set()))

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            if trainer.global_step == 3:  # the thread's request is queued before this boundary
                third_step.set()
                assert requested.wait(DEADLINE)

    def controller() -> None:
        assert third_step.wait(DEADLINE)
        assert callback.run is not None
        callback.run.request("pause")
        requested.set()
        assert paused.wait(DEADLINE)
        held.append(len(module.seen))  # the training thread is held inside the boundary
        resuming.set()
        callback.run.request("resume")

    thread = threading.Thread(target=controller)
    thread.start()
    fit(module, callback, before=lambda _: [Signal()], max_epochs=1)
    thread.join(DEADLINE)

    assert callback.run is not None and callback.run.status == "finished"
    (pause,) = [e for e in session(callback).events(kind="command_applied") if e["payload"]["command"] == "pause"]
    assert pause["step"] == 3 and held == [3]
    assert started == [(step, step >= 3) for step in range(STEPS_PER_EPOCH)]  # went on once resumed
    assert statuses(callback) == ["running", "paused", "running", "finished"]


def test_pause_from_a_callback_holds_the_step_it_was_asked_at() -> None:
    module, callback = Tiny(), otf()
    held: list[int] = []

    def resumer(event: Event) -> None:
        if event.kind == "status" and event.payload["status"] == "paused":
            held.append(len(module.seen))
            threading.Thread(target=lambda: callback.run.request("resume")).start()  # type: ignore[union-attr]

    class Subscribe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            assert callback.run is not None
            callback.run.bus.subscribe(resumer)

    fit(module, callback, before=lambda cb: [Subscribe(), At(cb, 2, "pause")], max_epochs=1)
    assert held == [2]
    assert statuses(callback) == ["running", "paused", "running", "finished"]
    assert len(module.seen) == STEPS_PER_EPOCH


def test_stop_ends_training_early() -> None:
    module, callback = Tiny(), otf()
    trainer = fit(module, callback, before=lambda cb: [At(cb, 3, "stop")], max_epochs=5)

    assert trainer.should_stop
    assert len(module.seen) == 3 and trainer.global_step == 3  # no batch after the one it took effect at
    assert callback.run is not None and callback.run.status == "stopped"
    (stop,) = session(callback).events(kind="command_applied")
    assert (stop["payload"]["command"], stop["step"]) == ("stop", 3)
    assert session(callback).info()["status"] == "stopped"


@pytest.mark.parametrize("scheduler", [False, True])
def test_set_lr_changes_the_optimizers_lr_from_the_next_step(scheduler: bool) -> None:
    module, callback = Tiny(scheduler=scheduler), otf()
    fit(module, callback, before=lambda cb: [At(cb, 2, "set_lr", lr=0.01)], max_epochs=1)

    assert module.lrs[:2] == [0.1, 0.1]
    assert module.lrs[2:] == pytest.approx([0.01] * (STEPS_PER_EPOCH - 2))  # a scheduler keeps the change
    assert callback.run is not None
    recorded = [r["value"] for r in session(callback).metrics(callback.run.run_id, "lr")]
    assert recorded == pytest.approx(module.lrs)  # the rate each step trained with


def test_set_weight_decay_changes_the_optimizer_from_the_next_step() -> None:
    module, callback = Tiny(), otf()
    fit(module, callback, before=lambda cb: [At(cb, 2, "set_weight_decay", weight_decay=0.5)], max_epochs=1)
    assert module.weight_decays == [0.0, 0.0] + [0.5] * (STEPS_PER_EPOCH - 2)


def test_train_more_raises_lightnings_max_epochs() -> None:
    module, callback = Tiny(), otf()
    trainer = fit(module, callback, before=lambda cb: [At(cb, 2, "train_more", epochs=1)], max_epochs=1)
    assert trainer.current_epoch == 2 and len(module.seen) == 2 * STEPS_PER_EPOCH
    assert callback.run is not None and callback.run.status == "finished"


def test_after_the_planned_epochs_a_kept_alive_run_idles_until_told_to_train_more_or_stop() -> None:
    module, callback = Tiny(), otf(keep_alive=True)
    idles = threading.Semaphore(0)

    class Subscribe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            assert callback.run is not None
            callback.run.bus.subscribe(lambda e: idles.release()
                                       if e.kind == "status" and e.payload["status"] == "idle" else None)

    def commander() -> None:
        assert idles.acquire(timeout=DEADLINE)  # held at the end of the planned epoch
        assert len(module.seen) == STEPS_PER_EPOCH and callback.run is not None
        callback.run.request("train_more", epochs=1)
        assert idles.acquire(timeout=DEADLINE)
        callback.run.request("stop")

    thread = threading.Thread(target=commander)
    thread.start()
    trainer = fit(module, callback, before=lambda _: [Subscribe()], max_epochs=1)
    thread.join(DEADLINE)

    assert trainer.current_epoch == 2 and len(module.seen) == 2 * STEPS_PER_EPOCH
    assert statuses(callback) == ["running", "idle", "running", "idle", "stopped"]


def test_the_test_command_evaluates_the_test_loader() -> None:
    test = DataLoader(dataset(48, seed=3), batch_size=32)
    callback = otf(loss_fn=nn.CrossEntropyLoss(), test_loader=test)
    fit(Tiny(), callback, before=lambda cb: [At(cb, 2, "test")], max_epochs=1)

    assert callback.run is not None
    reader = session(callback)
    (event,) = reader.events(kind="eval")
    assert (event["payload"]["split"], event["step"], event["payload"]["samples"]) == ("test", 2, 48)
    assert [r["step"] for r in reader.metrics(callback.run.run_id, "test_loss")] == [2]


def test_the_test_command_without_a_test_loader_is_refused() -> None:
    callback = otf()
    fit(Tiny(), callback, before=lambda cb: [At(cb, 2, "test")], max_epochs=1)
    (rejected,) = session(callback).events(kind="command_rejected")
    assert rejected["payload"]["reason"] == "no test_loader was given"
    assert callback.run is not None and callback.run.status == "finished"  # training went on


# ---- metrics ---------------------------------------------------------------------------------
def test_callback_metrics_are_recorded_at_validation_and_epoch_ends() -> None:
    class Logs(Tiny):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            self.log("train_loss", out["loss"], on_step=False, on_epoch=True)  # a name the engine uses too
            return out

    callback = otf()
    fit(Logs(), callback, val=DataLoader(dataset(32, seed=1), batch_size=16))

    assert callback.run is not None
    reader, run_id = session(callback), callback.run.run_id
    ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    val = reader.metrics(run_id, "val_loss")
    assert [(r["step"], r["epoch"]) for r in val] == [(ends[0], 0), (ends[1], 1)]
    evals = reader.events(kind="eval")
    assert [(e["payload"]["split"], e["step"]) for e in evals] == [("val", ends[0]), ("val", ends[1])]
    assert [e["payload"]["loss"] for e in evals] == pytest.approx([r["value"] for r in val])
    # Logged by the LightningModule's on_train_epoch_end, after the callback's: at its own epoch.
    assert [(r["step"], r["epoch"], r["value"]) for r in reader.metrics(run_id, "epoch_marker")] == \
        [(ends[0], 0, 0.0), (ends[1], 1, 1.0)]
    # Lightning's epoch mean of the batch losses, beside the engine's per-step curve.
    assert [r["step"] for r in reader.metrics(run_id, "lightning/train_loss")] == ends
    assert len(reader.metrics(run_id, "train_loss")) == 2 * STEPS_PER_EPOCH


# ---- life cycle ------------------------------------------------------------------------------
def test_the_final_checkpoint_holds_the_trained_weights() -> None:
    module, callback = Tiny(), otf()
    fit(module, callback, max_epochs=1)
    assert callback.run is not None
    (final,) = session(callback).checkpoints(callback.run.run_id)
    assert (final["reason"], final["step"]) == ("final", STEPS_PER_EPOCH)
    tensors, _ = read_checkpoint(Path(final["path"]))
    assert all(torch.equal(tensors[k], v) for k, v in module.state_dict().items())


def test_an_exception_marks_the_run_failed_and_restores_the_trainer() -> None:
    callback = otf()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
    with pytest.raises(ValueError, match="bad batch"):
        trainer.fit(Tiny(fail_at=3), loader())
    assert callback.run is not None and callback.run.status == "failed"
    reader = session(callback)
    assert reader.info()["error"] == "ValueError: bad batch"
    (error,) = reader.events(kind="error")
    assert (error["step"], error["payload"]["message"]) == (2, "bad batch")
    assert "process_dataloader" not in vars(trainer.strategy)  # Lightning's own method again


@pytest.mark.parametrize("dashboard", [False, True])
def test_the_dashboard_is_optional_and_stops_with_the_fit(
        dashboard: bool, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ONTHEFLY_HANDSHAKE", "json")
    callback = otf(dashboard=dashboard)
    fit(Tiny(), callback, max_epochs=1)
    handshakes = [json.loads(line)["onthefly"] for line in capfd.readouterr().out.splitlines()
                  if line.startswith('{"onthefly"')]
    assert len(handshakes) == int(dashboard)
    assert callback.run is not None and callback.run.status == "finished"
    for handshake in handshakes:  # it served this process's run, and is gone once the run is closed
        assert handshake["pid"] == os.getpid()
        url = urllib.parse.urlsplit(handshake["url"])
        with pytest.raises(OSError):
            socket.create_connection((url.hostname, url.port), timeout=5).close()


@pytest.mark.parametrize(("options", "message"), [
    ({"project": ""}, "project must be a non-empty string"),
    ({"run_name": None}, "run_name must be a non-empty string"),
    ({"test_loader": DataLoader(dataset(8))}, "test_loader needs loss_fn"),
    ({"loss_fn": nn.CrossEntropyLoss(), "test_loader": [1, 2]}, "test_loader must be a torch.utils.data.DataLoader"),
])
def test_bad_arguments_are_refused_when_the_callback_is_made(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OnTheFlyCallback(**{"project": "lit", "run_name": "tiny", **options})
