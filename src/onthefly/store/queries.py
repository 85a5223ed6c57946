"""Heavy views computed where the data lives: downsampled metric series (in SQLite), loss
distributions, the hardest samples and one sample's history (over the Parquet per-sample
tables). The per-sample table with its statistics across epochs is :mod:`.dynamics`."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..signals.quantiles import robust_summary
from .db import connect
from .duck import cursor
from .samples import epoch_files, part_files, sample_epochs

__all__ = ["hardest_samples", "histogram", "loss_distribution", "metric_series", "sample_history"]


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


def loss_distribution(session_dir: Path, run_id: int, epoch: int | None = None, *, bins: int = 50,
                      split: str = "train") -> dict[str, Any]:
    """Histogram, quantiles p50/p90/p95/p99, median and MAD of per-sample loss for one epoch
    (default: the latest), exact: computed from every stored value."""
    epochs = sample_epochs(session_dir, run_id, split)
    if epoch is None and epochs:
        epoch = epochs[-1]
    files = epoch_files(session_dir, run_id, epoch, split) if epoch is not None else []
    losses = (np.concatenate([pq.read_table(f, columns=["loss"]).column("loss").to_numpy() for f in files])
              if files else np.empty(0, dtype=np.float32))
    return histogram(losses, epoch=epoch, epochs=epochs, bins=bins)


def histogram(losses: np.ndarray, *, epoch: int | None, epochs: list[int], bins: int, exact: bool = True,
              count: int | None = None, live: bool = False) -> dict[str, Any]:
    """A distribution view of ``losses`` (all of an epoch's, or a uniform sample of ``count``)."""
    summary = robust_summary(losses, exact=exact, count=count)
    finite = losses[np.isfinite(losses)]
    counts, edges = np.histogram(finite, bins=bins) if finite.size else (np.empty(0), np.empty(0))
    if count is not None and finite.size:  # a sample: scale its counts to the whole
        counts = np.round(counts * (count / finite.size))
    return {"epoch": epoch, "epochs": epochs, "live": live, **summary,
            "edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _top_k(files: list[Path], k: int, *, column: str = "loss", columns: tuple[str, ...] = (
        "index", "loss", "label", "pred", "margin", "correct")) -> list[dict[str, Any]]:
    """The ``k`` rows with the highest ``column`` (non-finite values last), in descending order."""
    if not files:
        return []
    conn = cursor()
    try:
        cols = ", ".join(f'"{c}"' for c in columns)
        # DuckDB's top-k keeps a heap of k rows: one pass, no full sort. Non-finite values are left
        # out (a run with a non-finite loss has failed at that step anyway).
        return conn.sql(
            f'SELECT {cols} FROM read_parquet($files) WHERE isfinite("{column}") ORDER BY "{column}" DESC '
            "LIMIT $k", params={"files": [str(f) for f in files], "k": k}).to_arrow_table().to_pylist()
    finally:
        conn.close()


def sample_history(session_dir: Path, run_id: int, index: int, *, split: str = "train") -> list[dict[str, Any]]:
    """Every recorded row of one sample, in order of step: its loss, margin... epoch by epoch."""
    files = [str(p) for p in part_files(session_dir, run_id, split)]
    if not files:
        return []
    conn = cursor()
    try:
        rows = conn.sql('SELECT epoch, step, loss, margin, pred, label, correct, confidence, grad_norm '
                        'FROM read_parquet($files) WHERE "index" = $index ORDER BY step',
                        params={"files": files, "index": index}).to_arrow_table().to_pylist()
    finally:
        conn.close()
    return [{k: _finite(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def hardest_samples(session_dir: Path, run_id: int, epoch: int | None = None, *, k: int = 20,
                    split: str = "train") -> dict[str, Any]:
    """The ``k`` samples with the highest loss in one epoch (default: the latest)."""
    if epoch is None:
        epochs = sample_epochs(session_dir, run_id, split)
        epoch = epochs[-1] if epochs else None
    if epoch is None:
        return {"epoch": None, "rows": []}
    rows = _top_k(epoch_files(session_dir, run_id, epoch, split), k)
    return {"epoch": epoch, "rows": [{**r, "loss": _finite(r["loss"]), "margin": _finite(r["margin"])}
                                     for r in rows]}
