"""The HTTP endpoints the dashboard calls, on a session of 1,000,000 samples x 20 epochs.

The session is written directly (Parquet parts as the store's sink writes them, the runs row and
the epoch summaries through a real session store), as a run that learns: margins grow epoch by
epoch, 8 % of the labels are wrong (their margins stay negative), the sampler draws every sample
once per epoch. The carried per-sample aggregates are derived epoch by epoch, as a dashboard
server does while a run trains (the time per epoch is printed). Then the session is served by
the real server in this process, and each endpoint is called ``--repeats`` times with httpx
(the page's own parameters: sorted and filtered table pages, one sample's history, slices
resolved from a quantile band and from a filter, the loss distribution, the clusterings).
Printed per endpoint: p50 and p95 latency against the target (p95 < 200 ms). The server has the
training process record a slice (through its channel); a session served without one answers
``POST /api/slices`` with 409, and the same resolution and record (``actions.slices.save_slice``)
is then timed without HTTP, and named so.

A cluster request is a command carried out by the training process; its work,
``save_clustering(features="signals")`` over every sample, is timed directly (target < 5 s).

"First table of a 200-epoch run" (target < 300 ms) is measured on a second session of
``--long-samples`` samples x ``--long-epochs`` epochs, each time in a fresh process (a fresh
server and cache; its imports, Arrow's and DuckDB's first use and one ``/api/session`` request
come before the clock starts): the first ``/samples`` call when the epoch's carried file exists
(a server that carried each epoch as it completed), when only the previous epoch's does (the
epoch has just completed), when none does (a run trained headless, opened afterwards), and with
the query this replaced (one GROUP BY with a window over every epoch's parts, kept below as
``old_sample_stats``), so the before/after ratio comes from the same run.

    .venv/bin/python benchmarks/endpoints.py [--samples 1000000] [--epochs 20] [--repeats 20]
        [--long-samples 100000] [--long-epochs 200] [--no-cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = "bench-endpoints"
CLASSES = 10
NOISE = 0.08  # labels that are wrong
BATCH = 128  # samples per step, for the step column
P95_TARGET_MS = 200.0
FIRST_TABLE_TARGET_MS = 300.0
CLUSTER_TARGET_S = 5.0
CACHE_TARGET = 64 * 2**20

def old_sample_stats(session_dir: Path, run_id: int, epoch: int | None = None, *, split: str = "train",
                     rule: Any = None, indices: Any = None) -> tuple[int | None, Any]:
    """``store.dynamics.sample_stats`` as it was: every epoch's parts in one query, every time
    (flags by today's ``add_flags``; the old code computed the same cut with a second query)."""
    import pyarrow as pa

    from onthefly.signals.dynamics import STATS_SCHEMA, FlagRule, add_flags
    from onthefly.store.dynamics import reference_stats
    from onthefly.store.samples import epoch_of, part_files

    parts = list(part_files(session_dir, run_id, split))
    if epoch is None:
        epoch = max((epoch_of(p) for p in parts), default=None)
    if epoch is None or not any(epoch_of(p) <= epoch for p in parts):
        return epoch, STATS_SCHEMA.empty_table()
    table = add_flags(reference_stats(session_dir, run_id, epoch, split=split), rule or FlagRule())
    if indices is not None:
        table = table.filter(np.isin(table.column("index").to_numpy(), indices))
    return epoch, pa.Table.from_batches(table.to_batches(), schema=STATS_SCHEMA)


# ---- the session --------------------------------------------------------------------------


def write_session(home: Path, samples: int, epochs: int, seed: int = 0) -> tuple[Any, int]:
    """A live session store holding one finished run of ``epochs`` epochs over ``samples``."""
    from onthefly.store.samples import ROWS_PER_PART, SampleChunk, SampleSink
    from onthefly.store.session import SessionStore

    store = SessionStore(PROJECT, home=home)
    run_id = store.new_run("baseline", config={"grad_norm": None, "sample_ids": "sampler"})
    sink = SampleSink(store.dir)  # what the writer thread uses: the same file names and layout
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples)
    wrong = rng.random(samples) < NOISE
    difficulty = rng.normal(0.0, 1.0, samples)
    steps_per_epoch = -(-samples // BATCH)
    for epoch in range(epochs):
        order = rng.permutation(samples)
        margin = 3.0 * (epoch + 1) / epochs - difficulty[order] + rng.normal(0.0, 0.5, samples)
        flipped = wrong[order]
        margin[flipped] = -np.abs(margin[flipped]) - 0.5
        label = labels[order]
        pred = np.where(margin > 0, label, (label + rng.integers(1, CLASSES, samples)) % CLASSES)
        loss = np.logaddexp(0.0, -margin)
        confidence = 1.0 / (1.0 + np.exp(-margin))
        step = epoch * steps_per_epoch + np.arange(samples) // BATCH
        for start in range(0, samples, ROWS_PER_PART):
            part = slice(start, start + ROWS_PER_PART)
            sink.add(SampleChunk(run_id, "train", epoch, step[part], order[part], loss[part], margin[part],
                                 pred[part], label[part], confidence[part], None))
        sink.close_epoch(run_id, "train", epoch)
        store.event(store.next_seq(), run_id, int(step[-1]), epoch, "epoch_summary",
                    {"split": "train", "loss": float(loss.mean()), "samples": samples}, time.time())
    store.set_run_status(run_id, "finished")
    store.flush()
    return store, run_id


def carry_every_epoch(session_dir: Path, run_id: int, epochs: int) -> list[float]:
    """Derive the carried aggregates epoch by epoch, as a server does when each completes; ms each."""
    from onthefly.store.reader import SessionReader

    reader = SessionReader(session_dir)
    times = []
    for epoch in range(epochs):
        t = time.perf_counter()
        reader.carry_dynamics(run_id, epoch)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def folder_bytes(session_dir: Path, run_id: int, pattern: str) -> int:
    return sum(p.stat().st_size for p in (session_dir / "samples" / f"run-{run_id}" / "train").glob(pattern))


# ---- the server and its client ------------------------------------------------------------------


def serve(session_dir: Path) -> Any:
    from onthefly.server import DashboardServer

    server = DashboardServer(session_dir, project=PROJECT, session_id=session_dir.name)
    server.start()
    return server


def client_for(server: Any, *, keep_alive: bool = True) -> Any:
    """A client as a browser is: one kept-alive connection (or a new connection per request)."""
    import httpx

    limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=600, limits=limits,
                        headers={"Authorization": f"Bearer {server.token}"})


def connection_stall(server: Any, run_id: int, calls: int = 10) -> tuple[float, float]:
    """p50 ms of a light request (one SQLite read) on a kept-alive connection and on a new
    connection each time: their difference is the stall between the server's writes (Nagle's
    algorithm against the client's delayed ACK), which every request on a page pays."""
    medians = []
    for keep_alive in (True, False):
        with client_for(server, keep_alive=keep_alive) as client:
            medians.append(statistics.median(call(client, "GET", f"/api/runs/{run_id}")[0] for _ in range(calls)))
    return medians[0], medians[1]


def call(client: Any, method: str, url: str, **options: Any) -> tuple[float, Any]:
    """(milliseconds until the whole answer is in, the answer's JSON)."""
    t = time.perf_counter()
    response = client.request(method, url, **options)
    ms = (time.perf_counter() - t) * 1e3
    if response.status_code >= 300:
        raise SystemExit(f"{method} {url} answered {response.status_code}: {response.text[:500]}")
    return ms, response.json()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def table_queries(samples: int) -> list[dict[str, Any]]:
    """What the page asks for: its default view, other sort columns both ways, a flag filter, a
    label filter, later pages."""
    return [
        {"sort": "loss", "order": "desc"},
        {"sort": "margin", "order": "asc"},
        {"sort": "aum", "order": "asc", "offset": min(5_000, samples // 2)},
        {"sort": "forgetting", "order": "desc"},
        {"sort": "confidence_mean", "order": "asc", "flag": "mislabelled"},
        {"sort": "loss", "order": "desc", "flag": "hard", "offset": 50},
        {"sort": "variability", "order": "desc", "label": 3},
        {"sort": "index", "order": "asc", "offset": samples // 2},
    ]


SLICE_DEFINITIONS = [
    {"kind": "quantile_band", "low": 0.9, "high": 1.0},
    {"kind": "filter", "where": [{"signal": "loss", "op": ">", "value": "p90"},
                                 {"signal": "margin", "op": "<", "value": 0}]},
]


def time_endpoints(client: Any, store: Any, run_id: int, samples: int, epochs: int, repeats: int,
                   clustering: int | None) -> dict[str, list[float]]:
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {}

    def repeat(name: str, n: int, one: Callable[[int], tuple[float, Any]]) -> None:
        times[name] = [one(i)[0] for i in range(n)]

    queries = table_queries(samples)
    repeat("table page", 2 * repeats, lambda i: call(
        client, "GET", f"/api/runs/{run_id}/samples", params={**queries[i % len(queries)], "limit": 50}))
    repeat("sample history", repeats, lambda i: call(
        client, "GET", f"/api/runs/{run_id}/samples/{int(rng.integers(samples))}/history"))
    probe = client.post("/api/slices", json={"name": "probe", "run_id": run_id, "definition": SLICE_DEFINITIONS[0]})
    if probe.status_code == 201:
        repeat("slice resolution", repeats, lambda i: call(
            client, "POST", "/api/slices",
            json={"name": f"bench {i}", "run_id": run_id, "definition": SLICE_DEFINITIONS[i % 2]}))
    else:
        # The server has the training process record a slice; this session has no training
        # process (nor channel) to ask: the same resolution and record, timed without HTTP.
        from onthefly.actions.slices import save_slice

        print(f"POST /api/slices answered {probe.status_code} ({probe.json().get('detail')}): slice resolution "
              "is timed as actions.slices.save_slice on the session's store", flush=True)

        def direct(i: int) -> tuple[float, Any]:
            t = time.perf_counter()
            record = save_slice(store, f"bench {i}", run_id, SLICE_DEFINITIONS[i % 2])
            return (time.perf_counter() - t) * 1e3, record

        repeat("slice resolution (no HTTP)", repeats, direct)
    repeat("distribution", repeats, lambda i: call(
        client, "GET", f"/api/runs/{run_id}/distribution",
        params={"bins": 50, **({} if i % 2 == 0 else {"epoch": int(rng.integers(epochs))})}))
    if clustering is not None:
        repeat("clusterings list", repeats, lambda i: call(client, "GET", f"/api/runs/{run_id}/clusters"))
        repeat("one clustering", repeats, lambda i: call(client, "GET", f"/api/clusterings/{clustering}"))
    return times


# ---- the first table in a fresh process ----------------------------------------------------------


def first_table_here(session_dir: Path, run_id: int, old: bool) -> None:
    """In a fresh process: start a server, warm up, time the first /samples call, print JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from onthefly.store import dynamics
    from onthefly.store.duck import cursor

    if old:
        dynamics.sample_stats = old_sample_stats  # the reader calls it by its module's name
    cursor().close()  # DuckDB's first use
    with tempfile.TemporaryDirectory() as scratch:  # Arrow's and Parquet's first use
        pq.write_table(pa.table({"a": [1]}), Path(scratch) / "warm-up.parquet")
        pq.read_table(Path(scratch) / "warm-up.parquet")
    server = serve(session_dir)
    try:
        with client_for(server) as client:
            call(client, "GET", "/api/session")
            ms, page = call(client, "GET", f"/api/runs/{run_id}/samples", params={"limit": 50})
    finally:
        server.stop()
    print(json.dumps({"ms": ms, "epoch": page["epoch"], "total": page["total"]}))


def first_table(session_dir: Path, run_id: int, *, old: bool = False) -> dict[str, Any]:
    command = [sys.executable, __file__, "--first-table", str(session_dir), "--run", str(run_id)]
    done = subprocess.run([*command, *(["--old"] if old else [])], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the first-table process failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def carried_files(session_dir: Path, run_id: int) -> list[Path]:
    return sorted((session_dir / "samples" / f"run-{run_id}" / "train").glob("carried-*.arrow"))


def measure_first_tables(home: Path, samples: int, epochs: int) -> dict[str, Any]:
    t = time.perf_counter()
    store, run_id = write_session(home, samples, epochs, seed=2)
    print(f"\n== first table: {samples:,} samples x {epochs} epochs written in {time.perf_counter() - t:.1f} s",
          flush=True)
    session_dir = store.dir
    carried = carry_every_epoch(session_dir, run_id, epochs - 1)  # a server that carried each epoch so far
    print(f"carried epoch by epoch: median {statistics.median(carried):.0f} ms per epoch", flush=True)
    results: dict[str, Any] = {"samples": samples, "epochs": epochs}
    results["new_epoch"] = first_table(session_dir, run_id)  # the last epoch has just completed
    results["warm"] = first_table(session_dir, run_id)  # its carried file is there now
    held = session_dir / "held"
    held.mkdir()
    for path in carried_files(session_dir, run_id):
        path.rename(held / path.name)
    results["cold"] = first_table(session_dir, run_id)  # no carried file at all
    results["old"] = first_table(session_dir, run_id, old=True)
    store.close()
    shutil.rmtree(session_dir, ignore_errors=True)
    return results


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20, help="calls per endpoint (the table page: twice)")
    parser.add_argument("--long-samples", type=int, default=100_000, help="samples of the 200-epoch session")
    parser.add_argument("--long-epochs", type=int, default=200)
    parser.add_argument("--no-cluster", action="store_true", help="skip the clustering (minutes at 1M on 2 cores)")
    parser.add_argument("--first-table", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_table is not None:
        first_table_here(args.first_table, args.run, args.old)
        return

    home = Path(tempfile.mkdtemp(prefix="otf-endpoints-"))
    os.environ["ONTHEFLY_HOME"] = str(home)
    try:
        report(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def report(args: argparse.Namespace, home: Path) -> None:
    from onthefly.actions.cluster import save_clustering
    from onthefly.store import dynamics

    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)", flush=True)
    t = time.perf_counter()
    store, run_id = write_session(home, args.samples, args.epochs)
    print(f"== endpoints: {args.samples:,} samples x {args.epochs} epochs written in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    carried = carry_every_epoch(store.dir, run_id, args.epochs)
    parts_bytes = folder_bytes(store.dir, run_id, "epoch-*.parquet") / args.epochs
    carried_bytes = [p.stat().st_size for p in carried_files(store.dir, run_id)]
    print(f"carried epoch by epoch: median {statistics.median(carried):.0f} ms per epoch (first "
          f"{carried[0]:.0f} ms); on disk per epoch: parts {parts_bytes / 2**20:.1f} MiB, a carried file "
          f"{carried_bytes[-1] / 2**20:.1f} MiB ({len(carried_bytes)} kept)", flush=True)

    cluster_s: float | None = None
    clustering: int | None = None
    if not args.no_cluster:
        t = time.perf_counter()
        record = save_clustering(store, run_id, features="signals")
        cluster_s = time.perf_counter() - t
        clustering = int(record["id"])
        print(f"cluster request (save_clustering, features='signals', k by silhouette): {cluster_s:.2f} s, "
              f"k={record['k']}", flush=True)

    server = serve(store.dir)
    try:
        with client_for(server) as client:
            call(client, "GET", "/api/session")
            first_ms, _ = call(client, "GET", f"/api/runs/{run_id}/samples", params={"limit": 50})
            times = time_endpoints(client, store, run_id, args.samples, args.epochs, args.repeats, clustering)
        stall = connection_stall(server, run_id)
    finally:
        server.stop()
    cache = dynamics.cached_bytes()
    reader_ms = []
    from onthefly.store.reader import SessionReader

    reader = SessionReader(store.dir)
    for _ in range(5):
        t = time.perf_counter()
        reader.sample_stats_at(run_id)
        reader_ms.append((time.perf_counter() - t) * 1e3)
    store.close()
    shutil.rmtree(store.dir, ignore_errors=True)

    first = measure_first_tables(home, args.long_samples, args.long_epochs)

    print(f"\n== {args.samples:,} samples x {args.epochs} epochs, {args.repeats} calls per endpoint "
          f"(the table page {2 * args.repeats}, over {len(table_queries(args.samples))} sorts and filters)")
    print(f"{'endpoint':<40} {'p50 ms':>9} {'p95 ms':>9}   target")
    verdicts = []
    for name, values in times.items():
        p50, p95 = percentile(values, 50), percentile(values, 95)
        met = p95 < P95_TARGET_MS
        verdicts.append((f"{name}: p95 < {P95_TARGET_MS:.0f} ms", met, f"{p95:.0f} ms"))
        print(f"{name:<40} {p50:9.1f} {p95:9.1f}   p95 < {P95_TARGET_MS:.0f} ms: {'met' if met else 'NOT met'}")
    print(f"(the table's store part, SessionReader.sample_stats_at: median {statistics.median(reader_ms):.0f} ms; "
          f"the server's first table call at the latest epoch: {first_ms:.0f} ms)")
    print(f"(every call above is on one kept-alive connection, as a browser's: a light request takes "
          f"{stall[0]:.1f} ms there and {stall[1]:.1f} ms on a new connection (without TCP_NODELAY on "
          f"the server's socket, a kept-alive request stalled ~40 ms)")
    if cluster_s is not None:
        verdicts.append((f"cluster request < {CLUSTER_TARGET_S:.0f} s", cluster_s < CLUSTER_TARGET_S, f"{cluster_s:.2f} s"))
    verdicts.append((f"in-process cache <= {CACHE_TARGET // 2**20} MiB", cache <= CACHE_TARGET,
                     f"{cache / 2**20:.1f} MiB"))
    label = f"{first['samples']:,} samples x {first['epochs']} epochs"
    print(f"\n== first table, {label} (fresh process each; first /samples call)")
    for key, what in (("warm", "the epoch's carried file exists"),
                      ("new_epoch", "the epoch just completed: carried from the previous one"),
                      ("cold", "no carried file (trained headless, opened now)"),
                      ("old", "the old query over every epoch")):
        print(f"{what:<58} {first[key]['ms']:9.0f} ms   ({first[key]['total']:,} rows at epoch {first[key]['epoch']})")
    print(f"old / new: {first['old']['ms'] / first['warm']['ms']:.1f}x (carried file there), "
          f"{first['old']['ms'] / first['new_epoch']['ms']:.1f}x (the epoch just completed), "
          f"{first['old']['ms'] / first['cold']['ms']:.2f}x (cold)")
    for key, what in (("warm", "carried"), ("new_epoch", "just completed")):
        verdicts.append((f"first table of a {first['epochs']}-epoch run ({what}) < {FIRST_TABLE_TARGET_MS:.0f} ms",
                         first[key]["ms"] < FIRST_TABLE_TARGET_MS, f"{first[key]['ms']:.0f} ms"))

    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    print("\n== targets")
    for what, met, figure in verdicts:
        print(f"{'met    ' if met else 'NOT met'}  {what}: {figure}")


if __name__ == "__main__":
    main()
