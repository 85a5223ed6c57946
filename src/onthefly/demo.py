"""The demo: the quickstart's model and data, at a size that trains for about a minute."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .engine.trainer import FitSummary
from .launch import quickstart

__all__ = ["demo_data", "run_demo"]


def demo_data(samples: int = 60_000, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """The quickstart's toy task (is the sum of the first 50 features positive?), with a held-out
    validation and test set."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples + 8_192, 28 * 28, generator=gen)
    y = (x[:, :50].sum(dim=1) > 0).long()
    train = TensorDataset(x[:samples], y[:samples])
    val = TensorDataset(x[samples : samples + 4_096], y[samples : samples + 4_096])
    test = TensorDataset(x[samples + 4_096 :], y[samples + 4_096 :])
    return (
        DataLoader(train, batch_size=128, shuffle=True),
        DataLoader(val, batch_size=256),
        DataLoader(test, batch_size=256),
    )


def run_demo(epochs: int, *, samples: int = 60_000, seed: int = 0, **options: Any) -> FitSummary:
    torch.manual_seed(seed)
    train, val, test = demo_data(samples, seed)
    model = nn.Sequential(nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return quickstart(
        project="demo", run_name="baseline", model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(),
        train_loader=train, val_loader=val, test_loader=test, max_epochs=epochs, do_test_after=True,
        **options,
    )
