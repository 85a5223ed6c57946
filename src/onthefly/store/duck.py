"""DuckDB for queries over the Parquet per-sample tables: one in-memory database per process,
a cursor per query (opening a fresh connection measured 20-60 ms a call; a cursor is cheap and
safe to use from any thread)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["cursor"]

THREADS = 2  # queries share the machine with training: never take every core
_lock = threading.Lock()
_database: Any = None


def cursor() -> Any:
    """A new cursor on the process's DuckDB database; close it when done."""
    global _database
    with _lock:
        if _database is None:
            import duckdb  # imported on first query: `import onthefly` stays light

            _database = duckdb.connect()
            _database.execute(f"SET threads TO {THREADS}")
        return _database.cursor()
