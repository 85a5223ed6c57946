"""The command controller: one transition table that applies commands and says which are possible.

``TABLE`` says, for every command, in which run statuses it may be applied and which status it
leads to. :meth:`CommandController.apply` follows it (and asks the run to carry out the command's
effect); :meth:`CommandController.possible` reads the same table, so what a dashboard enables is
exactly what would be accepted. Commands arrive from any thread through the queue and are applied
on the training thread, at a step boundary; every outcome is published (``command_applied`` or
``command_rejected``, with the reason) and so lands in the session's event log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .control import Command, CommandQueue, RunStatus

__all__ = ["LIVE", "TABLE", "CommandController", "Effect", "Rule"]

PAUSED = RunStatus.PAUSED
LIVE = frozenset({RunStatus.CREATED, RunStatus.RUNNING, PAUSED, RunStatus.IDLE})
_STARTED = frozenset({RunStatus.RUNNING, PAUSED, RunStatus.IDLE})


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[str]  # statuses in which the command may be applied
    becomes: str | None = None  # the status it leads to (None: unchanged)
    needs: str | None = None  # a capability the run must have ("test": a test loader)


# Order matters only for display: what a dashboard lists first.
TABLE: dict[str, Rule] = {
    "run": Rule(frozenset({RunStatus.CREATED}), RunStatus.RUNNING),
    "resume": Rule(frozenset({PAUSED}), RunStatus.RUNNING),
    "pause": Rule(frozenset({RunStatus.RUNNING}), PAUSED),
    "stop": Rule(LIVE),
    "train_more": Rule(_STARTED),
    "test": Rule(LIVE, needs="test"),
    "set_lr": Rule(LIVE),
    "set_weight_decay": Rule(LIVE),
    "checkpoint": Rule(LIVE),
}
# Commands carried out by an action the run registered (e.g. "cluster"): once training started.
ACTION_RULE = Rule(_STARTED)

# An effect carries out a command: args -> (why it was refused, or None; a result for the log).
Effect = Callable[[dict[str, Any]], "tuple[str | None, dict[str, Any] | None]"]


class CommandController:
    """Owns the run's status and its stop request. ``request``, ``possible`` and ``status`` may be
    called from any thread; everything else runs on the training thread."""

    def __init__(self, effects: Mapping[str, Effect], *, can: Callable[[str], bool],
                 on_status: Callable[[str], None], publish: Callable[[str, dict[str, Any]], object]) -> None:
        self.queue = CommandQueue()
        self._effects = dict(effects)
        self._actions: dict[str, Effect] = {}
        self._can = can  # does the run have this capability ("test")?
        self._on_status = on_status
        self._publish = publish
        self.status = RunStatus.CREATED
        self.stopping = False
        self.closed = False
        # Under torchrun: sync(take, wait) -> the commands every rank applies (engine.distributed).
        self.sync: Callable[[Callable[[], list[Command]], bool], list[Command]] | None = None

    # ---- any thread ------------------------------------------------------------------------
    def request(self, kind: str, **args: Any) -> Command:
        """Queue a command (validated now; applied at the next step boundary)."""
        return self.queue.put(kind, **args)

    def register_action(self, kind: str, effect: Effect) -> None:
        """A command carried out outside the engine (e.g. "cluster" by onthefly.actions)."""
        self._actions[kind] = effect

    def _rule(self, kind: str) -> Rule | None:
        return TABLE.get(kind) or (ACTION_RULE if kind in self._actions else None)

    def _refusal(self, kind: str) -> str | None:
        rule = self._rule(kind)
        status = self.status
        if rule is None:
            return f"this run has no handler for {kind!r}"
        if status not in rule.allowed:
            if status == RunStatus.IDLE and kind in ("pause", "resume", "run"):
                return "training has finished; use train_more to train further"
            return f"cannot {kind} while {status}"
        if rule.needs is not None and not self._can(rule.needs):
            return f"no {rule.needs}_loader was given"
        return None

    def possible(self) -> list[str]:
        """The commands that would be accepted now (what a dashboard enables)."""
        if self.closed or self.stopping:
            return []
        kinds = [*TABLE, *sorted(self._actions)]
        return [kind for kind in kinds if self._refusal(kind) is None]

    # ---- training thread -----------------------------------------------------------------
    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self._on_status(status)

    def apply(self, command: Command) -> None:
        kind, args = command.kind, command.args
        rejected = self._refusal(kind)
        result: dict[str, Any] | None = None
        if rejected is None:
            effect = self._effects.get(kind) or self._actions.get(kind)
            if effect is not None:
                rejected, result = effect(args)
        if rejected is None:
            if kind == "stop":
                self.stopping = True
            rule = self._rule(kind)
            if rule is not None and rule.becomes is not None:
                self.set_status(rule.becomes)
        payload: dict[str, Any] = {"id": command.id, "command": kind, "args": args}
        if result is not None:
            payload["result"] = result
        if rejected is not None:
            self._publish("command_rejected", {**payload, "reason": rejected})
        else:
            self._publish("command_applied", payload)

    def _take(self, wait: bool) -> list[Command]:
        """The commands to apply now: the queue's (waiting for one with ``wait``), or under
        torchrun the ones rank 0 took from its queue, the same on every rank (``sync``)."""
        take = self.queue.wait if wait else self.queue.drain
        return take() if self.sync is None else self.sync(take, wait)

    def apply_pending(self) -> None:
        """Apply queued commands; while paused, wait here for more."""
        for command in self._take(wait=False):
            self.apply(command)
        while self.status == RunStatus.PAUSED and not self.stopping:
            for command in self._take(wait=True):
                self.apply(command)

    def wait_for_run(self) -> bool:
        """In CREATED, wait for a "run" command (or "stop"). True when training may start."""
        while not self.stopping and self.status == RunStatus.CREATED:
            for command in self._take(wait=True):
                self.apply(command)
        return not self.stopping

    def idle(self, more_to_train: Callable[[], bool]) -> bool:
        """Planned training is done: wait for commands. True when more epochs were asked for."""
        self.set_status(RunStatus.IDLE)
        while not self.stopping:
            for command in self._take(wait=True):
                self.apply(command)
            if more_to_train() and not self.stopping:
                self.set_status(RunStatus.RUNNING)
                return True
        return False
