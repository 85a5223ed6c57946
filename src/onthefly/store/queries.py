"""Heavy views computed where the data lives: downsampled metric series (in SQLite), loss
distributions and the hardest samples (over the Parquet per-sample tables)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .db import connect
from .samples import part_files

__all__ = ["hardest_samples", "loss_distribution", "metric_series", "sample_epochs"]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def metric_series(db_path: Path, run_id: int, name: str, *, start_step: int | None = None,
                  end_step: int | None = None, points: int = 2000) -> dict[str, Any]:
    """One metric's values in a step range; above ``points`` values, buckets of equal step width
    give their mean, min and max (spikes survive the downsampling)."""
    conn = connect(db_path, readonly=True)
    try:
        where = "run_id = ? AND name = ? AND step BETWEEN ? AND ?"
        lo = -(2**62) if start_step is None else start_step
        hi = 2**62 if end_step is None else end_step
        args: tuple[Any, ...] = (run_id, name, lo, hi)
        total, first, last = conn.execute(
            f"SELECT COUNT(*), MIN(step), MAX(step) FROM metrics WHERE {where}", args).fetchone()
        if total <= points:
            rows = conn.execute(f"SELECT step, value, value, value FROM metrics WHERE {where} "
                                "ORDER BY step, time", args).fetchall()
        else:
            span = last - first + 1
            rows = conn.execute(
                f"SELECT CAST(AVG(step) AS INTEGER), AVG(value), MIN(value), MAX(value) FROM metrics "
                f"WHERE {where} GROUP BY (step - ?) * ? / ? ORDER BY 1",
                (*args, first, points, span)).fetchall()
    except sqlite3.Error as exc:
        from ..errors import StoreError

        raise StoreError(f"cannot read metrics from {db_path}: {exc}") from exc
    finally:
        conn.close()
    return {
        "step": [int(r[0]) for r in rows],
        "value": [_finite(r[1]) for r in rows],
        "min": [_finite(r[2]) for r in rows],
        "max": [_finite(r[3]) for r in rows],
        "total": int(total),
    }


def sample_epochs(session_dir: Path, run_id: int, split: str = "train") -> list[int]:
    epochs = {int(p.name[6:11]) for p in part_files(session_dir, run_id, split)}
    return sorted(epochs)


def _epoch_files(session_dir: Path, run_id: int, epoch: int, split: str) -> list[Path]:
    return [p for p in part_files(session_dir, run_id, split) if p.name.startswith(f"epoch-{epoch:05d}-")]


def loss_distribution(session_dir: Path, run_id: int, epoch: int | None = None, *, bins: int = 50,
                      split: str = "train") -> dict[str, Any]:
    """Histogram and p50/p90/p99 of per-sample loss for one epoch (default: the latest)."""
    epochs = sample_epochs(session_dir, run_id, split)
    if epoch is None and epochs:
        epoch = epochs[-1]
    empty = {"epoch": epoch, "epochs": epochs, "count": 0, "edges": [], "counts": [], "quantiles": None}
    if epoch is None:
        return empty
    files = _epoch_files(session_dir, run_id, epoch, split)
    if not files:
        return empty
    losses = np.concatenate([pq.read_table(f, columns=["loss"]).column("loss").to_numpy() for f in files])
    losses = losses[np.isfinite(losses)]
    if losses.size == 0:
        return {**empty, "count": 0}
    counts, edges = np.histogram(losses, bins=bins)
    p50, p90, p99 = np.quantile(losses, [0.5, 0.9, 0.99])
    return {"epoch": epoch, "epochs": epochs, "count": int(losses.size),
            "edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "quantiles": {"p50": float(p50), "p90": float(p90), "p99": float(p99)}}


def hardest_samples(session_dir: Path, run_id: int, epoch: int | None = None, *, k: int = 20,
                    split: str = "train") -> dict[str, Any]:
    """The ``k`` samples with the highest loss in one epoch (default: the latest)."""
    if epoch is None:
        epochs = sample_epochs(session_dir, run_id, split)
        epoch = epochs[-1] if epochs else None
    if epoch is None:
        return {"epoch": None, "rows": []}
    files = _epoch_files(session_dir, run_id, epoch, split)
    rows: list[dict[str, Any]] = []
    if files:
        import pyarrow as pa

        table = pa.concat_tables(pq.read_table(f, columns=["index", "loss", "label", "pred", "margin", "correct"])
                                 for f in files)
        loss = table.column("loss").to_numpy(zero_copy_only=False)
        loss = np.where(np.isfinite(loss), loss, -np.inf)
        k = min(k, len(loss))
        top = np.argpartition(-loss, k - 1)[:k] if k else np.array([], dtype=np.int64)
        top = top[np.argsort(-loss[top], kind="stable")]
        picked = table.take(pa.array(top)).to_pylist()
        rows = [{**r, "loss": _finite(r["loss"]), "margin": _finite(r["margin"])} for r in picked]
    return {"epoch": epoch, "rows": rows}
