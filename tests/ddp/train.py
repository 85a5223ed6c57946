"""A training script run under torchrun by tests/test_ddp.py: quickstart on scikit-learn's digits,
unchanged from a single-process script, plus what a test asks for through the environment:

* DDP_COMMANDS: JSON {"step": [command, {args}], ...} requested on rank 0 after that step ("pause"
  is answered by a "resume" from another thread once the run is paused);
* DDP_EPOCHS, DDP_RESUME ("last" or a checkpoint folder), DDP_CHECKPOINT_AT (a step),
  DDP_IDLE=1 (rank 0 kept alive when planned training ends: one epoch more is asked for, then stop),
  DDP_CRASH_RANK / DDP_CRASH_STEP (that rank raises after that step), DDP_NUDGE_STEP (rank 1 alone
  changes a weight after that step), DDP_COUNT (a file each rank
  writes its count of On The Fly's collectives per step into), DDP_SEED;
* DDP_PLAN: JSON {"step": S, "slice": {definition}, "card": {plan card}}: after step S rank 0 saves
  the slice "hard" and proposes and approves the card (carried out on every rank);
* DDP_SLOW_WRITES (seconds: rank 1's disk is that slow for every per-sample part it writes) and
  DDP_ANNOUNCED (a file rank 0 writes, for each training epoch it announced, how many distinct
  samples of that epoch the session held across the ranks at that moment)."""

from __future__ import annotations

import json
import os
import sys
import threading

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly

RANK = int(os.environ["RANK"])
COLLECTIVES = [0]  # calls of torch.distributed's Python collectives (On The Fly's; DDP's own run in C++)


def count_collectives() -> None:
    import torch.distributed as dist

    for name in ("broadcast", "all_reduce", "all_gather", "broadcast_object_list", "all_gather_object", "barrier",
                 "reduce", "gather", "scatter"):
        original = getattr(dist, name)

        def counted(*args: object, _original: object = original, **kwargs: object) -> object:
            COLLECTIVES[0] += 1
            return _original(*args, **kwargs)  # type: ignore[operator]

        setattr(dist, name, counted)


def when(run: onthefly.Run, status: str, timeout: float = 120.0) -> None:
    """Wait (polling, with a deadline) until the run's status is ``status``."""
    import time

    deadline = time.monotonic() + timeout
    while run.status != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"rank {RANK}: the run never became {status!r} (it is {run.status!r})")
        time.sleep(0.01)


def more_then_stop(run: onthefly.Run) -> None:
    """Planned training done and idle (kept alive): one epoch more, then, idle again, stop."""
    when(run, "idle")
    run.request("train_more", epochs=1)
    when(run, "running")
    when(run, "idle")
    run.request("stop")


def resume_once_paused(run: onthefly.Run) -> None:
    when(run, "paused")  # the pause takes effect at the next step boundary
    run.request("resume")


ANNOUNCED: dict[int, int] = {}


def count_announced(run: onthefly.Run, event: object) -> None:
    """At each training epoch_summary (rank 0's writer thread): the epoch's samples across the ranks."""
    if getattr(event, "kind", None) == "epoch_summary" and event.payload.get("split") == "train":  # type: ignore[attr-defined]
        epoch = event.epoch  # type: ignore[attr-defined]
        table = onthefly.open_session(run.session.dir).samples(run.run_id, epoch=epoch)
        ANNOUNCED[epoch] = len(set(table.column("index").to_pylist()))
        with open(os.environ["DDP_ANNOUNCED"], "w") as f:
            json.dump(ANNOUNCED, f)


def slow_disk(seconds: float) -> None:
    import time

    from onthefly.store import samples

    original = samples.SampleSink._write

    def slowly(self: object, key: object) -> object:
        time.sleep(seconds)  # the disk this rank writes to is slow
        return original(self, key)  # type: ignore[arg-type]

    samples.SampleSink._write = slowly  # type: ignore[method-assign]


class Plan(onthefly.Callback):
    def __init__(self) -> None:
        self.commands = {int(k): v for k, v in json.loads(os.environ.get("DDP_COMMANDS", "{}")).items()}
        self.checkpoint_at = int(os.environ.get("DDP_CHECKPOINT_AT", "0"))
        self.crash = (int(os.environ.get("DDP_CRASH_RANK", "-1")), int(os.environ.get("DDP_CRASH_STEP", "0")))
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            self.crash = (-1, 0)  # the planted crash happens once, before torchrun's restart
        self.counts: list[int] | None = [] if os.environ.get("DDP_COUNT") else None
        self.plan = json.loads(os.environ.get("DDP_PLAN", "null"))

    def on_fit_end(self, run: onthefly.Run) -> None:
        if self.counts is not None:
            with open(f"{os.environ['DDP_COUNT']}.rank{RANK}.json", "w") as f:
                json.dump(self.counts, f)

    def on_fit_start(self, run: onthefly.Run) -> None:
        if RANK == 0 and os.environ.get("DDP_IDLE") == "1":
            threading.Thread(target=more_then_stop, args=(run,), daemon=True).start()
        if RANK == 0 and os.environ.get("DDP_ANNOUNCED"):
            run.bus.subscribe(lambda event: count_announced(run, event))

    def on_step_end(self, run: onthefly.Run) -> None:
        step = run.global_step
        if RANK == 0 and step in self.commands:
            kind, args = self.commands[step]
            run.request(kind, **args)
            if kind == "pause":
                threading.Thread(target=resume_once_paused, args=(run,), daemon=True).start()
        if RANK == 0 and self.plan is not None and step == self.plan["step"]:
            from onthefly.actions import fork, slices

            slices.save_run_slice(run, "hard", self.plan["slice"])
            fork.approve(run, fork.propose(run, self.plan["card"])["id"])
        if self.counts is not None:
            self.counts.append(COLLECTIVES[0])
        if step == self.checkpoint_at:
            run.save_checkpoint()
        if RANK == 1 and step == int(os.environ.get("DDP_NUDGE_STEP", "0")):
            with torch.no_grad():  # the planted bug: rank 1 alone changes a weight
                next(iter(run._objects.model.parameters()))[0, 1] += 1e-3
        if RANK == self.crash[0] and step == self.crash[1]:
            raise RuntimeError(f"planted crash on rank {RANK} at step {step}")


def main() -> int:
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)  # a hang shows where it is, then the rank exits
    if os.environ.get("DDP_COUNT"):
        count_collectives()
    if RANK == 1 and os.environ.get("DDP_SLOW_WRITES"):
        slow_disk(float(os.environ["DDP_SLOW_WRITES"]))
    torch.manual_seed(int(os.environ.get("DDP_SEED", "0")))
    data = load_digits()
    x = torch.tensor(data.data[:1001] / 16.0, dtype=torch.float32)  # 1001: the shares are uneven
    y = torch.tensor(data.target[:1001], dtype=torch.long)
    val = TensorDataset(torch.tensor(data.data[1200:1400] / 16.0, dtype=torch.float32),
                        torch.tensor(data.target[1200:1400], dtype=torch.long))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    summary = onthefly.quickstart(
        project="ddp", run_name="ddp", model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                                generator=torch.Generator().manual_seed(0)),
        val_loader=DataLoader(val, batch_size=100), max_epochs=int(os.environ.get("DDP_EPOCHS", "2")),
        dashboard=RANK == 0 and os.environ.get("DDP_DASHBOARD") == "1", progress=False, callbacks=[Plan()],
        resume_from=os.environ.get("DDP_RESUME") or None, autofork="off",
        keep_alive=True if os.environ.get("DDP_IDLE") == "1" and RANK == 0 else None)
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    out = os.environ.get("DDP_OUT")
    if out:
        with open(f"{out}.rank{RANK}.json", "w") as f:
            json.dump({"summary": {"status": summary.status, "steps": summary.steps, "train_loss": summary.train_loss,
                                   "session": str(summary.session_dir)}, "weights": weights}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
