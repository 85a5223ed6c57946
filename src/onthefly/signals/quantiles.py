"""Robust summaries of per-sample values: exact (from the store, at the end of an epoch) and
approximate (a uniform reservoir sample, live inside an epoch).

Exact NumPy quantiles measured faster than a sketch at the sizes a session holds (a million
float32 values: ~15 ms for the five quantiles with ``np.quantile``), so a sketch is only used
where the values arrive in pieces: the epoch in progress.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["QUANTILES", "Reservoir", "robust_summary"]

QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
RESERVOIR_SIZE = 16_384  # quantile error ~ 1/sqrt(n): about 1 % of rank at this size


def robust_summary(values: np.ndarray, *, exact: bool = True, count: int | None = None) -> dict[str, Any]:
    """Quantiles p50/p90/p95/p99, mean, median and MAD (median absolute deviation) of the finite
    values. ``count`` is the number of values summarised, when ``values`` is a sample of them."""
    finite = values[np.isfinite(values)].astype(np.float64, copy=False)
    total = int(finite.size if count is None else count)
    if finite.size == 0:
        return {"count": total, "exact": exact, "quantiles": None, "mean": None, "median": None, "mad": None}
    qs = np.quantile(finite, list(QUANTILES.values()))
    median = float(qs[0])
    return {
        "count": total,
        "exact": exact,
        "quantiles": {name: float(q) for name, q in zip(QUANTILES, qs, strict=True)},
        "mean": float(finite.mean()),
        "median": median,
        "mad": float(np.median(np.abs(finite - median))),
    }


class Reservoir:
    """A uniform random sample of at most ``size`` values from a stream (each value kept with
    equal probability): values get random keys and the smallest keys are kept. Thread-safe."""

    def __init__(self, size: int = RESERVOIR_SIZE, seed: int = 0) -> None:
        self.size = size
        self.seen = 0
        self._rng = np.random.default_rng(seed)  # its own generator: never the user's RNG
        self._values = np.empty(0, dtype=np.float32)
        self._keys = np.empty(0, dtype=np.float64)
        self._lock = threading.Lock()

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32)
        values = values[np.isfinite(values)]
        with self._lock:
            self.seen += values.size
            keys = np.concatenate((self._keys, self._rng.random(values.size)))
            merged = np.concatenate((self._values, values))
            if merged.size > self.size:
                keep = np.argpartition(keys, self.size - 1)[: self.size]
                keys, merged = keys[keep], merged[keep]
            self._keys, self._values = keys, merged

    def values(self) -> np.ndarray:
        with self._lock:
            return self._values.copy()

    def summary(self) -> dict[str, Any]:
        values = self.values()
        return robust_summary(values, exact=values.size == self.seen, count=self.seen)
