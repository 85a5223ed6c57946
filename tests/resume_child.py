"""Child process for tests/test_resume.py: train, checkpoint mid-epoch and die, or resume.

    python resume_child.py interrupt OUT --checkpoint PATH --at-step K [--workers N] [--scheduler]
    python resume_child.py resume    OUT --checkpoint PATH [--workers N] [--scheduler]
    python resume_child.py full      OUT [--workers N] [--scheduler]

``interrupt`` saves a checkpoint from a callback at global step K and ends the process with
``os._exit(0)`` (nothing is flushed or closed, as when a job is killed). ``resume`` and ``full``
train to the end and write ``OUT/model.safetensors``, ``OUT/optimizer.pt`` (tensors-only) and
``OUT/result.json`` (session folder, run id, steps, the callback's step count).

The model, data and loader are defined here and imported by the test, so the in-process tests
train exactly the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly

SAMPLES = 200
BATCH = 16  # 13 batches per epoch, the last one of 8 samples
EPOCHS = 3
FEATURES = 20
CLASSES = 3


def make_data(n: int = SAMPLES, seed: int = 0) -> TensorDataset:
    """Deterministic: sample i is the same tensor whichever process or worker loads it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    y = x[:, :CLASSES].argmax(dim=1).long()
    return TensorDataset(x, y)


def make_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    """Dropout makes the trajectory depend on torch's global RNG."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, CLASSES)
    )


def make_loader(workers: int = 0, shuffle: bool = True) -> DataLoader:
    return DataLoader(make_data(), batch_size=BATCH, shuffle=shuffle, num_workers=workers)


class StepCounter(onthefly.Callback):
    """Counts optimizer steps (state saved in checkpoints); optionally checkpoints and dies."""

    def __init__(self, checkpoint: str | None = None, at_step: int | None = None) -> None:
        self.steps = 0
        self.checkpoint = checkpoint
        self.at_step = at_step

    def on_step_end(self, run: onthefly.Run) -> None:
        self.steps += 1
        if self.at_step is not None and run.global_step == self.at_step:
            run.save_checkpoint(self.checkpoint)
            os._exit(0)  # abrupt: no close, no flush, no atexit

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


def train(mode: str, out: Path, checkpoint: str | None, at_step: int | None, workers: int,
          scheduler: bool) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if scheduler else None
    counter = StepCounter(checkpoint, at_step) if mode == "interrupt" else StepCounter()
    torch.manual_seed(1234)  # the training RNG (shuffle order, dropout), apart from the init
    summary = onthefly.quickstart(
        project="resume", run_name=mode, model=model, optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(), train_loader=make_loader(workers),
        val_loader=make_loader(0, shuffle=False), max_epochs=EPOCHS, scheduler=sched,
        callbacks=[counter], progress=False,
        resume_from=checkpoint if mode == "resume" else None,
    )
    if mode == "interrupt":
        raise SystemExit(f"the run finished without reaching step {at_step}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None}, out / "optimizer.pt")
    (out / "result.json").write_text(json.dumps({
        "session_dir": str(summary.session_dir), "run_id": summary.run_id, "status": summary.status,
        "steps": summary.steps, "epochs": summary.epochs, "callback_steps": counter.steps,
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["interrupt", "resume", "full"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint")
    parser.add_argument("--at-step", type=int)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--scheduler", action="store_true")
    args = parser.parse_args()
    train(args.mode, args.out, args.checkpoint, args.at_step, args.workers, args.scheduler)


if __name__ == "__main__":
    main()
