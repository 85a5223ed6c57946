"""On The Fly: a local-first control room for PyTorch training.

The few names users call: ``quickstart`` (we run the loop), ``start_run`` (you keep your loop),
``Trainer`` (``quickstart`` with more control), ``Callback``, ``open_session`` (read a session).
They are imported on first use, so ``onthefly --version`` does not wait for torch to load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import OnTheFlyError

if TYPE_CHECKING:
    from .engine import Callback, FitSummary, Run, RunStatus, Trainer
    from .launch import quickstart, start_run
    from .store import open_session

__all__ = [
    "Callback",
    "FitSummary",
    "OnTheFlyError",
    "Run",
    "RunStatus",
    "Trainer",
    "__version__",
    "open_session",
    "quickstart",
    "start_run",
]

_LAZY = {
    "Callback": ".engine",
    "FitSummary": ".engine",
    "Run": ".engine",
    "RunStatus": ".engine",
    "Trainer": ".engine",
    "quickstart": ".launch",
    "start_run": ".launch",
    "open_session": ".store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onthefly' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
