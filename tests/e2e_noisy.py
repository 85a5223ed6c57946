"""The training script of tests/test_e2e_verify.py: scikit-learn's digits with 10 % of the labels
moved to the next class, through quickstart with its dashboard, long enough to act on while it runs."""

from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly


def main() -> int:
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    wrong = np.random.default_rng(0).choice(len(y), size=len(y) // 10, replace=False)
    y[wrong] = (y[wrong] + 1) % 10
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    onthefly.quickstart(project="noisy", run_name="digits", model=model,
                        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), loss_fn=nn.CrossEntropyLoss(),
                        train_loader=DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
                        max_epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 400, progress=False, autofork="off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
