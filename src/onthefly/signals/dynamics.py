"""Training dynamics per sample, across epochs: what each statistic means, and the two flags a
person acts on. Definitions only; the query that computes them over a run's Parquet parts is
:mod:`onthefly.store.dynamics`, reached through ``SessionReader.sample_stats``.

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

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ConfigError

__all__ = ["MIN_EPOCHS_FOR_MISLABELLED", "STATS_SCHEMA", "STAT_COLUMNS", "FlagRule", "add_flags", "flag_counts", "with_flags"]

MIN_EPOCHS_FOR_MISLABELLED = 2

STAT_COLUMNS = ("index", "label", "pred", "correct", "loss", "margin", "confidence", "grad_norm", "epochs",
                "aum", "forgetting", "confidence_mean", "variability", "hard", "mislabelled")

_TYPES = {"index": pa.int64(), "label": pa.int64(), "pred": pa.int64(), "correct": pa.bool_(),
          "epochs": pa.int32(), "forgetting": pa.int32(), "hard": pa.bool_(), "mislabelled": pa.bool_()}
STATS_SCHEMA = pa.schema([(name, _TYPES.get(name, pa.float64())) for name in STAT_COLUMNS])


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


def add_flags(table: pa.Table, rule: FlagRule) -> pa.Table:
    """``table`` (every sample seen at the epoch, every column of ``STAT_COLUMNS`` but the flags)
    with ``hard`` and ``mislabelled`` added, cast to ``STATS_SCHEMA``. The flags are decided over
    the whole epoch (quantiles, per-class statistics), so ``table`` must hold every sample of it;
    filter afterwards."""
    loss = table.column("loss").to_numpy(zero_copy_only=False).astype(np.float64)
    finite = loss[np.isfinite(loss)]
    hard_cut = float(np.quantile(finite, rule.hard_quantile)) if finite.size else np.inf
    batches = [with_flags(b, hard_cut, rule) for b in table.to_batches()]
    return pa.Table.from_batches(batches, schema=STATS_SCHEMA)


def with_flags(batch: pa.RecordBatch, hard_cut: float, rule: FlagRule) -> pa.RecordBatch:
    """``batch`` (every column of ``STAT_COLUMNS`` but the flags) with ``hard`` and ``mislabelled``
    added, cast to ``STATS_SCHEMA``. ``hard_cut`` is the loss at the rule's quantile over every
    sample of the epoch, not only those in the batch."""
    loss = batch.column("loss").to_numpy(zero_copy_only=False).astype(np.float64)
    hard = np.isfinite(loss) & (loss >= hard_cut)
    aum = batch.column("aum").to_numpy(zero_copy_only=False).astype(np.float64)
    n_epochs = batch.column("epochs").to_numpy(zero_copy_only=False)
    mislabelled = np.isfinite(aum) & (aum < rule.aum_threshold) & (n_epochs >= MIN_EPOCHS_FOR_MISLABELLED)
    columns = {name: batch.column(name) for name in batch.schema.names}
    columns["hard"], columns["mislabelled"] = pa.array(hard), pa.array(mislabelled)
    return pa.RecordBatch.from_arrays([columns[name].cast(STATS_SCHEMA.field(name).type) for name in STAT_COLUMNS],
                                      schema=STATS_SCHEMA)


def flag_counts(table: pa.Table) -> dict[str, int]:
    """How many rows of a stats table carry each flag."""
    import pyarrow.compute as pc  # here, not at import: the training process does not need it

    return {flag: int(pc.sum(table.column(flag)).as_py() or 0) for flag in ("hard", "mislabelled")}
