"""Clustering samples into regimes: features, MiniBatchKMeans, a 2-D PCA view, per-cluster facts.

Features are either

* ``"embeddings"``: what the model computes at a chosen layer (default: the input of the last
  ``nn.Linear``, i.e. the representation the classifier head reads), gathered by a forward hook
  registered for this pass only - nothing is hooked while training; or
* ``"signals"``: the per-sample signals from the store (loss, margin, confidence, AUM,
  forgetting, cartography), standardised.

k is given, or chosen by the silhouette score (on a sample of at most 2,000 points) over 2..8; the
centres are learnt from at most 20,000 rows (a uniform sample) and every row is assigned to its
nearest one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, StateError
from ..store.reader import SessionReader
from ..store.session import SessionStore

__all__ = ["SIGNAL_FEATURES", "ClusterResult", "attach", "cluster_features", "save_clustering", "scatter_points",
           "signal_features", "summarise"]

SIGNAL_FEATURES = ("loss", "margin", "confidence", "aum", "forgetting", "confidence_mean", "variability")
K_CHOICES = range(2, 9)
SILHOUETTE_SAMPLE = 2000
FIT_SAMPLE = 20_000  # rows k-means learns its centres from, at most
MAX_POINTS = 5000  # points a scatter plot receives at most (a uniform sample)


@dataclass
class ClusterResult:
    labels: np.ndarray  # cluster of each row
    xy: np.ndarray  # [n, 2] PCA projection
    k: int
    silhouette: float | None
    chosen_by: str  # "given" or "silhouette"


def signal_features(table: pa.Table) -> np.ndarray:
    """Standardised per-sample signals (columns with no finite value are left out)."""
    columns = []
    for name in SIGNAL_FEATURES:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            continue
        values = np.where(finite, values, np.nanmedian(values[finite]))
        std = values.std()
        columns.append((values - values.mean()) / (std if std > 0 else 1.0))
    return np.stack(columns, axis=1).astype(np.float32)


def cluster_features(features: np.ndarray, k: int | None = None, seed: int = 0) -> ClusterResult:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    n = features.shape[0]
    if n < 3:
        raise StateError(f"clustering needs at least 3 samples, got {n}")
    if k is not None and not 2 <= k <= min(n - 1, 50):
        raise ConfigError(f"k must be between 2 and {min(n - 1, 50)} for {n} samples, got {k}")
    rng = np.random.default_rng(seed)
    probe = rng.choice(n, size=min(n, SILHOUETTE_SAMPLE), replace=False)
    # Centres are learnt on a uniform sample of at most FIT_SAMPLE rows (a million samples would
    # take ~30 s for the 7 candidate k's); every row is then assigned to its nearest centre.
    fit_rows = features if n <= FIT_SAMPLE else features[np.sort(rng.choice(n, size=FIT_SAMPLE, replace=False))]

    def fit(clusters: int) -> tuple[np.ndarray, float | None]:
        model = MiniBatchKMeans(n_clusters=clusters, random_state=seed, n_init=3, batch_size=1024)
        model.fit(fit_rows)
        labels = model.predict(features)
        if len(np.unique(labels[probe])) < 2:
            return labels, None
        return labels, float(silhouette_score(features[probe], labels[probe]))

    if k is not None:
        labels, score = fit(k)
        chosen_by = "given"
    else:
        best: tuple[float, int, np.ndarray] | None = None
        for clusters in K_CHOICES:
            if clusters >= n:
                break
            labels, score = fit(clusters)
            if score is not None and (best is None or score > best[0]):
                best = (score, clusters, labels)
        if best is None:
            raise StateError("the samples' features do not separate into clusters (all identical?)")
        score, k, labels = best
        chosen_by = "silhouette"
    components = min(2, features.shape[1])
    xy = PCA(n_components=components, random_state=seed).fit_transform(features)
    if components < 2:
        xy = np.concatenate([xy, np.zeros((n, 1))], axis=1)
    return ClusterResult(labels=labels.astype(np.int32), xy=xy.astype(np.float32), k=int(k),
                         silhouette=score, chosen_by=chosen_by)


def summarise(result: ClusterResult, table: pa.Table) -> list[dict[str, Any]]:
    """Per cluster: size, mean loss, label mix (label -> count, most common first)."""
    loss = table.column("loss").to_numpy(zero_copy_only=False).astype(np.float64)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    out = []
    for cluster in range(result.k):
        member = result.labels == cluster
        values, counts = np.unique(labels[member & (labels >= 0)], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        finite = loss[member][np.isfinite(loss[member])]
        out.append({
            "cluster": cluster, "size": int(member.sum()),
            "mean_loss": float(finite.mean()) if finite.size else None,
            "labels": {str(int(values[i])): int(counts[i]) for i in order[:10]},
        })
    return out


def save_clustering(store: SessionStore, run_id: int, *, features: str = "signals", k: int | None = None,
                    subset: str = "all", epoch: int | None = None,
                    embed: Callable[[np.ndarray, str | None], tuple[str, np.ndarray]] | None = None,
                    layer: str | None = None) -> dict[str, Any]:
    """Cluster a run's samples (``subset`` "all" or "hard") at an epoch and save the result.
    ``embed(indices, layer)`` computes embeddings (the engine supplies it for a live run)."""
    if features not in ("signals", "embeddings"):
        raise ConfigError(f"features must be 'signals' or 'embeddings', got {features!r}")
    if subset not in ("all", "hard"):
        raise ConfigError(f"subset must be 'all' or 'hard', got {subset!r}")
    store.flush()  # what the run recorded so far is in the files before they are read
    epoch, table = SessionReader(store.dir).sample_stats_at(run_id, epoch)
    if subset == "hard":
        table = table.filter(table.column("hard"))
    if table.num_rows == 0:
        raise StateError(f"run {run_id} has no per-sample values{'' if epoch is None else f' at epoch {epoch}'} "
                         "to cluster yet: train an epoch first")
    indices = table.column("index").to_numpy()
    if features == "embeddings":
        if embed is None:
            raise StateError("embeddings need the model and the training data: cluster a live run started "
                             "by quickstart/Trainer, or use features='signals'")
        layer, matrix = embed(indices, layer)
    else:
        layer, matrix = None, signal_features(table)
    result = cluster_features(matrix, k)
    clusters = summarise(result, table)
    details = {"layer": layer, "subset": subset, "chosen_by": result.chosen_by, "clusters": clusters,
               "dimensions": int(matrix.shape[1]), "method": "MiniBatchKMeans + PCA(2)"}
    points = pa.table({"index": pa.array(indices, pa.int64()), "cluster": pa.array(result.labels),
                       "x": pa.array(result.xy[:, 0]), "y": pa.array(result.xy[:, 1])})
    clustering_id = store.save_clustering(run_id=run_id, epoch=epoch, features=features, k=result.k,
                                          silhouette=result.silhouette, details=details, points=points)
    return SessionReader(store.dir).clustering(clustering_id)


def attach(run: Any) -> None:
    """Let ``run`` (a live engine Run) carry out "cluster" commands at a step boundary."""

    def handle(args: dict[str, Any]) -> dict[str, Any]:
        record = save_clustering(run.session, run.run_id, embed=run.embed, **args)
        return {"clustering": record["id"], "k": record["k"], "silhouette": record["silhouette"],
                "epoch": record["epoch"]}

    run.register_action("cluster", handle)


def scatter_points(points: pa.Table, limit: int = MAX_POINTS, seed: int = 0) -> pa.Table:
    """At most ``limit`` points for a scatter plot: a uniform sample, the same on every call."""
    if points.num_rows <= limit:
        return points
    keep = np.sort(np.random.default_rng(seed).choice(points.num_rows, size=limit, replace=False))
    return points.take(pa.array(keep))
