from __future__ import annotations

import torch
from torch import nn

from onthefly.actions.flops import FlopCount, count, forward_flops, train_step_flops

BATCH, D_IN, D_HID, D_OUT = 4, 8, 16, 3
# FlopCounterMode's convention: a (m x k) @ (k x n) product is 2*m*n*k FLOPs; addmm's bias is free.
FIRST_FORWARD = 2 * BATCH * D_IN * D_HID      # addmm: x (4x8) @ W1^T (8x16)
SECOND_FORWARD = 2 * BATCH * D_HID * D_OUT    # addmm: h (4x16) @ W2^T (16x3)
FORWARD = FIRST_FORWARD + SECOND_FORWARD      # 1024 + 384
# Backward of out = h @ W2^T + b2 and h1 = x @ W1^T + b1, as autograd executes it:
GRAD_H = 2 * BATCH * D_OUT * D_HID            # mm: dOut (4x3) @ W2 (3x16)
GRAD_W2 = 2 * D_OUT * BATCH * D_HID           # mm: dOut^T (3x4) @ h (4x16)
GRAD_W1 = 2 * D_HID * BATCH * D_IN            # mm: dH1^T (16x4) @ x (4x8); x needs no gradient
BACKWARD = GRAD_H + GRAD_W2 + GRAD_W1         # 384 + 384 + 1024; bias grads are sums (zero FLOPs)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.ReLU(), nn.Linear(D_HID, D_OUT))


def test_forward_matches_the_hand_count() -> None:
    flops = forward_flops(mlp(), torch.randn(BATCH, D_IN))
    assert flops.total == FORWARD == 1408
    assert flops.by_op == {"aten.addmm": FORWARD}
    assert "aten.relu" in flops.zero_ops
    assert "aten.t" not in flops.zero_ops  # a view
    assert list(flops.zero_ops) == sorted(set(flops.zero_ops))


def test_train_step_counts_forward_and_backward() -> None:
    flops = train_step_flops(mlp(), lambda out: out.sum(), torch.randn(BATCH, D_IN))
    assert flops.total == FORWARD + BACKWARD == 3200
    assert flops.by_op == {"aten.addmm": FORWARD, "aten.mm": BACKWARD}
    assert {"aten.relu", "aten.threshold_backward", "aten.sum"} <= set(flops.zero_ops)
    assert "aten.mm" not in flops.zero_ops


def test_train_step_leaves_gradients_unchanged() -> None:
    model = mlp()
    x = torch.randn(BATCH, D_IN)
    model(x).pow(2).sum().backward()
    model[2].bias.grad = None  # one parameter without a gradient stays without one
    before = {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}
    train_step_flops(model, lambda out: out.sum(), x)
    for name, p in model.named_parameters():
        grad, values = before[name]
        assert p.grad is grad
        if values is not None:
            assert p.grad is not None and torch.equal(p.grad, values)


def test_count_runs_any_callable() -> None:
    a, b = torch.randn(5, 7), torch.randn(7, 2)
    flops = count(lambda: (a @ b).relu())
    assert flops.total == 2 * 5 * 7 * 2
    assert "aten.relu" in flops.zero_ops


def test_add_and_scaled() -> None:
    one = FlopCount(100, {"aten.mm": 60, "aten.addmm": 40}, ("aten.relu",))
    two = FlopCount(30, {"aten.mm": 30}, ("aten.add", "aten.relu"))
    both = one + two
    assert both == FlopCount(130, {"aten.mm": 90, "aten.addmm": 40}, ("aten.add", "aten.relu"))
    assert one.by_op == {"aten.mm": 60, "aten.addmm": 40}  # operands untouched
    assert one.scaled(2.5) == FlopCount(250, {"aten.mm": 150, "aten.addmm": 100}, ("aten.relu",))
    assert FlopCount(3, {"aten.mm": 3}, ()).scaled(1 / 3).total == 1
    assert both.to_json() == {"total": 130, "by_op": {"aten.mm": 90, "aten.addmm": 40},
                              "zero_ops": ["aten.add", "aten.relu"]}
