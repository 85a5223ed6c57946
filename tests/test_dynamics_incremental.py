"""Training dynamics carried from epoch to epoch (store/dynamics.py) give exactly what one query
over every epoch's parts gives (the query they replaced, kept here as the reference), read
only the newest carried file and the parts since, and keep memory and disk bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from onthefly.signals.dynamics import STAT_COLUMNS, FlagRule, add_flags
from onthefly.store import dynamics
from onthefly.store.db import connect, create_schema
from onthefly.store.dynamics import carried_state, reference_stats, sample_stats
from onthefly.store.samples import SampleChunk, SampleSink, epoch_of, part_files, write_table

# The definition to match: dynamics.REFERENCE_QUERY, the query over every epoch's parts it replaced.
# Sums over epochs may be added in another order than the reference's (a cold start folds ten
# epochs at once): the same values up to rounding. Every other column is compared exactly.
ACROSS_EPOCHS = ("aum", "confidence_mean", "variability")


def reference(folder: Path, run_id: int, epoch: int, split: str = "train",
              rule: FlagRule | None = None) -> pa.Table:
    return add_flags(reference_stats(folder, run_id, epoch, split=split), rule or FlagRule())


def assert_same(ours: pa.Table, expected: pa.Table) -> None:
    assert ours.schema == expected.schema and ours.num_rows == expected.num_rows
    for name in STAT_COLUMNS:
        got, want = ours.column(name), expected.column(name)
        if name in ACROSS_EPOCHS:
            np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-12, atol=1e-15, err_msg=name)
        elif pa.types.is_floating(got.type):  # NaN where the reference has NaN, the same bits elsewhere
            np.testing.assert_array_equal(got.to_numpy(), want.to_numpy(), err_msg=name)
        else:
            assert got.to_pylist() == want.to_pylist(), name


def write_run(folder: Path, *, run_id: int = 1, split: str = "train", epochs: int = 6, samples: int = 300,
              seed: int = 0, classification: bool = True, parts_per_epoch: int = 2) -> None:
    """Epochs of a sampler that skips some samples, draws some twice (at different steps), and
    sometimes records a NaN loss; labels stay, predictions drift, so samples are forgotten."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, samples)
    sink = SampleSink(folder)
    step = 0
    for epoch in range(epochs):
        drawn = rng.choice(samples, size=samples, replace=True)  # misses some, repeats others
        n = drawn.size
        pred = np.where(rng.random(n) < 0.6, labels[drawn], rng.integers(0, 5, n))
        loss = rng.exponential(1.0, n).astype(np.float32)
        loss[rng.random(n) < 0.03] = np.nan
        margin = rng.normal(0.0, 1.0, n).astype(np.float32)
        confidence = rng.random(n).astype(np.float32)
        grad_norm = rng.exponential(1.0, n).astype(np.float32)
        if not classification:
            pred, margin, confidence = np.full(n, -1), np.full(n, np.nan, np.float32), None
        steps = step + np.arange(n) // 8
        step = int(steps[-1]) + 1
        for chunk in np.array_split(np.arange(n), parts_per_epoch):
            sink.add(SampleChunk(run_id=run_id, split=split, epoch=epoch, step=steps[chunk],
                                 index=drawn[chunk].astype(np.int64), loss=loss[chunk], margin=margin[chunk],
                                 pred=pred[chunk].astype(np.int64),
                                 label=(labels[drawn[chunk]] if classification else np.full(chunk.size, -1)),
                                 confidence=None if confidence is None else confidence[chunk],
                                 grad_norm=grad_norm[chunk]))
            sink.close_epoch(run_id, split, epoch)  # writes what is pending: several parts per epoch


def record_summaries(folder: Path, run_id: int, split: str, epochs: range) -> None:
    """The session log's epoch_summary events, which say an epoch's parts are complete."""
    conn = connect(folder / "session.sqlite")
    create_schema(conn)
    seq = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    conn.executemany("INSERT INTO events (seq, run_id, time, step, epoch, kind, payload) VALUES (?,?,?,?,?,?,?)",
                     [(seq + i + 1, run_id, 0.0, 0, e, "epoch_summary", json.dumps({"split": split}))
                      for i, e in enumerate(epochs)])
    conn.commit()
    conn.close()


def carried_files(folder: Path, run_id: int = 1, split: str = "train") -> list[str]:
    return sorted(p.name for p in (folder / "samples" / f"run-{run_id}" / split).glob("carried-*.arrow"))


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_tables(monkeypatch)


def forget_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty cache of tables, as in a new process."""
    monkeypatch.setattr(dynamics, "_cache", type(dynamics._cache)())
    monkeypatch.setattr(dynamics, "_cache_bytes", 0)


def test_every_epoch_equals_the_query_over_every_part(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=7)
    for epoch in range(7):  # epoch by epoch, as a dashboard follows a run: each from the previous
        shown, table = sample_stats(tmp_path, 1, epoch)
        assert shown == epoch
        assert_same(table, reference(tmp_path, 1, epoch))
    assert 0 < sample_stats(tmp_path, 1, 6)[1].num_rows < 300  # some samples were not drawn in epoch 6


def test_a_cold_start_and_an_earlier_epoch_equal_the_query(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=14, samples=200, seed=1)
    latest, table = sample_stats(tmp_path, 1)  # nothing carried yet: every epoch folded at once
    assert latest == 13
    assert_same(table, reference(tmp_path, 1, 13))
    for epoch in (12, 9, 3, 0):  # not the latest: from the nearest kept carried file
        assert_same(sample_stats(tmp_path, 1, epoch)[1], reference(tmp_path, 1, epoch))


def test_regression_rows_and_the_val_split_equal_the_query(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=4, seed=2)
    write_run(tmp_path, split="val", epochs=4, samples=120, seed=3, parts_per_epoch=1)
    write_run(tmp_path, run_id=2, epochs=4, seed=4, classification=False)
    for epoch in range(4):
        assert_same(sample_stats(tmp_path, 1, epoch, split="val")[1], reference(tmp_path, 1, epoch, "val"))
        assert_same(sample_stats(tmp_path, 2, epoch)[1], reference(tmp_path, 2, epoch))
    regression = sample_stats(tmp_path, 2, 3)[1]
    assert regression.column("label").null_count == regression.num_rows  # no classes: no labels, no flags
    assert not any(regression.column("mislabelled").to_pylist())


@pytest.mark.parametrize("cold", [False, True], ids=["epoch by epoch", "all at once"])
def test_missing_predictions_and_changed_labels_follow_the_query(tmp_path: Path, cold: bool) -> None:
    # Sample 0 is right, then has no prediction (pred -1: NULL), then wrong: the last prediction
    # and correctness are the last recorded ones, and NULL is no forgetting event. Sample 1's
    # label changes from 2 to 1 (the table shows the largest). Sample 2 is right, then wrong.
    # Sample 3 is right, right, without a prediction at the end of a fold, then wrong.
    rows = [  # (index, pred, label) per epoch
        [(0, 0, 0), (1, 2, 2), (2, 1, 1), (3, 1, 1)],
        [(0, -1, -1), (1, 1, 1), (2, 1, 1), (3, 1, 1)],
        [(0, 3, 0), (1, 0, 1), (2, 0, 1), (3, -1, -1)],
        [(0, 3, 0), (2, 1, 1), (3, 0, 1)],
    ]
    sink = SampleSink(tmp_path)
    for epoch, epoch_rows in enumerate(rows):
        index, pred, label = (np.array(column) for column in zip(*epoch_rows, strict=True))
        n = index.size
        sink.add(SampleChunk(run_id=1, split="train", epoch=epoch, step=np.arange(n) + 10 * epoch, index=index,
                             loss=np.linspace(0.1, 1.0, n, dtype=np.float32) + epoch,
                             margin=np.linspace(-1.0, 1.0, n, dtype=np.float32) * (epoch + 1), pred=pred, label=label,
                             confidence=np.linspace(0.2, 0.9, n, dtype=np.float32) / (epoch + 1)))
        sink.close_epoch(1, "train", epoch)
    for epoch in ([2, 3] if cold else range(4)):  # cold: epochs 1 and 2 folded together
        sample_stats(tmp_path, 1, epoch)
    for epoch in range(4):
        assert_same(sample_stats(tmp_path, 1, epoch)[1], reference(tmp_path, 1, epoch))
    table = {r["index"]: r for r in sample_stats(tmp_path, 1, 2)[1].to_pylist()}
    assert (table[0]["pred"], table[0]["correct"], table[0]["forgetting"]) == (3, False, 0)
    assert table[1]["label"] == 2 and table[2]["forgetting"] == 1
    assert sample_stats(tmp_path, 1, 3)[1].to_pylist()[-1]["forgetting"] == 0  # sample 3


def test_flags_are_decided_over_the_whole_epoch_then_filtered(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=3, seed=5)
    rule = FlagRule(hard_quantile=0.8, aum_threshold=0.1)
    whole = reference(tmp_path, 1, 1, rule=rule)
    wanted = np.array([299, 5, 5, 7, 100_000, 42])  # unsorted, repeated, one never drawn
    shown, table = sample_stats(tmp_path, 1, 1, rule=rule, indices=wanted)
    expected = whole.filter(np.isin(whole.column("index").to_numpy(), wanted))
    assert shown == 1 and 0 < table.num_rows < len(wanted)
    assert_same(table, expected)
    _, batches = dynamics.iter_sample_stats(tmp_path, 1, 1, rule=rule, indices=wanted, batch_rows=2)
    streamed = list(batches)
    assert max(b.num_rows for b in streamed) == 2
    assert_same(pa.Table.from_batches(streamed), expected)


def test_a_new_epoch_reads_only_the_previous_carried_file_and_its_own_parts(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=6, seed=6)
    record_summaries(tmp_path, 1, "train", range(5))  # epoch 5 is still being written
    expected = reference(tmp_path, 1, 5)
    sample_stats(tmp_path, 1, 4)
    assert carried_files(tmp_path) == ["carried-00000.arrow", "carried-00004.arrow"]
    for part in part_files(tmp_path, 1, "train"):  # the earlier epochs' parts can no longer be read
        if epoch_of(part) < 5:
            part.write_bytes(b"not parquet")
    assert_same(sample_stats(tmp_path, 1, 5)[1], expected)
    assert "carried-00005.arrow" not in carried_files(tmp_path)  # incomplete: derived, not kept
    record_summaries(tmp_path, 1, "train", range(5, 6))
    carried_state(tmp_path, 1)  # as the server does when an epoch completes
    assert carried_files(tmp_path) == ["carried-00000.arrow", "carried-00005.arrow"]


def test_a_part_added_after_its_epoch_was_carried_is_taken_into_account(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=3, seed=7)
    sample_stats(tmp_path, 1, 1)
    assert "carried-00001.arrow" in carried_files(tmp_path)
    late = SampleChunk(run_id=1, split="train", epoch=1, step=np.array([10_000]), index=np.array([3]),
                       loss=np.array([50.0], np.float32), margin=np.array([-9.0], np.float32),
                       pred=np.array([0]), label=np.array([1]))  # a second evaluation at that epoch, say
    write_table(tmp_path / "samples" / "run-1" / "train" / "epoch-00001-part-00099.parquet", late.to_arrow())
    for epoch in (1, 2):
        assert_same(sample_stats(tmp_path, 1, epoch)[1], reference(tmp_path, 1, epoch))


def test_only_the_newest_and_every_tenth_carried_file_are_kept(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path, epochs=25, samples=50, seed=8, parts_per_epoch=1)
    record_summaries(tmp_path, 1, "train", range(25))
    for epoch in range(25):
        sample_stats(tmp_path, 1, epoch)
    assert carried_files(tmp_path) == [f"carried-{e:05d}.arrow" for e in (0, 10, 20, 24)]
    forget_tables(monkeypatch)
    assert_same(sample_stats(tmp_path, 1, 17)[1], reference(tmp_path, 1, 17))  # folded from carried-00010
    assert carried_files(tmp_path) == [f"carried-{e:05d}.arrow" for e in (0, 10, 20, 24)]
    assert not [p for p in (tmp_path / "samples" / "run-1" / "train").iterdir() if p.name.endswith(".tmp")]


def test_an_unreadable_carried_file_is_derived_again(tmp_path: Path) -> None:
    write_run(tmp_path, epochs=4, seed=9)
    sample_stats(tmp_path, 1, 2)
    carried = tmp_path / "samples" / "run-1" / "train" / "carried-00002.arrow"
    broken = carried.with_name("broken")
    broken.write_bytes(b"truncated")
    os.replace(broken, carried)  # files are replaced, never changed in place (they are memory-mapped)
    assert_same(sample_stats(tmp_path, 1, 3)[1], reference(tmp_path, 1, 3))  # from carried-00000
    state = carried_state(tmp_path, 1, 2)  # written again
    assert ipc.open_file(carried).read_all().column("index").equals(state.column("index")) and state.num_rows > 0


def test_the_cache_is_bounded_in_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path, epochs=4, samples=400, seed=10)
    size = sample_stats(tmp_path, 1, 0)[1].nbytes
    monkeypatch.setattr(dynamics, "CACHE_BYTES", int(size * 2.5))
    tables = [sample_stats(tmp_path, 1, epoch)[1] for epoch in range(4)]
    assert 0 < dynamics.cached_bytes() <= dynamics.CACHE_BYTES
    assert sample_stats(tmp_path, 1, 3)[1] is tables[3]  # the most recent ones are kept
    assert sample_stats(tmp_path, 1, 0)[1] is not tables[0]  # the oldest was dropped
    monkeypatch.setattr(dynamics, "CACHE_BYTES", size // 2)  # a table larger than the bound: not kept
    forget_tables(monkeypatch)
    first = sample_stats(tmp_path, 1, 1)[1]
    assert dynamics.cached_bytes() == 0 and sample_stats(tmp_path, 1, 1)[1] is not first


def test_a_folder_that_cannot_be_written_still_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path, epochs=3, seed=11)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    assert_same(sample_stats(tmp_path, 1, 2)[1], reference(tmp_path, 1, 2))
    assert carried_files(tmp_path) == [] and not list((tmp_path / "samples" / "run-1" / "train").glob(".*"))


def test_an_epoch_without_parts_has_an_empty_table(tmp_path: Path) -> None:
    epoch, table = sample_stats(tmp_path, 1)
    assert epoch is None and table.num_rows == 0
    write_run(tmp_path, epochs=2, seed=12)
    epoch, table = sample_stats(tmp_path, 1, 7)
    assert epoch == 7 and table.num_rows == 0 and table.schema == reference(tmp_path, 1, 1).schema
    assert carried_state(tmp_path, 1, 7).num_rows == 0
