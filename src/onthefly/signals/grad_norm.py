"""Per-sample gradient norms without per-sample gradients.

For an ``nn.Linear`` layer ``z = a W^T + b``, sample i's weight gradient is the outer product
``g_i a_i^T`` (``g_i`` = the gradient at the layer's output), so its squared Frobenius norm is
``|a_i|^2 |g_i|^2``, and the bias gradient's is ``|g_i|^2``: two row norms per layer, no [batch,
out, in] tensor. Inputs with extra dimensions (sequences: ``a_i`` is [T, in]) use the exact
"ghost norm" ``sum((A A^T) * (G G^T))`` when T^2 <= in*out, else the per-sample gradient of that
layer alone (``G^T A``). The squared norms of every Linear layer add up to the sample's norm over
those parameters.

Other layers (convolutions, norms, embeddings) are not covered: the reported ``method`` names the
share of trainable parameters the numbers cover. A model with no Linear layer falls back to the
norm of the loss gradient with respect to the model's outputs (``output-gradient``), a standard
proxy (it bounds the last layer's gradient up to the norm of its input).

Cost when off: nothing - no hook is registered. When on: one forward hook per Linear layer that
registers a gradient hook on its output; the norms stay on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GradNormTracker"]


class GradNormTracker:
    def __init__(self, model: nn.Module) -> None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)
                       and any(p.requires_grad for p in m.parameters(recurse=False))]
        self._sq: torch.Tensor | None = None
        if self.layers:
            covered = sum(p.numel() for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad)
            share = covered / trainable if trainable else 1.0
            others = sorted({type(m).__name__ for m in model.modules()
                             if not isinstance(m, nn.Linear)
                             and any(p.requires_grad for p in m.parameters(recurse=False))})
            self.method = (f"linear-identity: {len(self.layers)} Linear layer(s), {share:.0%} of trainable "
                           "parameters" + (f"; not covered: {', '.join(others)}" if others else ""))
            self._handles = [m.register_forward_hook(self._linear_forward) for m in self.layers]
        else:
            self.method = "output-gradient: no Linear layer, norm of the loss gradient at the model's outputs"
            self._handles = [model.register_forward_hook(self._output_forward)]

    def _add(self, sq: torch.Tensor) -> None:
        # Called from autograd (on CUDA, its device thread) during backward; take() runs after
        # backward() has returned, so there is no race.
        if self._sq is None or self._sq.shape != sq.shape:
            self._sq = sq
        else:
            self._sq = self._sq + sq

    def _linear_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        a = inputs[0].detach().float()
        weight = module.weight.requires_grad
        bias = module.bias is not None and module.bias.requires_grad
        if a.ndim == 2:
            a_sq = a.pow(2).sum(1) if weight else torch.zeros(a.shape[0], device=a.device)
            if bias:
                a_sq = a_sq + 1.0

            def hook(g: torch.Tensor) -> None:
                self._add(g.detach().float().pow(2).sum(1) * a_sq)
        else:
            seq_a = a.flatten(1, -2) if a.ndim > 3 else a  # [B, T, in]

            def hook(g: torch.Tensor) -> None:
                grads = g.detach().float()
                seq_g = grads.flatten(1, -2) if grads.ndim > 3 else grads  # [B, T, out]
                sq = torch.zeros(seq_g.shape[0], device=seq_g.device)
                if weight:
                    t, n_in, n_out = seq_a.shape[1], seq_a.shape[2], seq_g.shape[2]
                    if t * t <= n_in * n_out:
                        sq = sq + ((seq_a @ seq_a.mT) * (seq_g @ seq_g.mT)).sum((1, 2))
                    else:
                        sq = sq + (seq_g.mT @ seq_a).pow(2).sum((1, 2))
                if bias:
                    sq = sq + seq_g.sum(1).pow(2).sum(1)
                self._add(sq)

        output.register_hook(hook)

    def _output_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad \
                and output.ndim >= 1:
            output.register_hook(lambda g: self._add(g.detach().float().flatten(1).pow(2).sum(1)
                                                      if g.ndim > 1 else g.detach().float().pow(2)))

    def take(self, factor: float | torch.Tensor) -> torch.Tensor | None:
        """The norms gathered by the last backward pass, divided by ``factor`` (what the
        backpropagated loss was multiplied by relative to the sum of per-sample losses, e.g.
        1/batch for a mean). Stays on the device; None if no backward pass ran since last time."""
        sq, self._sq = self._sq, None
        if sq is None:
            return None
        return sq.sqrt() / factor

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
