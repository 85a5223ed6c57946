"""The one base exception for errors a user can act on.

Every message says what happened, what was expected, and how to fix it. The server (a later
layer) maps ``http_status`` to its response code; the engine never imports the server.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "LossError",
    "NotFoundError",
    "OnTheFlyError",
    "StateError",
    "StoreError",
]


class OnTheFlyError(Exception):
    """Base class for every user-facing error raised by On The Fly."""

    http_status: int = 400


class ConfigError(OnTheFlyError, ValueError):
    """An argument handed to On The Fly is missing, of the wrong type or out of range."""


class DataError(OnTheFlyError, ValueError):
    """A loader or a batch is not something On The Fly can train on."""


class LossError(OnTheFlyError, ValueError):
    """The loss function's output cannot be used (scalar where per-sample values are needed,
    wrong length, not finite)."""


class NotFoundError(OnTheFlyError, LookupError):
    """What was asked for (a run, a slice, a clustering) does not exist in this session."""

    http_status = 404


class StateError(OnTheFlyError, RuntimeError):
    """An action does not fit the current state (e.g. resume while not paused)."""

    http_status = 409


class StoreError(OnTheFlyError, OSError):
    """The session folder or one of its files cannot be read or written."""

    http_status = 500
