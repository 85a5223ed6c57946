"""Training-step time with per-sample gradient norms on against off, through ``Trainer``.

An MLP (784-512-512-10) on synthetic samples, batch 128, trained with ``grad_norm=True`` and
``grad_norm=False`` in trials rotated so that each comes first, second and third in turn. A third
trial per round trains with gradient norms off again: its ratio to the first (off against off) is
the control, this machine's noise floor. Only the epochs are timed (a callback's
``on_epoch_start``/``on_epoch_end``), not the session set-up, and the first epoch of each trial is
left out (allocator and kernel warm-up, the first-step checks). Prints per-trial times, the
median control ratio, and as the last line the median ratio on / off: ``ratio: X.XXX``.

    .venv/bin/python benchmarks/grad_norm.py [--repeats 5] [--epochs 3] [--samples 30000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from overhead import make_data

TARGET = 1.3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def train(data: TensorDataset, epochs: int, batch: int, grad_norm: bool) -> list[tuple[float, float]]:
    """(wall, cpu) seconds of each epoch: training batches only, there is no validation loader.
    CPU time is the whole process's (our writer and transfer threads included)."""
    from onthefly import Callback, Trainer
    from onthefly.store.samples import read_samples

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[tuple[float, float]] = []
            self._start = (0.0, 0.0)

        def on_epoch_start(self, run: Any) -> None:
            self._start = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, run: Any) -> None:
            self.seconds.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

    model = make_model()
    timer = EpochTimer()
    trainer = Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                      loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(data, batch_size=batch, shuffle=True),
                      project="bench", run_name=f"grad-norm-{'on' if grad_norm else 'off'}", progress=False,
                      device="cpu", grad_norm=grad_norm, callbacks=[timer])
    trainer.fit(epochs)
    if grad_norm:  # the norms were measured and stored, not silently skipped
        norms = read_samples(trainer.run.session.dir, trainer.run.run_id).column("grad_norm").to_numpy()
        assert np.isfinite(norms).all(), "grad_norm=True stored rows without a gradient norm"
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5, help="rounds of (off, on, off again)")
    parser.add_argument("--epochs", type=int, default=3, help="per trial; the first is not timed")
    parser.add_argument("--samples", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch of each trial is not timed")
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-bench-"))
    os.environ["ONTHEFLY_DASHBOARD"] = "0"
    torch.set_num_threads(args.threads)
    data = make_data(args.samples)
    train(data, 2, args.batch, grad_norm=True)  # warm-up: imports, allocator, kernels
    train(data, 2, args.batch, grad_norm=False)

    trials = {"off": lambda: train(data, args.epochs, args.batch, grad_norm=False),
              "on": lambda: train(data, args.epochs, args.batch, grad_norm=True),
              "off again": lambda: train(data, args.epochs, args.batch, grad_norm=False)}
    names = list(trials)
    ratios, controls, cpu_ratios, cpu_controls = [], [], [], []
    fastest: dict[str, float] = dict.fromkeys(names, float("inf"))  # the quickest epoch of each kind
    for i in range(args.repeats):
        # Rotate the order so a drift in machine speed favours no trial.
        order = names[i % 3:] + names[: i % 3]
        epochs = {name: trials[name]()[1:] for name in order}
        wall = {name: sum(e[0] for e in epochs[name]) for name in names}
        cpu = {name: sum(e[1] for e in epochs[name]) for name in names}
        for name in names:
            fastest[name] = min(fastest[name], *(e[0] for e in epochs[name]))
        ratios.append(wall["on"] / wall["off"])
        controls.append(wall["off again"] / wall["off"])
        cpu_ratios.append(cpu["on"] / cpu["off"])
        cpu_controls.append(cpu["off again"] / cpu["off"])
        print(f"repeat {i + 1} ({', '.join(order)}): off {wall['off']:.3f} s (cpu {cpu['off']:.3f} s)  "
              f"on {wall['on']:.3f} s (cpu {cpu['on']:.3f} s)  off again {wall['off again']:.3f} s "
              f"(cpu {cpu['off again']:.3f} s)  on/off {ratios[-1]:.3f}  control {controls[-1]:.3f}", flush=True)
    steps = len(DataLoader(data, batch_size=args.batch))
    print(f"timed: {args.epochs - 1} epoch(s) x {steps} steps per trial, batch {args.batch}, {args.samples} "
          f"samples, torch threads: {torch.get_num_threads()}")
    print(f"fastest epoch: off {fastest['off'] / steps * 1e3:.2f} ms/step, on {fastest['on'] / steps * 1e3:.2f} "
          f"ms/step, off again {fastest['off again'] / steps * 1e3:.2f} ms/step; on/off "
          f"{fastest['on'] / fastest['off']:.3f}, control {fastest['off again'] / fastest['off']:.3f}")
    for name, values in (("control (off again / off), wall", controls), ("control, cpu time", cpu_controls),
                         ("grad norms (on / off), cpu time", cpu_ratios), ("grad norms (on / off), wall", ratios)):
        q1, q3 = np.percentile(values, [25, 75])
        print(f"{name}: median {statistics.median(values):.3f}, interquartile range {q1:.3f}-{q3:.3f}")
    ratio = statistics.median(ratios)
    print(f"target on/off <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}")
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
