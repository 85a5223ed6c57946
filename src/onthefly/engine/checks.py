"""Checks on what a training loop hands the engine: fail at the first step, not an hour later.

Training thread. The first step is checked thoroughly (one deliberate host sync, to see a
non-finite loss at once); later steps only by host metadata (shapes), which costs no sync.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DataError, LossError
from ..signals.per_sample import is_classification
from ..signals.recorder import Indices

__all__ = ["check_first_step", "check_step_shapes", "non_finite_error"]


def check_first_step(per: Any, indices: Indices | None, logits: Any, targets: Any) -> bool:
    """Check the first step's per-sample losses; returns whether the task is classification."""
    if not isinstance(per, torch.Tensor) or per.ndim != 1:
        shape = tuple(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__
        raise LossError(
            f"step() needs one loss per sample (a 1-D tensor), got {shape}. Compute the loss with "
            "reduction='none', e.g. F.cross_entropy(logits, y, reduction='none')."
        )
    if indices is not None and len(indices) == 1 and per.shape[0] > 1:
        raise DataError(
            f"the DataLoader drew one dataset index for a batch of {per.shape[0]} samples: with "
            "batch_size=None (automatic batching off) each index must give one sample, so On The Fly "
            "cannot tell which samples a batch returned whole by the dataset holds. Let the DataLoader "
            "batch (batch_size=... or batch_sampler=...); a dataset can fetch a whole batch of indices "
            "at once with __getitems__."
        )
    if indices is not None and len(indices) != per.shape[0]:
        raise LossError(
            f"step() got {per.shape[0]} per-sample losses for a batch of {len(indices)} samples; "
            "pass one loss per sample (reduction='none')."
        )
    # One deliberate host sync, on the first step only: fail now, not an hour later.
    if not bool(torch.isfinite(per).all()):
        raise LossError(
            "the loss is not finite (NaN or inf) at the very first step. Check the data for "
            "NaN/inf values and the model's initialisation, and lower the learning rate."
        )
    return logits is not None and is_classification(logits, targets)


def check_step_shapes(per: torch.Tensor, indices: Indices | None, loss: Any) -> None:
    """Every later step: shapes are host metadata, so this costs no sync."""
    if per.ndim != 1 or (indices is not None and len(indices) != per.shape[0]):
        raise LossError(
            f"step() got per-sample losses of shape {tuple(per.shape)} for a batch of "
            f"{'?' if indices is None else len(indices)} samples; pass one loss per sample "
            "(a 1-D tensor, reduction='none')."
        )
    if loss is not None and (not isinstance(loss, torch.Tensor) or loss.numel() != 1):
        raise LossError(
            f"step(loss=...) must be the scalar loss you backpropagated, got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}."
        )


def non_finite_error(step: int, count: int) -> LossError:
    return LossError(
        f"the loss became non-finite (NaN or inf) for {count} sample(s) at step {step}. "
        "Lower the learning rate, clip gradients (grad_clip=1.0), or check the data for "
        "NaN/inf values; the session keeps everything up to this point."
    )
