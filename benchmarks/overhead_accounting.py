"""What On The Fly itself costs, accounted for instead of inferred from noisy wall-clock ratios.

On a shared VM whose speed drifts by tens of percent within seconds (a plain-vs-plain control of
`step_overhead.py` spreads over 0.76-1.28), a whole-run ratio cannot resolve a 3 % target. This
benchmark measures the engine's own work directly, in the same run as the training it observes:

* on the training thread: the time a step spends in the engine, measured around each call: all of
  ``Trainer._train_step`` but the step itself (``compute_step``: forward, loss, backward, optimizer
  step) - recording the step (copies of outputs and targets, bookkeeping, command checks, and at
  each flush deriving the per-sample values of every kept row), the replay log, hooks - plus
  moving the batch; the loader's wrapper (a copy of each batch's index list) is not counted;
* on the engine's threads: their CPU time (``onthefly-transfer`` hands NumPy arrays on,
  ``onthefly-store`` writes Parquet and SQLite), read from /proc per thread.

It prints both as a share of the training time, and their sum as an upper bound of the overhead
(upper: background work only slows training when it competes for a core). It cannot see
contention that costs nobody CPU time - e.g. a torch operation on a second thread, which once made
OpenMP's workers sleep between parallel regions and training 1.28x slower while this bound read
1.025 - so `overhead.py` remains the measurement of record. Last line:
``ratio: X.XXX`` = 1 + that bound. Linux only (/proc).

    .venv/bin/python benchmarks/overhead_accounting.py [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from overhead import make_data, make_model


def thread_cpu(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=60_000)
    args = parser.parse_args()
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-bench-"))
    os.environ["ONTHEFLY_DASHBOARD"] = "0"
    torch.set_num_threads(args.threads)
    import onthefly

    model = make_model()
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(make_data(args.samples), batch_size=256, shuffle=True), project="bench",
        run_name="accounting", progress=False, device="cpu")
    run = trainer.run

    engine_time = 0.0
    steps = 0
    import onthefly.engine.trainer as trainer_module

    # A training step's own work is Trainer.compute_step (zero_grad, forward, loss, backward,
    # optimizer step); everything else in Trainer._train_step is the engine's (recording the step,
    # the replay log, command checks, hooks), and so is moving the batch inside compute_step.
    train_step, compute_step = trainer_module.Trainer._train_step, trainer_module.Trainer.compute_step
    inside = 0.0

    def timed_train_step(self: object, *a: object, **k: object) -> None:
        nonlocal engine_time, steps, inside
        inside = 0.0
        start = time.perf_counter()
        train_step(self, *a, **k)  # type: ignore[arg-type]
        engine_time += time.perf_counter() - start - inside
        steps += 1

    def timed_compute_step(self: object, *a: object, **k: object) -> object:
        nonlocal inside
        start = time.perf_counter()
        result = compute_step(self, *a, **k)  # type: ignore[arg-type]
        inside += time.perf_counter() - start
        return result

    trainer_module.Trainer._train_step = timed_train_step  # type: ignore[method-assign]
    trainer_module.Trainer.compute_step = timed_compute_step  # type: ignore[method-assign]
    to_device = trainer_module.to_device

    def timed_to_device(*a: object, **k: object) -> object:  # moving the batch (a no-op copy on CPU)
        nonlocal engine_time
        start = time.perf_counter()
        result = to_device(*a, **k)  # type: ignore[arg-type]
        engine_time += time.perf_counter() - start
        return result

    trainer_module.to_device = timed_to_device  # type: ignore[assignment]

    engine_threads: dict[str, float] = {}
    epoch_time = 0.0
    started = 0.0

    class Probe(onthefly.Callback):
        def on_epoch_start(self, run: onthefly.Run) -> None:
            nonlocal started
            started = time.perf_counter()

        def on_epoch_end(self, run: onthefly.Run) -> None:
            nonlocal epoch_time
            epoch_time += time.perf_counter() - started
            for thread in threading.enumerate():  # cumulative CPU time, read while they live
                if thread.name.startswith("onthefly-") and thread.native_id is not None:
                    engine_threads[thread.name] = thread_cpu(thread.native_id)

    probe = Probe()
    run.callbacks.append(probe)
    for hook in ("on_epoch_start", "on_epoch_end"):
        run._hooks[hook].append(probe)
    trainer.fit(args.epochs)

    background = sum(engine_threads.values())
    print(f"{args.epochs} epochs, {steps} steps, {epoch_time:.2f} s of epochs, torch threads {args.threads}")
    print(f"training thread, in the engine (a step but its own work): {engine_time * 1e3:.0f} ms "
          f"({engine_time / steps * 1e6:.0f} us a step) = {engine_time / epoch_time:.2%} of the epochs")
    for name, seconds in sorted(engine_threads.items()):
        print(f"thread {name}: {seconds * 1e3:.0f} ms CPU = {seconds / epoch_time:.2%} of the epochs")
    bound = (engine_time + background) / epoch_time
    print(f"upper bound of the overhead: {bound:.2%}")
    print(f"ratio: {1 + bound:.3f}")


if __name__ == "__main__":
    main()
