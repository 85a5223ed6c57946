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
* ``mislabelled`` ("likely mislabelled"): worth checking by a person, and dropping or relabelling -
  not more training. Decided over the whole epoch's table, from the one run the user trained:

  1. *Is there a low mode, and where does it end.* With label noise, the AUM of a run has two
     modes: the samples the model learns (positive AUM) and those it keeps scoring as another
     class (negative AUM). The cut is the least dense point between the main mode and the most
     prominent mode below ``aum_threshold`` (default 0) holding at least ``MIN_MODE_SHARE`` of the
     samples (a Gaussian kernel density on a 512-bin histogram, Silverman's bandwidth). No such
     mode (a clean run, or one too early in training for the modes to part): nothing is flagged.
  2. *Systematic confusions first.* Among the samples below that cut, a (label, prediction at E)
     pair far more common than the label's suspects spread evenly over the other classes would
     give is a pattern - the structure confident learning (Northcutt et al., 2021) reads from its
     confident joint, as look-alike classes swapped by annotators leave it. Each sample's AUM is
     moved down by the log of that excess (half an interquartile range per unit), and the final
     cut is the least dense point of the moved AUMs within half an interquartile range of the
     first one. Unstructured noise leaves the AUMs about as they were.
  3. *At least as many as confident learning counts.* When the low mode is broad and flat
     (uniform noise at a low rate) its ripples can look like the valley and the cut stops far
     too low. The number of wrong labels confident learning estimates from the run's own
     probabilities at E (the calibrated confident joint's off-diagonal; the predicted class's
     probability is the label's times ``exp(-margin)``) is a floor that needs no density: when
     the cut flags fewer, samples that confident learning counts as confidently another class
     are added, lowest moved AUM first, up to that count. Only those: a clean hard sample that the
     model gets wrong without conviction is never added. A run that has memorised its wrong
     labels by E counts few and leaves the cut as it was.

  No flagged sample has an AUM at or above ``aum_threshold``. ``FlagRule(adaptive=False)`` keeps
  the fixed rule (AUM below ``aum_threshold``), as does a table of fewer than
  ``MIN_SAMPLES_FOR_CUT`` samples, too few for a density. Classification only; with fewer than
  ``MIN_EPOCHS_FOR_MISLABELLED`` epochs the flag is not raised. Measured against cleanlab on
  scikit-learn's digits in ``benchmarks/label_noise.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ConfigError

__all__ = ["MIN_EPOCHS_FOR_MISLABELLED", "MIN_MODE_SHARE", "MIN_SAMPLES_FOR_CUT", "STATS_SCHEMA", "STAT_COLUMNS",
           "FlagRule", "add_flags", "flag_counts", "mislabelled_cut", "with_flags"]

MIN_EPOCHS_FOR_MISLABELLED = 2
MIN_SAMPLES_FOR_CUT = 100  # fewer samples than this make no density: the fixed AUM rule applies
MIN_MODE_SHARE = 0.01  # a low mode holds at least this share of the samples, or it is the tail of the hard ones

STAT_COLUMNS = ("index", "label", "pred", "correct", "loss", "margin", "confidence", "grad_norm", "epochs",
                "aum", "forgetting", "confidence_mean", "variability", "hard", "mislabelled")

_TYPES = {"index": pa.int64(), "label": pa.int64(), "pred": pa.int64(), "correct": pa.bool_(),
          "epochs": pa.int32(), "forgetting": pa.int32(), "hard": pa.bool_(), "mislabelled": pa.bool_()}
STATS_SCHEMA = pa.schema([(name, _TYPES.get(name, pa.float64())) for name in STAT_COLUMNS])

_BINS = 512  # histogram of the AUMs the density is smoothed from: O(n) at any table size
_CONFUSION_WEIGHT = 0.5  # how far (in AUM interquartile ranges per unit of log lift) a confusion moves a sample
_NEAR = 0.5  # how far (in AUM interquartile ranges) the second pass may move the first pass's cut
_CONFUSION_PRIOR = 1.0  # pseudo-count that keeps a lone suspect's (label, pred) pair from counting as a pattern


@dataclass(frozen=True)
class FlagRule:
    """How the flags are decided. ``aum_threshold``: no sample with an AUM at or above it is
    flagged likely mislabelled; with ``adaptive`` (default) the cut is found below it from the
    run's AUM distribution, without it the threshold itself is the cut (the rule before 0.x)."""

    hard_quantile: float = 0.9
    aum_threshold: float = 0.0
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.hard_quantile < 1.0:
            raise ConfigError(f"hard_quantile must be between 0 and 1 (e.g. 0.9), got {self.hard_quantile}")
        if not np.isfinite(self.aum_threshold):
            raise ConfigError(f"aum_threshold must be a finite number (e.g. 0), got {self.aum_threshold}")

    def describe(self) -> dict[str, Any]:
        after = f"after at least {MIN_EPOCHS_FOR_MISLABELLED} epochs"
        if not self.adaptive:
            mislabelled = f"area under the margin (mean margin over epochs) below {self.aum_threshold:g}, {after}"
        else:
            mislabelled = (f"area under the margin (mean margin over epochs) below the valley between the run's "
                           f"main AUM mode and a low one (and below {self.aum_threshold:g}), systematic "
                           f"(label, prediction) confusions moved down first, and at least as many as "
                           f"confident learning counts from the epoch's probabilities; {after}; nothing while "
                           f"no low mode has formed")
        return {"hard": f"loss at or above the epoch's p{round(self.hard_quantile * 100)}",
                "mislabelled": mislabelled}


def add_flags(table: pa.Table, rule: FlagRule) -> pa.Table:
    """``table`` (every sample seen at the epoch, every column of ``STAT_COLUMNS`` but the flags;
    flags already there are recomputed) with ``hard`` and ``mislabelled`` added, cast to
    ``STATS_SCHEMA``. The flags are decided over the whole epoch (a quantile, the AUM
    distribution, per-class confusions), so ``table`` must hold every sample of it; filter
    afterwards. O(n) but for one partial sort of the suspects."""
    loss = _floats(table, "loss")
    finite = loss[np.isfinite(loss)]
    hard_cut = float(np.quantile(finite, rule.hard_quantile)) if finite.size else np.inf
    hard = np.isfinite(loss) & (loss >= hard_cut)
    mislabelled = _mislabelled(_floats(table, "aum"), _ints(table, "label"), _ints(table, "pred"),
                               _floats(table, "epochs"), _floats(table, "confidence"), _floats(table, "margin"),
                               rule)
    columns = {name: table.column(name) for name in table.schema.names}
    columns["hard"], columns["mislabelled"] = pa.chunked_array([hard]), pa.chunked_array([mislabelled])
    return pa.table([columns[name].cast(STATS_SCHEMA.field(name).type) for name in STAT_COLUMNS],
                    schema=STATS_SCHEMA)


def with_flags(batch: pa.RecordBatch, hard_cut: float, rule: FlagRule) -> pa.RecordBatch:
    """``batch`` with the flags of the *fixed* rule (AUM below ``rule.aum_threshold``), which
    needs no other row: kept for callers that flag one record batch at a time. The default rule
    needs the whole epoch: use :func:`add_flags`."""
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


def mislabelled_cut(aum: np.ndarray, ceiling: float = 0.0, near: float | None = None) -> float:
    """The AUM below which samples count as likely mislabelled: the least dense point between the
    distribution's main mode and its most prominent low mode (one below zero, or below ``ceiling``
    if that is higher, holding at least ``MIN_MODE_SHARE`` of the samples), and never above
    ``ceiling``; ``-inf`` when there is no such mode. With ``near``: the least dense point within
    half an interquartile range of it instead (the second pass). ``aum``: finite values."""
    aum = np.asarray(aum, dtype=np.float64)
    if aum.size < 2:
        return -np.inf
    sample = _spread_sample(aum)
    q1, median, q3 = np.quantile(sample, [0.25, 0.5, 0.75])
    iqr = q3 - q1
    spread = min(float(sample.std()), iqr / 1.34) or float(sample.std())
    if not spread > 0:
        return -np.inf
    # The range is bounded so that one absurd AUM cannot squeeze the rest into a few bins.
    lowest, highest = float(aum.min()), float(aum.max())
    low, high = max(lowest, median - 50 * iqr), min(highest, median + 50 * iqr)
    counts, edges = np.histogram(aum if (low, high) == (lowest, highest) else np.clip(aum, low, high), _BINS,
                                 (low, high))
    centers = (edges[:-1] + edges[1:]) / 2
    step = centers[1] - centers[0]
    bandwidth = 0.9 * spread * aum.size ** -0.2  # Silverman's rule of thumb
    reach = max(1, int(4 * bandwidth / step))
    kernel = np.exp(-0.5 * (np.arange(-reach, reach + 1) * step / bandwidth) ** 2)
    density = np.convolve(np.pad(counts.astype(np.float64), reach), kernel, "valid")
    top = int(density.argmax())
    if centers[top] <= min(ceiling, 0.0):
        return -np.inf
    if near is not None:
        window = np.flatnonzero((np.abs(centers - near) <= _NEAR * iqr) & (centers < ceiling))
        return float(min(centers[window[np.argmin(density[window])]], ceiling)) if window.size else near
    inner = np.arange(1, top)  # local maxima left of the main mode, below zero (or the ceiling)
    peaks = inner[(density[inner] > density[inner - 1]) & (density[inner] >= density[inner + 1])
                  & (centers[inner] < max(ceiling, 0.0))]
    valleys = np.array([p + int(np.argmin(density[p:top + 1])) for p in peaks], dtype=np.int64)
    # A ripple in the tail of the hard samples holds too few of them to count as a mode.
    below = np.cumsum(counts)[np.maximum(valleys - 1, 0)]
    keep = below >= MIN_MODE_SHARE * aum.size
    if not keep.any():
        return -np.inf
    peaks, valleys = peaks[keep], valleys[keep]
    # The low mode that stands out most above the valley between it and the main mode.
    valley = valleys[int(np.argmax(density[peaks] - density[valleys]))]
    return float(min(centers[valley], ceiling))


def _mislabelled(aum: np.ndarray, label: np.ndarray, pred: np.ndarray, epochs: np.ndarray,
                 confidence: np.ndarray, margin: np.ndarray, rule: FlagRule) -> np.ndarray:
    flagged = np.zeros(aum.shape[0], dtype=bool)
    # Regression runs have no margin (AUM is NaN), nor rows whose label had no logit.
    eligible = np.isfinite(aum) & (epochs >= MIN_EPOCHS_FOR_MISLABELLED) & (label >= 0) & (pred >= 0)
    every = bool(eligible.all())
    rows = slice(None) if every else np.flatnonzero(eligible)  # a view, not a copy, in the usual case
    if not rule.adaptive or int(eligible.sum()) < MIN_SAMPLES_FOR_CUT:
        flagged[rows] = aum[rows] < rule.aum_threshold
        return flagged
    a, y, p = aum[rows], label[rows], pred[rows]
    # First pass, AUM alone: is there a low mode at all, and who is in it.
    cut = mislabelled_cut(a, rule.aum_threshold)
    if cut == -np.inf:
        return flagged
    # Second pass: the same cut on AUM moved down for systematic confusions among those suspects.
    q1, q3 = np.quantile(_spread_sample(a), [0.25, 0.75])
    score = a - (q3 - q1) * _confusion_shift(a < cut, y, p)
    score_cut = mislabelled_cut(score, rule.aum_threshold, near=cut)
    flagged_rows = (score < score_cut) & (a < rule.aum_threshold)
    # Third: no fewer than confident learning counts (a cut at a ripple of a flat low mode flags a
    # fraction of them), taking only samples it counts as another class, lowest moved AUM first.
    count, elsewhere = _confident_joint(y, p, confidence[rows], margin[rows])
    missing = round(count) - int(np.count_nonzero(flagged_rows))
    if missing > 0:
        more = np.flatnonzero(elsewhere & ~flagged_rows & (a < rule.aum_threshold))
        if more.size > missing:
            more = more[np.argpartition(score[more], missing)[:missing]]
        flagged_rows[more] = True
    flagged[rows] = flagged_rows
    return flagged


def _confident_joint(label: np.ndarray, pred: np.ndarray, confidence: np.ndarray, margin: np.ndarray
                     ) -> tuple[float, np.ndarray]:
    """(how many labels confident learning estimates are wrong, which samples it counts as
    confidently another class), from the run's probabilities at one epoch (Northcutt et al.,
    2021: the off-diagonal of the calibrated confident joint). A class's threshold is the mean
    probability its labelled samples give it. A sample is confidently its prediction, another
    class, when that class gets at least the class's threshold (the prediction's probability is
    the label's times ``exp(-margin)``: the margin is a gap of log-probabilities); else
    confidently its label when the label gets at least its own; neither, it is not counted. The
    estimate: per label, the share of its confident samples that are confidently another class,
    times the label's count. ``confidence``: the labelled class's probability; rows with NaN
    there or in ``margin`` are never counted."""
    known = np.isfinite(confidence) & np.isfinite(margin)
    elsewhere = np.zeros(label.shape[0], dtype=bool)
    if not known.any():
        return 0.0, elsewhere
    classes = int(max(label.max(), pred.max())) + 1
    if classes > 1 << 22:  # not a class column to count into: renumber (a sort)
        values, inverse = np.unique(np.concatenate([label, pred]), return_inverse=True)
        label, pred, classes = inverse[:label.size], inverse[label.size:], values.size
    y, p, conf = label[known], pred[known], confidence[known]
    labelled = np.bincount(y, minlength=classes)
    threshold = np.bincount(y, weights=conf, minlength=classes) / np.maximum(labelled, 1)
    threshold[labelled == 0] = np.inf  # a class no sample is labelled with has no threshold
    # The largest other class's probability: the prediction's when the prediction is wrong.
    other = conf * np.exp(-margin[known])
    off = (p != y) & (other >= threshold[p])
    own = ~off & (conf >= threshold[y])
    off_count = np.bincount(y, weights=off, minlength=classes)
    confident = off_count + np.bincount(y, weights=own, minlength=classes)
    elsewhere[known] = off
    return float((np.bincount(label, minlength=classes) * off_count / np.maximum(confident, 1)).sum()), elsewhere


def _confusion_shift(suspect: np.ndarray, label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """How far down (in AUM interquartile ranges) each sample moves for sitting in a systematic
    confusion: the log of how many *other* suspects share its (label, pred) pair over how many
    the label's other suspects, spread evenly over the other classes, would put there. Zero for
    a sample predicted as its label, and with two classes (one pair per label: no pattern)."""
    shift = np.zeros(label.shape[0])
    few = label.size and int(label.max()) < 1 << 22  # counting beats sorting for a class column
    classes = int(np.count_nonzero(np.bincount(label))) if few else np.unique(label).size
    off = np.flatnonzero(pred != label)
    if classes < 3 or off.size == 0:
        return shift
    y, p = label[off], pred[off]
    wrong = suspect[off].astype(np.float64)
    pairs, pair_of = np.unique(y * (int(p.max()) + 1) + p, return_inverse=True)
    labels, label_of = np.unique(y, return_inverse=True)
    pair_of, label_of = pair_of.reshape(-1), label_of.reshape(-1)
    in_pair = np.bincount(pair_of, weights=wrong, minlength=pairs.size)[pair_of] - wrong
    in_label = np.bincount(label_of, weights=wrong, minlength=labels.size)[label_of] - wrong
    lift = (in_pair + _CONFUSION_PRIOR) / (in_label / (classes - 1) + _CONFUSION_PRIOR)
    shift[off] = _CONFUSION_WEIGHT * np.log(lift)
    return shift


def _spread_sample(values: np.ndarray, size: int = 200_000) -> np.ndarray:
    """At most ``size`` of ``values``, evenly strided: enough for a median, quartiles and a standard
    deviation, without sorting a million numbers."""
    return values if values.size <= size else values[:: -(-values.size // size)]


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _ints(table: pa.Table, name: str) -> np.ndarray:
    """A class column, with what is no class (null, NaN: a regression run's labels) as -1."""
    values = table.column(name).to_numpy(zero_copy_only=False)
    if values.dtype.kind in "iu":
        return np.asarray(values, dtype=np.int64)
    values = values.astype(np.float64)  # nulls come out as NaN
    return np.where(np.isfinite(values), values, -1).astype(np.int64)
