"""Training dynamics per sample, across epochs, computed where the data lives (DuckDB over the
run's Parquet parts), and the two flags a person acts on.

Per sample, at a chosen epoch E (values of E, statistics over epochs 0..E):

* ``loss``, ``margin``, ``pred``, ``correct``, ``confidence``, ``grad_norm`` at epoch E (the mean
  when a sampler drew the sample more than once in the epoch);
* ``aum``: area under the margin (Pleiss et al., 2020), the mean margin over the epochs;
* ``forgetting``: forgetting events (Toneva et al., 2019), times the sample went from correctly
  to wrongly classified between consecutive epochs;
* ``confidence_mean`` and ``variability``: dataset cartography (Swayamdipta et al., 2020), the
  mean and standard deviation over epochs of the probability given to the labelled class.

Flags, kept apart because they call for different actions:

* ``hard``: loss at epoch E at or above the ``hard_quantile`` (default p90) of that epoch. Hard
  samples are worth more training (a specialist, more weight).
* ``mislabelled`` ("likely mislabelled"): AUM below ``aum_threshold`` (default 0): on average
  over training, the model scored another class above the labelled one. Such samples are worth
  checking by a person, and dropping or relabelling - not more training. Classification only;
  with fewer than ``MIN_EPOCHS_FOR_MISLABELLED`` epochs the flag is not raised.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError
from ..store.duck import cursor
from ..store.samples import epoch_of, part_files, sample_epochs

__all__ = ["STATS_SCHEMA", "STAT_COLUMNS", "FlagRule", "flag_counts", "iter_sample_stats", "sample_stats"]

MIN_EPOCHS_FOR_MISLABELLED = 2

STAT_COLUMNS = ("index", "label", "pred", "correct", "loss", "margin", "confidence", "grad_norm", "epochs",
                "aum", "forgetting", "confidence_mean", "variability", "hard", "mislabelled")


@dataclass(frozen=True)
class FlagRule:
    hard_quantile: float = 0.9
    aum_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.hard_quantile < 1.0:
            raise ConfigError(f"hard_quantile must be between 0 and 1 (e.g. 0.9), got {self.hard_quantile}")

    def describe(self) -> dict[str, Any]:
        return {
            "hard": f"loss at or above the epoch's p{round(self.hard_quantile * 100)}",
            "mislabelled": f"area under the margin (mean margin over epochs) below {self.aum_threshold:g}, "
                           f"after at least {MIN_EPOCHS_FOR_MISLABELLED} epochs",
        }


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


CACHED_TABLES = 8
_cache: OrderedDict[Any, tuple[int | None, pa.Table]] = OrderedDict()
_cache_lock = threading.Lock()

_HARD_CUT = """
SELECT quantile_cont(loss, $q) FROM (
    SELECT avg(loss) AS loss FROM read_parquet($files) GROUP BY "index"
) WHERE isfinite(loss)
"""


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
            yield _with_flags(batch, hard_cut, rule)
    finally:
        conn.close()


def _with_flags(batch: pa.RecordBatch, hard_cut: float, rule: FlagRule) -> pa.RecordBatch:
    loss = batch.column("loss").to_numpy(zero_copy_only=False).astype(np.float64)
    hard = np.isfinite(loss) & (loss >= hard_cut)
    aum = batch.column("aum").to_numpy(zero_copy_only=False).astype(np.float64)
    n_epochs = batch.column("epochs").to_numpy(zero_copy_only=False)
    mislabelled = np.isfinite(aum) & (aum < rule.aum_threshold) & (n_epochs >= MIN_EPOCHS_FOR_MISLABELLED)
    columns = {name: batch.column(name) for name in batch.schema.names}
    columns["hard"], columns["mislabelled"] = pa.array(hard), pa.array(mislabelled)
    return pa.RecordBatch.from_arrays([columns[name].cast(STATS_SCHEMA.field(name).type) for name in STAT_COLUMNS],
                                      schema=STATS_SCHEMA)


_TYPES = {"index": pa.int64(), "label": pa.int64(), "pred": pa.int64(), "correct": pa.bool_(),
          "epochs": pa.int32(), "forgetting": pa.int32(), "hard": pa.bool_(), "mislabelled": pa.bool_()}
STATS_SCHEMA = pa.schema([(name, _TYPES.get(name, pa.float64())) for name in STAT_COLUMNS])


def flag_counts(table: pa.Table) -> dict[str, int]:
    return {flag: int(pc.sum(table.column(flag)).as_py() or 0) for flag in ("hard", "mislabelled")}
