"""The CUDA paths in one short script, for a session lent a GPU machine (about a minute).

    python benchmarks/gpu_check.py            # prints one line per check, "ok" or what failed

1. **No added host syncs**: a Trainer step (forward, loss, backward, optimizer step, run.step's
   recording) under ``torch.cuda.set_sync_debug_mode("error")`` on the training thread, after
   warm-up; any synchronising call in it raises. Flushes (once a second, copies made
   ``non_blocking`` and awaited on the transfer thread) are kept out of the window.
2. **AMP**: float16 (with a GradScaler) and bfloat16 (without) train a few hundred steps to a
   finite, falling loss; per-sample losses recorded are finite.
3. **Gradient norms under AMP**: the continuous monitor's ``grad_norm`` series is finite and
   positive with float16 (unscaled) and bfloat16.
4. **Non-blocking copies**: with ``pin_memory=True`` the Trainer copies batches ``non_blocking``.
5. **Overhead on the GPU**: On The Fly against a plain loop, alternated (ratio printed).
6. **nccl DDP**: ``benchmarks/ddp_overhead.py`` on the GPUs there are (one rank per GPU).

On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly


def data(n: int = 32_768) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 256, generator=g)
    return TensorDataset(x, (x[:, :10] + 0.3 * torch.randn(n, 10, generator=g)).argmax(1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def trainer(amp: Any = False, **options: Any) -> onthefly.Trainer:
    net = model()
    return onthefly.Trainer(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
                            loss_fn=nn.CrossEntropyLoss(), project="gpu-check", run_name=f"amp-{amp}",
                            train_loader=DataLoader(data(), batch_size=256, shuffle=True, pin_memory=True),
                            device="cuda", amp=amp, progress=False, **options)


class SyncWindow(onthefly.Callback):
    """The sync debug mode on from one step's end to the next step's recording (flushes excluded)."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, run: onthefly.Run, batch: Any, outputs: Any, loss: Any) -> None:
        torch.cuda.set_sync_debug_mode(0)
        if run.global_step >= 20:
            self.checked += 1
            torch.cuda.set_sync_debug_mode("error")


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA here: nothing to check")
        return 0
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    results = []
    # 1. no added host syncs
    window = SyncWindow()
    t = trainer(callbacks=[window], max_steps=120)
    import onthefly.engine.run as run_module

    run_module.FLUSH_SECONDS = 3600.0  # flushes (awaited on the transfer thread) outside the window
    try:
        t.fit(1)
        results.append(check("no host sync in the step", window.checked > 50, f"{window.checked} steps checked"))
    except RuntimeError as exc:
        results.append(check("no host sync in the step", False, str(exc)[:300]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
        run_module.FLUSH_SECONDS = 1.0
    results.append(check("non-blocking copies with pin_memory", t.non_blocking))
    # 2-3. AMP float16 / bfloat16, gradient norms
    from onthefly.actions import health

    for amp in ("fp16", "bf16"):
        t = trainer(amp=amp, max_steps=300)
        health.attach(t, continuous=True, report_every=50)
        summary = t.fit(3)
        t.run.session.flush()
        reader = onthefly.open_session(t.run.session.dir)
        losses = reader.samples(t.run.run_id).column("loss").to_numpy()
        norms = [m["value"] for m in reader.metrics(t.run.run_id, "grad_norm")]
        first, last = losses[:2560].mean(), losses[-2560:].mean()
        results.append(check(f"AMP {amp}: finite falling loss", bool(torch.isfinite(torch.tensor(losses)).all())
                             and last < first, f"{first:.3f} -> {last:.3f}, {summary.steps} steps"))
        results.append(check(f"AMP {amp}: gradient norms", len(norms) >= 250 and all(0 < v < float("inf")
                                                                                      for v in norms),
                             f"{len(norms)} steps, median {statistics.median(norms):.3g}"))
    # 5. overhead against a plain loop, alternated
    times: dict[str, list[float]] = {"plain": [], "onthefly": []}
    for r in range(6):
        for name in (("plain", "onthefly") if r % 2 == 0 else ("onthefly", "plain")):
            net = model().cuda()
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
            loader = DataLoader(data(), batch_size=256, shuffle=True, pin_memory=True)
            torch.cuda.synchronize()
            began = time.perf_counter()
            if name == "plain":
                loss_fn = nn.CrossEntropyLoss()
                for x, y in loader:
                    x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn(net(x), y).backward()
                    optimizer.step()
            else:
                onthefly.Trainer(model=net, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), train_loader=loader,
                                 project="gpu-check", run_name="overhead", device="cuda", progress=False).fit(1)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - began)
    ratio = statistics.median(times["onthefly"]) / statistics.median(times["plain"])
    results.append(check("overhead on the GPU", ratio <= 1.05, f"ratio {ratio:.3f} (an epoch, median of 6, "
                                                                "set-up included)"))
    # 6. nccl DDP
    gpus = torch.cuda.device_count()
    command = [sys.executable, os.path.join(os.path.dirname(__file__), "ddp_overhead.py"), "--nproc", str(gpus),
               "--rounds", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    print(done.stdout[-600:], flush=True)
    results.append(check(f"nccl DDP on {gpus} GPU(s)", done.returncode == 0, done.stderr[-300:]))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
