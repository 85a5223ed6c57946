"""Verify suspects: out-of-fold verdicts from fresh copies of the user's model, RNG kept, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import onthefly
from onthefly.actions import verify
from onthefly.actions.verify import verify_suspects
from onthefly.errors import ConfigError, DataError


def separable(n: int = 240, flipped: int = 12, seed: int = 0) -> tuple[TensorDataset, np.ndarray]:
    """Three well-separated blobs; ``flipped`` labels moved to the next class (their indices returned)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    x = centers[y] + torch.randn(n, 2, generator=gen)
    wrong = np.random.default_rng(seed).choice(n, size=flipped, replace=False)
    y = y.clone()
    y[wrong] = (y[wrong] + 1) % 3
    return TensorDataset(x, y), wrong


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))


def test_flipped_labels_are_confirmed_and_clean_ones_are_not() -> None:
    data, wrong = separable()
    clean = np.setdiff1d(np.arange(len(data)), wrong)[:12]
    suspects = np.concatenate([wrong, clean])
    result = verify_suspects(small_model, data, suspects, folds=3, epochs=20, batch_size=32,
                             optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    assert result.index.tolist() == suspects.tolist()  # the order given
    assert result.label.tolist() == data.tensors[1][suspects].tolist()
    confirmed = dict(zip(result.index.tolist(), result.confirmed.tolist(), strict=True))
    assert all(confirmed[i] for i in wrong) and not any(confirmed[i] for i in clean)
    assert np.all(result.label_probability[: wrong.size] < 0.5) and np.all(result.label_probability[wrong.size:] > 0.5)
    assert sorted(set(result.fold.tolist())) == [0, 1, 2]
    table = result.table()
    assert table.num_rows == suspects.size and table.column("confirmed").to_pylist() == result.confirmed.tolist()


def test_compute_is_counted_and_each_fold_leaves_out_only_its_suspects() -> None:
    data, wrong = separable(n=90, flipped=6)
    result = verify_suspects(small_model, data, wrong, folds=3, epochs=2, batch_size=16)
    assert result.samples_trained == 3 * 2 * (90 - 2)  # three folds of two held-out suspects
    capped = verify_suspects(small_model, data, wrong, folds=2, epochs=1, max_train_samples=40)
    assert capped.samples_trained == 2 * 40


def test_a_module_is_copied_with_fresh_weights_and_rng_is_left_as_it_was() -> None:
    data, wrong = separable(n=60, flipped=4)
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    verify_suspects(model, data, wrong, folds=2, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_same_seed_same_verdicts() -> None:
    data, wrong = separable(n=60, flipped=4)
    a = verify_suspects(small_model, data, wrong, folds=2, epochs=3, seed=7)
    b = verify_suspects(small_model, data, wrong, folds=2, epochs=3, seed=7)
    assert np.array_equal(a.label_probability, b.label_probability)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)
        self.scale = nn.Parameter(torch.ones(3))  # no reset_parameters() covers it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def test_errors_say_what_to_do() -> None:
    data, wrong = separable(n=30, flipped=2)
    with pytest.raises(ConfigError, match=r"cannot re-initialise the model's parameters scale.*lambda: MyNet\(\)"):
        verify_suspects(Scaled(), data, wrong)
    with pytest.raises(ConfigError, match="suspect index 30 is outside the dataset"):
        verify_suspects(small_model, data, [1, 30])
    with pytest.raises(ConfigError, match="must not repeat"):
        verify_suspects(small_model, data, [1, 1])
    with pytest.raises(ConfigError, match="folds must be a whole number >= 2"):
        verify_suspects(small_model, data, wrong, folds=1)
    regression = TensorDataset(torch.randn(30, 2), torch.randn(30))
    with pytest.raises(DataError, match="needs a classifier"):
        verify_suspects(lambda: nn.Linear(2, 1), regression, [0, 1], loss_fn=nn.MSELoss())
    empty = verify_suspects(small_model, data, [])
    assert empty.index.size == 0 and empty.samples_trained == 0


# ---- the verify_suspects command: what the dashboard's "Verify suspects" sends ------------------------
def train_with_requests(requests: dict[int, dict[str, object]], epochs: int = 8) -> onthefly.Trainer:

    data, _ = separable()

    class Ask(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            if run.epoch in requests:
                run.request("verify_suspects", **requests[run.epoch])

    torch.manual_seed(0)
    model = small_model()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                               loss_fn=nn.CrossEntropyLoss(), project="verify", progress=False, callbacks=[Ask()],
                               train_loader=torch.utils.data.DataLoader(
                                   data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    verify.attach(trainer)
    trainer.fit(epochs)
    trainer.run.session.flush()
    return trainer


def test_the_command_confirms_flagged_samples_saves_them_as_a_slice_and_leaves_the_run_as_it_was() -> None:
    _, wrong = separable()
    asked = train_with_requests({4: {"folds": 3, "epochs": 10}, 6: {"folds": 3, "epochs": 10}})
    reader = onthefly.open_session(asked.run.session.dir)
    first, second = (e["payload"] for e in reader.events(asked.run.run_id, kind="suspects_verified"))
    assert first["suspects"] >= 10 and first["confirmed"] >= 10  # of the 12 flipped labels
    confirmed = set(first["confirmed_indices"])
    assert len(confirmed & set(wrong.tolist())) >= 10 and len(confirmed - set(wrong.tolist())) <= 1  # flipped ones
    assert first["slice"] == "verified mislabelled" and second["slice"] == "verified mislabelled 2"
    assert sorted(reader.slice_indices(reader.slice("verified mislabelled")).tolist()) == sorted(
        first["confirmed_indices"])
    assert first["samples_trained"] > 0 and first["folds"] == 3
    statuses = [e["payload"]["status"] for e in reader.events(asked.run.run_id, kind="status")]
    assert statuses.count("paused") == 2  # the run waited while the copies trained
    unasked = train_with_requests({})
    assert all(torch.equal(a, b) for a, b in zip(asked.model.state_dict().values(),
                                                 unasked.model.state_dict().values(), strict=True))


def test_the_command_says_why_when_there_is_nothing_to_verify() -> None:
    trainer = train_with_requests({0: {}}, epochs=2)  # after one epoch nothing is flagged yet
    reader = onthefly.open_session(trainer.run.session.dir)
    (rejected,) = reader.events(trainer.run.run_id, kind="command_rejected")
    assert rejected["payload"]["command"] == "verify_suspects"
    assert "nothing to verify" in rejected["payload"]["reason"] or "no complete epoch" in rejected["payload"]["reason"]
