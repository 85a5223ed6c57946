"""The session's SQLite database: schema and connections.

One writer (the store's writer thread) and any number of readers; WAL mode lets readers see
committed data while training writes more.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["SCHEMA_VERSION", "connect", "create_schema"]

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS session (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    created REAL NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    version TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    status TEXT NOT NULL,
    ended REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    project TEXT NOT NULL,
    parent_id INTEGER REFERENCES runs(id),
    parent_checkpoint_id INTEGER,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    run_id INTEGER,
    time REAL NOT NULL,
    step INTEGER,
    epoch INTEGER,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    time REAL NOT NULL,
    value REAL
);
CREATE INDEX IF NOT EXISTS metrics_by_run_name_step ON metrics (run_id, name, step);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    batch_in_epoch INTEGER NOT NULL,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    time REAL NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS slices (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    run_id INTEGER NOT NULL,
    epoch INTEGER,
    split TEXT NOT NULL,
    definition TEXT NOT NULL,
    count INTEGER NOT NULL,
    path TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clusterings (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    epoch INTEGER,
    features TEXT NOT NULL,
    k INTEGER NOT NULL,
    silhouette REAL,
    details TEXT NOT NULL,
    path TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS plans (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    card TEXT NOT NULL,
    result TEXT,
    error TEXT,
    runs TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS edges (
    child_id INTEGER NOT NULL,
    parent_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER,
    checkpoint_id INTEGER,
    plan_id INTEGER,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    request TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sample_files (
    run_id INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    split TEXT NOT NULL,
    path TEXT NOT NULL,
    rows INTEGER NOT NULL,
    first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL
);
"""


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the session database. Readers use ``readonly=True`` and never block the writer."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    else:
        conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is safe in WAL mode: a power cut may lose the last transactions, never corrupt.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)
    conn.commit()
