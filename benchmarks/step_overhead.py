"""Per-step overhead of On The Fly, measured in interleaved blocks.

On a shared machine whose speed drifts by tens of percent from one second to the next, whole-run
timings cannot resolve a 1-3 % difference. Here the same batches (preloaded, so data loading is
out of the picture) are trained in alternating blocks of steps: a plain PyTorch step, then an On
The Fly step (per-sample loss, margin and prediction recorded, flushes and writer threads
running), block after block. Each pair of neighbouring blocks sees the same machine; the median of
the per-pair ratios is printed as the last line, ``ratio: X.XXX``. The same is first done for
plain against plain (a second, identical model): that control ratio is this machine's noise floor.

    .venv/bin/python benchmarks/step_overhead.py [--blocks 60] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from overhead import make_data, make_model, pin_allocator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    pin_allocator()  # see overhead.py: without it the control ratio read 0.84 (IQR 0.75-1.25)
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-bench-"))
    from onthefly import Trainer

    data = make_data(60_000)
    batches = list(DataLoader(data, batch_size=args.batch, shuffle=True))
    indices = np.arange(args.batch, dtype=np.int64)

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    ours = make_model()
    trainer = Trainer(model=ours, optimizer=torch.optim.Adam(ours.parameters(), lr=1e-3),
                      loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(data, batch_size=args.batch),
                      project="bench", run_name="steps", progress=False, device="cpu")
    run = trainer.run
    run.recorder.begin_epoch(run.run_id, "train", 0)

    twin = make_model()
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)

    def plain_block(start: int, net: nn.Module = model, optimizer: torch.optim.Optimizer = opt) -> float:
        t = time.perf_counter()
        for x, y in batches[start : start + args.steps]:
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            optimizer.step()
        return time.perf_counter() - t

    def twin_block(start: int) -> float:
        return plain_block(start, twin, twin_opt)

    def ours_block(start: int) -> float:
        t = time.perf_counter()
        for x, y in batches[start : start + args.steps]:
            run._indices = indices[: len(y)]  # what run.batches() sets from the sampler
            trainer._train_step((x, y), boundary=True)
        return time.perf_counter() - t

    span = len(batches) - args.steps

    def interleave(other: object) -> list[float]:
        ratios = []
        for block in range(args.blocks):
            start = (block * args.steps) % span
            if block % 2 == 0:
                base, mine = plain_block(start), other(start)  # type: ignore[operator]
            else:
                mine, base = other(start), plain_block(start)  # type: ignore[operator]
            ratios.append(mine / base)
        return ratios

    control = interleave(twin_block)
    ratios = interleave(ours_block)
    run.close()
    for name, values in (("control (plain vs plain)", control), ("onthefly vs plain", ratios)):
        q1, q3 = np.percentile(values, [25, 75])
        print(f"{name}: median {statistics.median(values):.3f}, interquartile range {q1:.3f}-{q3:.3f}")
    print(f"blocks: {args.blocks} x {args.steps} steps, torch threads: {torch.get_num_threads()}")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
