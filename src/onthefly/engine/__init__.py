"""The training engine: the loop, control points and command queue, run state, checkpoints,
sample tracking. Knows nothing of HTTP: it publishes events and takes commands."""

from __future__ import annotations

from .callbacks import Callback, EarlyStopping, ModelCheckpoint
from .control import COMMANDS, Command, CommandQueue, RunStatus
from .events import Event, EventBus
from .run import Run
from .trainer import FitSummary, Trainer

__all__ = [
    "COMMANDS",
    "Callback",
    "Command",
    "CommandQueue",
    "EarlyStopping",
    "Event",
    "EventBus",
    "FitSummary",
    "ModelCheckpoint",
    "Run",
    "RunStatus",
    "Trainer",
]
