"""Commands through the engine's queue: each takes effect at a step boundary and is recorded with
the global step at which it took effect.

A command issued from a callback's ``on_step_end`` at step k is applied at the next boundary,
step k + 1: that is the deterministic way these tests place commands in a run.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly import Callback, FitSummary, Run, Trainer
from onthefly.engine.control import COMMAND_KINDS, COMMANDS, CommandQueue
from onthefly.engine.events import Event
from onthefly.errors import ConfigError

STEPS_PER_EPOCH = 8  # toy_data(): 256 samples in batches of 32
DEADLINE = 60.0  # seconds; only reached when something is broken


# ---- helpers ---------------------------------------------------------------------------------
def make_trainer(
    *, callbacks: tuple[Callback, ...] = (), with_test: bool = True,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None, **options: Any,
) -> Trainer:
    model = toy_model()
    opt = optimizer(model) if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(
        model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True),
        test_loader=DataLoader(toy_data(64, seed=1), batch_size=32) if with_test else None,
        project="control", run_name="r", callbacks=callbacks, progress=False, **options,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def uninterrupted_weights(epochs: int = 1) -> dict[str, torch.Tensor]:
    trainer = make_trainer()
    trainer.fit(epochs)
    return weights(trainer)


class At(Callback):
    """Queue a command from the training thread right after step ``step``."""

    def __init__(self, step: int, kind: str, **args: Any) -> None:
        self.step, self.kind, self.args = step, kind, args

    def on_step_end(self, run: Run) -> None:
        if run.global_step == self.step:
            run.request(self.kind, **self.args)


class Watcher:
    """Collects a run's bus events; ``wait`` blocks until a matching one arrives (with a deadline)."""

    def __init__(self, run: Run) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        run.bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def _matching(self, kind: str, payload: dict[str, Any]) -> list[Event]:
        return [e for e in self.events
                if e.kind == kind and all(e.payload.get(k) == v for k, v in payload.items())]

    def wait(self, kind: str, *, count: int = 1, **payload: Any) -> Event:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._matching(kind, payload)) >= count, DEADLINE):
                seen = [(e.kind, dict(e.payload)) for e in self.events if e.kind != "progress"]
                raise AssertionError(f"no {kind} event #{count} with {payload}; events: {seen}")
            return self._matching(kind, payload)[count - 1]


class FitThread(threading.Thread):
    def __init__(self, trainer: Trainer, epochs: int) -> None:
        super().__init__(name="fit", daemon=True)
        self.trainer, self.epochs = trainer, epochs
        self.summary: FitSummary | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.summary = self.trainer.fit(self.epochs)
        except BaseException as exc:
            self.error = exc

    def result(self) -> FitSummary:
        self.join(DEADLINE)
        assert not self.is_alive(), "fit() did not return"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


@pytest.fixture
def fit_in_thread() -> Iterator[Callable[[Trainer, int], FitThread]]:
    started: list[FitThread] = []

    def start(trainer: Trainer, epochs: int) -> FitThread:
        thread = FitThread(trainer, epochs)
        started.append(thread)
        thread.start()
        return thread

    yield start
    for thread in started:  # a failed test must not leave a run parked forever
        if thread.is_alive():
            thread.trainer.run.request("stop")
            thread.join(DEADLINE)


def session_events(summary: FitSummary, kind: str | None = None) -> list[dict[str, Any]]:
    return onthefly.open_session(summary.session_dir).events(summary.run_id, kind=kind)


def statuses(summary: FitSummary) -> list[str]:
    return [e["payload"]["status"] for e in session_events(summary, "status")]


def command_events(summary: FitSummary, command: str) -> list[dict[str, Any]]:
    return [e for e in session_events(summary)
            if e["kind"] in ("command_applied", "command_rejected") and e["payload"]["command"] == command]


def metric(summary: FitSummary, name: str) -> dict[int, float]:
    rows = onthefly.open_session(summary.session_dir).metrics(summary.run_id, name)
    return {row["step"]: row["value"] for row in rows}


# ---- pause, resume, stop -----------------------------------------------------------------------
def test_pause_and_resume_from_another_thread(fit_in_thread: Callable[[Trainer, int], FitThread]) -> None:
    trainer = make_trainer(callbacks=(At(3, "pause"),))
    run = trainer.run
    watcher = Watcher(run)
    fit = fit_in_thread(trainer, 2)

    paused = watcher.wait("status", status="paused")
    assert paused.step == 4
    # The training thread is parked at the boundary of step 4: a command sent now is applied
    # there, and the step has not moved once the command has gone through.
    run.request("set_weight_decay", weight_decay=0.001)
    applied = watcher.wait("command_applied", command="set_weight_decay")
    assert applied.step == 4
    assert run.global_step == 4
    assert run.status == "paused"
    assert fit.is_alive()

    run.request("resume")
    summary = fit.result()

    assert summary.status == "finished"
    assert summary.steps == 2 * STEPS_PER_EPOCH
    assert statuses(summary) == ["running", "paused", "running", "finished"]
    (pause,) = command_events(summary, "pause")
    (resume,) = command_events(summary, "resume")
    assert (pause["kind"], pause["step"]) == ("command_applied", 4)
    assert (resume["kind"], resume["step"]) == ("command_applied", 4)
    # No step was lost or repeated around the pause.
    assert sorted(metric(summary, "train_loss")) == list(range(1, summary.steps + 1))


def test_pause_and_resume_leave_the_weights_of_an_uninterrupted_run(
    fit_in_thread: Callable[[Trainer, int], FitThread],
) -> None:
    expected = uninterrupted_weights(2)
    trainer = make_trainer(callbacks=(At(5, "pause"),))
    watcher = Watcher(trainer.run)
    fit = fit_in_thread(trainer, 2)
    watcher.wait("status", status="paused")
    trainer.run.request("resume")
    fit.result()
    assert_same_weights(weights(trainer), expected)


def test_stop_while_paused_ends_training(fit_in_thread: Callable[[Trainer, int], FitThread]) -> None:
    trainer = make_trainer(callbacks=(At(2, "pause"),))
    watcher = Watcher(trainer.run)
    fit = fit_in_thread(trainer, 3)
    watcher.wait("status", status="paused")
    trainer.run.request("stop")
    summary = fit.result()
    assert summary.status == "stopped"
    assert summary.steps == 3
    assert statuses(summary) == ["running", "paused", "stopped"]


def test_stop_ends_training_at_the_step_it_takes_effect() -> None:
    trainer = make_trainer(callbacks=(At(4, "stop"),))
    summary = trainer.fit(3)

    assert summary.status == "stopped"
    assert summary.steps == 5
    assert trainer.run.global_step == 5
    (stop,) = command_events(summary, "stop")
    assert set(stop) == {"seq", "run_id", "time", "step", "epoch", "kind", "payload"}
    assert (stop["kind"], stop["step"], stop["epoch"], stop["run_id"]) == ("command_applied", 5, 0, 1)
    assert statuses(summary) == ["running", "stopped"]
    reader = onthefly.open_session(summary.session_dir)
    assert reader.info()["status"] == "stopped"
    assert reader.runs()[0]["status"] == "stopped"
    samples = reader.samples(summary.run_id)
    assert samples.num_rows == 5 * 32
    assert max(samples.column("step").to_pylist()) == 5


def test_stop_requested_before_fit_trains_a_single_step() -> None:
    trainer = make_trainer()
    trainer.run.request("stop")
    summary = trainer.fit(2)
    assert (summary.status, summary.steps) == ("stopped", 1)


# ---- test now, train more, learning rate, weight decay, checkpoint -------------------------------
def test_test_now_evaluates_the_test_split_at_that_step() -> None:
    trainer = make_trainer(callbacks=(At(3, "test"),))
    summary = trainer.fit(1)

    evals = [e for e in session_events(summary, "eval") if e["payload"]["split"] == "test"]
    assert len(evals) == 1
    assert evals[0]["step"] == 4
    assert evals[0]["payload"]["samples"] == 64
    assert 0.0 <= evals[0]["payload"]["accuracy"] <= 1.0
    assert metric(summary, "test_loss") == {4: pytest.approx(evals[0]["payload"]["loss"])}
    (command,) = command_events(summary, "test")
    assert (command["kind"], command["step"]) == ("command_applied", 4)


@pytest.mark.parametrize(
    "commands",
    [
        [("test", {})],
        [("checkpoint", {})],
        [("pause", {}), ("resume", {})],
        [("set_lr", {"lr": 0.1})],  # the value it already has
    ],
    ids=["test", "checkpoint", "pause-resume", "same-lr"],
)
def test_commands_that_change_no_setting_leave_the_training_trajectory_alone(
    commands: list[tuple[str, dict[str, Any]]],
) -> None:
    expected = uninterrupted_weights(1)
    trainer = make_trainer(callbacks=tuple(At(3, kind, **args) for kind, args in commands))
    summary = trainer.fit(1)
    assert summary.status == "finished"
    assert [e["kind"] for e in session_events(summary) if e["kind"].startswith("command_")] == \
        ["command_applied"] * len(commands)
    assert_same_weights(weights(trainer), expected)


def test_train_more_extends_the_plan() -> None:
    trainer = make_trainer(callbacks=(At(3, "train_more", epochs=2),))
    summary = trainer.fit(1)

    assert summary.status == "finished"
    assert summary.epochs == 3
    assert summary.steps == 3 * STEPS_PER_EPOCH
    (command,) = command_events(summary, "train_more")
    assert (command["kind"], command["step"], command["payload"]["args"]) == \
        ("command_applied", 4, {"epochs": 2})
    samples = onthefly.open_session(summary.session_dir).samples(summary.run_id)
    assert sorted(set(samples.column("epoch").to_pylist())) == [0, 1, 2]
    assert samples.num_rows == 3 * 256


def test_set_lr_applies_from_the_next_optimizer_step() -> None:
    trainer = make_trainer(callbacks=(At(3, "set_lr", lr=0.01),))
    summary = trainer.fit(1)

    assert trainer.optimizer.param_groups[0]["lr"] == 0.01
    (command,) = command_events(summary, "set_lr")
    assert (command["kind"], command["step"]) == ("command_applied", 4)
    assert command["payload"]["args"] == {"lr": 0.01, "group": None}
    lrs = metric(summary, "lr")
    assert lrs == {step: (0.1 if step <= 4 else 0.01) for step in range(1, STEPS_PER_EPOCH + 1)}


def test_set_lr_gives_the_weights_of_changing_the_lr_by_hand_after_that_step() -> None:
    class SetLrByHand(Callback):
        def on_step_end(self, run: Run) -> None:
            if run.global_step == 4:
                for group in run.optimizer.param_groups:
                    group["lr"] = 0.01

    by_hand = make_trainer(callbacks=(SetLrByHand(),))
    by_hand.fit(1)
    by_command = make_trainer(callbacks=(At(3, "set_lr", lr=0.01),))
    by_command.fit(1)
    assert_same_weights(weights(by_command), weights(by_hand))
    assert not torch.equal(weights(by_command)["0.weight"], uninterrupted_weights(1)["0.weight"])


def test_set_lr_on_one_parameter_group() -> None:
    def two_groups(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                               lr=0.1)

    trainer = make_trainer(callbacks=(At(2, "set_lr", lr=0.5, group=1),), optimizer=two_groups)
    summary = trainer.fit(1)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.1, 0.5]
    (command,) = command_events(summary, "set_lr")
    assert (command["kind"], command["step"]) == ("command_applied", 3)


def test_set_weight_decay_changes_every_group_from_that_step() -> None:
    trainer = make_trainer(callbacks=(At(3, "set_weight_decay", weight_decay=0.01),))
    summary = trainer.fit(1)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    (command,) = command_events(summary, "set_weight_decay")
    assert (command["kind"], command["step"], command["payload"]["args"]) == \
        ("command_applied", 4, {"weight_decay": 0.01, "group": None})


def test_checkpoint_command_writes_a_registered_checkpoint() -> None:
    trainer = make_trainer(callbacks=(At(3, "checkpoint"),))
    summary = trainer.fit(1)

    row, final = onthefly.open_session(summary.session_dir).checkpoints(summary.run_id)
    assert final["reason"] == "final"
    assert (row["step"], row["epoch"], row["batch_in_epoch"], row["reason"]) == (4, 0, 4, "command")
    folder = Path(row["path"])
    assert folder.is_dir()
    assert row["bytes"] > 0
    assert set(load_file(str(folder / "model.safetensors"))) == set(trainer.model.state_dict())
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["progress"]["global_step"] == 4
    (command,) = command_events(summary, "checkpoint")
    assert (command["kind"], command["step"]) == ("command_applied", 4)
    assert [(e["step"], e["payload"]["reason"]) for e in session_events(summary, "checkpoint")] == [(4, "command"), (8, "final")]


def test_checkpoint_command_with_a_path(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    trainer = make_trainer(callbacks=(At(2, "checkpoint", path=str(target)),))
    summary = trainer.fit(1)
    row, final = onthefly.open_session(summary.session_dir).checkpoints(summary.run_id)
    assert final["reason"] == "final"
    assert Path(row["path"]) == target
    assert (target / "model.safetensors").is_file()


# ---- invalid commands --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "args", "message"),
    [
        ("nope", {}, "unknown command 'nope'"),
        ("set_lr", {"lr": -1}, "lr must be a finite number > 0.0, got -1"),
        ("set_lr", {"lr": 0}, "lr must be a finite number > 0.0, got 0"),
        ("set_lr", {"lr": "abc"}, "lr must be a finite number > 0.0, got 'abc'"),
        ("set_lr", {"lr": float("nan")}, "lr must be a finite number > 0.0, got nan"),
        ("set_lr", {"lr": float("inf")}, "lr must be a finite number > 0.0, got inf"),
        ("set_lr", {"lr": True}, "lr must be a finite number > 0.0, got True"),
        ("set_lr", {}, "set_lr needs lr: a finite number > 0.0"),
        ("set_lr", {"lr": None}, "lr must be a finite number > 0.0, got None"),
        ("set_lr", {"lr": 0.1, "group": -1}, "group must be a parameter-group index from 0 to 10000, got -1"),
        ("set_lr", {"lr": 0.1, "group": 10_001}, "group must be a parameter-group index from 0 to 10000"),
        ("set_lr", {"lr": 0.1, "group": True}, "group must be a parameter-group index from 0 to 10000, got True"),
        ("set_lr", {"lr": 0.1, "rate": 2}, "unexpected argument(s) ['rate'] for set_lr; it takes lr, group"),
        ("set_weight_decay", {"weight_decay": -0.1}, "weight_decay must be a finite number >= 0.0"),
        ("train_more", {"epochs": 0}, "epochs must be a whole number from 1 to 100000, got 0"),
        ("train_more", {"epochs": 100_001}, "epochs must be a whole number from 1 to 100000, got 100001"),
        ("train_more", {"epochs": 1.5}, "epochs must be a whole number from 1 to 100000, got 1.5"),
        ("train_more", {"epochs": "2"}, "epochs must be a whole number from 1 to 100000, got '2'"),
        ("train_more", {}, "train_more needs epochs: a whole number from 1 to 100000"),
        ("pause", {"now": True}, "unexpected argument(s) ['now']"),
        ("checkpoint", {"path": 3}, "path must be a string, got 3"),
        ("cluster", {"features": "pixels"}, "features must be 'signals' or 'embeddings', got 'pixels'"),
        ("cluster", {"subset": "easy"}, "subset must be 'all' or 'hard', got 'easy'"),
        ("cluster", {"k": 51}, "k must be a whole number from 2 to 50, or omitted (chosen by silhouette), got 51"),
        ("cluster", {"epoch": -1}, "epoch must be a whole number from 0 to 2147483648, got -1"),
        ("cluster", {"layer": "x" * 501}, "layer must be a module name (a string) of at most 500 characters"),
        ("cluster", {"k": 1, "subset": "easy"}, "k must be a whole number from 2 to 50, or omitted (chosen by "
                                                "silhouette), got 1; subset must be 'all' or 'hard', got 'easy'"),
    ],
)
def test_invalid_command_is_refused_and_nothing_is_queued(kind: str, args: dict[str, Any], message: str) -> None:
    run = onthefly.start_run(project="control", run_name="r", model=toy_model(),
                             optimizer=torch.optim.SGD(toy_model().parameters(), lr=0.1))
    try:
        with pytest.raises(ConfigError, match=re.escape(message)):
            run.request(kind, **args)
        with pytest.raises(ConfigError, match=re.escape(message)):
            run.commands.put(kind, **args)
        assert not run.commands.pending
        assert run.commands.drain() == []
    finally:
        run.close()


@pytest.mark.parametrize(
    ("kind", "args", "queued"),
    [
        ("pause", {}, {}),
        ("set_lr", {"lr": 1}, {"lr": 1.0, "group": None}),
        ("set_lr", {"lr": 0.5, "group": 10_000}, {"lr": 0.5, "group": 10_000}),
        ("set_weight_decay", {"weight_decay": 0}, {"weight_decay": 0.0, "group": None}),
        ("train_more", {"epochs": 100_000}, {"epochs": 100_000}),
        ("train_more", {"epochs": 2.0}, {"epochs": 2}),  # JSON's integers: 2.0 is the integer 2
        ("checkpoint", {}, {"path": None}),
        ("checkpoint", {"path": "mine"}, {"path": "mine"}),
        ("cluster", {}, {"features": "signals", "k": None, "subset": "all", "epoch": None, "layer": None}),
        ("cluster", {"k": 50, "epoch": 2**31, "features": "embeddings", "layer": "fc"},
         {"features": "embeddings", "k": 50, "subset": "all", "epoch": 2**31, "layer": "fc"}),
    ],
)
def test_a_valid_command_is_queued_as_a_plain_dict_with_its_defaults(
    kind: str, args: dict[str, Any], queued: dict[str, Any],
) -> None:
    queue = CommandQueue()
    command = queue.put(kind, **args)
    assert (command.id, command.kind, command.args) == (1, kind, queued)
    assert {k: type(v) for k, v in command.args.items()} == {k: type(v) for k, v in queued.items()}
    assert queue.drain() == [command]


def test_a_refused_command_takes_no_queue_id() -> None:
    queue = CommandQueue()
    with pytest.raises(ConfigError):
        queue.put("train_more", epochs=0)
    assert queue.put("pause").id == 1


def test_every_command_kind_has_one_model() -> None:
    assert COMMAND_KINDS == tuple(COMMANDS) == ("run", "pause", "resume", "stop", "test", "train_more", "set_lr",
                                                "set_weight_decay", "checkpoint", "cluster", "export", "execute_plan",
                                                "preview_plan", "compare", "health_check", "verify_suspects")
    for kind in COMMAND_KINDS:
        assert COMMANDS[kind].model_fields["kind"].annotation == Literal[kind]


@pytest.mark.parametrize(
    ("commands", "rejected", "reason"),
    [
        ([("resume", {})], "resume", "cannot resume while running"),
        ([("run", {})], "run", "cannot run while running"),
        ([("set_lr", {"lr": 0.5, "group": 3})], "set_lr", "there is no group 3"),
        ([("pause", {}), ("pause", {}), ("resume", {})], "pause", "cannot pause while paused"),
    ],
    ids=["resume-while-running", "run-while-running", "no-such-group", "pause-while-paused"],
)
def test_command_that_does_not_fit_the_state_is_rejected_and_training_goes_on(
    commands: list[tuple[str, dict[str, Any]]], rejected: str, reason: str,
) -> None:
    expected = uninterrupted_weights(1)
    trainer = make_trainer(callbacks=tuple(At(3, kind, **args) for kind, args in commands))
    summary = trainer.fit(1)

    assert (summary.status, summary.steps) == ("finished", STEPS_PER_EPOCH)
    rejections = session_events(summary, "command_rejected")
    assert len(rejections) == 1
    assert rejections[0]["payload"]["command"] == rejected
    assert rejections[0]["step"] == 4
    assert reason in rejections[0]["payload"]["reason"]
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1
    assert_same_weights(weights(trainer), expected)


def test_test_now_without_a_test_loader_is_rejected() -> None:
    trainer = make_trainer(callbacks=(At(3, "test"),), with_test=False)
    summary = trainer.fit(1)
    (command,) = command_events(summary, "test")
    assert command["kind"] == "command_rejected"
    assert "test_loader" in command["payload"]["reason"]
    assert session_events(summary, "eval") == []


def test_set_weight_decay_on_an_optimizer_without_it_is_rejected() -> None:
    trainer = make_trainer(callbacks=(At(3, "set_weight_decay", weight_decay=0.1),),
                           optimizer=lambda model: torch.optim.Rprop(model.parameters(), lr=0.01))
    summary = trainer.fit(1)
    (command,) = command_events(summary, "set_weight_decay")
    assert command["kind"] == "command_rejected"
    assert "Rprop" in command["payload"]["reason"]
    assert "weight_decay" not in trainer.optimizer.param_groups[0]
    assert summary.status == "finished"


# ---- keep_alive and wait_for_run ---------------------------------------------------------------
def test_keep_alive_goes_idle_and_takes_commands(fit_in_thread: Callable[[Trainer, int], FitThread]) -> None:
    trainer = make_trainer(keep_alive=True)
    run = trainer.run
    watcher = Watcher(run)
    fit = fit_in_thread(trainer, 1)

    idle = watcher.wait("status", status="idle")
    assert idle.step == STEPS_PER_EPOCH
    assert fit.is_alive()

    run.request("test")
    test = watcher.wait("eval", split="test")
    assert test.step == STEPS_PER_EPOCH

    run.request("pause")  # nothing to pause: training has finished
    rejected = watcher.wait("command_rejected", command="pause")
    assert "train_more" in rejected.payload["reason"]
    assert run.status == "idle"

    run.request("train_more", epochs=1)
    watcher.wait("status", count=2, status="idle")
    assert run.global_step == 2 * STEPS_PER_EPOCH
    assert run.epoch == 2
    assert fit.is_alive()

    run.request("stop")
    summary = fit.result()
    assert summary.status == "stopped"
    assert summary.steps == 2 * STEPS_PER_EPOCH
    assert statuses(summary) == ["running", "idle", "running", "idle", "stopped"]
    samples = onthefly.open_session(summary.session_dir).samples(summary.run_id)
    assert samples.num_rows == 2 * 256


def test_without_keep_alive_fit_returns_by_itself() -> None:
    trainer = make_trainer()
    summary = trainer.fit(1)
    assert summary.status == "finished"
    assert statuses(summary) == ["running", "finished"]


def test_wait_for_run_trains_nothing_until_run(fit_in_thread: Callable[[Trainer, int], FitThread]) -> None:
    trainer = make_trainer(wait_for_run=True)
    run = trainer.run
    watcher = Watcher(run)
    fit = fit_in_thread(trainer, 1)

    watcher.wait("waiting")
    run.request("pause")
    watcher.wait("command_rejected", command="pause")
    run.request("set_lr", lr=0.05)  # settings can be changed before training starts
    watcher.wait("command_applied", command="set_lr")
    assert run.global_step == 0
    assert run.status == "created"
    assert fit.is_alive()

    run.request("run")
    summary = fit.result()
    assert (summary.status, summary.steps) == ("finished", STEPS_PER_EPOCH)
    (command,) = command_events(summary, "run")
    assert (command["kind"], command["step"]) == ("command_applied", 0)
    assert statuses(summary) == ["running", "finished"]
    assert set(metric(summary, "lr").values()) == {0.05}


def test_stop_while_waiting_for_run_trains_nothing(fit_in_thread: Callable[[Trainer, int], FitThread]) -> None:
    trainer = make_trainer(wait_for_run=True)
    watcher = Watcher(trainer.run)
    fit = fit_in_thread(trainer, 1)
    watcher.wait("waiting")
    trainer.run.request("stop")
    summary = fit.result()
    assert (summary.status, summary.steps) == ("stopped", 0)
    assert onthefly.open_session(summary.session_dir).samples(summary.run_id).num_rows == 0


def test_the_transition_table_covers_every_command() -> None:
    """A command the engine validates but the controller has no rule for would always be refused."""
    from onthefly.engine.control import COMMAND_KINDS
    from onthefly.engine.controller import TABLE

    carried_out_by_actions = {"cluster", "export", "execute_plan", "preview_plan", "compare", "health_check",
                              "verify_suspects"}
    assert set(COMMAND_KINDS) == set(TABLE) | carried_out_by_actions
