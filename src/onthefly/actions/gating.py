"""The gating network and the mixture it makes: pure torch, no session (``mixture`` carries a gate
card out with these).

A ``Gate`` is a linear layer (or a one-hidden-layer MLP) over standardised features - the model's
input flattened, or the generalist's embedding (the input of its last ``nn.Linear``) - giving one
score per expert. A ``Mixture`` holds the gate and the frozen experts as one ``nn.Module`` taking
the experts' input tensor:

* ``top1``: each sample gets the logits of the expert with the highest score (every expert is
  evaluated and the choice is a one-hot product, so the module exports as one static graph and
  its outputs are the chosen expert's logits bit for bit);
* ``soft``: the log of the gate-weighted mean of the experts' probabilities (a valid input to
  softmax / cross-entropy, like logits).

The gate is trained with the experts frozen, on their outputs precomputed once over held-out data:
the negative log-likelihood of the soft mixture (for ``top1`` too: its argmax is the expert the
mixture trusts most), plus Switch Transformer's load-balancing loss ``E * sum_e f_e * P_e`` (``f_e``
the share of samples whose top choice is ``e``, ``P_e`` the mean gate probability of ``e``), which
is smallest when routing is uniform and keeps an expert from dying early.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["Gate", "GateTraining", "Mixture", "balance_loss", "split_last_linear", "train_gate"]


class Gate(nn.Module):
    def __init__(self, features: int, experts: int, hidden: int, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())
        self.net: nn.Module = (nn.Linear(features, experts) if hidden == 0 else
                               nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, experts)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features.flatten(1).float() - self.mean) / self.std)


def split_last_linear(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, nn.Linear]:
    """(trunk, head) with ``head(trunk(x)) == model(x)`` bit for bit: a copy of ``model`` whose
    last ``nn.Linear`` is an ``nn.Identity``, and that Linear. Refused (ConfigError) when the
    model's output is not its last Linear's (something comes after it)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("gate_input: 'embedding' is the input of the generalist's last nn.Linear, and its model "
                          "has none; use gate_input 'inputs'")
    trunk = copy.deepcopy(model)
    head = copy.deepcopy(trunk.get_submodule(names[-1]))
    trunk.set_submodule(names[-1], nn.Identity())
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        whole, parts = model(example), head(trunk(example))
    if not isinstance(whole, torch.Tensor) or whole.shape != parts.shape or not torch.equal(whole, parts):
        raise ConfigError(f"gate_input: 'embedding' needs a model whose output is its last nn.Linear's "
                          f"({names[-1]!r}), and this one computes more after it; use gate_input 'inputs'")
    return trunk, head


class Mixture(nn.Module):
    """The gate and the experts as one module: ``forward(x)`` gives logits-like outputs
    [batch, classes] (see the module docstring); ``route(x)`` the gate's probabilities."""

    def __init__(self, gate: Gate, experts: list[nn.Module], routing: str,
                 embedding: tuple[nn.Module, nn.Linear] | None = None) -> None:
        super().__init__()
        if routing not in ("top1", "soft"):
            raise ConfigError(f"routing must be 'top1' or 'soft', got {routing!r}")
        self.gate, self.routing = gate, routing
        # With the embedding, the generalist is held as trunk and head (its output is head(trunk(x))).
        self.trunk: nn.Module | None = embedding[0] if embedding is not None else None
        self.head: nn.Linear | None = embedding[1] if embedding is not None else None
        self.experts = nn.ModuleList(experts[1:] if embedding is not None else experts)
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.gate.parameters():
            p.requires_grad_(True)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate scores [batch, experts], the experts' logits [batch, experts, classes])."""
        if self.trunk is not None and self.head is not None:
            embedding = self.trunk(x)
            outputs = [self.head(embedding)] + [expert(x) for expert in self.experts]
            features = embedding
        else:
            outputs = [expert(x) for expert in self.experts]
            features = x
        return self.gate(features), torch.stack(outputs, dim=1)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.scores(x)[0], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, logits = self.scores(x)
        if self.routing == "top1":
            choice = F.one_hot(scores.argmax(dim=1), logits.shape[1]).to(logits.dtype)
            return torch.einsum("be,bec->bc", choice, logits)
        mixed = torch.einsum("be,bec->bc", F.softmax(scores.float(), dim=1), F.softmax(logits.float(), dim=2))
        return torch.log(mixed.clamp_min(torch.finfo(mixed.dtype).tiny))


def balance_loss(probabilities: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss for a batch of gate probabilities [batch, experts]:
    1 when routing is uniform, up to ``experts`` when every sample goes to one expert."""
    experts = probabilities.shape[1]
    share = F.one_hot(probabilities.argmax(dim=1), experts).float().mean(dim=0)
    return experts * (share * probabilities.mean(dim=0)).sum()


@dataclass
class GateTraining:
    losses: list[float]  # the mixture's negative log-likelihood, every step
    balance: list[float]  # the load-balancing loss, every step
    flops_per_sample: float = 0.0  # one training step of the gate, per sample (set by the caller)


def train_gate(gate: Gate, features: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor, *,
               steps: int, batch_size: int, lr: float, balance: float, seed: int) -> GateTraining:
    """Train ``gate`` on precomputed ``features`` [n, ...], the experts' log-probabilities
    [n, experts, classes] and class ``targets`` [n] (Adam, batches drawn with ``seed``)."""
    n = features.shape[0]
    if n == 0:
        raise ConfigError("data: the held-out data is empty; the gate needs samples to learn routing on")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    at_label = log_probs.gather(2, targets.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1)).squeeze(2)
    losses, balances = [], []
    gate.train()
    for _ in range(steps):
        chosen = torch.randint(n, (min(batch_size, n),), generator=generator).to(features.device)
        probabilities = F.softmax(gate(features[chosen]), dim=1)
        nll = -torch.logsumexp(torch.log(probabilities.clamp_min(1e-12)) + at_label[chosen], dim=1).mean()
        aux = balance_loss(probabilities)
        loss = nll + balance * aux if balance > 0 else nll
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(nll.detach())
        balances.append(aux.detach())
    gate.eval()
    return GateTraining(losses=torch.stack(losses).tolist(), balance=torch.stack(balances).tolist())
