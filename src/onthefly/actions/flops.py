"""Counting the FLOPs a forward pass or a training step executes, for benchmarks that compare
models by the work they do rather than by their parameter count.

The counting is PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``: it sees every aten
operator that runs (autograd's backward included) and applies a formula per operator. Its
convention is one multiply-add = 2 FLOPs: ``mm``/``addmm`` of (m x k) by (k x n) count
``2 * m * n * k`` and the bias add of ``addmm`` is not counted. Operators without a formula
(``relu``, ``add``, ``sum``, softmax...) count as zero; so that a total is never read as complete
when it is not, :class:`FlopCount` lists them in ``zero_ops``. They are recorded by a small
dispatch mode underneath the counter, which sees the operators the counter executes. Views are
left out of ``zero_ops`` by one rule: an operator whose schema marks an input as aliased and not
written (``OpOverload.is_view``: ``t``, ``view``, ``expand``, ``detach``...) does no arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCount", "count", "forward_flops", "train_step_flops"]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs in total and by operator (``"aten.addmm"``), and the operators that ran but count
    zero because FlopCounterMode has no formula for them (sorted)."""

    total: int
    by_op: dict[str, int]
    zero_ops: tuple[str, ...]

    def __add__(self, other: FlopCount) -> FlopCount:
        by_op = dict(self.by_op)
        for op, flops in other.by_op.items():
            by_op[op] = by_op.get(op, 0) + flops
        return FlopCount(self.total + other.total, by_op, tuple(sorted({*self.zero_ops, *other.zero_ops})))

    def scaled(self, k: float) -> FlopCount:
        """``k`` times the work (e.g. steps per epoch), each figure rounded to an integer."""
        return FlopCount(round(self.total * k), {op: round(f * k) for op, f in self.by_op.items()}, self.zero_ops)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "by_op": dict(self.by_op), "zero_ops": list(self.zero_ops)}


class _OpRecorder(TorchDispatchMode):
    """Notes the name of every non-view aten operator that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if isinstance(func, torch._ops.OpOverload) and not func.is_view:
            self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], object]) -> FlopCount:
    """Run ``fn()`` and count the FLOPs of what it executes (a forward, or forward and backward
    when ``fn`` calls ``backward``)."""
    counter = FlopCounterMode(display=False)
    recorder = _OpRecorder()
    # The recorder is entered first, so it sits below the counter: it sees the operators the
    # counter actually runs, after the counter has decomposed those it has no formula for.
    with recorder, counter:
        fn()
    by_op = {str(op): int(flops) for op, flops in counter.get_flop_counts().get("Global", {}).items()}
    counted = {op for op, flops in by_op.items() if flops > 0}
    return FlopCount(int(counter.get_total_flops()), by_op, tuple(sorted(recorder.ops - counted)))


def forward_flops(module: nn.Module, *args: Any, **kwargs: Any) -> FlopCount:
    """FLOPs of ``module(*args, **kwargs)`` without autograd. The module's mode is left as it is:
    put it in eval mode first to count what inference executes."""
    with torch.no_grad():
        return count(lambda: module(*args, **kwargs))


def train_step_flops(module: nn.Module, loss_of: Callable[[Any], torch.Tensor], *args: Any,
                     **kwargs: Any) -> FlopCount:
    """FLOPs of one training step without the optimizer: ``loss_of(module(*args, **kwargs))``
    and its backward. The parameters' ``.grad`` are left as they were."""

    def step() -> None:
        loss_of(module(*args, **kwargs)).backward()

    with _grads_restored(module), torch.enable_grad():
        return count(step)


@contextmanager
def _grads_restored(module: nn.Module) -> Iterator[None]:
    # Start from no gradient (so the count does not include accumulating into an old one) and put
    # back each parameter's own .grad tensor afterwards, even if the step raised.
    saved = [(p, p.grad) for p in module.parameters()]
    for p, _ in saved:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in saved:
            p.grad = grad
