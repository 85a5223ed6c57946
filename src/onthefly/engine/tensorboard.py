"""Scalars as TensorBoard event files, for users who keep TensorBoard open (``tensorboard_dir=``).

Every scalar the session records for the run (training loss, validation and test values, the
learning rate, metrics of your own) is also handed to ``torch.utils.tensorboard.SummaryWriter``
under ``tensorboard_dir/<run name>``, with its step and wall time. The writer's own thread writes
the files; the training thread only queues a value. Needs the ``tensorboard`` package
(``pip install tensorboard``), imported when asked for.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["TensorBoardTap"]


class TensorBoardTap:
    def __init__(self, folder: str | Path, run_id: int, run_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"tensorboard_dir needs the tensorboard package ({exc}); pip install tensorboard") \
                from None
        self.run_id = run_id
        self.log_dir = Path(folder) / (re.sub(r"[^A-Za-z0-9._-]+", "_", run_name) or f"run-{run_id}")
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir))
        self._lock = threading.Lock()  # rows arrive from the training and the transfer threads

    def __call__(self, rows: list[tuple[int, str, int, int, float, float]]) -> None:
        with self._lock:
            if self._writer is None:
                return
            for run_id, name, step, _epoch, when, value in rows:
                if run_id == self.run_id and value is not None:
                    self._writer.add_scalar(name.replace("_", "/", 1) if name.startswith(("val_", "test_"))
                                            else name, value, global_step=step, walltime=when)

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
