"""Training dynamics across epochs (AUM, forgetting, cartography), flags, and robust summaries.
How the "likely mislabelled" flag decides, and its quality on real data with known label noise:
test_label_noise.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.signals.dynamics import FlagRule
from onthefly.signals.quantiles import Reservoir, robust_summary
from onthefly.store.dynamics import sample_stats
from onthefly.store.samples import SampleChunk, SampleSink


def write_epochs(folder: Path, epochs: list[dict[str, list[float]]]) -> None:
    """Write one Parquet part per epoch, from plain columns (index, margin, pred, label, loss)."""
    sink = SampleSink(folder)
    for epoch, cols in enumerate(epochs):
        n = len(cols["index"])
        sink.add(SampleChunk(
            run_id=1, split="train", epoch=epoch, step=np.arange(n, dtype=np.int64) + 100 * epoch,
            index=np.asarray(cols["index"], dtype=np.int64), loss=np.asarray(cols["loss"], dtype=np.float32),
            margin=np.asarray(cols["margin"], dtype=np.float32), pred=np.asarray(cols["pred"], dtype=np.int64),
            label=np.asarray(cols["label"], dtype=np.int64),
            confidence=np.asarray(cols["confidence"], dtype=np.float32),
        ))
        sink.close_epoch(1, "train", epoch)


def test_statistics_across_epochs_match_hand_computed_values(tmp_path: Path) -> None:
    # Sample 0: right, wrong, right (one forgetting event). Sample 1: always wrong.
    # Sample 2: right, right, wrong (one forgetting event), drawn twice in epoch 2.
    write_epochs(tmp_path, [
        {"index": [0, 1, 2], "margin": [1.0, -2.0, 3.0], "pred": [0, 0, 1], "label": [0, 1, 1],
         "loss": [0.1, 2.0, 0.2], "confidence": [0.6, 0.1, 0.9]},
        {"index": [1, 0, 2], "margin": [-1.0, -0.5, 2.0], "pred": [2, 1, 1], "label": [1, 0, 1],
         "loss": [1.5, 0.9, 0.1], "confidence": [0.2, 0.4, 0.8]},
        {"index": [2, 0, 1, 2], "margin": [-1.0, 2.0, -3.0, -2.0], "pred": [0, 0, 0, 0], "label": [1, 0, 1, 1],
         "loss": [1.0, 0.05, 3.0, 1.4], "confidence": [0.3, 0.9, 0.05, 0.1]},
    ])
    epoch, table = sample_stats(tmp_path, 1, rule=FlagRule(hard_quantile=0.5))
    assert epoch == 2
    rows = {r["index"]: r for r in table.to_pylist()}
    assert rows[0]["forgetting"] == 1 and rows[1]["forgetting"] == 0 and rows[2]["forgetting"] == 1
    assert rows[0]["aum"] == pytest.approx((1.0 - 0.5 + 2.0) / 3)
    assert rows[2]["margin"] == pytest.approx(-1.5)  # two draws in epoch 2: their mean
    assert rows[2]["aum"] == pytest.approx((3.0 + 2.0 - 1.5) / 3)
    assert rows[1]["confidence_mean"] == pytest.approx((0.1 + 0.2 + 0.05) / 3)
    assert rows[1]["variability"] == pytest.approx(np.std([0.1, 0.2, 0.05]), rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(0.05) and rows[0]["epochs"] == 3
    assert [rows[i]["hard"] for i in range(3)] == [False, True, True]  # loss >= p50 of {0.05, 3.0, 1.2}
    assert [rows[i]["mislabelled"] for i in range(3)] == [False, True, False]

    epoch, early = sample_stats(tmp_path, 1, epoch=0)
    assert epoch == 0 and early.column("mislabelled").to_pylist() == [False] * 3  # too few epochs
    assert sample_stats(tmp_path, 1, epoch=7)[1].num_rows == 0


def test_flag_rule_is_checked() -> None:
    with pytest.raises(onthefly.OnTheFlyError, match="hard_quantile must be between 0 and 1"):
        FlagRule(hard_quantile=90)


def test_reservoir_is_exact_while_small_and_close_on_a_million_values() -> None:
    small = Reservoir(size=100)
    small.add(np.arange(50, dtype=np.float32))
    assert small.summary() == robust_summary(np.arange(50, dtype=np.float32))
    rng = np.random.default_rng(1)
    values = rng.exponential(size=1_000_000).astype(np.float32)
    reservoir = Reservoir()
    for chunk in np.array_split(values, 300):
        reservoir.add(chunk)
    approx, exact = reservoir.summary(), robust_summary(values)
    assert approx["count"] == exact["count"] == 1_000_000 and approx["exact"] is False
    for name in ("p50", "p90", "p99"):
        rank = np.searchsorted(np.sort(values), approx["quantiles"][name]) / values.size
        assert abs(rank - float(name[1:]) / 100) < 0.01, name  # within 1 % of rank


def test_robust_summary_median_and_mad() -> None:
    summary = robust_summary(np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan]))
    assert summary["median"] == 3.0 and summary["mad"] == 1.0 and summary["count"] == 5


def test_validation_samples_are_recorded_on_request() -> None:
    import torch.nn.functional as F

    train, val = toy_data(n=64), toy_data(n=48, seed=3)
    model = nn.Sequential(nn.Linear(20, 3))
    # lr=0: the model never changes, so each stored validation loss can be recomputed by index.
    summary = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(train, batch_size=16), project="val", run_name="r", progress=False,
        val_loader=DataLoader(val, batch_size=10, shuffle=True), val_samples=True,  # shuffled on purpose
    ).fit(2)
    session = onthefly.open_session(summary.session_dir)
    table = session.samples(summary.run_id, split="val")
    assert sorted(set(table.column("epoch").to_pylist())) == [0, 1] and table.num_rows == 96
    x, y = val.tensors
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, reduction="none")
    for index, loss, label in zip(table.column("index").to_pylist(), table.column("loss").to_pylist(),
                                  table.column("label").to_pylist(), strict=True):
        assert loss == pytest.approx(expected[index].item(), rel=1e-5) and label == int(y[index])
    stats = session.sample_stats(summary.run_id)  # the training split is unchanged by it
    assert stats.num_rows == 64
    assert sample_stats(summary.session_dir, summary.run_id, split="val")[1].num_rows == 48


def test_validation_samples_are_off_by_default() -> None:
    model = toy_model()
    summary = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(toy_data(n=32), batch_size=16), val_loader=DataLoader(toy_data(n=16), batch_size=8),
        project="val", run_name="off", progress=False,
    ).fit(1)
    assert onthefly.open_session(summary.session_dir).samples(summary.run_id, split="val").num_rows == 0
