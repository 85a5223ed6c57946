"""Per-sample gradient norms by the Linear-layer identity, checked against explicit per-sample
gradients computed one sample at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.signals.grad_norm import GradNormTracker


def explicit_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|d loss_i / d theta| over the Linear layers' parameters, one sample at a time."""
    params = [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)]
    norms = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(norms)


class SequenceModel(nn.Module):
    """A Linear layer applied to every position of a sequence, then pooled."""

    def __init__(self, features: int, hidden: int, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(dim=1))


@pytest.mark.parametrize("model_kind", ["mlp", "sequence-ghost", "sequence-materialised"])
def test_identity_matches_explicit_per_sample_gradients(model_kind: str) -> None:
    torch.manual_seed(0)
    if model_kind == "mlp":
        model: nn.Module = toy_model()
        x = torch.randn(8, 20)
    elif model_kind == "sequence-ghost":  # T^2 <= in*out: the Gram-matrix form
        model, x = SequenceModel(6, 5), torch.randn(8, 4, 6)
    else:  # T^2 > in*out: the layer's per-sample gradient is formed
        model, x = SequenceModel(2, 2), torch.randn(8, 9, 2)
    y = torch.randint(0, 3, (8,))
    tracker = GradNormTracker(model)
    F.cross_entropy(model(x), y).backward()
    measured = tracker.take(1.0 / len(x))
    assert measured is not None
    assert tracker.take(1.0) is None  # nothing since the last take
    assert tracker.method.startswith("linear-identity: 2 Linear layer(s), 100%")
    tracker.remove()
    torch.testing.assert_close(measured, explicit_norms(model, x, y), rtol=1e-4, atol=1e-6)


def test_no_backward_no_norms_and_removed_hooks_cost_nothing() -> None:
    model = toy_model()
    tracker = GradNormTracker(model)
    with torch.no_grad():
        model(torch.randn(4, 20))  # evaluation: no hook on the outputs
    assert tracker.take(1.0) is None
    tracker.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_model_without_linear_layers_uses_the_output_gradient() -> None:
    model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Flatten())  # [B, 1, 5] -> [B, 9]
    tracker = GradNormTracker(model)
    x = torch.randn(4, 1, 5, requires_grad=False)
    out = model(x)
    y = torch.randint(0, 9, (4,))
    F.cross_entropy(out, y).backward()
    measured = tracker.take(1.0 / 4)
    assert tracker.method.startswith("output-gradient")
    expected = (torch.softmax(out.detach(), 1) - F.one_hot(y, 9)).norm(dim=1)
    torch.testing.assert_close(measured, expected)


def test_trainer_records_exact_norms_per_index_with_accumulation() -> None:
    data = toy_data(n=64)
    model = toy_model()
    # lr=0: the model never changes, so each stored norm can be recomputed from its index.
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    summary = onthefly.Trainer(
        model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), project="gn", run_name="r",
        train_loader=DataLoader(data, batch_size=16, shuffle=True), accumulate_grad_batches=2,
        grad_norm=True, progress=False,
    ).fit(1)
    session = onthefly.open_session(summary.session_dir)
    assert session.runs()[0]["config"]["grad_norm"].startswith("linear-identity")
    table = session.samples(summary.run_id).sort_by("index")
    x, y = data.tensors
    expected = explicit_norms(model, x, y).detach().numpy()
    np.testing.assert_allclose(table.column("grad_norm").to_numpy(), expected, rtol=1e-4, atol=1e-6)


def test_grad_norm_column_is_empty_when_off() -> None:
    model = toy_model()
    summary = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        project="gn", run_name="off", train_loader=DataLoader(toy_data(n=32), batch_size=8), progress=False,
    ).fit(1)
    assert all(not m._forward_hooks for m in model.modules())
    table = onthefly.open_session(summary.session_dir).samples(summary.run_id)
    assert np.isnan(table.column("grad_norm").to_numpy()).all()
    assert onthefly.open_session(summary.session_dir).runs()[0]["config"]["grad_norm"] is None
