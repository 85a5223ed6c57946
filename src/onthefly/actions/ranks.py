"""Carrying a command out under ``torchrun``: every rank trains (a fork's children), but only
rank 0 reads and writes the session (the card, its slice, the verdict), so what rank 0 finds is
sent to the others - the value, or its error raised on every rank, so that no rank waits for a
collective the others never reach. In a single process this is only a function call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import StateError

__all__ = ["on_rank_zero"]

T = TypeVar("T")


def on_rank_zero(run: Any, work: Callable[[], T]) -> T:
    """``work()`` done by rank 0 alone; its value (JSON) returned on every rank, or its error
    raised on every rank (rank 0 raises its own). Single process: ``work()``."""
    where = run.world
    if where is None:
        return work()
    if where.rank == 0:
        try:
            value = work()
        except Exception as exc:
            where.share({"error": f"{type(exc).__name__}: {exc}"})
            raise
        where.share({"value": value})
        return value
    outcome = where.share()
    if "error" in outcome:
        raise StateError(f"on rank 0: {outcome['error']}")
    return outcome["value"]
