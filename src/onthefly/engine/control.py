"""Commands and run status: what a person (or a test) can ask of a running session.

Commands go into a queue from any thread; the training thread applies them only at a step
boundary, so a command never lands in the middle of a forward/backward pass.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["COMMANDS", "Command", "CommandQueue", "RunStatus"]


class RunStatus:
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    IDLE = "idle"  # planned training done, waiting for commands (keep_alive)
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


def _no_args(args: dict[str, Any]) -> dict[str, Any]:
    """Called with what is left once a command's own arguments are taken out."""
    if args:
        raise ConfigError(f"unexpected argument(s) {sorted(args)} for this command")
    return {}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _finite(name: str, value: Any, *, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def _group(args: dict[str, Any]) -> int | None:
    group = args.pop("group", None)
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
        raise ConfigError(f"group must be a parameter-group index >= 0, got {group!r}")
    return group


def _check_train_more(args: dict[str, Any]) -> dict[str, Any]:
    args = dict(args)
    epochs = _positive_int("epochs", args.pop("epochs", None))
    _no_args(args)
    return {"epochs": epochs}


def _check_set_lr(args: dict[str, Any]) -> dict[str, Any]:
    args = dict(args)
    lr = _finite("lr", args.pop("lr", None), minimum=0.0, strict=True)
    group = _group(args)
    _no_args(args)
    return {"lr": lr, "group": group}


def _check_set_wd(args: dict[str, Any]) -> dict[str, Any]:
    args = dict(args)
    wd = _finite("weight_decay", args.pop("weight_decay", None), minimum=0.0, strict=False)
    group = _group(args)
    _no_args(args)
    return {"weight_decay": wd, "group": group}


def _check_checkpoint(args: dict[str, Any]) -> dict[str, Any]:
    args = dict(args)
    path = args.pop("path", None)
    if path is not None and not isinstance(path, str):
        raise ConfigError(f"path must be a string, got {path!r}")
    _no_args(args)
    return {"path": path}


def _check_cluster(args: dict[str, Any]) -> dict[str, Any]:
    args = dict(args)
    features = args.pop("features", "signals")
    if features not in ("signals", "embeddings"):
        raise ConfigError(f"features must be 'signals' or 'embeddings', got {features!r}")
    subset = args.pop("subset", "all")
    if subset not in ("all", "hard"):
        raise ConfigError(f"subset must be 'all' or 'hard', got {subset!r}")
    k = args.pop("k", None)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 50):
        raise ConfigError(f"k must be a whole number from 2 to 50, or omitted (chosen by silhouette), got {k!r}")
    epoch = args.pop("epoch", None)
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise ConfigError(f"epoch must be a whole number >= 0, got {epoch!r}")
    layer = args.pop("layer", None)
    if layer is not None and (not isinstance(layer, str) or len(layer) > 500):
        raise ConfigError(f"layer must be a module name (a string), got {layer!r}")
    _no_args(args)
    return {"features": features, "subset": subset, "k": k, "epoch": epoch, "layer": layer}


COMMANDS = {
    "run": _no_args,
    "pause": _no_args,
    "resume": _no_args,
    "stop": _no_args,
    "test": _no_args,
    "train_more": _check_train_more,
    "set_lr": _check_set_lr,
    "set_weight_decay": _check_set_wd,
    "checkpoint": _check_checkpoint,
    "cluster": _check_cluster,  # carried out by a handler the composer registers (Run.handlers)
}


@dataclass(frozen=True)
class Command:
    id: int
    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    issued: float = 0.0


class CommandQueue:
    """Thread-safe FIFO of validated commands. ``pending`` is a lock-free check for the hot path."""

    def __init__(self) -> None:
        self._items: deque[Command] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)

    def put(self, kind: str, **args: Any) -> Command:
        if kind not in COMMANDS:
            raise ConfigError(f"unknown command {kind!r}; known commands: {', '.join(sorted(COMMANDS))}")
        command = Command(next(self._ids), kind, COMMANDS[kind](args), time.time())
        with self._cond:
            self._items.append(command)
            self._cond.notify_all()
        return command

    @property
    def pending(self) -> bool:
        return bool(self._items)  # a deque's truth value is safe to read without the lock

    def drain(self) -> list[Command]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
        return items

    def wait(self, timeout: float | None = None) -> list[Command]:
        """Block until at least one command is queued (or the timeout passes); take them all."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._items), timeout)
            items = list(self._items)
            self._items.clear()
        return items
