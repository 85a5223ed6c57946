"""Compare experts: several models evaluated on several sample sets, with paired intervals.

Every model is evaluated on a set (a slice of the training data, "val", "test") by the same
code, :func:`evaluate_set`, which goes through the engine's own evaluation; the per-sample
results are therefore *paired*: position ``i`` of every run's results on a set is the same
sample. :func:`compare` uses that pairing. A difference between two models on one set is the
mean of per-sample differences, and its interval comes from a paired bootstrap: each resample
draws sample positions with replacement and uses the same draw for both models. The models'
errors are strongly correlated (easy samples are easy for both), and pairing removes that shared
part from the interval; two independent intervals would be far wider and could hide a real gain.
For accuracy, McNemar's test looks only at the discordant samples (one model right, the other
wrong), the ones :func:`compare` lists as ``fixed`` and ``broken``.

Runs on the thread that calls it (the training thread, between runs' turns): evaluation uses the
model and the device, and leaves the model's mode, parameters and every RNG as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..engine.batch import BatchSpec
from ..engine.evaluate import evaluate
from ..errors import ConfigError
from ..signals.per_sample import PerSampleLoss
from ..signals.recorder import LABEL, LOSS, PRED

__all__ = ["PerSample", "compare", "evaluate_set"]

# Resamples are drawn in chunks held as a [resamples, n] matrix of draw counts, so that 2000
# resamples of a million samples never hold 16 GiB. About CHUNK_VALUES counts a chunk (4 MiB of
# int64: the scatter that counts the draws stays in cache; 8x larger chunks measured 1.2-1.5x
# slower with 60k samples), but at least MIN_CHUNK resamples: one-row products made OpenBLAS's
# threads spin against another process on a shared CPU, 3-5x slower.
CHUNK_VALUES = 1 << 19
MIN_CHUNK = 8
EXACT_BELOW = 25  # McNemar: exact binomial test when b + c is below this, else chi-square


@dataclass(eq=False)  # arrays have no single truth value, so no generated __eq__
class PerSample:
    """One model's per-sample results on one evaluation set, in the set's order."""

    ids: np.ndarray  # int64 dataset indices
    loss: np.ndarray  # float64
    correct: np.ndarray | None  # bool; None when the task is not classification
    label: np.ndarray | None  # int64 targets (classification), else None
    pred: np.ndarray | None  # int64 predictions (classification), else None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def evaluate_set(
    model: nn.Module, dataset: Dataset, indices: np.ndarray | None, *, loss: PerSampleLoss,
    spec: BatchSpec, device: torch.device, batch_size: int = 256, collate_fn: Callable[[list[Any]], Any] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> PerSample:
    """Evaluate ``model`` on ``dataset[indices]`` (all of ``dataset`` when ``indices`` is None),
    in that order, with the engine's evaluation: the same per-sample code for every run, so that
    results of different models on the same indices are paired sample by sample.

    Nothing about training changes: the model is put in eval mode for the pass and back in its
    mode after, no parameter or buffer is written (``torch.no_grad``, eval-mode batch norm) and
    every RNG is restored (creating a DataLoader iterator draws from torch's). The model must
    already be on ``device``. Losses are the engine's float32 values, widened to float64.
    """
    if isinstance(dataset, IterableDataset):
        raise ConfigError(
            f"evaluate_set needs a dataset that can be indexed (a map-style Dataset), got the iterable "
            f"{type(dataset).__name__}: its samples have no stable indices to pair runs on."
        )
    ids = _checked_indices(dataset, indices)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    # No shuffling: a sequential sampler, so the loader's positions are positions in ``ids``.
    loader = DataLoader(dataset if indices is None else Subset(dataset, ids.tolist()),
                        batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        pin_memory=device.type == "cuda")  # lets the engine's copies to the GPU not block
    received: list[tuple[np.ndarray, np.ndarray, bool]] = []
    evaluate(model, loader, loss, spec, device, autocast,
             per_sample=lambda positions, rows, classification: received.append((positions, rows, classification)))
    assert len(received) == 1, "evaluate hands its per-sample rows over once"
    positions, rows, classification = received[0]
    assert np.array_equal(np.sort(positions), np.arange(len(ids))), "every position evaluated once"
    ordered = np.empty_like(rows)
    ordered[positions] = rows  # subset position -> place in ``ids`` (already in order here)
    if not classification:
        return PerSample(ids=ids, loss=ordered[:, LOSS].astype(np.float64), correct=None, label=None, pred=None)
    label = ordered[:, LABEL].astype(np.int64)  # float32 columns hold class ids exactly up to 2**24
    pred = ordered[:, PRED].astype(np.int64)
    return PerSample(ids=ids, loss=ordered[:, LOSS].astype(np.float64), correct=pred == label, label=label,
                     pred=pred)


def _checked_indices(dataset: Dataset, indices: np.ndarray | None) -> np.ndarray:
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"evaluate_set needs a dataset with a length, got {type(dataset).__name__}") from None
    if indices is None:
        ids = np.arange(size, dtype=np.int64)
    else:
        given = np.asarray(indices)
        if given.ndim != 1 or not (np.issubdtype(given.dtype, np.integer) or given.size == 0):
            raise ConfigError(
                f"indices must be a 1-D array of integer dataset indices, got shape {given.shape} of "
                f"{given.dtype}; pass e.g. np.asarray(slice_ids, dtype=np.int64), or None for the whole dataset."
            )
        ids = given.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= size):
            raise ConfigError(
                f"indices must lie in [0, {size}) for a dataset of {size} samples, got values from "
                f"{int(ids.min())} to {int(ids.max())}."
            )
        if np.unique(ids).size != ids.size:
            raise ConfigError(
                f"indices hold {ids.size - np.unique(ids).size} duplicate(s); an evaluation set names each "
                "sample once (a repeated sample would count twice in every mean and interval)."
            )
    if ids.size == 0:
        raise ConfigError("the evaluation set is empty: there is no sample to evaluate. Give at least one index.")
    return ids


def compare(
    results: Mapping[str, Mapping[str, PerSample]], reference: str, *, n_boot: int = 2000, seed: int = 0,
    confidence: float = 0.95, min_n: int = 30,
) -> dict[str, Any]:
    """Compare every run with ``reference`` on every set, from ``results[run][set]``.

    Each run must have been evaluated on the same sets as the reference, on the same sample ids in
    the same order (what :func:`evaluate_set` with the same ``indices`` gives): the comparison is
    paired by position, and unpaired results raise :class:`ConfigError`.

    Returns a JSON-able dict: ``reference``, ``sets`` (the reference's order), ``runs`` (the order of
    ``results``), ``confidence``, ``n_boot`` and ``cells``, one per (run, set), runs outer, sets inner.
    A cell has ``run``, ``set``, ``n``, ``loss`` (the mean over finite losses, None if there is none),
    ``nan_losses`` (how many are not finite), ``accuracy`` and ``per_class`` (``{str(label): {"n",
    "accuracy"}}``; both None for a task that is not classification). A cell of any other run than
    the reference also has, with differences taken as run minus reference:

    * ``diff``: ``{"accuracy": {"value", "low", "high"} | None, "loss": {...} | None,
      "interval_note": str | None}``. ``low``/``high`` form a paired-bootstrap percentile interval at
      ``confidence``, or are None when fewer than ``min_n`` samples back the value, which the note
      says. Samples whose loss is not finite in either run are left out of the loss difference
      (the note counts them). Accuracy is None unless both runs are classification.
    * ``mcnemar``: ``{"b", "c", "p", "method"}``: ``b`` samples the reference got right and this run
      wrong, ``c`` the reverse; ``p`` two-sided, exact binomial when b + c < 25, else chi-square with
      continuity correction. ``fixed``: ids wrong for the reference, right here (c of them);
      ``broken``: ids right for the reference, wrong here (b of them), in the set's order.
      All three None unless both runs are classification.

    Every set gets its own ``numpy.random.default_rng(seed)``, and all runs on a set share its
    resamples: a cell's interval depends on ``seed`` and on its two runs' results alone (up to
    floating-point rounding), not on which other runs or sets are compared alongside.
    """
    _check_options(n_boot, confidence, min_n)
    if not results:
        raise ConfigError("compare needs the results of at least one run; got none.")
    runs = list(results)
    if reference not in results:
        raise ConfigError(f"the reference run {reference!r} has no results; the runs given are {runs}.")
    sets = list(results[reference])
    _check_paired(results, reference, sets)
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for set_name in sets:
        ref = results[reference][set_name]
        others = [run for run in runs if run != reference]
        cells[(reference, set_name)] = _summary(reference, set_name, ref)
        diffs = _differences([results[run][set_name] for run in others], ref, n_boot, seed, confidence, min_n)
        for run, diff in zip(others, diffs, strict=True):
            cells[(run, set_name)] = {**_summary(run, set_name, results[run][set_name]), **diff}
    return {
        "reference": reference,
        "sets": sets,
        "runs": runs,
        "confidence": confidence,
        "n_boot": n_boot,
        "cells": [cells[(run, set_name)] for run in runs for set_name in sets],
    }


def _check_options(n_boot: int, confidence: float, min_n: int) -> None:
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive number of resamples (e.g. 2000), got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    if not isinstance(min_n, int) or min_n < 1:
        raise ConfigError(f"min_n must be a positive number of samples (e.g. 30), got {min_n!r}")


def _check_paired(results: Mapping[str, Mapping[str, PerSample]], reference: str, sets: list[str]) -> None:
    """Same sets for every run, and on each set the same ids in the same order: the pairing."""
    for run, by_set in results.items():
        if set(by_set) != set(sets):
            raise ConfigError(
                f"run {run!r} was evaluated on the sets {sorted(by_set)} but the reference {reference!r} on "
                f"{sorted(sets)}; every run needs results on the same sets. Evaluate the missing ones with "
                "evaluate_set, or leave those sets out."
            )
    for run, by_set in results.items():
        for set_name, result in by_set.items():
            _check_shapes(run, set_name, result)
    for set_name in sets:
        ref_ids = results[reference][set_name].ids
        for run, by_set in results.items():
            ids = by_set[set_name].ids
            if np.array_equal(ids, ref_ids):
                continue
            if ids.shape != ref_ids.shape:
                detail = f"{ids.shape[0]} samples against {ref_ids.shape[0]}"
            else:
                at = int(np.flatnonzero(ids != ref_ids)[0])
                detail = f"first difference at position {at}: id {int(ids[at])} against {int(ref_ids[at])}"
            raise ConfigError(
                f"set {set_name!r}: run {run!r} was evaluated on other samples than the reference "
                f"{reference!r} ({detail}). Results must be paired: evaluate every run with evaluate_set "
                "on the same indices, in the same order."
            )


def _check_shapes(run: str, set_name: str, result: PerSample) -> None:
    if not isinstance(result, PerSample):
        raise ConfigError(
            f"run {run!r}, set {set_name!r}: expected the PerSample that evaluate_set returns, got "
            f"{type(result).__name__}."
        )
    n = len(result)
    for name in ("loss", "correct", "label", "pred"):
        values = getattr(result, name)
        if values is not None and values.shape != (n,):
            raise ConfigError(
                f"run {run!r}, set {set_name!r}: {name} has shape {values.shape} but there are {n} ids; "
                "every per-sample array holds one value per id."
            )


def _summary(run: str, set_name: str, result: PerSample) -> dict[str, Any]:
    """The cell's own numbers: size, mean loss, accuracy, accuracy per class."""
    finite = np.isfinite(result.loss)
    cell: dict[str, Any] = {
        "run": run, "set": set_name, "n": len(result),
        "loss": float(result.loss[finite].mean()) if finite.any() else None,
        "nan_losses": int((~finite).sum()),
        "accuracy": None, "per_class": None,
    }
    if result.correct is not None and len(result):
        cell["accuracy"] = float(result.correct.mean())
    if result.correct is not None and result.label is not None:
        labels, inverse, counts = np.unique(result.label, return_inverse=True, return_counts=True)
        right = np.bincount(inverse, weights=result.correct, minlength=labels.size)
        cell["per_class"] = {str(int(label)): {"n": int(count), "accuracy": float(r / count)}
                             for label, count, r in zip(labels, counts, right, strict=True)}
    return cell


def _differences(runs: list[PerSample], ref: PerSample, n_boot: int, seed: int, confidence: float,
                 min_n: int) -> list[dict[str, Any]]:
    """``diff``, ``mcnemar``, ``fixed`` and ``broken`` of each run against ``ref`` on one set.

    Each mean difference is a column: per-sample differences with weights (1 for a sample that
    counts, 0 for one left out). All columns of the set get their intervals from one set of
    resamples, drawn once.
    """
    n = len(ref)
    columns: list[_Column] = []
    notes: list[list[str]] = []
    for position, run in enumerate(runs):
        said = [] if n >= min_n else [f"n = {n} < {min_n}: too few samples for an interval"]
        if run.correct is not None and ref.correct is not None and n:
            columns.append(_Column(position, "accuracy", run.correct.astype(np.float64) - ref.correct,
                                   np.ones(n), interval=n >= min_n))
        finite = np.isfinite(run.loss) & np.isfinite(ref.loss)
        kept = int(finite.sum())
        if kept < n:
            said.append(f"{n - kept} sample(s) with a NaN or infinite loss in either run left out of the "
                        "loss difference")
        if kept:
            columns.append(_Column(position, "loss", np.where(finite, run.loss - ref.loss, 0.0),
                                   finite.astype(np.float64), interval=kept >= min_n))
        if n >= min_n > kept:
            said.append(f"only {kept} sample(s) with finite losses, < {min_n}: no interval for the loss difference")
        notes.append(said)
    intervals = _paired_bootstrap(columns, n_boot, seed, confidence)
    diffs: list[dict[str, Any]] = [{"accuracy": None, "loss": None, "interval_note": "; ".join(said) or None}
                                   for said in notes]
    for column, (low, high) in zip(columns, intervals, strict=True):
        diffs[column.run][column.metric] = {"value": column.mean(), "low": low, "high": high}
    return [{"diff": diff, **_discordant(run, ref)} for run, diff in zip(runs, diffs, strict=True)]


@dataclass(eq=False)
class _Column:
    """One mean difference on a set: sum(weights * values) / sum(weights), of one run's metric."""

    run: int  # position in the runs compared on the set
    metric: str  # "accuracy" or "loss"
    values: np.ndarray  # per-sample run minus reference
    weights: np.ndarray  # 1 for a sample that counts, 0 for one left out
    interval: bool  # enough samples for an interval

    def mean(self) -> float:
        return float((self.values * self.weights).sum() / self.weights.sum())


def _paired_bootstrap(columns: list[_Column], n_boot: int, seed: int, confidence: float
                      ) -> list[tuple[float | None, float | None]]:
    """Percentile intervals of the columns' weighted means; (None, None) where not wanted.

    A resample draws n sample positions with replacement, the same draw for every column (so both
    runs of a difference see the same samples). It is held as counts, how many times each position
    was drawn, so a chunk of resamples is one matrix product with all columns at once.
    """
    intervals: list[tuple[float | None, float | None]] = [(None, None)] * len(columns)
    chosen = [i for i, column in enumerate(columns) if column.interval]
    if not chosen:
        return intervals
    # [n, 2k]: the weighted values of the k columns, then their weights
    stacked = np.stack([columns[i].values * columns[i].weights for i in chosen]
                       + [columns[i].weights for i in chosen], axis=1)
    n, k = stacked.shape[0], len(chosen)
    rng = np.random.default_rng(seed)
    chunk = min(n_boot, max(MIN_CHUNK, CHUNK_VALUES // n))
    means: list[np.ndarray] = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        drawn = rng.integers(0, n, size=(rows, n))
        drawn += (np.arange(rows) * n)[:, None]  # offsets keep the resamples' positions apart
        # counts[r, i]: how many times resample r drew position i
        counts = np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        sums = counts @ stacked  # one pass over the counts for every column
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample may miss every kept sample
            means.append(sums[:, :k] / sums[:, k:])
    tail = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(np.concatenate(means), [tail, 1.0 - tail], axis=0)
    for j, i in enumerate(chosen):
        intervals[i] = (float(low[j]), float(high[j]))
    return intervals


def _discordant(run: PerSample, ref: PerSample) -> dict[str, Any]:
    """McNemar's test and the samples it counts; None for each unless both are classification."""
    if run.correct is None or ref.correct is None:
        return {"mcnemar": None, "fixed": None, "broken": None}
    fixed = ~ref.correct & run.correct
    broken = ref.correct & ~run.correct
    b, c = int(broken.sum()), int(fixed.sum())
    p, method = _mcnemar(b, c)
    return {"mcnemar": {"b": b, "c": c, "p": p, "method": method},
            "fixed": ref.ids[fixed].tolist(), "broken": ref.ids[broken].tolist()}


def _mcnemar(b: int, c: int) -> tuple[float, str]:
    """Two-sided McNemar p-value of b and c discordant pairs, and the method used.

    Under "no difference" each discordant sample is equally likely to fall either way, so b is
    Binomial(b + c, 1/2): exact below ``EXACT_BELOW`` pairs, else the chi-square(1) approximation
    with continuity correction, (|b - c| - 1)^2 / (b + c), the correction floored at 0 so that b = c
    gives p = 1.
    """
    total = b + c
    if total == 0:
        return 1.0, "exact"
    from scipy import (
        stats,  # here, not at the top: a training process that never compares need not load it (60 MiB)
    )

    if total < EXACT_BELOW:
        return float(stats.binomtest(b, total, 0.5).pvalue), "exact"
    statistic = max(abs(b - c) - 1, 0) ** 2 / total
    return float(stats.chi2.sf(statistic, df=1)), "chi2"
