"""Compare experts: per-sample evaluation that changes nothing, and paired statistics with
known answers (identical models, a large gain, hand-computed McNemar tables, the normal
approximation for a large set)."""

from __future__ import annotations

import copy
import json
import math
import random
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from conftest import toy_data, toy_model
from onthefly.actions.compare import PerSample, compare, evaluate_set
from onthefly.engine.batch import BatchSpec
from onthefly.errors import ConfigError
from onthefly.signals.per_sample import PerSampleLoss

CPU = torch.device("cpu")
TUPLES = BatchSpec(None, None, None)
Z95 = 1.959963984540054  # standard normal 97.5% quantile


def results_of(correct: np.ndarray, loss: np.ndarray | None = None, ids: np.ndarray | None = None) -> PerSample:
    """Classification results from a correctness vector (label 0; pred 0 when right, else 1)."""
    correct = np.asarray(correct, dtype=bool)
    n = correct.size
    label = np.zeros(n, dtype=np.int64)
    return PerSample(
        ids=np.arange(n, dtype=np.int64) if ids is None else ids,
        loss=np.where(correct, 0.1, 2.0) if loss is None else np.asarray(loss, dtype=np.float64),
        correct=correct, label=label, pred=np.where(correct, 0, 1).astype(np.int64),
    )


def table(b: int, c: int, both_right: int = 0, both_wrong: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, run) correctness: b samples reference-only right, c run-only right."""
    ref = np.array([True] * b + [False] * c + [True] * both_right + [False] * both_wrong)
    run = np.array([False] * b + [True] * c + [True] * both_right + [False] * both_wrong)
    return ref, run


def cell(result: dict, run: str, set_name: str) -> dict:
    (found,) = [c for c in result["cells"] if c["run"] == run and c["set"] == set_name]
    return found


# --- statistics with known answers -------------------------------------------------------------


def test_identical_runs_differ_by_zero_with_a_zero_interval_and_p_one() -> None:
    ref = np.random.default_rng(1).random(200) < 0.7
    result = compare({"a": {"val": results_of(ref)}, "b": {"val": results_of(ref.copy())}}, "a")
    diff = cell(result, "b", "val")
    assert diff["diff"]["accuracy"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert diff["diff"]["loss"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert diff["diff"]["interval_note"] is None
    assert diff["mcnemar"] == {"b": 0, "c": 0, "p": 1.0, "method": "exact"}
    assert diff["fixed"] == [] and diff["broken"] == []


def test_a_large_gain_has_an_interval_above_zero_and_a_small_p() -> None:
    # 400 samples: the run fixes 120 of the reference's errors and breaks 8 of its right answers
    ref, run = table(b=8, c=120, both_right=232, both_wrong=40)
    result = compare({"ref": {"val": results_of(ref)}, "new": {"val": results_of(run)}}, "ref")
    diff = cell(result, "new", "val")
    accuracy = diff["diff"]["accuracy"]
    assert accuracy["value"] == pytest.approx((120 - 8) / 400)
    assert 0 < accuracy["low"] < accuracy["value"] < accuracy["high"]
    assert diff["diff"]["loss"]["high"] < 0  # fewer errors, lower loss
    assert diff["mcnemar"]["b"] == 8 and diff["mcnemar"]["c"] == 120
    assert diff["mcnemar"]["method"] == "chi2" and diff["mcnemar"]["p"] < 0.01
    assert len(diff["fixed"]) == 120 and len(diff["broken"]) == 8


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_bootstrap_interval_matches_the_normal_approximation_for_a_large_set(metric: str) -> None:
    rng = np.random.default_rng(7)
    n = 5000
    ref, run = rng.random(n) < 0.70, rng.random(n) < 0.74
    ref_loss, run_loss = rng.gamma(2.0, 0.5, n), rng.gamma(2.0, 0.45, n)
    result = compare({"a": {"s": results_of(ref, ref_loss)}, "b": {"s": results_of(run, run_loss)}}, "a")
    per_sample = (run.astype(float) - ref) if metric == "accuracy" else run_loss - ref_loss
    mean, se = per_sample.mean(), per_sample.std(ddof=1) / math.sqrt(n)
    got = cell(result, "b", "s")["diff"][metric]
    assert got["value"] == pytest.approx(mean)
    # the Monte Carlo error of a 2.5% percentile of 2000 resamples is about 0.06 standard errors
    assert got["low"] == pytest.approx(mean - Z95 * se, abs=0.25 * se)
    assert got["high"] == pytest.approx(mean + Z95 * se, abs=0.25 * se)


@pytest.mark.parametrize(("b", "c", "p", "method"), [
    (1, 6, 0.125, "exact"),  # 2 * (C(7,0) + C(7,1)) / 2**7 = 16 / 128
    (6, 1, 0.125, "exact"),
    (0, 5, 0.0625, "exact"),  # 2 / 2**5
    (3, 3, 1.0, "exact"),
    (10, 30, math.erfc(math.sqrt((20 - 1) ** 2 / 40 / 2)), "chi2"),  # chi-square(1) survival of 9.025
    (20, 20, 1.0, "chi2"),  # the continuity correction never makes |b - c| negative
])
def test_mcnemar_against_hand_computed_tables(b: int, c: int, p: float, method: str) -> None:
    ref, run = table(b, c, both_right=30, both_wrong=4)
    result = compare({"a": {"s": results_of(ref)}, "b": {"s": results_of(run)}}, "a")
    mcnemar = cell(result, "b", "s")["mcnemar"]
    assert mcnemar["b"] == b and mcnemar["c"] == c and mcnemar["method"] == method
    assert mcnemar["p"] == pytest.approx(p, rel=1e-9)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others() -> None:
    rng = np.random.default_rng(3)
    results = {"a": {"s": results_of(rng.random(300) < 0.6)}, "b": {"s": results_of(rng.random(300) < 0.65)}}
    first, again = compare(results, "a", seed=5), compare(results, "a", seed=5)
    other = compare(results, "a", seed=6)
    assert first == again
    assert cell(first, "b", "s")["diff"]["accuracy"] != cell(other, "b", "s")["diff"]["accuracy"]


def test_an_interval_does_not_depend_on_the_other_runs_and_sets_compared() -> None:
    rng = np.random.default_rng(4)
    a, b, c = (results_of(rng.random(100) < q) for q in (0.6, 0.7, 0.8))
    alone = compare({"a": {"s": a}, "b": {"s": b}}, "a")
    crowd = compare({"a": {"x": a, "s": a}, "c": {"x": c, "s": c}, "b": {"x": b, "s": b}}, "a")
    for metric in ("accuracy", "loss"):  # equal up to rounding: the sums run over more columns
        got, wanted = cell(crowd, "b", "s")["diff"][metric], cell(alone, "b", "s")["diff"][metric]
        assert got == {key: pytest.approx(value, abs=1e-12) for key, value in wanted.items()}


def test_fewer_than_min_n_samples_give_a_value_without_an_interval() -> None:
    ref, run = table(b=2, c=5, both_right=5)
    result = compare({"a": {"tiny": results_of(ref)}, "b": {"tiny": results_of(run)}}, "a")
    diff = cell(result, "b", "tiny")["diff"]
    assert diff["accuracy"] == {"value": pytest.approx(3 / 12), "low": None, "high": None}
    assert diff["loss"]["low"] is None and diff["loss"]["high"] is None
    assert diff["interval_note"] == "n = 12 < 30: too few samples for an interval"
    assert cell(result, "b", "tiny")["mcnemar"]["p"] == pytest.approx(0.453125)  # still tested: exact


def test_nan_losses_are_counted_and_left_out_of_the_loss_difference() -> None:
    rng = np.random.default_rng(5)
    correct = rng.random(100) < 0.5
    ref_loss, run_loss = rng.random(100), rng.random(100)
    ref_loss[[3, 40]] = np.nan
    run_loss[77] = np.inf
    result = compare({"a": {"s": results_of(correct, ref_loss)}, "b": {"s": results_of(correct, run_loss)}}, "a")
    kept = np.isfinite(ref_loss) & np.isfinite(run_loss)
    diff = cell(result, "b", "s")["diff"]
    assert diff["loss"]["value"] == pytest.approx((run_loss[kept] - ref_loss[kept]).mean())
    assert diff["loss"]["low"] < diff["loss"]["value"] < diff["loss"]["high"]
    assert "3 sample(s) with a NaN or infinite loss" in diff["interval_note"]
    assert cell(result, "a", "s")["nan_losses"] == 2
    assert cell(result, "a", "s")["loss"] == pytest.approx(np.nanmean(ref_loss))
    json.dumps(result, allow_nan=False)


def test_regression_results_compare_loss_only() -> None:
    rng = np.random.default_rng(6)
    ids = np.arange(50, dtype=np.int64)
    ref = PerSample(ids=ids, loss=rng.random(50) + 0.5, correct=None, label=None, pred=None)
    run = PerSample(ids=ids, loss=rng.random(50), correct=None, label=None, pred=None)
    result = compare({"a": {"s": ref}, "b": {"s": run}}, "a")
    got = cell(result, "b", "s")
    assert got["accuracy"] is None and got["per_class"] is None
    assert got["diff"]["accuracy"] is None
    assert got["diff"]["loss"]["value"] == pytest.approx((run.loss - ref.loss).mean())
    assert got["diff"]["loss"]["high"] < 0
    assert got["mcnemar"] is None and got["fixed"] is None and got["broken"] is None


def test_per_class_accuracy_counts_each_label() -> None:
    result = PerSample(ids=np.arange(5, dtype=np.int64), loss=np.zeros(5),
                       correct=np.array([True, False, True, True, False]), label=np.array([0, 0, 2, 2, 2]),
                       pred=np.array([0, 1, 2, 2, 0]))
    summary = cell(compare({"a": {"s": result}}, "a"), "a", "s")
    assert summary["per_class"] == {"0": {"n": 2, "accuracy": 0.5}, "2": {"n": 3, "accuracy": pytest.approx(2 / 3)}}
    assert summary["accuracy"] == pytest.approx(0.6)
    assert "diff" not in summary  # the reference is not compared with itself


def test_results_on_other_samples_are_refused() -> None:
    ref = results_of(np.ones(40, dtype=bool))
    shifted = results_of(np.ones(40, dtype=bool), ids=np.arange(1, 41, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"set 'val': run 'b' .* reference 'a' \(first difference at position 0"):
        compare({"a": {"val": ref}, "b": {"val": shifted}}, "a")
    shorter = results_of(np.ones(39, dtype=bool))
    with pytest.raises(ConfigError, match=r"set 'val': run 'b' .*\(39 samples against 40\)"):
        compare({"a": {"val": ref}, "b": {"val": shorter}}, "a")


ONE = results_of(np.ones(1, dtype=bool))


@pytest.mark.parametrize(("results", "reference", "options", "match"), [
    ({}, "a", {}, "at least one run"),
    ({"a": {}}, "main", {}, r"reference run 'main' has no results; the runs given are \['a'\]"),
    ({"a": {"val": ONE, "test": ONE}, "b": {"val": ONE}}, "a", {}, r"run 'b' was evaluated on the sets \['val'\]"),
    ({"a": {"val": ONE}, "b": {"val": {"loss": [0.1]}}}, "a", {}, r"run 'b', set 'val': expected the PerSample"),
    ({"a": {"val": PerSample(np.arange(3), np.zeros(2), None, None, None)}}, "a", {},
     r"run 'a', set 'val': loss has shape \(2,\) but there are 3 ids"),
    ({"a": {}}, "a", {"n_boot": 0}, "n_boot must be a positive"),
    ({"a": {}}, "a", {"confidence": 95}, "confidence must lie strictly between 0 and 1"),
])
def test_bad_arguments_are_refused(results: dict, reference: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compare(results, reference, **options)


# --- evaluation ---------------------------------------------------------------------------------


def test_evaluate_set_gives_per_sample_cross_entropy_in_the_order_of_indices() -> None:
    data, model = toy_data(), toy_model()
    indices = np.array([200, 3, 17, 255, 0, 128, 64, 9, 31, 100], dtype=np.int64)
    got = evaluate_set(model, data, indices, loss=PerSampleLoss(nn.CrossEntropyLoss()), spec=TUPLES,
                       device=CPU, batch_size=3)
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x[indices])
    np.testing.assert_array_equal(got.ids, indices)
    np.testing.assert_allclose(got.loss, F.cross_entropy(logits, y[indices], reduction="none").numpy(), rtol=1e-6)
    np.testing.assert_array_equal(got.label, y[indices].numpy())
    np.testing.assert_array_equal(got.pred, logits.argmax(dim=1).numpy())
    np.testing.assert_array_equal(got.correct, got.pred == got.label)
    assert got.ids.dtype == np.int64 and got.loss.dtype == np.float64 and got.correct.dtype == bool


def test_evaluate_set_without_indices_covers_the_whole_dataset() -> None:
    got = evaluate_set(toy_model(), toy_data(50), None, loss=PerSampleLoss(nn.CrossEntropyLoss()),
                       spec=TUPLES, device=CPU, batch_size=16)
    np.testing.assert_array_equal(got.ids, np.arange(50))
    assert len(got) == 50


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_set_changes_no_training_state(training: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train(training)
    before = copy.deepcopy(model.state_dict())  # batch-norm running statistics included
    torch_rng, numpy_rng, python_rng = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    data = toy_data(64)
    got = evaluate_set(model, data, np.arange(0, 64, 2), loss=PerSampleLoss(nn.CrossEntropyLoss()),
                       spec=TUPLES, device=CPU, batch_size=8)
    assert model.training is training and all(m.training is training for m in model.modules())
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], numpy_rng[1]) and random.getstate() == python_rng
    # evaluated in eval mode: no dropout, running statistics
    x, y = data.tensors
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x[0:64:2]), y[0:64:2], reduction="none")
    np.testing.assert_allclose(got.loss, expected.numpy(), rtol=1e-6)


def test_evaluate_set_of_a_regression_task_has_no_classification_columns() -> None:
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = nn.Linear(4, 1)
    got = evaluate_set(model, data, np.arange(10, 30), loss=PerSampleLoss(nn.MSELoss()), spec=TUPLES,
                       device=CPU, batch_size=7)
    assert got.correct is None and got.label is None and got.pred is None
    with torch.no_grad():
        expected = ((model(x[10:30]) - data.tensors[1][10:30]) ** 2).squeeze(1)
    np.testing.assert_allclose(got.loss, expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize(("indices", "match"), [
    (np.array([0, 256]), r"indices must lie in \[0, 256\)"),
    (np.array([-1, 3]), r"indices must lie in \[0, 256\)"),
    (np.array([4, 5, 4]), "1 duplicate"),
    (np.array([0.5, 1.0]), "1-D array of integer dataset indices"),
    (np.zeros((2, 2), dtype=np.int64), "1-D array of integer dataset indices"),
    (np.array([], dtype=np.int64), "the evaluation set is empty"),
])
def test_evaluate_set_refuses_bad_indices(indices: np.ndarray, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        evaluate_set(toy_model(), toy_data(), indices, loss=PerSampleLoss(nn.CrossEntropyLoss()), spec=TUPLES,
                     device=CPU)


# --- end to end ---------------------------------------------------------------------------------


def train(model: nn.Module, data: TensorDataset, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = data.tensors
    for step in range(steps):
        batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()


def test_two_models_on_three_sets_end_to_end() -> None:
    train_data = toy_data()
    early = toy_model()
    train(early, train_data, steps=4)
    later = copy.deepcopy(early)
    train(later, train_data, steps=40)
    sets = {"train_slice": (train_data, np.arange(100, 228)), "val": (toy_data(128, seed=1), None),
            "test": (toy_data(96, seed=2), None)}
    loss = PerSampleLoss(nn.CrossEntropyLoss())
    results = {run: {name: evaluate_set(model, data, indices, loss=loss, spec=TUPLES, device=CPU, batch_size=50)
                     for name, (data, indices) in sets.items()}
               for run, model in (("early", early), ("later", later))}
    result = compare(results, "early")
    json.dumps(result, allow_nan=False)
    assert result["runs"] == ["early", "later"] and result["sets"] == list(sets)
    assert [(c["run"], c["set"]) for c in result["cells"]] == list(product(["early", "later"], sets))
    for name in sets:
        ref, run = results["early"][name], results["later"][name]
        got = cell(result, "later", name)
        assert got["n"] == len(ref)
        assert got["fixed"] == ref.ids[~ref.correct & run.correct].tolist()
        assert got["broken"] == ref.ids[ref.correct & ~run.correct].tolist()
        assert got["mcnemar"]["b"] == len(got["broken"]) and got["mcnemar"]["c"] == len(got["fixed"])
        assert got["diff"]["accuracy"]["value"] == pytest.approx(run.correct.mean() - ref.correct.mean())
        assert got["diff"]["loss"]["value"] == pytest.approx(run.loss.mean() - ref.loss.mean())
        assert got["diff"]["loss"]["high"] < 0  # ten times the training: lower loss on every set
    assert set(cell(result, "later", "train_slice")["fixed"]) <= set(range(100, 228))  # dataset ids
