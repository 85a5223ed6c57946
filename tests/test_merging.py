"""Weight-space merges: hand-computed results, bit-for-bit agreement with the references
(torch's AveragedModel, peft's merge_utils), adapter fusion, streaming from files, refusals."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import peft.utils.merge_utils as peft_merge  # slow to import (~7 s): once for the module
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from onthefly.actions.adapters import LowRankAdapter, add_adapters
from onthefly.actions.merging import (
    dare_linear,
    dare_seed,
    dare_ties,
    fisher_weighted,
    fuse_adapters,
    linear,
    task_arithmetic,
    ties,
)
from onthefly.actions.model_weights import (
    FileWeights,
    TensorWeights,
    adapter_layers,
    check_same_architecture,
    fold_adapters,
)
from onthefly.errors import ConfigError, StateError

Sign = Literal["total", "frequency"]
SHAPES = {"fc.weight": (6, 5), "fc.bias": (7,), "scale": (), "conv": (2, 3, 4)}


def weights(**tensors: object) -> TensorWeights:
    return TensorWeights({k: v if isinstance(v, torch.Tensor) else torch.tensor(v)
                          for k, v in tensors.items()})


def forks(count: int, seed: int = 0) -> tuple[TensorWeights, list[TensorWeights]]:
    """A random base and ``count`` parents near it (float32, plus an integer counter)."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    parents = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
               for _ in range(count)]
    for i, parent in enumerate(parents):
        parent["steps"] = torch.tensor(10 + i)
    base["steps"] = torch.tensor(0)
    return TensorWeights(base), [TensorWeights(p) for p in parents]


def fisher(model: TensorWeights) -> TensorWeights:
    """A stand-in Fisher: |weights| of the floating entries (Fishers cover parameters only)."""
    return TensorWeights({k: model.get(k).abs() for k in model.keys()
                          if model.get(k).is_floating_point()})


def task_vectors(base: TensorWeights, parents: list[TensorWeights], key: str) -> list[torch.Tensor]:
    return [p.get(key) - base.get(key) for p in parents]


# --- hand-computed results -----------------------------------------------------------------


def test_linear_uniform_averages_floats_and_keeps_first_parents_counters() -> None:
    parents = [weights(w=[1.0, 2.0], n=3), weights(w=[3.0, 6.0], n=7), weights(w=[5.0, 10.0], n=9)]
    merged = linear(parents)
    assert torch.equal(merged["w"], torch.tensor([3.0, 6.0]))
    assert merged["n"].item() == 3 and merged["n"].dtype == torch.int64


def test_linear_weighted_divides_by_the_weights_sum_unless_told_not_to() -> None:
    parents = [weights(w=[1.0, 2.0]), weights(w=[3.0, 6.0])]
    assert torch.equal(linear(parents, [1, 3])["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(linear(parents, [1, 3], normalize=False)["w"], torch.tensor([10.0, 20.0]))


def test_float16_is_computed_in_float32_and_cast_back() -> None:
    big = torch.tensor([60000.0, -60000.0], dtype=torch.float16)  # 2 * 60000 overflows float16
    merged = linear([TensorWeights({"w": big}), TensorWeights({"w": big})], [1.0, 1.0])["w"]
    assert merged.dtype == torch.float16 and torch.equal(merged, big)
    base = TensorWeights({"w": torch.zeros(2, dtype=torch.float16)})
    summed = task_arithmetic(base, [TensorWeights({"w": big})] * 2, normalize=True)["w"]
    assert summed.dtype == torch.float16 and torch.equal(summed, big)


def test_task_arithmetic_adds_the_weighted_task_vectors_to_the_base() -> None:
    base = weights(w=[1.0, 1.0], n=0)
    parents = [weights(w=[2.0, 0.0], n=4), weights(w=[3.0, 5.0], n=5)]
    assert torch.equal(task_arithmetic(base, parents)["w"], torch.tensor([4.0, 4.0]))
    merged = task_arithmetic(base, parents, [1, 3], lambda_=0.5, normalize=True)
    assert torch.equal(merged["w"], torch.tensor([1.875, 2.375]))  # 1 + 0.5 * [7, 11] / 4
    assert merged["n"].item() == 4


@pytest.mark.parametrize(("method", "expected"), [("total", 5.0), ("frequency", -1.0)])
def test_ties_elects_the_sign_by_total_or_by_frequency(method: Sign, expected: float) -> None:
    base = weights(w=[0.0])
    parents = [weights(w=[5.0]), weights(w=[-1.0]), weights(w=[-1.0])]
    merged = ties(base, parents, density=1.0, majority_sign_method=method)
    assert merged["w"].item() == expected


def test_ties_keeps_the_largest_entries_and_averages_those_that_agree() -> None:
    base = weights(w=[0.0, 0.0, 0.0, 0.0])
    parents = [weights(w=[4.0, -1.0, 2.0, -3.0]), weights(w=[-1.0, -2.0, 6.0, 1.0])]
    # kept: [4, 0, 0, -3] and [0, -2, 6, 0]; signs elected by sum: +, -, +, -
    assert torch.equal(ties(base, parents, density=0.5)["w"], torch.tensor([4.0, -2.0, 6.0, -3.0]))
    # all kept: sums [3, -3, 8, -2]; entry 2 averages 2 and 6, entry 1 averages -1 and -2
    assert torch.equal(ties(base, parents, density=1.0)["w"], torch.tensor([4.0, -1.5, 4.0, -3.0]))


def test_dare_keeps_each_entry_rescaled_or_drops_it() -> None:
    base = weights(w=torch.ones(1000))
    parent = weights(w=torch.full((1000,), 3.0))
    merged = dare_linear(base, [parent], density=0.5, seed=1)["w"]
    assert set(merged.unique().tolist()) == {1.0, 5.0}  # 1 + 0 or 1 + 2 / 0.5
    assert 400 < int((merged == 5.0).sum()) < 600
    everything = dare_ties(base, [parent, parent], density=1.0)["w"]
    assert torch.equal(everything, torch.full((1000,), 3.0))


def test_fisher_weighted_weighs_each_entry_by_its_importance() -> None:
    parents = [weights(w=[1.0, 2.0], running=[0.0]), weights(w=[3.0, 6.0], running=[4.0])]
    fishers = [weights(w=[1.0, 0.0]), weights(w=[3.0, 0.0])]
    merged = fisher_weighted(parents, fishers, floor=0.5)
    # entry 0: (1*1 + 3*3) / (1 + 3); entry 1 has Fisher 0 -> floor on both -> plain mean
    assert torch.equal(merged["w"], torch.tensor([2.5, 4.0]))
    assert torch.equal(merged["running"], torch.tensor([2.0]))  # no Fisher: the average
    weighted = fisher_weighted(parents, fishers, [3, 1], floor=0.5)
    # entry 0: (3*1*1 + 1*3*3) / (3 + 3); entry 1: (3*0.5*2 + 1*0.5*6) / (1.5 + 0.5)
    assert torch.equal(weighted["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(weighted["running"], torch.tensor([1.0]))


def test_fisher_zero_everywhere_gives_the_weighted_average_not_nan() -> None:
    _, parents = forks(3)
    fishers = [TensorWeights({k: torch.zeros(s) for k, s in SHAPES.items()}) for _ in parents]
    merged = fisher_weighted(parents, fishers, [1, 2, 3])
    expected = linear(parents, [1, 2, 3])
    for key in SHAPES:
        assert not merged[key].isnan().any()
        torch.testing.assert_close(merged[key], expected[key])


# --- the references, bit for bit -----------------------------------------------------------


def test_uniform_linear_equals_averaged_model() -> None:
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        model(torch.randn(16, 5))  # moves the BatchNorm statistics
        models.append(model)
    averaged = AveragedModel(models[0])
    for model in models:
        averaged.update_parameters(model)
    merged = linear([TensorWeights(m.state_dict()) for m in models])
    for name, parameter in averaged.module.named_parameters():
        assert torch.equal(merged[name], parameter), name
    assert torch.equal(merged["1.num_batches_tracked"], models[0][1].num_batches_tracked)


@pytest.mark.parametrize("weight_list", [None, [0.5, 1.5, -0.3]])
@pytest.mark.parametrize("lambda_", [1.0, 0.7])
def test_task_arithmetic_equals_peft(weight_list: list[float] | None, lambda_: float) -> None:
    base, parents = forks(3)
    merged = task_arithmetic(base, parents, weight_list, lambda_=lambda_)
    w = torch.tensor(weight_list if weight_list is not None else [1.0, 1.0, 1.0])
    for key in SHAPES:
        delta = peft_merge.task_arithmetic(task_vectors(base, parents, key), w)
        expected = base.get(key) + lambda_ * delta
        assert torch.equal(merged[key], expected), key
    assert merged["steps"].item() == 10


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_equals_peft(method: Sign, density: float) -> None:
    base, parents = forks(4, seed=1)
    w = [0.4, 1.0, 0.7, 1.3]
    merged = ties(base, parents, w, density=density, lambda_=0.9, majority_sign_method=method)
    for key in SHAPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
            delta = peft_merge.ties(task_vectors(base, parents, key), torch.tensor(w), density,
                                    method)
        assert torch.equal(merged[key], base.get(key) + 0.9 * delta), key


@pytest.mark.parametrize("density", [0.4, 0.9])
def test_dare_linear_equals_peft_on_the_same_seeds(density: float) -> None:
    base, parents = forks(3, seed=2)
    w = [1.0, 0.5, 2.0]
    merged = dare_linear(base, parents, w, density=density, lambda_=0.8, seed=7)
    for index, key in enumerate(parents[0].keys()):
        if key in SHAPES:
            torch.manual_seed(dare_seed(7, index))
            tvs = task_vectors(base, parents, key)
            delta = peft_merge.dare_linear(tvs, torch.tensor(w), density)
            assert torch.equal(merged[key], base.get(key) + 0.8 * delta), key


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_equals_peft_on_the_same_seeds(method: Sign) -> None:
    base, parents = forks(4, seed=3)
    merged = dare_ties(base, parents, density=0.6, seed=11, majority_sign_method=method)
    for index, key in enumerate(parents[0].keys()):
        if key in SHAPES:
            torch.manual_seed(dare_seed(11, index))
            tvs = task_vectors(base, parents, key)
            delta = peft_merge.dare_ties(tvs, torch.ones(4), 0.6, method)
            assert torch.equal(merged[key], base.get(key) + delta), key


def test_dare_is_deterministic_per_seed_and_leaves_the_global_rng_alone() -> None:
    base, parents = forks(3)
    state = torch.get_rng_state()
    first = dare_ties(base, parents, density=0.5, seed=5)
    again = dare_ties(base, parents, density=0.5, seed=5)
    other = dare_ties(base, parents, density=0.5, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])
    assert dare_seed(5, 0) != dare_seed(5, 1) != dare_seed(6, 1)


# --- adapters ------------------------------------------------------------------------------


def plain_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def adapter_fork(plain: nn.Sequential, rank: int, seed: int) -> nn.Sequential:
    fork = copy.deepcopy(plain)
    torch.manual_seed(seed)
    add_adapters(fork, rank=rank)
    with torch.no_grad():
        for module in fork.modules():
            if isinstance(module, LowRankAdapter):
                module.lora_b.copy_(torch.randn(module.lora_b.shape))  # as if trained
    return fork


def deltas(fork: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (m.lora_b @ m.lora_a).detach() for name, m in fork.named_modules()
            if isinstance(m, LowRankAdapter)}


def test_fold_adapters_gives_the_plain_models_keys_and_merged_weights() -> None:
    plain = plain_model()
    fork = adapter_fork(plain, rank=2, seed=1)
    folded = fold_adapters(TensorWeights(fork.state_dict()))
    assert adapter_layers(TensorWeights(fork.state_dict())) == ["0", "2"]
    assert folded.keys() == list(plain.state_dict())
    assert folded.meta("0.weight") == ((5, 6), torch.float32)
    assert torch.equal(folded.get("0.weight"), fork[0].merged_weight())
    assert torch.equal(folded.get("2.bias"), fork[2].base.bias)
    restored = copy.deepcopy(plain)
    restored.load_state_dict({k: folded.get(k) for k in folded.keys()})
    x = torch.randn(3, 6)
    torch.testing.assert_close(restored(x), fork(x))
    unadapted = TensorWeights(plain.state_dict())
    assert fold_adapters(unadapted) is unadapted and adapter_layers(unadapted) == []


def test_fuse_adapters_adds_the_weighted_sum_of_deltas_to_the_base() -> None:
    plain = plain_model()
    forked = [adapter_fork(plain, rank=2, seed=1), adapter_fork(plain, rank=1, seed=2)]
    fused = fuse_adapters([TensorWeights(f.state_dict()) for f in forked], [0.25, 2.0])
    assert list(fused) == list(plain.state_dict())
    d1, d2 = deltas(forked[0]), deltas(forked[1])
    for layer in ("0", "2"):
        expected = plain.state_dict()[f"{layer}.weight"] + 0.25 * d1[layer] + 2.0 * d2[layer]
        torch.testing.assert_close(fused[f"{layer}.weight"], expected)
        assert torch.equal(fused[f"{layer}.bias"], plain.state_dict()[f"{layer}.bias"])
    model = copy.deepcopy(plain)
    model.load_state_dict(fused)
    x = torch.randn(4, 6)
    hidden = x @ (plain[0].weight + 0.25 * d1["0"] + 2.0 * d2["0"]).T + plain[0].bias
    out = hidden.relu() @ (plain[2].weight + 0.25 * d1["2"] + 2.0 * d2["2"]).T + plain[2].bias
    torch.testing.assert_close(model(x), out)
    uniform = fuse_adapters([TensorWeights(f.state_dict()) for f in forked])
    torch.testing.assert_close(uniform["0.weight"], plain[0].weight + (d1["0"] + d2["0"]) / 2)


def test_fuse_adapters_refactorises_to_the_asked_rank() -> None:
    plain = plain_model()
    models = [TensorWeights(adapter_fork(plain, rank=2, seed=s).state_dict()) for s in (1, 2)]
    full = fuse_adapters(models)
    base = plain.state_dict()["0.weight"]
    assert torch.equal(fuse_adapters(models, rank=4)["0.weight"], full["0.weight"])  # rank(D) <= 4
    torch.testing.assert_close(fuse_adapters(models, rank=5)["0.weight"], full["0.weight"])
    low = fuse_adapters(models, rank=1)["0.weight"]
    u, s, vh = torch.linalg.svd(full["0.weight"] - base, full_matrices=False)
    torch.testing.assert_close(low, base + s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(low - base, atol=1e-4).item() == 1


def test_fuse_adapters_refuses_different_layers_bases_or_no_adapters() -> None:
    plain = plain_model()
    one, two = (adapter_fork(plain, rank=2, seed=s).state_dict() for s in (1, 2))
    partial = {k: v for k, v in two.items() if not k.startswith("2.")}
    partial.update({"2.weight": plain[2].weight.detach(), "2.bias": plain[2].bias.detach()})
    with pytest.raises(ConfigError, match="model 2 has no adapter on '2' that model 1 has"):
        fuse_adapters([TensorWeights(one), TensorWeights(partial)])
    moved = dict(two, **{"0.base.weight": two["0.base.weight"] + 1})
    with pytest.raises(ConfigError, match=r"'0.base.weight' differs between model 1 and model 2"):
        fuse_adapters([TensorWeights(one), TensorWeights(moved)])
    with pytest.raises(ConfigError, match="model 1 has no adapters"):
        fuse_adapters([TensorWeights(plain.state_dict())])
    with pytest.raises(ConfigError, match="rank: got 0"):
        fuse_adapters([TensorWeights(one)], rank=0)


# --- files ---------------------------------------------------------------------------------


def test_file_weights_round_trip_and_merge_like_tensors(tmp_path: Path) -> None:
    _, parents = forks(2)
    paths = []
    for i, parent in enumerate(parents):
        paths.append(tmp_path / f"p{i}.safetensors")
        save_file({k: parent.get(k) for k in parent.keys()}, paths[-1])
    with FileWeights(paths[0]) as first, FileWeights(paths[1]) as second:
        assert sorted(first.keys()) == sorted(parents[0].keys())
        for key in parents[0].keys():
            assert first.meta(key) == parents[0].meta(key)
            assert torch.equal(first.get(key), parents[0].get(key))
        from_files = linear([first, second], [1, 2])
    from_tensors = linear(parents, [1, 2])
    assert from_files.keys() == from_tensors.keys()
    assert all(torch.equal(from_files[k], from_tensors[k]) for k in from_files)


MERGES = {
    "linear uniform": lambda b, ps, fs: linear(ps),
    "linear weighted": lambda b, ps, fs: linear(ps, [1.0, 2.0, 3.0]),
    "task_arithmetic": lambda b, ps, fs: task_arithmetic(b, ps, lambda_=0.5),
    "ties": lambda b, ps, fs: ties(b, ps, density=0.4, majority_sign_method="frequency"),
    "dare_linear": lambda b, ps, fs: dare_linear(b, ps, density=0.4, seed=3),
    "dare_ties": lambda b, ps, fs: dare_ties(b, ps, [1.0, 0.5, 2.0], density=0.4),
    "fisher_weighted": lambda b, ps, fs: fisher_weighted(ps, fs, [1.0, 0.5, 2.0]),
}


@pytest.mark.parametrize("method", list(MERGES))
def test_merging_from_files_equals_merging_in_memory(method: str, tmp_path: Path) -> None:
    base, parents = forks(3, seed=4)
    models = [base, *parents]
    gen = torch.Generator().manual_seed(5)
    # a float16 key, and the files' (sorted) key order, which DARE's per-key seeds follow
    half = {"half": torch.randn(9, 4, generator=gen).half()}
    dicts = [dict(sorted({**{k: m.get(k) for k in m.keys()}, **half}.items())) for m in models]
    fishers = [fisher(TensorWeights(d)) for d in dicts[1:]]
    dicts += [{k: f.get(k) for k in f.keys()} for f in fishers]
    for i, tensors in enumerate(dicts):
        save_file(tensors, tmp_path / f"{i}.safetensors")
    in_memory = MERGES[method](TensorWeights(dicts[0]), [TensorWeights(d) for d in dicts[1:4]],
                               fishers)
    opened = [FileWeights(tmp_path / f"{i}.safetensors") for i in range(len(dicts))]
    from_files = MERGES[method](opened[0], opened[1:4], opened[4:])
    assert from_files.keys() == in_memory.keys()
    for key, tensor in in_memory.items():
        assert from_files[key].dtype == tensor.dtype and torch.equal(from_files[key], tensor), key
    for weights_file in opened:
        weights_file.close()


def test_file_weights_reads_a_tensor_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.zeros(2, 2, dtype=torch.float16)}, path)
    opened = FileWeights(path)
    assert opened.keys() == ["a", "b"] and opened.meta("b") == ((2, 2), torch.float16)
    early = opened.get("a")
    with path.open("r+b") as raw:  # rewrite the data in place, after opening and one read
        header_size = int.from_bytes(raw.read(8), "little")
        raw.seek(8 + header_size)
        raw.write(torch.ones(4).numpy().tobytes())
        raw.write(torch.ones(4, dtype=torch.float16).numpy().tobytes())
    assert torch.equal(opened.get("a"), torch.ones(4))  # read at get(), not at open
    assert torch.equal(opened.get("b"), torch.ones(2, 2, dtype=torch.float16))
    assert torch.equal(early, torch.zeros(4))  # a tensor already read is the caller's own copy
    opened.close()
    opened.close()  # idempotent
    with pytest.raises(StateError, match="is closed"):
        opened.get("a")


def test_file_weights_refuses_a_file_that_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"cannot read .* as a safetensors file"):
        FileWeights(path)
    with pytest.raises(ConfigError, match="cannot read"):
        FileWeights(tmp_path / "missing.safetensors")


# --- refusals ------------------------------------------------------------------------------


def test_check_same_architecture_names_the_first_mismatch() -> None:
    three = weights(**{"fc.weight": torch.zeros(4, 8), "fc.bias": torch.zeros(4)})
    check_same_architecture({"run 3": three, "run 4": three})
    lacking = weights(**{"fc.weight": torch.zeros(4, 8)})
    with pytest.raises(ConfigError, match=r"parents: run 5 lacks 'fc.bias' that run 3 has"):
        check_same_architecture({"run 3": three, "run 5": lacking})
    extra = weights(**{"fc.weight": torch.zeros(4, 8), "fc.bias": torch.zeros(4), "x": 1.0})
    with pytest.raises(ConfigError, match=r"parents: run 5 has 'x' that run 3 lacks"):
        check_same_architecture({"run 3": three, "run 5": extra})
    wide = weights(**{"fc.weight": torch.zeros(4, 16), "fc.bias": torch.zeros(4)})
    with pytest.raises(ConfigError,
                       match=r"'fc.weight' is \(4, 8\) float32 in run 3 but \(4, 16\) float32 in run 5"):
        check_same_architecture({"run 3": three, "run 5": wide})
    double = weights(**{"fc.weight": torch.zeros(4, 8, dtype=torch.float64),
                        "fc.bias": torch.zeros(4)})
    with pytest.raises(ConfigError, match=r"\(4, 8\) float32 in run 3 but \(4, 8\) float64 in run 5"):
        check_same_architecture({"run 3": three, "run 5": double})


def test_merges_check_parents_and_base() -> None:
    _, parents = forks(2)
    other = TensorWeights({k: torch.zeros(3) for k in parents[0].keys()})
    mismatch = r"parents: 'fc.weight' is \(6, 5\) float32 in parent 1 but \(3,\) float32 in parent 2"
    with pytest.raises(ConfigError, match=mismatch):
        linear([parents[0], other])
    with pytest.raises(ConfigError, match=r"in parent 1 but .* in base"):
        ties(other, parents, density=0.5)
    with pytest.raises(ConfigError, match="parents: none given"):
        linear([])
    with pytest.raises(ConfigError, match=r"parent 1 is a dict, not Weights; wrap a state dict"):
        linear([{"w": torch.zeros(1)}])  # type: ignore[list-item]


@pytest.mark.parametrize(("call", "message"), [
    (lambda b, ps: linear(ps, [1.0]), "weights: got 1 for 2 parents"),
    (lambda b, ps: linear(ps, [1.0, -1.0]), "weights: .* sum to 0"),
    (lambda b, ps: linear(ps, [1.0, float("nan")]), "weights: weight 2 is nan"),
    (lambda b, ps: task_arithmetic(b, ps, [1.0, 2.0, 3.0]), "weights: got 3 for 2 parents"),
    (lambda b, ps: task_arithmetic(b, ps, [1.0, -1.0], normalize=True), "weights: .* sum to 0"),
    (lambda b, ps: ties(b, ps, density=0.0), "density: got 0.0"),
    (lambda b, ps: ties(b, ps, density=1.5), "density: got 1.5"),
    (lambda b, ps: dare_linear(b, ps, density=0.0), "density: got 0.0"),
    (lambda b, ps: dare_ties(b, ps, density=2.0), "density: got 2.0"),
    (lambda b, ps: ties(b, ps, density=0.5, majority_sign_method="mean"), "majority_sign_method"),
    (lambda b, ps: fisher_weighted(ps, [b]), "fishers: got 1 for 2 parents"),
    (lambda b, ps: fisher_weighted(ps, [b, b]), r"fishers: 'steps' is \(\) int64 in fisher 1"),
    (lambda b, ps: fisher_weighted(ps, [fisher(b), b]),
     "fishers: fisher 2 has 'steps' that fisher 1 lacks"),
    (lambda b, ps: fisher_weighted(ps, [fisher(b)] * 2, floor=0.0), "floor: got 0.0"),
    (lambda b, ps: fisher_weighted(ps, [fisher(b)] * 2, [2.0, -1.0]), "negative weight"),
])
def test_bad_arguments_are_refused_with_the_field_named(
        call: Callable[[TensorWeights, list[TensorWeights]], object], message: str) -> None:
    base, parents = forks(2)
    with pytest.raises(ConfigError, match=message):
        call(base, parents)
