"""The determinism check's K-step replay: the steps since the last checkpoint trained again on
copies, every loss and tensor compared bit for bit with the live run, the live run untouched.
Data: scikit-learn's bundled digits (1200 training samples: 38 batches of 32 per epoch)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from onthefly.actions import health
from test_health import Augmented, Jitter, checkups, clock_seed, mlp, splits

CHECK_AT = 50  # the check-up is asked for after step 50, in epoch 1 (steps 39-76)


class Plan(onthefly.Callback):
    """A checkpoint at the end of epoch 0 (or after ``checkpoint_at`` steps), a determinism check
    asked for after step CHECK_AT."""

    def __init__(self, checkpoint_at: int | None = None, check: bool = True) -> None:
        self.checkpoint_at, self.check = checkpoint_at, check

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if self.checkpoint_at is None and run.epoch == 0:
            run.save_checkpoint()

    def on_step_end(self, run: onthefly.Run) -> None:
        if run.global_step == self.checkpoint_at:
            run.save_checkpoint()
        if self.check and run.global_step == CHECK_AT:
            run.request("health_check", areas=["determinism"])


def train(model: nn.Module | None = None, *, train_set: Any = None, loader: dict[str, Any] | None = None,
          callbacks: tuple[onthefly.Callback, ...] = (), plan: Plan | None = None, steps: int = 56,
          **options: Any) -> onthefly.Trainer:
    model = model if model is not None else mlp(dropout=True)
    default_train, val, _ = splits()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = onthefly.Trainer(
        model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(train_set or default_train, batch_size=32, shuffle=True,
                                generator=torch.Generator().manual_seed(0), **(loader or {})),
        val_loader=DataLoader(val, batch_size=128), project="replay", progress=False, max_steps=steps,
        callbacks=[plan or Plan(), *callbacks],
        **({"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 7, gamma=0.9), "scheduler_interval": "step"}
           | options))
    health.attach(trainer)
    trainer.fit(3)
    return trainer


def replay_card(trainer: onthefly.Trainer) -> dict[str, Any]:
    (record,) = checkups(trainer.run)
    (found,) = [c for c in record["cards"] if c["check"] == "replay"]
    return found


def weights(trainer: onthefly.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_the_steps_since_an_epoch_end_checkpoint_replay_identically() -> None:
    found = replay_card(train())
    assert found["severity"] == "info" and found["title"].startswith("identical"), found
    assert found["evidence"]["checkpoint_step"] == 38
    assert found["evidence"]["replayed"] == CHECK_AT + 1 - 38 == found["evidence"]["batches"]


def test_a_mid_epoch_checkpoint_with_accumulation_clipping_and_augmentation_replays_identically() -> None:
    # 19 optimizer steps per epoch: the checkpoint at step 44 and the check after step 50 both lie
    # in epoch 2; the augmentation draws from NumPy's global stream, in the training process.
    trainer = train(plan=Plan(checkpoint_at=44), accumulate_grad_batches=2, grad_clip=0.5, train_set=Augmented())
    found = replay_card(trainer)
    assert found["severity"] == "info" and found["title"].startswith("identical"), found
    assert found["evidence"]["checkpoint_step"] == 44
    assert found["evidence"]["batches"] == 2 * (CHECK_AT + 1 - 44)  # two batches per optimizer step


def test_workers_augmenting_replay_identically_from_an_epoch_end() -> None:
    found = replay_card(train(loader={"num_workers": 2}, train_set=Augmented()))  # workers seeded by torch
    assert found["severity"] == "info" and found["title"].startswith("identical"), found


def test_workers_augmenting_after_a_mid_epoch_checkpoint_are_named_as_the_cause() -> None:
    # A worker's own random stream is in no checkpoint: a resume inside the epoch (which the replay
    # draws like) starts the workers' streams elsewhere. The replay says so.
    found = replay_card(train(plan=Plan(checkpoint_at=44), loader={"num_workers": 2}, train_set=Augmented()))
    assert found["severity"] == "error" and found["evidence"]["step"] == 45
    assert "inside an epoch and the loader has workers" in found["fix"]


def test_the_check_leaves_the_live_run_as_it_would_have_been() -> None:
    checked = weights(train())
    unchecked = weights(train(plan=Plan(check=False)))
    assert checked.keys() == unchecked.keys()
    assert all(torch.equal(checked[k], unchecked[k]) for k in checked)


def test_a_planted_nondeterministic_op_is_found_at_the_first_replayed_step_and_named() -> None:
    torch.manual_seed(0)
    found = replay_card(train(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), Jitter(), nn.Linear(64, 10))))
    assert found["severity"] == "error", found
    evidence = found["evidence"]
    assert evidence["step"] == 39  # the first step after the checkpoint
    assert evidence["live_loss"] != evidence["replayed_loss"]
    assert evidence["first_tensor"] == "model.0.weight"
    assert evidence["first_op"] == "randn" and evidence["module"] == "2"
    assert "loss of step 39" in found["title"] and "randn in 2" in found["title"]


class Nudge(onthefly.Callback):
    """The planted nondeterminism between steps: after step 45, the output bias changed by a value from the clock."""

    def on_step_end(self, run: onthefly.Run) -> None:
        if run.global_step == 45:
            with torch.no_grad():
                run._objects.model[-1].bias[0] += 1e-4 * (time.perf_counter_ns() % 7 + 1)


def test_a_change_between_steps_is_found_at_the_step_after_it_and_placed_outside_the_step() -> None:
    found = replay_card(train(callbacks=(Nudge(),)))
    assert found["severity"] == "error"
    assert found["evidence"]["step"] == 46
    assert "op" not in found["evidence"] and "first_op" not in found["evidence"]
    assert "came from outside it" in found["title"]


def test_a_worker_seeded_from_the_clock_makes_the_replayed_data_differ() -> None:
    found = replay_card(train(train_set=Augmented(), loader={"num_workers": 2, "worker_init_fn": clock_seed}))
    assert found["severity"] == "error" and found["evidence"]["step"] == 39
    assert "came from outside it" in found["title"]


def test_without_a_checkpoint_or_across_an_epoch_end_the_replay_says_why() -> None:
    found = replay_card(train(plan=Plan(checkpoint_at=10 ** 6)))
    assert found["severity"] == "info" and "no checkpoint yet" in found["title"]
    found = replay_card(train(plan=Plan(checkpoint_at=20)))
    assert found["severity"] == "info" and "cannot be replayed" in found["title"]
    assert "epoch" in found["title"] and found["evidence"]["replayed"] == 0


def test_a_learning_rate_command_in_the_window_is_named() -> None:
    class SetLr(onthefly.Callback):
        def on_step_end(self, run: onthefly.Run) -> None:
            if run.global_step == 42:
                run.request("set_lr", lr=5e-4)

    found = replay_card(train(callbacks=(SetLr(),)))
    assert found["severity"] == "info" and "set_lr" in found["title"], found


def test_a_step_with_nan_losses_compares_its_bits() -> None:
    from onthefly.actions.replay import _bits_equal

    nan = torch.tensor([float("nan"), 1.0])
    assert _bits_equal(nan, nan.clone())
    assert not _bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not _bits_equal(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    assert np.isnan(nan[0].item())
