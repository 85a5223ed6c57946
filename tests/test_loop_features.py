"""The loop features users expect from Lightning and Hugging Face, in ``Trainer``: custom
evaluation metrics, validation every N steps, ``amp="bf16"``, the richer hooks with the data they
need, early stopping, ``max_steps``, ``resume_from="last"`` and TensorBoard event files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.errors import ConfigError
from onthefly.store import open_session


def make_trainer(**options: Any) -> onthefly.Trainer:
    model = options.pop("model", None) or toy_model()
    return onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)),
        val_loader=DataLoader(toy_data(96, seed=1), batch_size=32), project="loop", progress=False, **options)


def macro_recall(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    pred = outputs.argmax(dim=1)
    return float(torch.stack([(pred[targets == c] == c).float().mean() for c in targets.unique()]).mean())


def test_custom_metrics_are_computed_over_the_whole_split_and_recorded() -> None:
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def shapes(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        seen.append((tuple(outputs.shape), tuple(targets.shape)))
        return 0.0

    trainer = make_trainer(metrics={"recall": macro_recall, "shapes": shapes})
    summary = trainer.fit(2)
    assert seen == [((96, 3), (96,))] * 2  # once per validation, on all 96 samples at once
    model = trainer.model.eval()
    x, y = toy_data(96, seed=1).tensors
    with torch.no_grad():
        expected = macro_recall(model(x), y)
    assert summary.val["recall"] == pytest.approx(expected)
    names = open_session(summary.session_dir).metric_names(summary.run_id)
    assert "val_recall" in names and "val_shapes" in names


def test_validation_every_n_steps_and_at_each_epoch_end() -> None:
    summary = make_trainer(val_every_steps=3).fit(2)  # 8 steps an epoch
    evals = open_session(summary.session_dir).events(summary.run_id, kind="eval")
    assert [e["step"] for e in evals] == [3, 6, 8, 9, 12, 15, 16]


def test_mid_epoch_validation_does_not_change_training() -> None:
    plain, checked = make_trainer(), make_trainer(val_every_steps=2)
    plain.fit(2)
    checked.fit(2)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(checked.model.state_dict()[key], value), key


def test_bf16_autocast_without_a_scaler_on_the_cpu() -> None:
    dtypes: list[torch.dtype] = []

    class Seen(onthefly.Callback):
        def on_train_batch_end(self, run: onthefly.Run, batch: Any, outputs: Any, loss: torch.Tensor) -> None:
            dtypes.append(outputs.dtype)

    trainer = make_trainer(amp="bf16", callbacks=[Seen()])
    assert trainer.scaler is None
    summary = trainer.fit(1)
    assert summary.status == "finished" and set(dtypes) == {torch.bfloat16}
    assert (trainer.run.config["amp"], trainer.run.config["amp_dtype"]) == ("bf16", "bfloat16")


@pytest.mark.parametrize(("amp", "match"), [("fp16", "needs a CUDA device"), ("fp8", "amp must be")])
def test_bad_amp_is_refused_when_the_trainer_is_made(amp: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_trainer(amp=amp)


@pytest.mark.parametrize(("options", "match"), [
    ({"val_every_steps": 0}, "val_every_steps must be"),
    ({"metrics": {"f 1": macro_recall}}, "metrics must map"),
    ({"metrics": {"f1": 3}}, "metrics must map"),
    ({"max_steps": 0}, "max_steps must be"),
])
def test_bad_loop_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_trainer(**options)


def test_the_hooks_get_the_data_they_need(tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []

    class Hooks(onthefly.Callback):
        def on_train_batch_end(self, run: onthefly.Run, batch: Any, outputs: Any, loss: torch.Tensor) -> None:
            calls.append(("batch", (len(batch[0]), tuple(outputs.shape), loss.ndim)))

        def on_before_optimizer_step(self, run: onthefly.Run, optimizer: torch.optim.Optimizer) -> None:
            grads = [p.grad for p in run.model.parameters()]
            calls.append(("before_step", all(g is not None for g in grads)))

        def on_validation_end(self, run: onthefly.Run, metrics: dict[str, float]) -> None:
            calls.append(("validation", sorted(metrics)))

        def on_save_checkpoint(self, run: onthefly.Run, folder: Path) -> None:
            calls.append(("saved", folder.name))

        def on_epoch_end(self, run: onthefly.Run) -> None:
            run.save_checkpoint(tmp_path / "ckpt")

    make_trainer(callbacks=[Hooks()], accumulate_grad_batches=2).fit(1)
    kinds = [kind for kind, _ in calls]
    assert kinds.count("batch") == 8 and kinds.count("before_step") == 4  # one per accumulation window
    assert calls[0] == ("batch", (32, (32, 3), 0))
    assert all(value for kind, value in calls if kind == "before_step")
    assert ("validation", ["accuracy", "loss", "samples"]) in calls
    assert calls[-1] == ("saved", "ckpt")

    loaded: list[Path] = []

    class Loaded(Hooks):
        def on_load_checkpoint(self, run: onthefly.Run, folder: Path) -> None:
            loaded.append(folder)

    make_trainer(callbacks=[Loaded()], resume_from=tmp_path / "ckpt")
    assert loaded == [tmp_path / "ckpt"]


def test_on_exception_sees_the_error_before_the_run_is_marked_failed() -> None:
    seen: list[str] = []

    class Boom(onthefly.Callback):
        def on_step_end(self, run: onthefly.Run) -> None:
            if run.global_step == 2:
                raise RuntimeError("boom")

        def on_exception(self, run: onthefly.Run, error: BaseException) -> None:
            seen.append(f"{type(error).__name__}: {error}")

    trainer = make_trainer(callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(1)
    assert seen == ["RuntimeError: boom"]
    assert trainer.run.status == "failed"


class Worsening(onthefly.Callback):
    """Makes validation look worse every epoch after the first: the learning rate jumps."""

    def on_epoch_end(self, run: onthefly.Run) -> None:
        for group in run.optimizer.param_groups:
            group["lr"] = 5.0


def test_early_stopping_stops_when_the_monitored_metric_stops_improving() -> None:
    stopper = onthefly.EarlyStopping("val_loss", patience=1)
    trainer = make_trainer(callbacks=[Worsening(), stopper])
    summary = trainer.fit(10)
    assert summary.status == "stopped" and summary.epochs < 10
    events = open_session(summary.session_dir).events(summary.run_id, kind="early_stopping")
    assert len(events) == 1 and events[0]["payload"]["monitor"] == "val_loss"
    assert events[0]["payload"]["last"] > events[0]["payload"]["best"]
    assert stopper.state_dict()["stopped"] is True


def test_early_stopping_refuses_a_metric_validation_does_not_give() -> None:
    with pytest.raises(ValueError, match="monitor must name"):
        onthefly.EarlyStopping("loss")
    trainer = make_trainer(callbacks=[onthefly.EarlyStopping("val_f1")])
    with pytest.raises(ValueError, match="'val_f1' but validation gave"):
        trainer.fit(1)


def test_model_checkpoint_keeps_the_last_and_the_best_and_prunes_the_rest() -> None:
    keeper = onthefly.ModelCheckpoint(every_epochs=1, keep_last=1, keep_best=1, monitor="val_loss")
    trainer = make_trainer(callbacks=[Worsening(), keeper])  # validation loss best after epoch 0
    summary = trainer.fit(4)
    reader = open_session(summary.session_dir)
    periodic = [c for c in reader.checkpoints(summary.run_id) if c["reason"] == "periodic"]
    assert [c["step"] for c in periodic] == [8, 32]  # the best (epoch 0) and the newest
    assert [c["step"] for c in keeper.saved] == [8, 32]
    for step in (16, 24):  # pruned: neither their files nor their rows remain
        assert not list((summary.session_dir / "checkpoints" / f"run-{summary.run_id}").glob(f"*-step-{step:09d}"))
    scores = [c["score"] for c in keeper.saved]
    assert scores[0] == min(c["score"] for c in keeper.saved)


def test_model_checkpoint_never_prunes_what_the_session_refers_to() -> None:
    class TestAt(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            if run.epoch == 1:
                run.evaluate("val")
                run.request("test")  # the test at this step names the periodic checkpoint it reuses

    keeper = onthefly.ModelCheckpoint(every_steps=4, keep_last=1)
    model = toy_model()
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32), test_loader=DataLoader(toy_data(64, seed=2), batch_size=32),
        project="loop", progress=False, callbacks=[keeper, TestAt()])
    summary = trainer.fit(3)
    reader = open_session(summary.session_dir)
    tested = [e["payload"]["checkpoint_id"] for e in reader.events(summary.run_id, kind="eval")
              if e["payload"]["split"] == "test"]
    assert [reader.checkpoint(c)["reason"] for c in tested] == ["periodic"]  # reused, and still there
    periodic = [c["step"] for c in reader.checkpoints(summary.run_id) if c["reason"] == "periodic"]
    assert periodic[-1] == 24 and len(periodic) < 6


@pytest.mark.parametrize(("options", "match"), [
    ({"every_epochs": None}, "give every_epochs or every_steps"),
    ({"keep_last": 0}, "keep_last must be"),
    ({"monitor": "loss"}, "monitor must name"),
])
def test_bad_model_checkpoint_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        onthefly.ModelCheckpoint(**options)


def weights(trainer: onthefly.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_max_steps_ends_training_inside_an_epoch_and_a_resume_goes_on_exactly() -> None:
    keeper = onthefly.ModelCheckpoint(every_epochs=None, every_steps=5)
    short = make_trainer(max_steps=5, callbacks=[keeper])  # 8 steps an epoch
    summary = short.fit(3)
    assert short.run.global_step == 5 and short.run.epoch == 0
    reader = open_session(summary.session_dir)
    assert reader.samples(summary.run_id).num_rows == 5 * 32
    assert [e["step"] for e in reader.events(summary.run_id, kind="eval")] == [5]  # validated where it ended
    assert next(r for r in reader.runs() if r["id"] == summary.run_id)["status"] == "finished"
    checkpoint = reader.checkpoints(summary.run_id)[-1]
    assert checkpoint["step"] == 5

    longer = make_trainer(max_steps=13, resume_from=Path(checkpoint["path"]),
                          callbacks=[onthefly.ModelCheckpoint(every_epochs=None, every_steps=5)])
    longer.fit(3)
    straight = make_trainer(max_steps=13)
    straight.fit(3)
    assert longer.run.global_step == straight.run.global_step == 13
    for key, value in weights(straight).items():
        assert torch.equal(weights(longer)[key], value), key


def test_max_steps_at_an_epochs_last_step_ends_that_epoch_first() -> None:
    summary = make_trainer(max_steps=16, val_every_steps=100).fit(5)
    reader = open_session(summary.session_dir)
    assert [e["epoch"] for e in reader.events(summary.run_id, kind="epoch_summary")] == [0, 1]
    assert [e["step"] for e in reader.events(summary.run_id, kind="eval")] == [8, 16]


def test_resume_from_last_takes_the_newest_checkpoint_of_the_project() -> None:
    first = make_trainer(run_name="r", callbacks=[onthefly.ModelCheckpoint(every_epochs=1)])
    first.fit(2)
    again = make_trainer(run_name="r", resume_from="last", callbacks=[onthefly.ModelCheckpoint(every_epochs=1)])
    assert again.run.session.dir == first.run.session.dir  # the session goes on
    again.fit(3)
    straight = make_trainer(run_name="r")
    straight.fit(3)
    for key, value in weights(straight).items():
        assert torch.equal(weights(again)[key], value), key


def test_resume_from_last_with_nothing_to_resume_starts_fresh_and_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    model = toy_model()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(toy_data(), batch_size=32),
                               project="nothing-saved-yet", progress=False, resume_from="last")
    assert trainer.run.global_step == 0
    assert "no checkpoint of project 'nothing-saved-yet'" in capsys.readouterr().err
    trainer.run.close()


def test_tensorboard_event_files_hold_the_runs_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = make_trainer(tensorboard_dir=tmp_path / "tb", run_name="with board").fit(2)
    folder = tmp_path / "tb" / "with_board"
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val/loss"} <= tags, tags
    reader = open_session(summary.session_dir)
    recorded = {(m["step"], m["value"]) for m in reader.metrics(summary.run_id, "train_loss")}
    written = {(e.step, e.value) for e in events.Scalars("train_loss")}
    assert {step for step, _ in written} == {step for step, _ in recorded}
    for step, value in written:
        assert value == pytest.approx(dict(recorded)[step], rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [8, 16]
