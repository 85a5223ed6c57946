"""Low-rank adapters on ``nn.Linear`` layers, and freezing all but a model's head.

A fork that trains adapters keeps every original weight frozen and learns, for each Linear
layer, ``y = W x + b + (alpha / r) * B (A x)`` with ``A`` (r x in) and ``B`` (out x r, zero at
the start, so the adapted model begins exactly where its parent was). The adapters are what
adapter fusion merges later: ``adapter_state(model)`` gives them by layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LowRankAdapter", "adapter_state", "add_adapters", "train_head_only"]


class LowRankAdapter(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in (what a merged model uses)."""
        return self.base.weight + (self.lora_b @ self.lora_a) * self.scale


def add_adapters(model: nn.Module, rank: int) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` in a LowRankAdapter (in place) and freeze every
    other parameter. Returns the wrapped layers' names. Draws from torch's RNG (A's init)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layer to put adapters on; choose trains='all' or 'head'")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LowRankAdapter(getattr(owner, leaf), rank))
    return names


def adapter_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Layer name -> its adapter's A and B (copies), for every adapter in ``model``."""
    return {name: {"a": m.lora_a.detach().clone(), "b": m.lora_b.detach().clone()}
            for name, m in model.named_modules() if isinstance(m, LowRankAdapter)}


def train_head_only(model: nn.Module) -> str:
    """Freeze every parameter but those of the last module (in definition order) that has its
    own; returns that module's name."""
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    if not owners:
        raise ValueError("the model has no parameters")
    head = owners[-1]
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(name == head)
    return head
