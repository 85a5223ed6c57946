"""On The Fly under torchrun against the same plain DDP loop, alternated in one run.

    python benchmarks/ddp_overhead.py [--rounds 5] [--epochs 4] [--nproc 2]

Starts itself under ``torchrun --standalone`` (gloo on the CPU; nccl when CUDA is there). Each
round trains the same model on the same data twice, once with a plain DDP loop (DistributedSampler,
DistributedDataParallel, SGD, zero_grad/backward/step) and once with ``onthefly.Trainer`` (which
wraps it the same way, records every sample's loss and margin, and broadcasts the command word about
every 50 ms), in alternating order. The figure is the time of an epoch after the first (warm-up)
epoch, median over epochs and rounds; printed: both, and their ratio (target <= 1.05).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SAMPLES, FEATURES, CLASSES, BATCH = 16_384, 128, 10, 128


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = (x[:, :CLASSES] + 0.5 * torch.randn(SAMPLES, CLASSES, generator=g)).argmax(1)
    return TensorDataset(x, y)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, CLASSES))


def loader(dataset: TensorDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))


def plain(dataset: TensorDataset, epochs: int, device: torch.device) -> list[float]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler

    net = model().to(device)
    ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), seed=0)
    batches = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    ends = [time.perf_counter()]
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(ddp(x), y).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(ends[1:])]  # epochs after the first


def onthefly_run(dataset: TensorDataset, epochs: int, device: torch.device) -> list[float]:
    import onthefly

    ends: list[float] = []

    class Clock(onthefly.Callback):
        def on_fit_start(self, run: onthefly.Run) -> None:
            ends.append(time.perf_counter())

        def on_epoch_end(self, run: onthefly.Run) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    net = model()
    trainer = onthefly.Trainer(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                               loss_fn=nn.CrossEntropyLoss(), train_loader=loader(dataset), project="bench-ddp",
                               run_name="otf", progress=False, callbacks=[Clock()], device=device)
    trainer.fit(epochs)
    return [b - a for a, b in itertools.pairwise(ends[1:])]


def worker(rounds: int, epochs: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dataset = data()
    times: dict[str, list[float]] = {"plain": [], "onthefly": []}
    for r in range(rounds):
        order = ["plain", "onthefly"] if r % 2 == 0 else ["onthefly", "plain"]
        for name in order:
            run = plain if name == "plain" else onthefly_run
            times[name] += run(dataset, epochs, device)
            dist.barrier()
    if dist.get_rank() == 0:
        base, ours = statistics.median(times["plain"]), statistics.median(times["onthefly"])
        steps = SAMPLES // dist.get_world_size() // BATCH
        print(f"{dist.get_world_size()} ranks ({dist.get_backend()}, {device.type}), {steps} steps an epoch, "
              f"{rounds} rounds x {epochs - 1} timed epochs")
        print(f"plain DDP loop      {base * 1000:8.1f} ms an epoch ({base / steps * 1e3:.2f} ms a step)")
        print(f"On The Fly (DDP)    {ours * 1000:8.1f} ms an epoch ({ours / steps * 1e3:.2f} ms a step)")
        print(f"ratio               {ours / base:8.3f}  (target <= 1.05)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args.rounds, args.epochs)
        return
    env = {**os.environ, "ONTHEFLY_DASHBOARD": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               __file__, "--rounds", str(args.rounds), "--epochs", str(args.epochs)]
    sys.exit(subprocess.call(command, env=env))


if __name__ == "__main__":
    main()
