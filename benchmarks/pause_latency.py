"""Pause latency: from the HTTP request to the engine's ``paused`` event.

A training run with the dashboard server attached is paused and resumed repeatedly over HTTP.
Prints the median latency, the median training step time measured in the same run, and the
target (one step + 100 ms) as the last line: ``pause latency: X ms (step Y ms, limit Z ms)``.

    .venv/bin/python benchmarks/pause_latency.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import httpx
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-bench-"))
    from onthefly import Trainer
    from onthefly.launch import attach_dashboard

    torch.manual_seed(0)
    x = torch.randn(60_000, 784)
    y = (x[:, :10]).argmax(dim=1)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    trainer = Trainer(model=model, optimizer=torch.optim.Adam(model.parameters()), loss_fn=nn.CrossEntropyLoss(),
                      train_loader=DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True),
                      project="bench", run_name="pause", progress=False, keep_alive=True)
    run = trainer.run
    server = attach_dashboard(run)
    changed = threading.Condition()
    seen: dict[str, float] = {}

    def on_event(event: object) -> None:
        kind = getattr(event, "kind", "")
        if kind == "status":
            with changed:
                seen[event.payload["status"]] = time.perf_counter()  # type: ignore[attr-defined]
                changed.notify_all()

    run.bus.subscribe(on_event)
    thread = threading.Thread(target=trainer.fit, args=(1000,), daemon=True)
    thread.start()
    client = httpx.Client(base_url=server.url.split("/?")[0], headers={"Authorization": f"Bearer {server.token}"})

    def wait_for(status: str, after: float) -> float:
        with changed:
            changed.wait_for(lambda: seen.get(status, 0) > after, timeout=30)
        return seen[status]

    wait_for("running", 0)
    latencies, steps = [], []
    for _ in range(args.repeats):
        step_before, t_before = run.global_step, time.perf_counter()
        while run.global_step < step_before + 20:  # let it run a little between pauses
            time.sleep(0.005)
        steps.append((time.perf_counter() - t_before) / (run.global_step - step_before))
        start = time.perf_counter()
        client.post("/api/runs/1/commands", json={"kind": "pause"}).raise_for_status()
        latencies.append(wait_for("paused", start) - start)
        resumed = time.perf_counter()
        client.post("/api/runs/1/commands", json={"kind": "resume"}).raise_for_status()
        wait_for("running", resumed)
    run.request("stop")
    thread.join(60)
    server.stop()
    latency, step = statistics.median(latencies), statistics.median(steps)
    print(f"pauses: {len(latencies)}, max latency {max(latencies) * 1e3:.1f} ms")
    print(f"pause latency: {latency * 1e3:.1f} ms (step {step * 1e3:.1f} ms, limit {(step + 0.1) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
