"""The per-sample store's ingest at 1M and 10M rows: what the writer thread sustains.

Ingest: chunks of 16,384 rows (what the engine's recorder hands over per flush) go into a real
session store, with an epoch closed every tenth of the rows (10 epochs, each a permutation of
the same samples), timed from the first chunk to ``flush()`` returning. Baseline, in the same
run and alternated with it: the same rows written straight to one Parquet file with pyarrow
(zstd). A chunk the writer's bounded queue drops is not ingested: drops are counted, and the
rows on disk are checked against the rows handed over.

The queries the dashboard runs over what was written are timed through its HTTP endpoints by
``benchmarks/endpoints.py``. A summary table is printed, then machine-readable lines.

    .venv/bin/python benchmarks/samples.py [--rows 1000000 10000000] [--ingest-repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_ROWS = 16_384  # rows per flush (one second of a fast CPU loop)
EPOCHS = 10
BATCH = 128  # samples per training step, for the step column
INGEST_TARGET = 1_000_000  # rows/s

# The store's float columns, as the recorder hands them over: column views of one [n, 6] block.
LOSS, MARGIN, PRED, LABEL, CONFIDENCE, GRAD_NORM = range(6)


def label_of(rows: int) -> str:
    return f"{rows // 1_000_000}M" if rows % 1_000_000 == 0 else f"{rows / 1e6:g}M"


def make_chunks(rows: int, run_id: int, seed: int = 0) -> list[Any]:
    """``rows`` rows in chunks of CHUNK_ROWS: EPOCHS epochs of ``rows // EPOCHS`` samples, each
    epoch a fresh permutation of the sample indices. Losses are distinct in practice (continuous)."""
    from onthefly.store.samples import SampleChunk

    rng = np.random.default_rng(seed)
    per_epoch = rows // EPOCHS
    steps_per_epoch = -(-per_epoch // BATCH)
    chunks = []
    for epoch in range(EPOCHS):
        index = rng.permutation(per_epoch).astype(np.int64)
        step = np.arange(per_epoch, dtype=np.int64) // BATCH + 1 + epoch * steps_per_epoch
        block = np.empty((per_epoch, 6), dtype=np.float32)
        block[:, LOSS] = rng.exponential(1.0, per_epoch)
        block[:, MARGIN] = rng.normal(0.0, 2.0, per_epoch)
        block[:, PRED] = rng.integers(0, 10, per_epoch)
        block[:, LABEL] = rng.integers(0, 10, per_epoch)
        block[:, CONFIDENCE] = rng.uniform(0.1, 1.0, per_epoch)
        block[:, GRAD_NORM] = rng.exponential(0.5, per_epoch)
        pred = block[:, PRED].astype(np.int64)
        label = block[:, LABEL].astype(np.int64)
        for start in range(0, per_epoch, CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            floats = block[part]
            chunks.append(SampleChunk(
                run_id=run_id, split="train", epoch=epoch, step=step[part], index=index[part],
                loss=floats[:, LOSS], margin=floats[:, MARGIN], pred=pred[part], label=label[part],
                confidence=floats[:, CONFIDENCE], grad_norm=floats[:, GRAD_NORM],
            ))
    return chunks


# ---- ingest -------------------------------------------------------------------------------


def ingest_store(chunks: list[Any], run_id: int) -> dict[str, Any]:
    """Feed the chunks to a fresh session store; seconds from the first chunk to flush done."""
    from onthefly.store.samples import part_files
    from onthefly.store.session import SessionStore

    store = SessionStore("bench")
    reported: list[int] = []
    # Dropped records reset the writer's counter once reported; count every report here.
    store.overflow_listener = reported.append
    handed = 0
    start = time.perf_counter()
    epoch = chunks[0].epoch
    for chunk in chunks:
        if chunk.epoch != epoch:
            store.close_epoch(run_id, "train", epoch)
            epoch = chunk.epoch
        store.samples(chunk)
        handed += len(chunk)
    store.close_epoch(run_id, "train", epoch)
    flushed = store.flush(timeout=600)
    seconds = time.perf_counter() - start
    dropped = sum(reported) + store._writer.dropped
    error = store.write_error
    # Rows on disk once flush() returned: only those count as ingested (close() writes leftovers).
    files = list(part_files(store.dir, run_id, "train"))
    on_disk = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    store.close()
    return {"seconds": seconds, "flushed": flushed, "dropped_records": dropped, "handed": handed,
            "on_disk": on_disk, "files": len(files), "dir": store.dir, "error": error,
            "bytes": sum(f.stat().st_size for f in files)}


def ingest_pyarrow(chunks: list[Any], path: Path) -> dict[str, Any]:
    """The same rows and columns written straight to one Parquet file (zstd)."""
    start = time.perf_counter()

    def column(name: str) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in chunks])

    n = sum(len(c) for c in chunks)
    pred, label = column("pred"), column("label")
    table = pa.table({
        "run_id": np.full(n, chunks[0].run_id, dtype=np.int32),
        "split": pa.repeat("train", n),
        "epoch": np.concatenate([np.full(len(c), c.epoch, dtype=np.int32) for c in chunks]),
        "step": column("step"), "index": column("index"), "loss": column("loss"),
        "margin": column("margin"), "pred": pred, "label": label, "correct": pred == label,
        "confidence": column("confidence"), "grad_norm": column("grad_norm"),
    })
    pq.write_table(table, path, compression="zstd")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "on_disk": pq.ParquetFile(path).metadata.num_rows, "bytes": path.stat().st_size}


# ---- one size -----------------------------------------------------------------------------------


def bench(rows: int, ingest_repeats: int, scratch: Path) -> dict[str, Any]:
    name = label_of(rows)
    run_id = 1  # a fresh session's first run
    t = time.perf_counter()
    chunks = make_chunks(rows, run_id)
    total = sum(len(c) for c in chunks)
    print(f"\n== {name}: {total:,} rows in {len(chunks)} chunks of {CHUNK_ROWS:,}, {EPOCHS} epochs "
          f"(generated in {time.perf_counter() - t:.1f} s)", flush=True)

    store_rates, base_rates = [], []
    written: dict[str, Any] = {}
    for i in range(ingest_repeats):
        if written:  # one store on disk at a time
            shutil.rmtree(written["dir"], ignore_errors=True)
        baseline_path = scratch / f"baseline-{name}.parquet"
        # Alternate the order so a drift in machine speed does not favour either side.
        if i % 2 == 0:
            written, base = ingest_store(chunks, run_id), ingest_pyarrow(chunks, baseline_path)
        else:
            base, written = ingest_pyarrow(chunks, baseline_path), ingest_store(chunks, run_id)
        baseline_path.unlink()
        store_rates.append(written["on_disk"] / written["seconds"])  # a dropped row is not ingested
        base_rates.append(base["on_disk"] / base["seconds"])
        print(f"ingest {i + 1}: store {store_rates[-1]:,.0f} rows/s ({written['seconds']:.2f} s, "
              f"{written['files']} parts, {written['bytes'] / 2**20:.0f} MiB, dropped records "
              f"{written['dropped_records']}, rows on disk {written['on_disk']:,}/{written['handed']:,}"
              f"{', flush timed out' if not written['flushed'] else ''}"
              f"{', write error: ' + repr(written['error']) if written['error'] else ''})  "
              f"pyarrow {base_rates[-1]:,.0f} rows/s ({base['seconds']:.2f} s, {base['bytes'] / 2**20:.0f} MiB)  "
              f"ratio {store_rates[-1] / base_rates[-1]:.3f}", flush=True)
    shutil.rmtree(written["dir"], ignore_errors=True)
    return {"name": name, "rows": total, "store_rate": statistics.median(store_rates),
            "base_rate": statistics.median(base_rates),
            "dropped": written["dropped_records"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--ingest-repeats", type=int, default=3, help="ingest timings per side (median)")
    parser.add_argument("--quick", action="store_true", help="1M rows only, 2 ingest repeats")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.ingest_repeats = [1_000_000], 2
    home = Path(tempfile.mkdtemp(prefix="otf-bench-"))
    os.environ["ONTHEFLY_HOME"] = str(home)  # before the store is imported: a throwaway home
    try:
        results = [bench(rows, args.ingest_repeats, home) for rows in args.rows]
    finally:
        shutil.rmtree(home, ignore_errors=True)

    print("\nrows     ingest store/s  pyarrow/s   ratio")
    for r in results:
        print(f"{r['name']:<8} {r['store_rate']:14,.0f} {r['base_rate']:11,.0f} {r['store_rate'] / r['base_rate']:7.3f}")
    for r in results:
        ok = "met" if r["store_rate"] >= INGEST_TARGET else "NOT met"
        print(f"target ingest >= {INGEST_TARGET:,} rows/s at {r['name']}: {ok} ({r['store_rate']:,.0f}; "
              f"dropped records {r['dropped']})")
    for r in results:
        print(f"ingest_{r['name']}_rows_per_s: {r['store_rate']:.0f}")
        print(f"ingest_{r['name']}_ratio: {r['store_rate'] / r['base_rate']:.3f}")


if __name__ == "__main__":
    main()
