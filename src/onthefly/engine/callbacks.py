"""Typed hooks with no-op defaults: the way to extend the loop without editing it.

Override only what you need; hooks you do not override cost nothing on the hot path. A callback
with state returns it from ``state_dict`` (tensors, numbers, strings, lists, dicts) and gets it
back in ``load_state_dict`` when a run resumes from a checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import Run

__all__ = ["HOOKS", "Callback"]

HOOKS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_fit_end")


class Callback:
    def on_fit_start(self, run: Run) -> None:
        """Before the first epoch."""

    def on_epoch_start(self, run: Run) -> None:
        """Before the first batch of each epoch."""

    def on_step_end(self, run: Run) -> None:
        """After each optimizer step, after queued commands were applied (``run.global_step``)."""

    def on_epoch_end(self, run: Run) -> None:
        """After each epoch's training batches and validation."""

    def on_fit_end(self, run: Run) -> None:
        """After training ends, however it ends."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)
