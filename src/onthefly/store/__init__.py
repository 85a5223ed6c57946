"""Session storage: SQLite (WAL) for runs, events, metrics and checkpoints; Parquet for
per-sample tables; safetensors and tensors-only files for weights and state."""

from __future__ import annotations

from .checkpoints import read_checkpoint, write_checkpoint
from .reader import SessionReader, open_session
from .samples import SampleChunk, read_samples
from .session import (
    SessionInfo,
    SessionStore,
    clean_sessions,
    is_alive,
    list_sessions,
    onthefly_home,
)

__all__ = [
    "SampleChunk",
    "SessionInfo",
    "SessionReader",
    "SessionStore",
    "clean_sessions",
    "is_alive",
    "list_sessions",
    "onthefly_home",
    "open_session",
    "read_checkpoint",
    "read_samples",
    "write_checkpoint",
]
