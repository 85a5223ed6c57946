"""The gating network on its own (no session): it learns to route separable regimes to the expert
that is right on each, load balancing keeps a weaker expert alive, top-1 routing gives the chosen
expert's logits bit for bit, the soft mixture is a mixture of probabilities, and the embedding
split is exact or refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.actions.gating import Gate, Mixture, balance_loss, split_last_linear, train_gate
from onthefly.errors import ConfigError


def regimes(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs whose first feature's sign says the regime, labels, and the regime of each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    regime = (x[:, 0] > 0).long()
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, regime


def expert_log_probs(y: torch.Tensor, regime: torch.Tensor, right: tuple[float, float], classes: int = 3) \
        -> torch.Tensor:
    """Two experts' log-probabilities: expert e puts ``right[e]`` on the true label in regime e and
    spreads it evenly in the other regime (it knows nothing there)."""
    out = []
    for e in range(2):
        p = torch.full((y.shape[0], classes), 1.0 / classes)
        knows = regime == e
        confident = torch.full((int(knows.sum()), classes), (1 - right[e]) / (classes - 1))
        confident[torch.arange(confident.shape[0]), y[knows]] = right[e]
        p[knows] = confident
        out.append(p.log())
    return torch.stack(out, dim=1)


def make_gate(x: torch.Tensor, experts: int = 2, hidden: int = 0) -> Gate:
    torch.manual_seed(0)
    return Gate(x.shape[1], experts, hidden, x.mean(0), x.std(0))


@pytest.mark.parametrize("hidden", [0, 16])
def test_the_gate_routes_each_regime_to_the_expert_that_is_right_there(hidden: int) -> None:
    x, y, regime = regimes()
    gate = make_gate(x, hidden=hidden)
    training = train_gate(gate, x, expert_log_probs(y, regime, (0.9, 0.9)), y, steps=300, batch_size=128, lr=0.05,
                          balance=0.01, seed=0)
    test_x, _, test_regime = regimes(1000, seed=1)
    with torch.no_grad():
        routed = gate(test_x).argmax(dim=1)
    assert (routed == test_regime).float().mean() > 0.97
    assert training.losses[-1] < training.losses[0]
    assert len(training.losses) == len(training.balance) == 300


def test_load_balancing_keeps_a_weaker_expert_in_use() -> None:
    # Expert 0 is a little better everywhere: without balancing the gate sends it everything.
    x, y, _ = regimes()
    everywhere = torch.ones_like(y)  # both experts "know" every sample; expert 0 is more often sure
    stronger = torch.stack([expert_log_probs(y, everywhere, (0.0, 0.9))[:, 1],
                            expert_log_probs(y, everywhere, (0.0, 0.7))[:, 1]], dim=1)
    shares = {}
    for balance in (0.0, 1.0):
        gate = make_gate(x)
        train_gate(gate, x, stronger, y, steps=400, batch_size=256, lr=0.05, balance=balance, seed=0)
        with torch.no_grad():
            shares[balance] = float((gate(x).argmax(dim=1) == 1).float().mean())
    assert shares[0.0] < 0.05, shares
    assert shares[1.0] > 0.25, shares


def test_balance_loss_is_one_when_uniform_and_the_expert_count_when_collapsed() -> None:
    uniform = torch.full((8, 4), 0.25)
    uniform[torch.arange(8), torch.arange(8) % 4] += 1e-3  # each expert the top choice of two samples
    assert balance_loss(uniform / uniform.sum(1, keepdim=True)).item() == pytest.approx(1.0, abs=1e-2)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), 4).float()
    assert balance_loss(collapsed).item() == pytest.approx(4.0)


def small_expert(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_top1_gives_the_chosen_experts_logits_bit_for_bit_and_soft_mixes_probabilities() -> None:
    x, _, _ = regimes(64)
    experts = [small_expert(1), small_expert(2), small_expert(3)]
    gate = make_gate(x, experts=3)
    top1 = Mixture(gate, experts, "top1").eval()
    with torch.no_grad():
        out = top1(x)
        choice = top1.route(x).argmax(dim=1)
        for i in range(x.shape[0]):
            assert torch.equal(out[i], experts[int(choice[i])](x[i:i + 1])[0]) or torch.equal(
                out[i], experts[int(choice[i])](x)[i])
        soft = Mixture(gate, experts, "soft").eval()(x)
        weights = F.softmax(gate(x), dim=1)
        expected = sum(weights[:, e:e + 1] * F.softmax(experts[e](x), dim=1) for e in range(3))
    torch.testing.assert_close(soft.exp(), expected)
    # Only the gate trains.
    assert all(not p.requires_grad for e in top1.experts for p in e.parameters())
    assert all(p.requires_grad for p in top1.gate.parameters())


def test_the_embedding_split_is_exact_and_refused_when_the_model_ends_after_its_last_linear() -> None:
    x, _, _ = regimes(16)
    model = small_expert(4)
    trunk, head = split_last_linear(model, x)
    assert torch.equal(head(trunk(x)), model(x))
    gate = make_gate(torch.randn(16, 8), experts=2)
    mixture = Mixture(gate, [model, small_expert(5)], "top1", (trunk, head)).eval()
    with torch.no_grad():
        assert mixture(x).shape == (16, 3)
    with pytest.raises(ConfigError, match="computes more after it"):
        split_last_linear(nn.Sequential(nn.Linear(6, 3), nn.Softmax(dim=1)), x)
    with pytest.raises(ConfigError, match="has none"):
        split_last_linear(nn.Sequential(nn.Conv1d(1, 1, 1), nn.Flatten()), torch.randn(2, 1, 6))


def test_an_empty_held_out_set_is_refused() -> None:
    gate = make_gate(torch.randn(4, 6))
    with pytest.raises(ConfigError, match="held-out data is empty"):
        train_gate(gate, torch.empty(0, 6), torch.empty(0, 2, 3), torch.empty(0, dtype=torch.long), steps=1,
                   batch_size=4, lr=0.1, balance=0.0, seed=0)
