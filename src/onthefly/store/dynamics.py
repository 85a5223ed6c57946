"""Per-sample training dynamics read where the data lives: one DuckDB query over a run's Parquet
parts gives, per sample, its values at an epoch and its statistics across epochs (AUM,
forgetting events, cartography), then the flags are added. What each column and flag means is
defined in :mod:`onthefly.signals.dynamics`; callers go through ``SessionReader.sample_stats``.

Runs on the caller's thread (a server worker thread, the training thread for a clustering
command at a step boundary, a user's thread for an export); the cache of finished tables is
shared by them, behind a lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..signals.dynamics import STATS_SCHEMA, FlagRule, with_flags
from .duck import cursor
from .samples import epoch_of, part_files, sample_epochs

__all__ = ["CACHED_TABLES", "iter_sample_stats", "sample_stats"]

_QUERY = """
WITH per_epoch AS (
    SELECT "index" AS idx, epoch,
           avg(loss) AS loss, avg(margin) AS margin, avg(confidence) AS confidence,
           avg(grad_norm) AS grad_norm, bool_and(correct) AS correct,
           max(label) AS label, arg_max(pred, step) AS pred
    FROM read_parquet($files)
    -- wanted
    GROUP BY idx, epoch
), ordered AS (
    SELECT *, lag(correct) OVER (PARTITION BY idx ORDER BY epoch) AS was_correct FROM per_epoch
)
SELECT idx AS "index",
       max(label) AS label,
       arg_max(pred, epoch) AS pred,
       arg_max(correct, epoch) AS correct,
       arg_max(loss, epoch) AS loss,
       arg_max(margin, epoch) AS margin,
       arg_max(confidence, epoch) AS confidence,
       arg_max(grad_norm, epoch) AS grad_norm,
       count(*)::INTEGER AS epochs,
       avg(margin) AS aum,
       (count(*) FILTER (WHERE was_correct AND NOT correct))::INTEGER AS forgetting,
       avg(confidence) AS confidence_mean,
       coalesce(stddev_pop(confidence), 0) AS variability
FROM ordered
GROUP BY idx
HAVING max(epoch) = $epoch
ORDER BY idx
"""

_HARD_CUT = """
SELECT quantile_cont(loss, $q) FROM (
    SELECT avg(loss) AS loss FROM read_parquet($files) GROUP BY "index"
) WHERE isfinite(loss)
"""

CACHED_TABLES = 8
_cache: OrderedDict[Any, tuple[int | None, pa.Table]] = OrderedDict()
_cache_lock = threading.Lock()


def sample_stats(session_dir: Path, run_id: int, epoch: int | None = None, *, split: str = "train",
                 rule: FlagRule | None = None, indices: np.ndarray | None = None) -> tuple[int | None, pa.Table]:
    """(epoch, table): one row per sample seen at ``epoch`` (default: the latest with data), with
    the columns in ``STAT_COLUMNS``, sorted by index; only ``indices`` when given."""
    rule = rule or FlagRule()
    key = None
    if indices is None:
        # A finished epoch's table never changes: the dashboard re-reads it for free. The key holds
        # every part file's name and size, so a part written since is a new key.
        files = tuple((p.name, p.stat().st_size) for p in part_files(session_dir, run_id, split))
        key = (str(session_dir), run_id, epoch, split, rule, files)
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    epoch, batches = iter_sample_stats(session_dir, run_id, epoch, split=split, rule=rule, indices=indices)
    result = epoch, pa.Table.from_batches(list(batches), schema=STATS_SCHEMA)
    if key is not None:
        with _cache_lock:
            _cache[key] = result
            while len(_cache) > CACHED_TABLES:
                _cache.popitem(last=False)
    return result


def iter_sample_stats(session_dir: Path, run_id: int, epoch: int | None = None, *, split: str = "train",
                      rule: FlagRule | None = None, indices: np.ndarray | None = None,
                      batch_rows: int = 65_536) -> tuple[int | None, Iterator[pa.RecordBatch]]:
    """Like :func:`sample_stats`, streamed in record batches (DuckDB never hands over the whole
    result at once): for exports of large slices."""
    rule = rule or FlagRule()
    epochs = sample_epochs(session_dir, run_id, split)
    if epoch is None:
        epoch = epochs[-1] if epochs else None
    if epoch is None or epoch not in epochs:
        return epoch, iter(())
    parts = [p for p in part_files(session_dir, run_id, split) if epoch_of(p) <= epoch]
    files = [str(p) for p in parts]
    this_epoch = [str(p) for p in parts if epoch_of(p) == epoch]
    return epoch, _stream(files, this_epoch, epoch, rule, indices, batch_rows)


def _stream(files: list[str], this_epoch: list[str], epoch: int, rule: FlagRule, indices: np.ndarray | None,
            batch_rows: int) -> Iterator[pa.RecordBatch]:
    conn = cursor()
    try:
        # The "hard" cut is the quantile over every sample of the epoch, not only those asked for.
        cut = conn.execute(_HARD_CUT, {"files": this_epoch, "q": rule.hard_quantile}).fetchall()
        hard_cut = np.inf if not cut or cut[0][0] is None else float(cut[0][0])
        query = _QUERY
        if indices is not None:
            conn.register("wanted", pa.table({"idx": pa.array(np.asarray(indices, dtype=np.int64))}))
            query = query.replace("-- wanted", 'WHERE "index" IN (SELECT idx FROM wanted)')
        reader = conn.sql(query, params={"files": files, "epoch": epoch}).to_arrow_reader(batch_rows)
        for batch in reader:
            yield with_flags(batch, hard_cut, rule)
    finally:
        conn.close()
