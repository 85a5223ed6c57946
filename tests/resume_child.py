"""The training that tests/test_resume.py checks, and the child processes it runs.

``train()`` is one small, RNG-sensitive run (shuffled loader, dropout, Adam, optionally StepLR)
through ``quickstart``. The test calls it in its own process for the uninterrupted reference, and
runs this file as a script for the runs that must live in processes of their own:

    python resume_child.py JOBS.json

JOBS.json is a list of jobs, run in order, each in a new process forked from this one (forked
right after the imports, before any training, so every job starts from a clean process; this
saves importing torch once per job). A job is a dict:

* ``{"mode": "interrupt", "home", "checkpoint", "at_step" or "at_epoch_end", "workers", "scheduler"}``:
  train, save a checkpoint to ``checkpoint`` at global step ``at_step`` (or in ``on_epoch_end`` of
  epoch ``at_epoch_end``) and end the process with ``os._exit(0)`` (no flush, no close, as when a
  job is killed).
* ``{"mode": "resume", "home", "checkpoint", "out", "workers", "scheduler"}``: resume from
  ``checkpoint``, train to the end and write ``out/model.safetensors``, ``out/optimizer.pt``
  (optimizer and scheduler state, tensors-only) and ``out/result.json``.

``home`` is the job's ONTHEFLY_HOME. The script exits with status 1 if any job failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly

SAMPLES = 200
BATCH = 16
BATCHES = 13  # per epoch: 12 of 16 samples and a last one of 8
EPOCHS = 3
FEATURES = 20
CLASSES = 3
LR = 1e-2
TRAIN_SEED = 1234  # torch's global RNG for training: shuffle order and dropout


def make_data(n: int = SAMPLES, seed: int = 0) -> TensorDataset:
    """Deterministic: sample i is the same tensor in every process and every loader worker."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    y = x[:, :CLASSES].argmax(dim=1).long()
    return TensorDataset(x, y)


def make_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    """Dropout makes every step depend on torch's global RNG."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, CLASSES)
    )


def make_loader(workers: int = 0, shuffle: bool = True) -> DataLoader:
    return DataLoader(make_data(), batch_size=BATCH, shuffle=shuffle, num_workers=workers)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR)


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    # step_size=2: the decay after epoch 1 only happens if the scheduler's own count was restored
    # (with step_size=1 the optimizer's restored lr alone would give the same schedule).
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)


class StepCounter(onthefly.Callback):
    """Counts optimizer steps (state saved in checkpoints); optionally checkpoints and dies, at
    global step ``at_step`` (in on_step_end) or in on_epoch_end of epoch ``at_epoch_end``."""

    def __init__(self, checkpoint: str | None = None, at_step: int | None = None,
                 at_epoch_end: int | None = None) -> None:
        self.steps = 0
        self.checkpoint = checkpoint
        self.at_step = at_step
        self.at_epoch_end = at_epoch_end

    def on_step_end(self, run: onthefly.Run) -> None:
        self.steps += 1
        if self.at_step is not None and run.global_step == self.at_step:
            self._checkpoint_and_die(run)

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if self.at_epoch_end is not None and run.epoch == self.at_epoch_end:
            self._checkpoint_and_die(run)

    def _checkpoint_and_die(self, run: onthefly.Run) -> None:
        run.save_checkpoint(self.checkpoint)  # returns once the files are written
        os._exit(0)  # abrupt: no close, no flush, no atexit

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


@dataclass
class Trained:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR | None
    summary: onthefly.FitSummary
    callback_steps: int


def train(
    *, workers: int = 0, scheduler: bool = False, checkpoint: str | None = None,
    interrupt_at: int | None = None, interrupt_at_epoch_end: int | None = None, resume: bool = False,
    extra_callbacks: tuple[onthefly.Callback, ...] = (),
) -> Trained:
    """Train ``EPOCHS`` epochs with ``quickstart`` (validating on a shuffled loader every epoch)."""
    model = make_model()
    optimizer = make_optimizer(model)
    sched = make_scheduler(optimizer) if scheduler else None
    counter = StepCounter(checkpoint, interrupt_at, interrupt_at_epoch_end)
    torch.manual_seed(TRAIN_SEED)
    summary = onthefly.quickstart(
        project="resume", run_name="resumed" if resume else "run", model=model,
        optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), train_loader=make_loader(workers),
        val_loader=make_loader(shuffle=True), max_epochs=EPOCHS, scheduler=sched,
        callbacks=[counter, *extra_callbacks], progress=False, dashboard=False,
        resume_from=checkpoint if resume else None,
    )
    if interrupt_at is not None or interrupt_at_epoch_end is not None:
        raise RuntimeError("training finished without reaching the interruption")
    return Trained(model, optimizer, sched, summary, counter.steps)


def run_job(job: dict[str, Any]) -> None:
    os.environ["ONTHEFLY_HOME"] = job["home"]
    if job["mode"] == "interrupt":
        train(workers=job["workers"], scheduler=job["scheduler"], checkpoint=job["checkpoint"],
              interrupt_at=job.get("at_step"), interrupt_at_epoch_end=job.get("at_epoch_end"))
        return
    trained = train(workers=job["workers"], scheduler=job["scheduler"],
                    checkpoint=job["checkpoint"], resume=True)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()},
              str(out / "model.safetensors"))
    torch.save({"optimizer": trained.optimizer.state_dict(),
                "scheduler": trained.scheduler.state_dict() if trained.scheduler else None},
               out / "optimizer.pt")
    summary = trained.summary
    (out / "result.json").write_text(json.dumps({
        "session_dir": str(summary.session_dir), "run_id": summary.run_id,
        "status": summary.status, "steps": summary.steps, "epochs": summary.epochs,
        "callback_steps": trained.callback_steps,
    }))


def _forked(job: dict[str, Any]) -> int:
    sys.stdout.flush()  # or the child would write the parent's buffered output again
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the job's own process
        code = 0
        try:
            run_job(job)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _spawned(job: dict[str, Any], jobs_file: Path, number: int) -> int:
    one = jobs_file.with_name(f"{jobs_file.stem}-{number}.json")
    one.write_text(json.dumps([job]))
    return subprocess.run([sys.executable, __file__, str(one)], check=False).returncode


def main() -> None:
    # One intra-op thread, as in the test process: the same reductions in every process (and on
    # a small machine several threads per process only fight over the cores).
    torch.set_num_threads(1)
    jobs_file = Path(sys.argv[1])
    jobs = json.loads(jobs_file.read_text())
    if len(jobs) == 1:
        run_job(jobs[0])  # an interrupt job ends this process itself
        return
    # Building an optimizer once imports what torch imports lazily on the first one (seconds of
    # torch._dynamo): here once, not again in every forked job. Nothing is trained.
    make_optimizer(make_model())
    failed = []
    for number, job in enumerate(jobs):
        code = _forked(job) if hasattr(os, "fork") else _spawned(job, jobs_file, number)
        if code != 0:
            failed.append(f"{job['mode']} job for {job['checkpoint']} exited with {code}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
