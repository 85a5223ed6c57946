"""Training-time overhead of On The Fly against a plain PyTorch loop.

An MLP on 60k synthetic samples, trained as a plain hand-written loop and through On The Fly
(per-sample loss, margin, prediction recorded for every sample; store writer running), in one
process. The runs are sandwiched, plain first and last: P O P O ... O P. Each On The Fly run is
compared with the mean of the plain runs just before and after it, which cancels a machine whose
speed drifts steadily; the ratio of neighbouring plain runs shows the drift that remains (the
noise floor). Prints the median ratio On The Fly / plain as the last line: ``ratio: X.XXX``.

The allocator is pinned first (``--default-malloc`` leaves it alone). glibc's malloc adapts its
trim and mmap thresholds to the allocations it has seen, and whether a loop then returns its
heap to the kernel and faults it back in every step depends on that history: a 2-epoch run here
took anywhere from 0 to 450,000 page faults (about 4 us each on this VM, up to 1.8 s of a 6 s
run), plain and On The Fly alike, varying from run to run and process to process. Pinned
thresholds (what ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` set, and what PyTorch's
advice to use jemalloc or tcmalloc for CPU training achieves) take that lottery out of both
loops. Each run prints its page faults.

    .venv/bin/python benchmarks/overhead.py [--repeats 15] [--epochs 2] [--dashboard] [--threads N]
                                            [--default-malloc]

``--dashboard`` attaches the dashboard server and a WebSocket client that streams every update
while On The Fly trains. ``--health`` measures the continuous health checks instead: On The Fly
with the gradient monitor (``health.attach(trainer, continuous=True)``: every step's gradient norm
and AMP overflows kept on the device, read every 100 steps) against On The Fly without it, in the
same sandwich; ``--health-every N`` adds a full check-up every N steps.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import statistics
import tempfile
import threading
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(samples: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 784, generator=gen)
    y = (x[:, :10] * torch.arange(1, 11)).argmax(dim=1)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def pin_allocator() -> bool:
    """Fix glibc malloc's trim and mmap thresholds (see the module docstring); False elsewhere."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Timing:
    """Wall-clock seconds and CPU seconds of the whole process (every thread, ours included),
    and the page faults it took.

    Each timed run starts from a collected heap: a full garbage collection (~0.3 s here, with
    torch, numpy and pyarrow loaded) would otherwise land in whichever run happened to trigger it.
    """

    def __init__(self) -> None:
        gc.collect()
        self.faults = page_faults()
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def stop(self) -> tuple[float, float, int]:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return wall, cpu, page_faults() - self.faults


def plain(data: TensorDataset, epochs: int, batch: int) -> tuple[float, float, int]:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    timing = Timing()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
    return timing.stop()


def _stream(url: str, stop: threading.Event) -> None:
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://").replace("/?token=", "/api/stream?token=")
    with connect(ws_url) as socket:
        while not stop.is_set():
            try:
                socket.recv(timeout=0.5)
            except TimeoutError:
                continue


def onthefly(data: TensorDataset, epochs: int, batch: int, dashboard: bool = False, monitor: bool = False,
             health_every: int | None = None) -> tuple[float, float, int]:
    from onthefly import Trainer
    from onthefly.launch import attach_dashboard

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    trainer = Trainer(model=model, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), train_loader=loader,
                      project="bench", run_name="overhead", progress=False, device="cpu")
    if monitor or health_every:
        from onthefly.actions import health

        health.attach(trainer, continuous=monitor, every_steps=health_every)
    server, stop, client = None, threading.Event(), None
    if dashboard:
        server = attach_dashboard(trainer.run)
        client = threading.Thread(target=_stream, args=(server.url, stop), daemon=True)
        client.start()
    timing = Timing()
    trainer.fit(epochs)
    elapsed = timing.stop()
    if server is not None and client is not None:
        stop.set()
        client.join(10)
        server.stop()
    return elapsed


def median_interval(values: list[float], draws: int = 10_000) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median: how far the printed median could be from the truth."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(values, size=(draws, len(values))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15, help="On The Fly runs (plain runs: one more)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run")
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dashboard", action="store_true", help="with a dashboard client streaming")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's adaptive thresholds on")
    parser.add_argument("--health", action="store_true",
                        help="On The Fly with continuous health checks against On The Fly without them")
    parser.add_argument("--health-every", type=int, default=None, help="with --health: a check-up every N steps")
    args = parser.parse_args()
    pinned = not args.default_malloc and pin_allocator()
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-bench-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.samples)

    def baseline(data: TensorDataset, epochs: int, batch: int) -> tuple[float, float, int]:
        return onthefly(data, epochs, batch) if args.health else plain(data, epochs, batch)

    def ours_run(data: TensorDataset, epochs: int, batch: int) -> tuple[float, float, int]:
        return onthefly(data, epochs, batch, args.dashboard, monitor=args.health, health_every=args.health_every)

    baseline(data, 1, args.batch)  # warm-up: allocator, kernels, imports
    ours_run(data, 1, args.batch)
    gc.collect()
    gc.freeze()  # what was loaded so far is never garbage: keep it out of every later collection
    before = baseline(data, args.epochs, args.batch)
    wall, cpu, drift = [], [], []
    for i in range(args.repeats):
        ours = ours_run(data, args.epochs, args.batch)
        after = baseline(data, args.epochs, args.batch)
        wall.append(ours[0] / ((before[0] + after[0]) / 2))
        cpu.append(ours[1] / ((before[1] + after[1]) / 2))
        drift.append(after[0] / before[0])
        print(f"repeat {i + 1}: plain {before[0]:.3f} s, onthefly {ours[0]:.3f} s (cpu {ours[1]:.3f} s), "
              f"plain {after[0]:.3f} s  wall ratio {wall[-1]:.3f}  cpu ratio {cpu[-1]:.3f}  "
              f"page faults {ours[2]} / {after[2]}", flush=True)
        before = after
    q1, q3 = np.percentile(wall, [25, 75])
    low, high = median_interval(wall)
    d1, d3 = np.percentile(drift, [25, 75])
    print(f"steps per epoch: {len(DataLoader(data, batch_size=args.batch))}, epochs per run: {args.epochs}, "
          f"torch threads: {torch.get_num_threads()}{', dashboard client streaming' if args.dashboard else ''}"
          f"{', health monitor vs On The Fly without it' if args.health else ''}, "
          f"allocator: {'glibc thresholds pinned' if pinned else 'as it is'}")
    print(f"noise floor, plain / the plain run before it: median {statistics.median(drift):.3f}, "
          f"interquartile range {d1:.3f}-{d3:.3f}")
    print(f"median cpu-time ratio (all threads, background work included): {statistics.median(cpu):.3f}")
    print(f"wall ratio interquartile range: {q1:.3f}-{q3:.3f}; 95 % interval of the median (bootstrap): "
          f"{low:.3f}-{high:.3f}")
    print(f"ratio: {statistics.median(wall):.3f}")


if __name__ == "__main__":
    main()
