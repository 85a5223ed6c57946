"""A loop of its own under torchrun (run by tests/test_ddp.py): start_run, the model in the user's
DistributedDataParallel, the loader given to run.batches() as is. DDP_UNWRAPPED=1: the model is
not wrapped (start_run must refuse it)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import onthefly


def main() -> int:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    data = load_digits()
    dataset = TensorDataset(torch.tensor(data.data[:600] / 16.0, dtype=torch.float32),
                            torch.tensor(data.target[:600], dtype=torch.long))
    model: nn.Module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if os.environ.get("DDP_UNWRAPPED") != "1":
        model = DistributedDataParallel(model)
    loader = DataLoader(dataset, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    with onthefly.start_run(project="ddp", run_name="custom", model=model, optimizer=optimizer,
                            dashboard=False) as run:
        for _ in run.epochs(2):
            for x, y in run.batches(loader):
                losses = F.cross_entropy(model(x), y, reduction="none")
                optimizer.zero_grad()
                losses.mean().backward()
                optimizer.step()
                run.step(losses, logits=None, targets=y)
    return 0


if __name__ == "__main__":
    sys.exit(main())
