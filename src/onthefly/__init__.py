"""On The Fly: a local-first control room for PyTorch training.

The few names users call: ``quickstart`` (we run the loop), ``start_run`` (you keep your loop),
``Trainer`` (``quickstart`` with more control), ``Callback``, ``EarlyStopping``, ``open_session`` (read a session),
``export_slice`` (write a slice of samples with their signals and data to CSV/Parquet/JSON),
``export_session`` / ``import_session`` (save a whole session to one ``.otf`` archive, open it elsewhere).
They are imported on first use, so ``onthefly --version`` does not wait for torch to load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import OnTheFlyError

if TYPE_CHECKING:
    from .actions.export import export_slice
    from .engine import (
        Callback,
        EarlyStopping,
        FitSummary,
        ModelCheckpoint,
        Run,
        RunStatus,
        Trainer,
    )
    from .launch import quickstart, start_run
    from .store import open_session
    from .store.archive import export_session, import_session

__all__ = [
    "Callback",
    "EarlyStopping",
    "FitSummary",
    "ModelCheckpoint",
    "OnTheFlyError",
    "Run",
    "RunStatus",
    "Trainer",
    "__version__",
    "export_session",
    "export_slice",
    "import_session",
    "open_session",
    "quickstart",
    "start_run",
]

_LAZY = {
    "Callback": ".engine",
    "EarlyStopping": ".engine",
    "ModelCheckpoint": ".engine",
    "FitSummary": ".engine",
    "Run": ".engine",
    "RunStatus": ".engine",
    "Trainer": ".engine",
    "quickstart": ".launch",
    "start_run": ".launch",
    "open_session": ".store",
    "export_slice": ".actions.export",
    "export_session": ".store.archive",
    "import_session": ".store.archive",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onthefly' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
