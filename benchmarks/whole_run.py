"""A user's whole training script, as a process: plain PyTorch against the same script with On The Fly.

The script trains an MLP (784-512-256-10) on 60k synthetic samples for 3 epochs with validation
after each, from ``python script.py`` to exit: imports, set-up, training, validation and shutdown
all count, as they do for a user. The two variants alternate (P O P O ...); every process is
timed from fork to exit and its peak resident memory read from the kernel (``wait4``'s
``ru_maxrss``). Prints per-pair ratios, the median wall ratio, the median peak memory of each
variant and their difference, and last ``ratio: X.XXX``.

    .venv/bin/python benchmarks/whole_run.py [--pairs 10] [--epochs 3] [--samples 60000]

On The Fly runs headless (``dashboard=False``), as a batch job would; its session goes to a
temporary ``ONTHEFLY_HOME``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    mode, epochs, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 784, generator=gen)
    y = (x[:, :10] * torch.arange(1, 11)).argmax(dim=1)
    train = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    val = DataLoader(TensorDataset(x[:10000], y[:10000]), batch_size=512)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    if mode == "plain":
        for _ in range(epochs):
            model.train()
            for xb, yb in train:
                opt.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                total = sum(loss_fn(model(xb), yb).item() * len(yb) for xb, yb in val)
            print(f"val loss {total / 10000:.4f}")
    else:
        from onthefly import quickstart
        quickstart(project="whole", run_name="run", model=model, optimizer=opt, loss_fn=loss_fn,
                   train_loader=train, val_loader=val, max_epochs=epochs, dashboard=False, progress=False)
""")


def run_once(script: Path, mode: str, epochs: int, samples: int, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), mode, str(epochs), str(samples)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(SCRIPT)
        env = {**os.environ, "ONTHEFLY_HOME": str(Path(tmp) / "home"), "ONTHEFLY_DASHBOARD": "0"}
        run_once(script, "plain", 1, 2048, env)  # warm the page cache for both
        run_once(script, "onthefly", 1, 2048, env)
        plain: list[tuple[float, float]] = []
        otf: list[tuple[float, float]] = []
        for pair in range(args.pairs):
            first, second = ("plain", "onthefly") if pair % 2 == 0 else ("onthefly", "plain")
            for mode in (first, second):
                result = run_once(script, mode, args.epochs, args.samples, env)
                (plain if mode == "plain" else otf).append(result)
            print(f"pair {pair + 1:2d}: plain {plain[-1][0]:6.2f} s {plain[-1][1]:6.0f} MiB | "
                  f"onthefly {otf[-1][0]:6.2f} s {otf[-1][1]:6.0f} MiB | ratio {otf[-1][0] / plain[-1][0]:.3f}",
                  flush=True)
    ratios = [o[0] / p[0] for p, o in zip(plain, otf, strict=True)]
    plain_mem = statistics.median(m for _, m in plain)
    otf_mem = statistics.median(m for _, m in otf)
    print(f"wall: plain median {statistics.median(w for w, _ in plain):.2f} s, "
          f"onthefly median {statistics.median(w for w, _ in otf):.2f} s")
    print(f"peak resident memory: plain {plain_mem:.0f} MiB, onthefly {otf_mem:.0f} MiB, "
          f"difference {otf_mem - plain_mem:+.0f} MiB (target: at most +64 MiB)")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
