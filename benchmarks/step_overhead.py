"""Per-step overhead of On The Fly, measured in interleaved blocks.

On a shared machine whose speed drifts by tens of percent from one second to the next, whole-run
timings cannot resolve a 1-3 % difference. Here the same batches (preloaded, so data loading is
out of the picture and the base is smaller than in a real loop) are trained in alternating blocks
of about a second: plain PyTorch steps, then On The Fly steps (per-sample loss, margin and
prediction recorded; flushes, transfer and store threads running), block after block. An On The
Fly block's time includes waiting until its engine threads have passed on and written everything
it produced (Parquet parts included), so none of its work spills into a plain block: their work
is counted as if it ran on the training thread - an upper bound. Each pair of neighbouring blocks
sees the same machine; the median of the per-pair ratios is printed as the last line,
``ratio: X.XXX``. The same is first done for plain against plain (a second, identical model):
that control ratio is this machine's noise floor. The allocator is pinned as in overhead.py.

    .venv/bin/python benchmarks/step_overhead.py [--blocks 40] [--steps 66]
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
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=66, help="steps per block (66: a flush interval here)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    pin_allocator()  # see overhead.py: without it the control ratio read 0.84 (IQR 0.75-1.25)
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-bench-"))
    from onthefly import Trainer

    data = make_data(60_000)
    batches = list(DataLoader(data, batch_size=args.batch, shuffle=True))
    # What a BatchSampler yields (lists of ints), as the engine's loader wrapper hands them over.
    index_lists = [list(range(i * args.batch, i * args.batch + len(y))) for i, (_, y) in enumerate(batches)]

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

    drains: list[float] = []

    def ours_block(start: int) -> float:
        t = time.perf_counter()
        for i in range(start, start + args.steps):
            run._indices = index_lists[i].copy()  # what run.batches() sets from the sampler
            trainer._train_step(batches[i], boundary=True)
        drained = time.perf_counter()
        run.recorder.wait_idle()  # everything this block produced is passed on ...
        run.session.flush()  # ... and written, before the next block starts
        drains.append(time.perf_counter() - drained)
        return time.perf_counter() - t

    span = len(batches) - args.steps

    def interleave(other: object) -> tuple[list[float], list[float]]:
        ratios, extra = [], []
        for block in range(args.blocks):
            start = (block * args.steps) % span
            if block % 2 == 0:
                base, mine = plain_block(start), other(start)  # type: ignore[operator]
            else:
                mine, base = other(start), plain_block(start)  # type: ignore[operator]
            ratios.append(mine / base)
            extra.append((mine - base) / args.steps)
        return ratios, extra

    control, control_extra = interleave(twin_block)
    ratios, extra = interleave(ours_block)
    run.close()
    for name, values, per_step in (("control (plain vs plain)", control, control_extra),
                                   ("onthefly vs plain", ratios, extra)):
        q1, q3 = np.percentile(values, [25, 75])
        print(f"{name}: median {statistics.median(values):.3f}, interquartile range {q1:.3f}-{q3:.3f}, "
              f"median difference {statistics.median(per_step) * 1e6:.0f} us a step")
    print(f"of which waiting for the engine's threads at the end of a block: median {statistics.median(drains) * 1e3:.1f} ms, "
          f"mean {statistics.mean(drains) * 1e3:.1f} ms ({statistics.mean(drains) / args.steps * 1e6:.0f} us a step)")
    print(f"blocks: {args.blocks} x {args.steps} steps, torch threads: {torch.get_num_threads()}")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
