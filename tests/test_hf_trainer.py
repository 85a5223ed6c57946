"""The Hugging Face Trainer callback with the real ``transformers.Trainer`` on the CPU: a tiny
BERT built from a config (nothing downloaded) on a tokenizer-style dict dataset, trained with
``OnTheFlyCallback`` and ``per_sample_loss``. Per-sample rows carry the dataset index of every
sample (shuffled, with gradient accumulation, with workers, after a resume), commands take effect
at optimizer-step boundaries, the Trainer's logs are recorded, and the run's life cycle follows
``train()``."""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

import onthefly
from onthefly.engine.events import Event
from onthefly.errors import ConfigError, LossError

transformers = pytest.importorskip("transformers")  # a dev dependency; the package never needs it
from onthefly.integrations.transformers import OnTheFlyCallback, per_sample_loss  # noqa: E402

DEADLINE = 60.0
VOCAB, LENGTH, CLASSES = 50, 8, 3
SAMPLES, BATCH = 96, 16
STEPS_PER_EPOCH = SAMPLES // BATCH


def tiny_bert(seed: int = 0, head: str = "sequence") -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH, num_labels=CLASSES)
    if head == "token":
        return transformers.BertForTokenClassification(config)
    return transformers.BertForSequenceClassification(config)


class Tokenized(Dataset):
    """What a tokenizer gives, per sample: ids, a mask (some padding), a label that depends on the
    tokens (``token_labels``: one per token, -100 on padding). ``fetched`` lists the indices
    loaded in this process, in order: the order the sampler drew them."""

    def __init__(self, n: int = SAMPLES, seed: int = 0, token_labels: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
        self.mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = self.ids[:, 0] % CLASSES
        self.token_labels = torch.where(self.mask.bool(), self.ids % CLASSES, -100) if token_labels else None
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched.append(int(i))
        labels = self.token_labels[i] if self.token_labels is not None else self.labels[i]
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def arguments(tmp_path: Path, **options: Any) -> Any:
    defaults: dict[str, Any] = dict(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True, save_strategy="no",
                                    disable_tqdm=True, per_device_train_batch_size=BATCH, learning_rate=1e-3,
                                    num_train_epochs=1, logging_steps=1)
    return transformers.TrainingArguments(**{**defaults, **options})


def trainer(tmp_path: Path, callback: OnTheFlyCallback | None, *, dataset: Dataset | None = None,
            per_sample: bool = True, extra: Sequence[Any] = (), model: nn.Module | None = None,
            eval_dataset: Dataset | None = None, compute_metrics: Any = None, **options: Any) -> Any:
    return transformers.Trainer(
        model=model if model is not None else tiny_bert(), args=arguments(tmp_path, **options),
        train_dataset=dataset if dataset is not None else Tokenized(), eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        callbacks=[*([callback] if callback is not None else []), *extra],
        compute_loss_func=per_sample_loss(callback) if per_sample and callback is not None else None)


def new_callback(**options: Any) -> OnTheFlyCallback:
    return OnTheFlyCallback(project="hf", run_name="trainer", dashboard=False, **options)


def rows_of(run: onthefly.Run) -> dict[str, np.ndarray]:
    table = onthefly.open_session(run.session.dir).samples(run.run_id)
    return {name: table.column(name).to_numpy() for name in ("epoch", "step", "index", "loss", "label", "margin")}


def events_of(run: onthefly.Run, kind: str) -> list[dict[str, Any]]:
    return onthefly.open_session(run.session.dir).events(run.run_id, kind=kind)


def metric(run: onthefly.Run, name: str) -> dict[int, float]:
    return {row["step"]: row["value"] for row in onthefly.open_session(run.session.dir).metrics(run.run_id, name)}


def status_of(run: onthefly.Run) -> str:
    record = next(r for r in onthefly.open_session(run.session.dir).runs() if r["id"] == run.run_id)
    return str(record["status"])


class At(transformers.TrainerCallback):
    """Queue a command to the run right after the Trainer's step ``step``; ``seen_lrs`` and
    ``seen_decays`` are the rates every optimizer step used (read before the scheduler moves them)."""

    def __init__(self, callback: OnTheFlyCallback, step: int | None = None, kind: str = "", **args: Any) -> None:
        self.callback, self.step, self.kind, self.args = callback, step, kind, args
        self.seen_lrs: list[float] = []
        self.seen_decays: list[tuple[float, ...]] = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.seen_lrs.append(optimizer.param_groups[0]["lr"])
        self.seen_decays.append(tuple(group["weight_decay"] for group in optimizer.param_groups))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            assert self.callback.run is not None
            self.callback.run.request(self.kind, **self.args)


class Watcher(transformers.TrainerCallback):
    """Subscribes to the run's bus when training begins (after the OnTheFlyCallback made the run);
    ``wait`` blocks until a matching event arrives, with a deadline."""

    def __init__(self, callback: OnTheFlyCallback) -> None:
        self.callback = callback
        self.events: list[Event] = []
        self.hf_steps: list[int] = []  # the Trainer's global_step at every step end
        self._cond = threading.Condition()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.callback.run is not None
        self.callback.run.bus.subscribe(self._on_event)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.hf_steps.append(state.global_step)

    def _on_event(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait(self, kind: str, **payload: Any) -> Event:
        def found() -> Event | None:
            return next((e for e in self.events if e.kind == kind
                         and all(e.payload.get(k) == v for k, v in payload.items())), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, DEADLINE):
                raise AssertionError(f"no {kind} event with {payload}; events: {[e.kind for e in self.events]}")
            event = found()
            assert event is not None
            return event


# ---- per-sample identity ------------------------------------------------------------------------
def test_rows_carry_each_samples_index_once_per_epoch_in_the_order_drawn(tmp_path: Path) -> None:
    data, callback = Tokenized(), new_callback()
    # Evaluated each epoch through the same compute_loss_func: its batches are no training rows.
    output = trainer(tmp_path, callback, dataset=data, num_train_epochs=2, eval_strategy="epoch",
                     eval_dataset=Tokenized(32, seed=5)).train()
    run = callback.run
    assert run is not None and output.global_step == run.global_step == 2 * STEPS_PER_EPOCH
    rows = rows_of(run)
    drawn = np.array(data.fetched).reshape(-1, BATCH)  # loaded in this process, batch after batch
    assert len(rows["index"]) == 2 * SAMPLES
    for epoch in (0, 1):
        assert sorted(rows["index"][rows["epoch"] == epoch]) == list(range(SAMPLES))  # each sample once
    for step in range(1, 2 * STEPS_PER_EPOCH + 1):  # the batch trained at each step is the one drawn
        assert sorted(rows["index"][rows["step"] == step]) == sorted(drawn[step - 1])
    assert not np.array_equal(drawn[:STEPS_PER_EPOCH], drawn[STEPS_PER_EPOCH:])  # shuffled every epoch
    np.testing.assert_array_equal(rows["label"], data.labels[rows["index"]].numpy())  # the row's own label
    assert np.isfinite(rows["loss"]).all() and not (rows["margin"] == 0).all()  # logits reached the run
    assert status_of(run) == "finished" and run.config["sample_ids"] == "index"


def test_gradient_accumulation_records_every_micro_batch_at_its_optimizer_step(tmp_path: Path) -> None:
    callback = new_callback()
    output = trainer(tmp_path, callback, gradient_accumulation_steps=2).train()
    run = callback.run
    assert run is not None and output.global_step == run.global_step == STEPS_PER_EPOCH // 2
    rows = rows_of(run)
    assert sorted(rows["index"]) == list(range(SAMPLES))
    hf_loss = metric(run, "hf/loss")
    for step in range(1, STEPS_PER_EPOCH // 2 + 1):
        at = rows["step"] == step
        assert at.sum() == 2 * BATCH
        # The loss returned to the Trainer is the window's mean: its logged loss is the rows' mean.
        assert hf_loss[step] == pytest.approx(float(rows["loss"][at].mean()), rel=1e-5)


def test_workers_give_the_same_rows_as_the_main_process(tmp_path: Path) -> None:
    results = []
    for workers in (0, 2):
        callback = new_callback()
        trainer(tmp_path / str(workers), callback, dataloader_num_workers=workers).train()
        assert callback.run is not None
        rows = rows_of(callback.run)
        order = np.lexsort((rows["index"], rows["step"]))
        results.append((rows["step"][order], rows["index"][order], rows["loss"][order]))
    for plain, with_workers in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(plain, with_workers)


def test_a_resumed_trainer_pairs_the_batches_after_those_it_skips(tmp_path: Path) -> None:
    class StopAt3(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            control.should_training_stop = state.global_step == 3

    first = new_callback()
    options: dict[str, Any] = dict(max_steps=STEPS_PER_EPOCH, save_strategy="steps", save_steps=3)
    trainer(tmp_path, first, extra=[StopAt3()], **options).train()
    second = new_callback()
    trainer(tmp_path, second, **options).train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-3"))
    assert first.run is not None and second.run is not None
    before, after = rows_of(first.run)["index"], rows_of(second.run)["index"]
    assert len(before) == len(after) == SAMPLES // 2
    assert sorted([*before, *after]) == list(range(SAMPLES))  # the epoch's other half, none twice
    assert second.run.config["resumed_at_step"] == 3


def test_token_level_labels_give_one_loss_per_sample(tmp_path: Path) -> None:
    data, callback = Tokenized(token_labels=True), new_callback()
    trainer(tmp_path, callback, dataset=data, model=tiny_bert(head="token")).train()
    assert callback.run is not None
    rows = rows_of(callback.run)
    assert sorted(rows["index"]) == list(range(SAMPLES))
    assert np.isfinite(rows["loss"]).all() and (rows["loss"] > 0).all()
    assert np.isnan(rows["label"]).all()  # not a classification row: no label, prediction or margin


def test_an_iterable_dataset_numbers_its_samples_by_position(tmp_path: Path) -> None:
    class Stream(IterableDataset):
        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            data = Tokenized()
            return (data[i] for i in range(SAMPLES))

    callback = new_callback()
    trainer(tmp_path, callback, dataset=Stream(), max_steps=3).train()
    assert callback.run is not None and callback.run.config["sample_ids"] == "position"
    rows = rows_of(callback.run)
    np.testing.assert_array_equal(rows["index"], np.arange(3 * BATCH))
    np.testing.assert_array_equal(rows["step"], np.repeat([1, 2, 3], BATCH))


@pytest.mark.parametrize("shift", [False, True])
def test_per_sample_loss_returns_the_windows_mean_over_labelled_tokens(shift: bool) -> None:
    compute = per_sample_loss(new_callback(), shift_labels=shift)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, 3:] = -100
    kept_logits, kept_labels = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
    expected_sum = nn.functional.cross_entropy(kept_logits.reshape(-1, 7), kept_labels.reshape(-1), reduction="sum")
    with torch.no_grad():  # as in the Trainer's evaluation: computed, not recorded
        loss = compute({"logits": logits}, labels, num_items_in_batch=torch.tensor(20))
    assert float(loss) == pytest.approx(float(expected_sum) / 20)


def test_per_sample_loss_names_the_shapes_it_takes() -> None:
    compute = per_sample_loss(new_callback())
    with pytest.raises(LossError, match=r"logits \[batch, classes\] with labels \[batch\].*got logits \(4, 3\)"):
        compute({"logits": torch.zeros(4, 3)}, torch.zeros(4, 2, dtype=torch.long))


def test_per_sample_loss_without_the_callback_in_the_trainer_fails_at_the_first_step(tmp_path: Path) -> None:
    callback = new_callback()
    hf = transformers.Trainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=2), train_dataset=Tokenized(),
                              compute_loss_func=per_sample_loss(callback))
    with pytest.raises(ConfigError, match=r"not one of the Trainer's: Trainer\(\.\.\., callbacks=\[callback\]"):
        hf.train()


def test_without_per_sample_loss_the_trainers_logged_loss_is_the_curve(tmp_path: Path) -> None:
    callback = new_callback()
    trainer(tmp_path, callback, per_sample=False, max_steps=3).train()
    run = callback.run
    assert run is not None and run.global_step == 3
    assert len(rows_of(run)["index"]) == 0
    assert sorted(metric(run, "train_loss")) == [1, 2, 3] and sorted(metric(run, "lr")) == [1, 2, 3]
    [said] = events_of(run, "samples_untracked")
    assert "compute_loss_func=per_sample_loss(callback)" in said["payload"]["reason"]
    assert status_of(run) == "finished"


# ---- control ------------------------------------------------------------------------------------
def test_pause_waits_at_a_step_boundary_and_resume_continues(tmp_path: Path) -> None:
    callback = new_callback()
    watcher = Watcher(callback)
    hf = trainer(tmp_path, callback, extra=[watcher, At(callback, 2, "pause")])
    done: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: done.setdefault("output", hf.train()), daemon=True)
    thread.start()
    try:
        watcher.wait("status", status="paused")
        run = callback.run
        assert run is not None
        # Asked after step 2, applied at the next boundary (step 3's end); nothing trains meanwhile.
        assert run.global_step == 3 and hf.state.global_step == 3 and thread.is_alive()
        assert watcher.hf_steps == [1, 2]  # the Trainer's step 3 has not finished its step end
    finally:
        if callback.run is not None:
            callback.run.request("resume")
        thread.join(DEADLINE)
    assert not thread.is_alive() and done["output"].global_step == STEPS_PER_EPOCH
    run = callback.run
    assert run is not None
    statuses = [e["payload"]["status"] for e in events_of(run, "status")]
    assert statuses == ["running", "paused", "running", "finished"]
    [applied] = [e for e in events_of(run, "command_applied") if e["payload"]["command"] == "pause"]
    assert applied["step"] == 3
    assert len(rows_of(run)["index"]) == SAMPLES


def test_stop_ends_training_early(tmp_path: Path) -> None:
    callback = new_callback()
    output = trainer(tmp_path, callback, extra=[At(callback, 2, "stop")], num_train_epochs=2).train()
    run = callback.run
    assert run is not None
    assert output.global_step == run.global_step == 3  # applied at step 3's end; nothing after it
    assert status_of(run) == "stopped"
    assert set(rows_of(run)["step"]) == {1, 2, 3}


def test_train_more_is_refused_by_the_trainers_fixed_plan(tmp_path: Path) -> None:
    callback = new_callback()
    output = trainer(tmp_path, callback, extra=[At(callback, 1, "train_more", epochs=1)], max_steps=3).train()
    run = callback.run
    assert run is not None and output.global_step == 3
    [said] = events_of(run, "train_more_unsupported")
    assert said["step"] == 2 and "num_train_epochs / max_steps" in said["payload"]["reason"]
    assert status_of(run) == "finished"


def test_set_lr_rescales_the_trainers_schedule_and_weight_decay_reaches_its_group(tmp_path: Path) -> None:
    callback = new_callback()
    lrs = At(callback, 2, "set_lr", lr=5e-3)
    decay = At(callback, 2, "set_weight_decay", weight_decay=0.25, group=0)
    trainer(tmp_path, callback, extra=[lrs, decay], weight_decay=0.01).train()  # linear decay over 6 steps
    base, total = 1e-3, STEPS_PER_EPOCH
    planned = [base * (total - k) / total for k in range(total)]
    # Applied at step 3's end, after the scheduler moved to planned[3]: the rate is 5e-3 from step 4
    # on, and the rest of the schedule is the same line rescaled to pass through it.
    factor = 5e-3 / planned[3]
    np.testing.assert_allclose(lrs.seen_lrs, [*planned[:3], *(factor * p for p in planned[3:])], rtol=1e-9)
    assert lrs.seen_lrs[3] == pytest.approx(5e-3)
    # HF's group 0 holds the decayed parameters, group 1 biases and LayerNorm (no decay).
    assert lrs.seen_decays[2] == (0.01, 0.0) and lrs.seen_decays[3] == (0.25, 0.0)
    run = callback.run
    assert run is not None
    assert metric(run, "lr")[4] == pytest.approx(5e-3)  # the run's lr curve shows it too
    applied = [e["payload"]["command"] for e in events_of(run, "command_applied")]
    assert "set_lr" in applied and "set_weight_decay" in applied


# ---- metrics and the run's life cycle -------------------------------------------------------------
def test_the_trainers_logs_are_recorded_with_evaluation_as_val(tmp_path: Path) -> None:
    def accuracy(prediction: Any) -> dict[str, float]:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    callback = new_callback()
    trainer(tmp_path, callback, eval_strategy="steps", eval_steps=3, eval_dataset=Tokenized(32, seed=5),
            compute_metrics=accuracy).train()
    run = callback.run
    assert run is not None
    assert sorted(metric(run, "hf/loss")) == list(range(1, STEPS_PER_EPOCH + 1))
    assert metric(run, "hf/learning_rate")[1] == pytest.approx(1e-3)
    assert sorted(metric(run, "val_loss")) == [3, 6] and sorted(metric(run, "val_accuracy")) == [3, 6]
    assert 0 <= metric(run, "val_accuracy")[6] <= 1
    assert "hf/train_runtime" in onthefly.open_session(run.session.dir).metric_names(run.run_id)
    evals = events_of(run, "eval")
    assert [e["step"] for e in evals] == [3, 6] and evals[0]["payload"]["split"] == "val"
    assert sorted(metric(run, "train_loss")) == list(range(1, STEPS_PER_EPOCH + 1))  # the engine's own curve
    assert status_of(run) == "finished" and run.closed
    assert any(e["payload"]["reason"] == "final" for e in events_of(run, "checkpoint"))


def test_a_train_that_raises_marks_the_run_failed(tmp_path: Path) -> None:
    class Broken(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                raise ValueError("bad step")

    with pytest.raises(ValueError, match="bad step"), new_callback() as callback:
        trainer(tmp_path, callback, extra=[Broken()]).train()
    assert callback.run is not None and status_of(callback.run) == "failed"


def test_the_dashboard_serves_the_run_and_stops_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ONTHEFLY_HANDSHAKE", "json")
    callback = OnTheFlyCallback(project="hf", run_name="watched", dashboard=True)
    trainer(tmp_path, callback, max_steps=2).train()
    [handshake] = [json.loads(line)["onthefly"] for line in capfd.readouterr().out.splitlines()
                   if line.startswith('{"onthefly"')]
    assert handshake["pid"] == os.getpid()
    assert callback.run is not None and status_of(callback.run) == "finished"
    url = urllib.parse.urlsplit(handshake["url"])
    with pytest.raises(OSError):  # gone once the run is closed
        socket.create_connection((url.hostname, url.port), timeout=5).close()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: OnTheFlyCallback(project="", run_name="x"), "project must be a non-empty string"),
    (lambda: OnTheFlyCallback(project="hf", run_name=None), "run_name must be a non-empty string"),
    (lambda: per_sample_loss(object()), "per_sample_loss needs the OnTheFlyCallback given to the Trainer"),
])
def test_bad_arguments_are_refused_when_made(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()
