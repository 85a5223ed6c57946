"""Per-sample tables: one Parquet file per (run, split, epoch) part, written in large row groups.

A chunk is a batch of rows handed over by the engine's recorder; the sink buffers chunks per
(run, split, epoch) and writes a part when enough rows have gathered or the epoch is closed.
Files are written under a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .columns import numeric_array, read_parquet, string_array

__all__ = ["SAMPLE_SCHEMA", "SampleChunk", "SampleSink", "epoch_files", "epoch_of", "part_files", "read_samples",
           "sample_epochs", "write_table"]

# Rows per Parquet file: large enough for efficient scans, small enough to bound memory.
ROWS_PER_PART = 65_536
# Arrow's default pool (mimalloc) keeps what it freed, per thread, for reuse; in the user's
# training process every MiB kept shows in their memory. The system allocator gives it back
# (benchmarks/whole_run.py: peak resident memory about 20 MiB lower).
POOL = pa.system_memory_pool()


def release_arrow_memory() -> None:
    """Hand back what Arrow's default pool keeps for reuse on this thread. The Parquet writer and
    reader take part of their buffers from it whatever pool they are given (under 2 MB at a time
    here), and mimalloc kept 12-18 MiB of it resident, in transparent huge pages, in the training
    process; after each part, its region held 5.5 MiB. About 20 us a call."""
    pa.default_memory_pool().release_unused()

SAMPLE_SCHEMA = pa.schema(
    [
        ("run_id", pa.int32()),
        ("split", pa.string()),
        ("epoch", pa.int32()),
        ("step", pa.int64()),
        ("index", pa.int64()),
        ("loss", pa.float32()),
        ("margin", pa.float32()),
        ("pred", pa.int64()),
        ("label", pa.int64()),
        ("correct", pa.bool_()),
        ("confidence", pa.float32()),
        ("grad_norm", pa.float32()),
    ]
)


@dataclass
class SampleChunk:
    """Rows for one (run, split, epoch); numpy columns of equal length.

    ``pred`` and ``label`` are -1, ``margin`` and ``confidence`` NaN when the task is not
    classification; ``grad_norm`` is NaN unless per-sample gradient norms are on.
    """

    run_id: int
    split: str
    epoch: int
    step: np.ndarray
    index: np.ndarray
    loss: np.ndarray
    margin: np.ndarray
    pred: np.ndarray
    label: np.ndarray
    confidence: np.ndarray | None = None
    grad_norm: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @staticmethod
    def merged(chunks: list[SampleChunk]) -> SampleChunk:
        """Chunks of one (run, split, epoch) as one: a single Arrow conversion instead of one per
        chunk (each conversion has a fixed cost of a dozen array builds, paid on the store thread)."""
        if len(chunks) == 1:
            return chunks[0]

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(c, name) for c in chunks])

        def cat_optional(name: str) -> np.ndarray | None:
            if all(getattr(c, name) is None for c in chunks):
                return None
            return np.concatenate([_or_nan(getattr(c, name), len(c)) for c in chunks])

        first = chunks[0]
        return SampleChunk(first.run_id, first.split, first.epoch, cat("step"), cat("index"), cat("loss"),
                           cat("margin"), cat("pred"), cat("label"), cat_optional("confidence"),
                           cat_optional("grad_norm"))

    def to_arrow(self) -> pa.Table:
        """The rows as a table of SAMPLE_SCHEMA, built from the columns' buffers (no pandas: see
        :mod:`onthefly.store.columns`)."""
        n = len(self)
        has_class = self.pred >= 0
        values = {
            "run_id": np.full(n, self.run_id), "epoch": np.full(n, self.epoch), "step": self.step,
            "index": self.index, "loss": self.loss, "margin": self.margin, "confidence": _or_nan(self.confidence, n),
            "grad_norm": _or_nan(self.grad_norm, n),
        }
        masked = {"pred": self.pred, "label": self.label, "correct": self.pred == self.label}
        arrays = [string_array(self.split, n) if field.name == "split"
                  else numeric_array(masked[field.name], field.type, valid=has_class) if field.name in masked
                  else numeric_array(values[field.name], field.type)
                  for field in SAMPLE_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=SAMPLE_SCHEMA)


def _or_nan(values: np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan, dtype=np.float32)
    return values.astype(np.float32, copy=False)


@dataclass
class WrittenPart:
    run_id: int
    split: str
    epoch: int
    path: str  # relative to the session folder
    rows: int
    first_step: int
    last_step: int


class SampleSink:
    """Buffers chunks per (run, split, epoch) and writes Parquet parts. Writer thread only."""

    def __init__(self, session_dir: Path) -> None:
        self._dir = session_dir
        self._pending: dict[tuple[int, str, int], list[SampleChunk]] = {}
        self._parts: dict[tuple[int, str, int], int] = {}
        _warm_up(session_dir)  # on the thread that creates the sink, before the writer thread exists

    def add(self, chunk: SampleChunk) -> list[WrittenPart]:
        key = (chunk.run_id, chunk.split, chunk.epoch)
        chunks = self._pending.setdefault(key, [])
        chunks.append(chunk)
        if sum(len(c) for c in chunks) >= ROWS_PER_PART:
            return [self._write(key)]
        return []

    def close_epoch(self, run_id: int, split: str, epoch: int) -> list[WrittenPart]:
        key = (run_id, split, epoch)
        return [self._write(key)] if self._pending.get(key) else []

    def close_all(self) -> list[WrittenPart]:
        return [self._write(key) for key in list(self._pending) if self._pending[key]]

    def _write(self, key: tuple[int, str, int]) -> WrittenPart:
        chunks = self._pending.pop(key)
        run_id, split, epoch = key
        part = self._parts.get(key, 0)
        self._parts[key] = part + 1
        merged = SampleChunk.merged(chunks)
        table = merged.to_arrow()
        rel = Path("samples") / f"run-{run_id}" / split / f"epoch-{epoch:05d}-part-{part:05d}.parquet"
        write_table(self._dir / rel, table, index_filter=True)
        return WrittenPart(
            run_id=run_id,
            split=split,
            epoch=epoch,
            path=rel.as_posix(),
            rows=len(table),
            first_step=int(merged.step.min()),
            last_step=int(merged.step.max()),
        )


def _warm_up(folder: Path) -> None:
    """Run Arrow's first-use initialisation (codecs, Parquet writer, memory pool) now, on the
    thread that creates the session. Done first on the writer thread, it runs under glibc's
    atexit lock, and a DataLoader worker forked at that moment deadlocks. Once it has run, the
    writer's work holds no lock a forked worker needs, so an epoch start never waits for it."""
    one = np.zeros(1, dtype=np.int64)
    nan = np.full(1, np.nan, dtype=np.float32)
    table = SampleChunk(0, "train", 0, one, one, nan, nan, one, one, nan, nan).to_arrow()
    path = folder / ".warm-up.parquet"  # through a file, as the writer writes: its statics too
    write_table(path, table, index_filter=True)
    path.unlink()


# Dictionary encoding only where values repeat: on losses and indices it made parts larger and
# writing 2.6x slower (measured with benchmarks/samples.py).
DICTIONARY_COLUMNS = ("run_id", "split", "epoch", "step", "pred", "label", "correct")


# A Bloom filter of a part's sample indices lets one sample's history (an equality lookup over
# every part) skip the parts without it: 2-3x faster at 1M samples x 20 epochs (benchmarks/
# endpoints.py), for 6 % more bytes and about 1 ms more per 65,536-row part on the writer thread.
INDEX_FILTER_FPP = 0.05


def write_table(path: Path, table: pa.Table, *, index_filter: bool = False) -> None:
    """Write a Parquet file under a temporary name, then rename: never half a file. With
    ``index_filter``, a Bloom filter of its "index" column goes with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    dictionary = [c for c in DICTIONARY_COLUMNS if c in table.column_names]
    bloom = {"index": {"ndv": max(len(table), 1), "fpp": INDEX_FILTER_FPP}} if index_filter else None
    pq.write_table(table, tmp, row_group_size=max(len(table), 1), compression="zstd",
                   use_dictionary=dictionary, memory_pool=POOL, bloom_filter_options=bloom)
    os.replace(tmp, path)
    release_arrow_memory()


def part_files(session_dir: Path, run_id: int | None, split: str) -> Iterator[Path]:
    """A run's parts (every run's with ``run_id=None``), of every rank of a torchrun job (the other
    ranks' in ``ranks/rank-R/samples``), by epoch."""
    def of(root: Path) -> Iterator[Path]:
        runs = [root / "samples" / f"run-{run_id}"] if run_id is not None else sorted((root / "samples").glob("run-*"))
        for run_dir in runs:
            yield from sorted((run_dir / split).glob("epoch-*.parquet"))

    ranks = sorted((session_dir / "ranks").glob("rank-*"))
    if not ranks:
        yield from of(session_dir)
        return
    parts = [p for root in [session_dir, *ranks] for p in of(root)]
    yield from sorted(parts, key=lambda p: (p.parent.parent.name, epoch_of(p), str(p)))


def epoch_of(part: Path) -> int:
    """The epoch a part file belongs to (its name is epoch-EEEEE-part-PPPPP.parquet)."""
    return int(part.name[6:11])


def sample_epochs(session_dir: Path, run_id: int, split: str = "train") -> list[int]:
    """The epochs of a run that have per-sample rows on disk, in order."""
    return sorted({epoch_of(p) for p in part_files(session_dir, run_id, split)})


def epoch_files(session_dir: Path, run_id: int, epoch: int, split: str = "train") -> list[Path]:
    return [p for p in part_files(session_dir, run_id, split) if epoch_of(p) == epoch]


def read_samples(
    session_dir: Path, run_id: int | None = None, *, epoch: int | None = None, split: str = "train",
    columns: list[str] | None = None,
) -> pa.Table:
    """All per-sample rows of a run (optionally one epoch, optionally some columns), as one Arrow
    table. Read on the calling thread into the system allocator: in the training process, Arrow's
    thread pools and their per-thread memory would stay in the user's resident memory."""
    tables = []
    for path in part_files(session_dir, run_id, split):
        if epoch is not None and epoch_of(path) != epoch:
            continue
        tables.append(read_parquet(path, columns))
    if not tables:
        schema = SAMPLE_SCHEMA if columns is None else pa.schema([SAMPLE_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables, memory_pool=POOL)
