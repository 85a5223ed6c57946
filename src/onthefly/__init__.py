"""On The Fly: a local-first control room for PyTorch training.

The few names users call: ``quickstart`` (we run the loop), ``start_run`` (you keep your loop),
``Trainer`` (``quickstart`` with more control), ``Callback``, ``open_session`` (read a session).
"""

from __future__ import annotations

from ._version import __version__
from .engine import Callback, FitSummary, Run, RunStatus, Trainer, quickstart, start_run
from .errors import OnTheFlyError
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
