"""The "likely mislabelled" flag: how the default rule decides over a whole epoch's table, and
its precision and recall on real data with known label noise (the levels README claims)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from onthefly.signals.dynamics import (
    MIN_EPOCHS_FOR_MISLABELLED,
    STAT_COLUMNS,
    FlagRule,
    add_flags,
    mislabelled_cut,
)

# What README says the flag achieves on digits with look-alike label swaps (tested below), and what
# benchmarks/label_noise.py measures against cleanlab.
CLAIMED_PRECISION = 0.90
CLAIMED_RECALL = 0.90


def stats_table(aum: np.ndarray, label: np.ndarray, pred: np.ndarray, epochs: int = 10,
                confidence: np.ndarray | None = None, margin: np.ndarray | None = None) -> pa.Table:
    """A stats table with every column ``add_flags`` reads; the others are plausible filler. By
    default the margin at the epoch is the AUM, and the label's probability is what a margin gives
    when the prediction takes the rest."""
    n = aum.size
    rng = np.random.default_rng(0)
    margin = aum if margin is None else margin
    confidence = 1 / (1 + np.exp(-margin)) if confidence is None else confidence
    columns = {"index": np.arange(n), "label": label, "pred": pred, "correct": pred == label,
               "loss": rng.exponential(size=n), "margin": margin, "confidence": confidence,
               "grad_norm": np.full(n, np.nan), "epochs": np.full(n, epochs, dtype=np.int32), "aum": aum,
               "forgetting": np.zeros(n, dtype=np.int32), "confidence_mean": np.full(n, 0.5),
               "variability": np.zeros(n)}
    return pa.table(columns)


def noisy_run(n: int = 3000, noise: float = 0.1, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """AUMs as a run with label noise leaves them: the learned samples high with a tail of hard
    ones reaching below zero, the mislabelled ones low and predicted as their own (true) class."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, size=n)
    aum = rng.normal(1.6, 0.6, size=n) - rng.exponential(0.3, size=n)
    pred = label.copy()
    noisy = rng.choice(n, size=int(noise * n), replace=False)
    true = label[noisy].copy()
    label[noisy] = (true + rng.integers(1, 10, size=noisy.size)) % 10
    aum[noisy] = rng.normal(-1.8, 0.5, size=noisy.size)
    pred[noisy] = true
    hard = rng.choice(np.setdiff1d(np.arange(n), noisy), size=n // 50, replace=False)  # wrong, near zero
    aum[hard] = rng.normal(-0.2, 0.3, size=hard.size)
    pred[hard] = (label[hard] + 1) % 10
    truth = np.zeros(n, dtype=bool)
    truth[noisy] = True
    return stats_table(aum, label, pred), truth


def flags(table: pa.Table, rule: FlagRule | None = None) -> np.ndarray:
    return add_flags(table, rule or FlagRule()).column("mislabelled").to_numpy(zero_copy_only=False)


def test_default_rule_cuts_between_the_two_aum_modes() -> None:
    table, truth = noisy_run()
    flagged, fixed = flags(table), flags(table, FlagRule(adaptive=False))
    precision, recall = (flagged & truth).sum() / flagged.sum(), (flagged & truth).sum() / truth.sum()
    assert precision >= 0.95 and recall >= 0.95
    # The fixed rule (AUM < 0) also takes the hard samples that dip below zero.
    assert (fixed & ~truth).sum() >= 3 * (flagged & ~truth).sum() + 20


def test_a_run_without_a_low_mode_flags_nothing() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    label = rng.integers(0, 10, size=n)
    aum = rng.normal(1.5, 0.7, size=n) - rng.exponential(0.4, size=n)  # one mode, a tail below zero
    pred = np.where(aum < 0, (label + 1) % 10, label)
    table = stats_table(aum, label, pred)
    assert (aum < 0).sum() > 50 and flags(table, FlagRule(adaptive=False)).sum() == (aum < 0).sum()
    assert flags(table).sum() == 0


def test_aum_threshold_is_the_highest_aum_a_flagged_sample_may_have() -> None:
    table, _ = noisy_run()
    aum = table.column("aum").to_numpy()
    for threshold in (-2.0, -1.0):
        flagged = flags(table, FlagRule(aum_threshold=threshold))
        assert flagged.any() and aum[flagged].max() < threshold
    assert mislabelled_cut(aum, ceiling=-1.0) <= -1.0


def test_systematic_confusions_are_taken_first() -> None:
    """Two samples with the same AUM just above the cut: the one whose (label, pred) pair is where
    the suspects concentrate is flagged, the one alone in its pair is not."""
    rng = np.random.default_rng(2)
    n = 3000
    label = rng.integers(0, 10, size=n)
    aum = rng.normal(1.6, 0.5, size=n)
    pred = label.copy()
    swapped = rng.choice(np.flatnonzero(label == 7), size=150, replace=False)  # 1s labelled 7: one pair
    aum[swapped], pred[swapped] = rng.normal(-1.8, 0.4, size=swapped.size), 1
    cut = mislabelled_cut(aum)
    assert -1.5 < cut < 0
    in_pattern, alone = np.flatnonzero(label == 7)[~np.isin(np.flatnonzero(label == 7), swapped)][:2]
    alone_label = 3
    label[alone], pred[in_pattern], pred[alone] = alone_label, 1, 5
    aum[[in_pattern, alone]] = cut + 0.05
    flagged = flags(stats_table(aum, label, pred))
    assert flagged[in_pattern] and not flagged[alone]
    assert flagged[swapped].mean() > 0.95


def test_a_flat_low_mode_is_flagged_as_far_as_confident_learning_counts() -> None:
    """Wrong labels spread over a broad low mode with a dip inside it: the valley cut stops at the
    dip, and the count confident learning reads from the epoch's probabilities takes the rest."""
    rng = np.random.default_rng(3)
    n = 3000
    label = rng.integers(0, 10, size=n)
    aum = rng.normal(1.6, 0.5, size=n)
    confidence = rng.uniform(0.8, 0.9, size=n)
    pred = label.copy()
    noisy = rng.choice(n, size=300, replace=False)
    deep, shallow = noisy[:180], noisy[180:]
    aum[deep], aum[shallow] = rng.normal(-4.0, 0.2, size=deep.size), rng.normal(-1.6, 0.3, size=shallow.size)
    pred[noisy] = (label[noisy] + rng.integers(1, 10, size=noisy.size)) % 10
    confidence[noisy] = 0.03
    # Hard samples bridge the shallow part of the low mode to the main one: no valley there.
    hard = rng.choice(np.setdiff1d(np.arange(n), noisy), size=60, replace=False)
    aum[hard], pred[hard], confidence[hard] = rng.uniform(-1.2, 0.3, size=hard.size), (label[hard] + 1) % 10, 0.4
    # At the epoch the prediction gets 0.9 for a wrong label (a confident other class), 0.45 for a hard one.
    other = np.where(np.isin(np.arange(n), noisy), 0.9, np.where(np.isin(np.arange(n), hard), 0.45, 0.05))
    margin = np.log(confidence / other)
    truth = np.zeros(n, dtype=bool)
    truth[noisy] = True
    assert mislabelled_cut(aum) < -2.5  # the density alone stops inside the low mode
    flagged = flags(stats_table(aum, label, pred, confidence=confidence, margin=margin))
    assert flagged[noisy].mean() > 0.97 and (flagged & ~truth).sum() <= 15
    # Without the epoch's probabilities (NaN) there is no count: the valley cut alone.
    no_count = flags(stats_table(aum, label, pred, confidence=np.full(n, np.nan), margin=margin))
    assert no_count[deep].all() and not no_count[shallow].any()


def test_too_few_epochs_regression_runs_and_small_tables() -> None:
    table, _ = noisy_run()
    early = table.set_column(table.schema.get_field_index("epochs"), "epochs",
                             pa.array(np.full(table.num_rows, MIN_EPOCHS_FOR_MISLABELLED - 1, dtype=np.int32)))
    assert flags(early).sum() == 0
    n = table.num_rows
    regression = table.set_column(table.schema.get_field_index("aum"), "aum", pa.array(np.full(n, np.nan)))
    regression = regression.set_column(regression.schema.get_field_index("label"), "label",
                                       pa.nulls(n, pa.int64()))
    assert flags(regression).sum() == 0
    small = stats_table(np.array([1.0, -0.5, 2.0, -3.0]), np.array([0, 1, 1, 0]), np.array([0, 0, 1, 1]))
    assert flags(small).tolist() == [False, True, False, True]  # too few for a density: the fixed rule


def test_flag_rule_is_constructed_as_before_and_checked() -> None:
    rule = FlagRule(hard_quantile=0.8, aum_threshold=-0.5)
    assert rule.adaptive and "valley" in rule.describe()["mislabelled"]
    assert "below -0.5" in FlagRule(aum_threshold=-0.5, adaptive=False).describe()["mislabelled"]
    with pytest.raises(onthefly.OnTheFlyError, match="aum_threshold must be a finite number"):
        FlagRule(aum_threshold=float("nan"))
    table, _ = noisy_run(n=500)
    assert add_flags(table, rule).schema.names == list(STAT_COLUMNS)


def test_likely_mislabelled_finds_swapped_digits_labels(capsys: pytest.CaptureFixture[str]) -> None:
    """scikit-learn's digits, 12 % of the labels swapped with a look-alike class (1<->7, 3<->8,
    4<->9, 5<->6, 0<->2; seeded), a small MLP trained 20 epochs through the engine."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    rng = np.random.default_rng(0)
    labels = digits.target.copy()
    partner = np.arange(10)
    for a, b in ((1, 7), (3, 8), (4, 9), (5, 6), (0, 2)):
        partner[a], partner[b] = b, a
    swapped = rng.choice(labels.size, size=round(0.12 * labels.size), replace=False)
    labels[swapped] = partner[labels[swapped]]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loader = DataLoader(TensorDataset(x, torch.tensor(labels)), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    summary = onthefly.Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                               loss_fn=nn.CrossEntropyLoss(), train_loader=loader, project="digits",
                               run_name="noisy", progress=False).fit(20)
    table = onthefly.open_session(summary.session_dir).sample_stats(summary.run_id)
    flagged = set(table.filter(table.column("mislabelled")).column("index").to_pylist())
    truth = set(swapped.tolist())
    precision = len(flagged & truth) / max(1, len(flagged))
    recall = len(flagged & truth) / len(truth)
    with capsys.disabled():
        print(f"\n[digits, 12% look-alike swaps] likely mislabelled: {len(flagged)} flagged, "
              f"precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= CLAIMED_PRECISION
    assert recall >= CLAIMED_RECALL
    assert table.filter(table.column("hard")).num_rows == pytest.approx(0.1 * table.num_rows, abs=2)
