"""Health check-ups against planted silent bugs: each script below trains fine (no error, the
loss goes on) yet carries one bug; check-ups every ``EVERY`` steps must flag it with the right
card within the steps stated, and the clean script must raise nothing above "info". The cards
are recorded in the session as ``health`` events. Data: scikit-learn's bundled digits."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from onthefly.actions import health
from onthefly.errors import ConfigError
from onthefly.store import open_session

EVERY = 5  # a check-up every 5 steps


@cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long)


def splits(train: int = 1200) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    x, y = digits()
    return (TensorDataset(x[:train], y[:train]), TensorDataset(x[1200:1500], y[1200:1500]),
            TensorDataset(x[1500:], y[1500:]))


def mlp(dropout: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), *([nn.Dropout(0.2)] if dropout else []), nn.Linear(64, 10))


def quick(*, model: nn.Module | None = None, optimizer: Any = None, lr: float = 0.05, train: Any = None,
          val: Any = None, loader: dict[str, Any] | None = None, callbacks: tuple[onthefly.Callback, ...] = (),
          steps: int = 30, **options: Any) -> list[dict[str, Any]]:
    """Train with check-ups every EVERY steps for ``steps`` steps; every check-up's record."""
    model = model if model is not None else mlp()
    default_train, default_val, test = splits()
    trainer = onthefly.Trainer(
        model=model, optimizer=optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
        loss_fn=options.pop("loss_fn", nn.CrossEntropyLoss()),
        train_loader=DataLoader(train or default_train, batch_size=32, shuffle=True,
                                generator=torch.Generator().manual_seed(0), **(loader or {})),
        val_loader=DataLoader(val or default_val, batch_size=128), test_loader=DataLoader(test, batch_size=128),
        project="health", progress=False, callbacks=callbacks, max_steps=steps, **options)
    health.attach(trainer, every_steps=EVERY)
    trainer.fit(10)
    return checkups(trainer.run)


def checkups(run: onthefly.Run) -> list[dict[str, Any]]:
    run.session.flush()
    return [{"step": e["step"], "cards": e["payload"]["cards"]}
            for e in open_session(run.session.dir).events(run.run_id, kind="health")]


def first_flag(records: list[dict[str, Any]], check: str) -> tuple[int | None, dict[str, Any] | None]:
    for record in records:
        for found in record["cards"]:
            if found["check"] == check:
                return record["step"], found
    return None, None


def assert_flagged(records: list[dict[str, Any]], check: str, within: int, severity: str = "error") -> dict[str, Any]:
    step, found = first_flag(records, check)
    flagged = sorted({c["check"] for r in records for c in r["cards"]})
    assert found is not None, f"{check} never flagged; the check-ups flagged {flagged}"
    assert step is not None and step <= within, f"{check} first flagged at step {step}, later than {within}"
    assert found["severity"] == severity, found
    assert found["fix"] and found["title"]
    print(f"\n{check}: first flagged at step {step}")  # the README's table (pytest -s)
    return found


# ---- the clean script --------------------------------------------------------------------------------
def test_a_clean_script_raises_nothing_above_info() -> None:
    records = quick(steps=40)
    assert len(records) == 40 // EVERY
    loud = [(r["step"], c["check"], c["title"]) for r in records for c in r["cards"] if c["severity"] != "info"]
    assert loud == []


# ---- planted bugs, a test each ------------------------------------------------------------------------
def test_an_optimizer_missing_a_layer() -> None:
    model = mlp()
    found = assert_flagged(quick(model=model, optimizer=torch.optim.SGD(model[0].parameters(), lr=0.05)),
                           "optimizer_missing_params", within=EVERY)
    assert found["evidence"]["parameters"] == ["2.weight", "2.bias"]


class EvalOnEpochStart(onthefly.Callback):
    """The bug: an evaluation helper leaves the model in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_train_batch_end(self, run: onthefly.Run, batch: Any, outputs: Any, loss: Any) -> None:
        self.model.eval()


def test_the_model_left_in_eval_mode_while_training() -> None:
    model = mlp(dropout=True)
    found = assert_flagged(quick(model=model, callbacks=(EvalOnEpochStart(model),)), "eval_mode_training", within=EVERY)
    assert found["evidence"]["affected_modules"] == ["Dropout"]


def custom_loop(step: Callable[[nn.Module, torch.optim.Optimizer, Any, int], None], *, steps: int = 30,
                scaler: Any = None, model: nn.Module | None = None) -> list[dict[str, Any]]:
    """A loop the user writes (start_run), with check-ups every EVERY steps."""
    model = model if model is not None else mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train, val, _ = splits()
    run = onthefly.start_run(project="health", run_name="loop", model=model, optimizer=optimizer,
                             loss_fn=nn.CrossEntropyLoss(), val_loader=DataLoader(val, batch_size=128),
                             dashboard=False, scaler=scaler)
    health.attach(run, every_steps=EVERY)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    with run:
        done = 0
        for _ in run.epochs(5):
            for i, (x, y) in enumerate(run.batches(loader)):
                losses = F.cross_entropy(model(x), y, reduction="none")
                step(model, optimizer, losses, i)
                run.step(losses.detach(), loss=losses.mean().detach())
                done += 1
                if done == steps:
                    run.stop()
                    break
    return checkups(run)


def test_zero_grad_missing_accumulates_gradients() -> None:
    def step(model: nn.Module, optimizer: torch.optim.Optimizer, losses: torch.Tensor, i: int) -> None:
        losses.mean().backward()  # the bug: no optimizer.zero_grad()
        optimizer.step()

    assert_flagged(custom_loop(step), "gradients_accumulate", within=2 * EVERY)


def test_a_learning_rate_100_times_too_high() -> None:
    found = assert_flagged(quick(lr=5.0), "update_too_large", within=EVERY)
    assert found["evidence"]["lr"] == 5.0


def test_labels_permuted_independently_of_the_inputs() -> None:
    x, y = digits()
    shuffled = y[:1200][torch.randperm(1200, generator=torch.Generator().manual_seed(0))]
    found = assert_flagged(quick(train=TensorDataset(x[:1200], shuffled)), "labels_independent", within=EVERY)
    assert found["evidence"]["neighbour_agreement"] < 0.2 < 0.9  # digits' real labels agree ~98% of the time


def test_labels_set_by_a_few_of_many_features_are_not_independent() -> None:
    # The demo's task: the sign of the sum of 50 of 784 features. Nearest neighbours in input
    # space agree barely above chance; the held-out linear probe sees the dependence.
    x = torch.randn(2000, 784, generator=torch.Generator().manual_seed(0))
    y = (x[:, :50].sum(dim=1) > 0).long()
    assert health._independent_labels(([x], [y])) == []
    permuted = y[torch.randperm(2000, generator=torch.Generator().manual_seed(1))]
    (found,) = health._independent_labels(([x], [permuted]))
    assert found["check"] == "labels_independent" and found["evidence"]["linear_probe"] < 0.55


def test_the_validation_set_inside_the_training_set() -> None:
    x, y = digits()
    found = assert_flagged(quick(val=TensorDataset(x[100:400], y[100:400])), "split_leakage", within=EVERY)
    assert found["evidence"]["count"] == 300 and found["evidence"]["split"] == "val"
    assert found["evidence"]["examples"][0] == {"train": 100, "val": 0}


def test_a_dead_relu_layer() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-20.0)  # the bug: an initialisation that kills the layer
    found = assert_flagged(quick(model=model), "dead_units", within=EVERY)
    assert found["evidence"]["layers"] == {"1": 1.0}


class PoisonAt(onthefly.Callback):
    """The bug: at step ``k`` a weight becomes NaN (as a bad fused kernel or a corrupt update would)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        self.model, self.k = model, k

    def on_step_end(self, run: onthefly.Run) -> None:
        if run.global_step == self.k:
            with torch.no_grad():
                self.model[2].weight[0, 0] = float("nan")


def test_a_nan_appearing_at_step_k() -> None:
    model = mlp()
    try:
        records = quick(model=model, callbacks=(PoisonAt(model, 12),))
    except Exception:  # the engine fails the run on a non-finite loss at its next flush
        pytest.fail("the check-up should flag the NaN before the run fails")
    step, found = first_flag(records, "nonfinite_weights")
    assert found is not None and found["severity"] == "error" and "2.weight" in found["evidence"]["tensors"]
    assert step == 15  # the first check-up after step 12


def test_amp_overflow_collapses_the_loss_scale() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, losses: torch.Tensor, i: int) -> None:
        optimizer.zero_grad()
        scaler.scale(losses.mean() * 1e35).backward()  # the bug: a loss scaled into float overflow
        scaler.step(optimizer)
        scaler.update()

    found = assert_flagged(custom_loop(step, scaler=scaler, steps=30), "loss_scale_collapsed", within=4 * EVERY)
    assert found["evidence"]["scale"] < 1.0


class EmaIntoFrozen(onthefly.Callback):
    """The bug: an EMA meant for a copy writes into the model's frozen first layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_step_end(self, run: onthefly.Run) -> None:
        with torch.no_grad():
            self.model[0].weight.mul_(0.999)


def test_a_frozen_layer_being_updated() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    found = assert_flagged(quick(model=model, optimizer=torch.optim.SGD(model[2].parameters(), lr=0.05),
                                 callbacks=(EmaIntoFrozen(model),)), "frozen_changed", within=EVERY)
    assert found["evidence"]["parameters"] == ["0.weight"]


def same_seed(worker_id: int) -> None:
    np.random.seed(0)  # the bug: every worker the same NumPy stream (augmentations repeat)


def test_workers_with_one_seed() -> None:
    found = assert_flagged(quick(loader={"num_workers": 2, "worker_init_fn": same_seed}, steps=10), "worker_seeds",
                           within=EVERY, severity="warning")
    assert found["evidence"]["streams"] == ["numpy"]


def test_a_loss_applied_to_probabilities_instead_of_logits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Softmax(dim=1))
    assert_flagged(quick(model=model), "probabilities_to_logit_loss", within=EVERY)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.aux = nn.Linear(64, 64), nn.Linear(64, 10), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))  # the bug: the aux head is never used


def test_parameters_that_never_receive_a_gradient() -> None:
    found = assert_flagged(quick(model=Branchy()), "no_gradient", within=EVERY, severity="warning")
    assert found["evidence"]["parameters"] == ["aux.weight", "aux.bias"]


def test_a_learning_rate_scheduled_to_zero() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # the bug: a warmup that never rises
    assert_flagged(quick(model=model, optimizer=optimizer, scheduler=scheduler, scheduler_interval="step"),
                   "lr_zero", within=EVERY)


# ---- the machinery ------------------------------------------------------------------------------------
def test_a_check_up_on_request_is_recorded_and_leaves_training_untouched() -> None:
    train, val, _ = splits()

    def run_with(request: bool) -> tuple[onthefly.Trainer, int]:
        model = mlp()
        trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   loss_fn=nn.CrossEntropyLoss(),
                                   train_loader=DataLoader(train, batch_size=32, shuffle=True,
                                                           generator=torch.Generator().manual_seed(0)),
                                   val_loader=DataLoader(val, batch_size=128), project="health", progress=False,
                                   max_steps=20)
        health.attach(trainer)
        if request:
            command = trainer.run.request("health_check", areas=["gradients", "data"])
        trainer.fit(2)
        return trainer, command.id if request else 0

    checked, _ = run_with(True)
    plain, _ = run_with(False)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(checked.model.state_dict()[key], value), key
    records = checkups(checked.run)
    assert len(records) == 1 and {c["area"] for c in records[0]["cards"]} <= {"gradients", "data"}


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ConfigError, match="every_steps"):
        health.attach(object(), every_steps=0)
    from onthefly.engine.control import check_command

    with pytest.raises(ConfigError, match="areas"):
        check_command("health_check", {"areas": ["vibes"]})


# ---- the determinism check ----------------------------------------------------------------------------
def determinism(model: nn.Module | None = None, train: Any = None, loader: dict[str, Any] | None = None,
                steps: int = 8) -> dict[str, Any]:
    model = model if model is not None else mlp(dropout=True)
    default_train, val, _ = splits()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                               loss_fn=nn.CrossEntropyLoss(),
                               train_loader=DataLoader(train or default_train, batch_size=32, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0), **(loader or {})),
                               val_loader=DataLoader(val, batch_size=128), project="health", progress=False,
                               max_steps=steps)
    health.attach(trainer)
    trainer.run.request("health_check", areas=["determinism"])
    trainer.fit(1)
    (record,) = checkups(trainer.run)
    (found,) = [c for c in record["cards"] if c["check"] == "determinism"]
    (replayed,) = [c for c in record["cards"] if c["check"] == "replay"]  # no checkpoint: nothing replayed
    assert replayed["severity"] == "info" and replayed["evidence"]["replayed"] == 0
    return found


def test_determinism_is_identical_on_the_cpu_with_dropout_and_adam() -> None:
    found = determinism()
    assert found["severity"] == "info" and found["title"].startswith("identical")
    contract = found["evidence"]["contract"]
    assert contract["torch"] == torch.__version__ and contract["device"] == "cpu"
    assert contract["loader_generator"] is True and contract["world_size"] == 1
    assert found["evidence"]["ops"] > 10


class Jitter(nn.Module):
    """The planted nondeterminism: noise from a generator seeded from the clock."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(time.perf_counter_ns()))
        return x + 1e-3 * noise


def test_a_planted_nondeterministic_op_is_found_and_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), Jitter(), nn.Linear(64, 10))
    found = determinism(model=model)
    assert found["severity"] == "error"
    assert found["evidence"]["differs"] == "step"
    assert found["evidence"]["module"] == "2" and found["evidence"]["first_op"] == "randn"
    assert "randn in 2" in found["title"]


class Augmented(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = digits()

    def __len__(self) -> int:
        return 1200

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + float(np.random.normal(0, 0.01)), self.y[i]  # augmentation with NumPy's stream


def clock_seed(worker_id: int) -> None:
    import time

    np.random.seed(time.perf_counter_ns() % 2**32)  # the planted bug: a worker seeded from the clock


def test_a_worker_seeded_from_the_clock_is_found() -> None:
    found = determinism(train=Augmented(), loader={"num_workers": 2, "worker_init_fn": clock_seed})
    assert found["severity"] == "error" and found["evidence"]["differs"] == "data"
    assert "data loading is not deterministic" in found["title"]
    assert found["evidence"]["contract"]["worker_init_fn"] == "clock_seed"


def test_workers_seeded_by_torch_load_the_same_batch_twice() -> None:
    found = determinism(train=Augmented(), loader={"num_workers": 2})
    assert found["severity"] == "info", found


# ---- continuous checks ---------------------------------------------------------------------------------
def continuous(model: nn.Module, lr: float = 0.05, steps: int = 60, **options: Any) -> tuple[onthefly.Trainer, Any]:
    train, val, _ = splits()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                               loss_fn=nn.CrossEntropyLoss(),
                               train_loader=DataLoader(train, batch_size=32, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0)),
                               val_loader=DataLoader(val, batch_size=128), project="health", progress=False,
                               max_steps=steps, **options)
    health.attach(trainer, continuous=True, report_every=10)
    trainer.fit(5)
    trainer.run.session.flush()
    return trainer, open_session(trainer.run.session.dir)


def test_the_continuous_monitor_records_every_steps_gradient_norm_exactly() -> None:
    trainer, reader = continuous(mlp(), steps=35)
    series = reader.metrics(trainer.run.run_id, "grad_norm")
    assert [m["step"] for m in series] == list(range(1, 36))  # every step, the last window at the end too
    assert all(m["value"] > 0 for m in series)
    assert checkups(trainer.run) == []  # a clean run: no card


class SpikeAt(onthefly.Callback):
    """The bug: one batch's gradients 1000x too large (a corrupt sample, a loss without a mean)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_before_optimizer_step(self, run: onthefly.Run, optimizer: torch.optim.Optimizer) -> None:
        if run.global_step + 1 == self.k:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(1000.0)


def test_a_gradient_spike_without_clipping_is_flagged_at_the_next_report() -> None:
    # The spike is injected before the monitor measures (callbacks run before tools' hooks).
    trainer, _ = continuous(mlp(), lr=1e-4, steps=40, callbacks=[SpikeAt(25)])
    records = checkups(trainer.run)
    step, found = first_flag(records, "gradient_spikes")
    assert found is not None and found["evidence"]["steps"] == [25]
    assert step == 40  # the window of steps 21-30 is read when the next one (31-40) is sent


class SkipsNonFinite(torch.optim.SGD):
    """An optimizer that skips a step with non-finite gradients (as GradScaler does): the run goes on."""

    def step(self, closure: Any = None) -> Any:
        if any(not bool(torch.isfinite(p.grad).all()) for g in self.param_groups for p in g["params"]
               if p.grad is not None):
            return None
        return super().step(closure)


class NanGradientAt(onthefly.Callback):
    def __init__(self, k: int) -> None:
        self.k = k

    def on_before_optimizer_step(self, run: onthefly.Run, optimizer: torch.optim.Optimizer) -> None:
        if run.global_step + 1 == self.k:
            optimizer.param_groups[0]["params"][0].grad[0, 0] = float("nan")


def test_non_finite_gradients_are_flagged_by_the_monitor_though_the_loss_stays_finite() -> None:
    model = mlp()
    train, val, _ = splits()
    trainer = onthefly.Trainer(model=model, optimizer=SkipsNonFinite(model.parameters(), lr=0.05),
                               loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(train, batch_size=32),
                               val_loader=DataLoader(val, batch_size=128), project="health", progress=False,
                               max_steps=30, callbacks=[NanGradientAt(7)])
    health.attach(trainer, continuous=True, report_every=10)
    trainer.fit(2)
    step, found = first_flag(checkups(trainer.run), "nonfinite_gradient")
    assert found is not None and found["severity"] == "error" and found["evidence"]["steps"] == [7]
    assert step == 20
