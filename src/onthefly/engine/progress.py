"""Terminal progress: a bar per epoch and a line per evaluation, fed by bus events.

Updates come from the per-sample flushes (a few per second), never from the training step.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .events import Event

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    def __init__(self) -> None:
        self.console = Console(file=sys.stderr)
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._task: Any = None
        self._started = False

    def __call__(self, event: Event) -> None:
        kind = event.kind
        if kind == "epoch_started":
            if not self._started:
                self._progress.start()
                self._started = True
            total = event.payload.get("batches")
            self._task = self._progress.add_task(
                "train", total=total, epoch=f"{(event.epoch or 0) + 1}", loss="…")
        elif kind == "progress" and self._task is not None:
            self._progress.update(self._task, completed=event.payload.get("batch_in_epoch", 0),
                                  loss=f"{event.payload['loss']:.4f}")
        elif kind == "epoch_summary" and self._task is not None and event.payload.get("split") == "train":
            self._progress.update(self._task, completed=self._progress.tasks[-1].total or 0,
                                  loss=f"{event.payload['loss']:.4f}")
        elif kind == "eval":
            p = event.payload
            acc = f"  accuracy {p['accuracy']:.4f}" if "accuracy" in p else ""
            self._progress.console.print(f"  {p['split']}: loss {p['loss']:.4f}{acc}")
        elif kind == "status" and event.payload.get("status") in ("paused", "idle"):
            self._progress.console.print(f"  [{event.payload['status']} at step {event.step}]")

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False
