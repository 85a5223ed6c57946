"""Read-only access to a session folder, live or ended: runs, events, metrics, checkpoints,
per-sample tables and what is computed from them (training dynamics, one sample's history),
slices and clusterings. Safe to use while the session's own process is writing (WAL), and from
any thread: every call opens its own SQLite connection or DuckDB cursor."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NotFoundError, StoreError
from ..signals.dynamics import FlagRule
from . import dynamics, queries
from .db import connect
from .samples import read_samples, sample_epochs
from .session import DB_FILE, sessions_root

__all__ = ["SessionReader", "open_session"]


class SessionReader:
    def __init__(self, folder: Path) -> None:
        self.dir = Path(folder)
        db = self.dir / DB_FILE
        if not db.is_file():
            raise StoreError(
                f"{self.dir} is not an On The Fly session folder (no {DB_FILE}). "
                "`onthefly sessions` lists the sessions on this machine."
            )
        self._db = db

    @property
    def db_path(self) -> Path:
        return self._db

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        conn = connect(self._db, readonly=True)
        try:
            return [dict(row) for row in conn.execute(sql, args).fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self._db}: {exc}") from exc
        finally:
            conn.close()

    def info(self) -> dict[str, Any]:
        rows = self._query("SELECT * FROM session")
        return rows[0] if rows else {}

    def runs(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM runs ORDER BY id")
        for row in rows:
            row["config"] = json.loads(row["config"])
        return rows

    def events(self, run_id: int | None = None, *, after_seq: int = 0, kind: str | None = None,
               limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE seq > ?"
        args: list[Any] = [after_seq]
        if run_id is not None:
            sql += " AND run_id = ?"
            args.append(run_id)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self._query(sql, tuple(args))
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        return rows

    def metric_names(self, run_id: int) -> list[str]:
        return [r["name"] for r in self._query(
            "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,))]

    def metrics(self, run_id: int, name: str) -> list[dict[str, Any]]:
        return self._query(
            "SELECT step, epoch, time, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step, time",
            (run_id, name),
        )

    def metric_series(self, run_id: int, name: str, *, start_step: int | None = None,
                      end_step: int | None = None, points: int = 2000) -> dict[str, Any]:
        """One metric's values in a step range, downsampled in SQLite above ``points`` values
        (bucket mean, min and max: spikes survive)."""
        return queries.metric_series(self._db, run_id, name, start_step=start_step, end_step=end_step,
                                     points=points)

    def checkpoints(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """The checkpoint registry; ``path`` is absolute (the registry keeps paths inside the
        session relative to its folder, so that it moves whole)."""
        if run_id is None:
            rows = self._query("SELECT * FROM checkpoints ORDER BY id")
        else:
            rows = self._query("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY id", (run_id,))
        for row in rows:
            row["path"] = str(self.dir / row["path"])  # an absolute path stays as it is
        return rows

    def checkpoint(self, checkpoint_id: int) -> dict[str, Any]:
        for row in self.checkpoints():
            if row["id"] == checkpoint_id:
                return row
        ids = ", ".join(str(r["id"]) for r in self.checkpoints()) or "none"
        raise NotFoundError(f"no checkpoint {checkpoint_id} in session {self.dir.name} (its checkpoints: {ids})")

    def samples(self, run_id: int | None = None, *, epoch: int | None = None,
                split: str = "train") -> pa.Table:
        return read_samples(self.dir, run_id, epoch=epoch, split=split)

    def sample_epochs(self, run_id: int, split: str = "train") -> list[int]:
        """Epochs with per-sample values on disk (the latest may still be being written)."""
        return sample_epochs(self.dir, run_id, split)

    def complete_epochs(self, run_id: int, split: str = "train") -> list[int]:
        """Epochs whose per-sample values are all written (the epoch_summary event is stored
        after the epoch's last Parquet part: one writer, in order)."""
        rows = self._query("SELECT DISTINCT epoch FROM events WHERE run_id = ? AND kind = 'epoch_summary' "
                           "AND json_extract(payload, '$.split') = ? ORDER BY epoch", (run_id, split))
        return [int(r["epoch"]) for r in rows]

    def default_epoch(self, run_id: int, split: str = "train") -> int | None:
        """The epoch views show by default: the latest complete one, else the latest with data."""
        complete = self.complete_epochs(run_id, split)
        if complete:
            return complete[-1]
        epochs = self.sample_epochs(run_id, split)
        return epochs[-1] if epochs else None

    def sample_stats(self, run_id: int, epoch: int | None = None, *, hard_quantile: float = 0.9,
                     aum_threshold: float = 0.0) -> pa.Table:
        """One row per sample at ``epoch`` (default: the latest complete one): loss, margin,
        confidence, grad norm, AUM, forgetting events, cartography, and the hard / likely
        mislabelled flags (see :mod:`onthefly.signals.dynamics`)."""
        rule = FlagRule(hard_quantile=hard_quantile, aum_threshold=aum_threshold)
        return self.sample_stats_at(run_id, epoch, rule=rule)[1]

    def sample_stats_at(self, run_id: int, epoch: int | None = None, *, rule: FlagRule | None = None,
                        split: str = "train") -> tuple[int | None, pa.Table]:
        """(epoch, table): :meth:`sample_stats` with the epoch it was computed at (default: the
        latest complete one), for a ``split`` and a flag rule. Read from the epoch's carried
        aggregates (derived once, from the previous epoch's), and cached while small."""
        if epoch is None:
            epoch = self.default_epoch(run_id, split)
        return dynamics.sample_stats(self.dir, run_id, epoch, split=split, rule=rule)

    def carry_dynamics(self, run_id: int, epoch: int | None = None, *, split: str = "train") -> None:
        """Derive and keep the carried per-sample aggregates of ``epoch`` (default: the latest
        complete one) if they are not on disk yet: the first look at its table is then one
        file read. For the dashboard server to call (off its event loop) when an epoch completes."""
        if epoch is None:
            epoch = self.default_epoch(run_id, split)
        dynamics.carried_state(self.dir, run_id, epoch, split=split)

    def iter_sample_stats(self, run_id: int, epoch: int | None, *, indices: np.ndarray | None = None,
                          rule: FlagRule | None = None, split: str = "train",
                          batch_rows: int = 65_536) -> tuple[int | None, Iterator[pa.RecordBatch]]:
        """(epoch, record batches) of the stats table at ``epoch`` (None: the latest with data),
        only ``indices`` when given, streamed: for exports of large slices."""
        return dynamics.iter_sample_stats(self.dir, run_id, epoch, split=split, rule=rule, indices=indices,
                                          batch_rows=batch_rows)

    def sample_history(self, run_id: int, index: int, *, split: str = "train") -> list[dict[str, Any]]:
        """Every recorded row of one sample, in order of step: its loss, margin... epoch by epoch."""
        return queries.sample_history(self.dir, run_id, index, split=split)

    def loss_distribution(self, run_id: int, epoch: int | None = None, *, bins: int = 50,
                          split: str = "train") -> dict[str, Any]:
        """Histogram, quantiles, median and MAD of per-sample loss at ``epoch`` (default: the
        latest with data), exact: from every stored value."""
        return queries.loss_distribution(self.dir, run_id, epoch, bins=bins, split=split)

    def hardest_samples(self, run_id: int, epoch: int | None = None, *, k: int = 20,
                        split: str = "train") -> dict[str, Any]:
        """The ``k`` samples with the highest loss at ``epoch`` (default: the latest with data)."""
        return queries.hardest_samples(self.dir, run_id, epoch, k=k, split=split)

    # ---- plan cards, lineage, comparisons ------------------------------------------------------
    def plans(self, status: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM plans"
        args: tuple[Any, ...] = ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        rows = self._query(sql + " ORDER BY id", args)
        for row in rows:
            for key in ("card", "result", "runs"):
                row[key] = json.loads(row[key]) if row[key] is not None else None
        return rows

    def plan(self, plan_id: int) -> dict[str, Any]:
        for row in self.plans():
            if row["id"] == plan_id:
                return row
        raise NotFoundError(f"no plan card {plan_id} in this session")

    def edges(self) -> list[dict[str, Any]]:
        return self._query("SELECT * FROM edges ORDER BY created, child_id")

    def lineage(self) -> dict[str, Any]:
        """The session's runs as a graph: nodes (id, name, status, created) and edges (child,
        parent, kind, step, checkpoint, plan card)."""
        nodes = [{"id": r["id"], "name": r["name"], "status": r["status"], "created": r["created"],
                  "parent_id": r["parent_id"]} for r in self.runs()]
        edges = [{"child": e["child_id"], "parent": e["parent_id"], "kind": e["kind"], "step": e["step"],
                  "checkpoint_id": e["checkpoint_id"], "plan_id": e["plan_id"]} for e in self.edges()]
        listed = {(e["child"], e["parent"]) for e in edges}
        for node in nodes:  # a resume from an earlier checkpoint records its parent on the run only
            if node["parent_id"] is not None and (node["id"], node["parent_id"]) not in listed:
                run = next(r for r in self.runs() if r["id"] == node["id"])
                edges.append({"child": node["id"], "parent": node["parent_id"], "kind": "resume", "step": None,
                              "checkpoint_id": run["parent_checkpoint_id"], "plan_id": None})
        return {"nodes": nodes, "edges": edges}

    def comparisons(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM comparisons ORDER BY id")
        for row in rows:
            row["request"], row["result"] = json.loads(row["request"]), json.loads(row["result"])
        return rows

    def comparison(self, comparison_id: int) -> dict[str, Any]:
        rows = [r for r in self.comparisons() if r["id"] == comparison_id]
        if not rows:
            raise NotFoundError(f"no comparison {comparison_id} in this session")
        return rows[0]

    # ---- slices and clusterings ---------------------------------------------------------------
    def slices(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM slices ORDER BY id")
        for row in rows:
            row["definition"] = json.loads(row["definition"])
        return rows

    def slice(self, name: str) -> dict[str, Any]:
        """A saved slice by name (its definition and where its indices are)."""
        for row in self.slices():
            if row["name"] == name:
                return row
        names = ", ".join(repr(r["name"]) for r in self.slices()) or "none yet"
        raise NotFoundError(f"no slice named {name!r} in this session (saved slices: {names})")

    def slice_indices(self, record: dict[str, Any]) -> np.ndarray:
        """The sample indices a saved slice resolved to when it was saved."""
        path = self.dir / record["path"]
        try:
            return pq.read_table(path, columns=["index"]).column("index").to_numpy()
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read the indices of slice {record['name']!r} from {path}: {exc}") from exc

    def clusterings(self, run_id: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM clusterings"
        args: tuple[Any, ...] = ()
        if run_id is not None:
            sql, args = sql + " WHERE run_id = ?", (run_id,)
        rows = self._query(sql + " ORDER BY id", args)
        for row in rows:
            row["details"] = json.loads(row["details"])
        return rows

    def clustering(self, clustering_id: int) -> dict[str, Any]:
        for row in self.clusterings():
            if row["id"] == clustering_id:
                return row
        raise NotFoundError(f"no clustering {clustering_id} in this session")

    def clustering_points(self, record: dict[str, Any]) -> pa.Table:
        """Per sample: index, cluster, x, y (the 2-D projection)."""
        path = self.dir / record["path"]
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read clustering {record['id']} from {path}: {exc}") from exc


def open_session(session: str | Path) -> SessionReader:
    """Open a session by folder path or by id (as `onthefly sessions` prints it)."""
    path = Path(session)
    if not path.is_dir():
        path = sessions_root() / str(session)
    if not path.is_dir():
        raise StoreError(f"no session {session!r}: not a folder, and not an id under {sessions_root()}")
    return SessionReader(path)
