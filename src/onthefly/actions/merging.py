"""Weight-space merges of PyTorch state dicts, streamed one tensor at a time.

A merge reads its parents through ``Weights`` (``model_weights``: names, shape and dtype, one
tensor per ``get``)
and builds its output key by key, so merging checkpoints kept as safetensors files
(``FileWeights``) holds about one model (the output) plus one tensor per parent. The methods are
mergekit's: ``linear`` (uniform = SWA's running average, bit for bit with ``AveragedModel`` on the
CPU), ``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties`` (bit for bit with
``peft.utils.merge_utils`` on each key's task vectors), ``fisher_weighted``; and
``fuse_adapters`` for runs that trained low-rank adapters on one frozen base
(``onthefly.actions.adapters``).

Rules every method shares: the parents (and the base) have the same keys, shapes and dtypes;
tensors that are not floating point (``num_batches_tracked``) come from the first parent
unchanged; float16 and bfloat16 are computed in float32 and cast back; no global RNG is touched
(DARE draws from its own generator per key, see ``dare_seed``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch

from ..errors import ConfigError
from .model_weights import (
    ADAPTER_SCALE,
    LORA_A,
    LORA_B,
    FileWeights,
    FoldedWeights,
    Weights,
    adapter_layers,
    check_same,
    describe_meta,
)

__all__ = [
    "dare_linear",
    "dare_seed",
    "dare_ties",
    "fisher_weighted",
    "fuse_adapters",
    "linear",
    "task_arithmetic",
    "ties",
]

SignMethod = Literal["total", "frequency"]


def _check_parents(parents: Sequence[Weights], base: Weights | None = None) -> None:
    named: dict[str, Weights] = {f"parent {i}": p for i, p in enumerate(parents, start=1)}
    if base is not None:
        named["base"] = base
    for name, weights in named.items():
        is_weights = all(hasattr(weights, m) for m in ("keys", "meta", "get"))
        if not is_weights or isinstance(weights, Mapping):
            raise ConfigError(f"parents: {name} is a {type(weights).__name__}, not Weights; wrap "
                              f"a state dict in TensorWeights(...) or open a file with "
                              f"FileWeights(path)")
    if not parents:
        raise ConfigError("parents: none given; pass at least one model to merge")
    check_same(named, "parents")


def _check_weights(weights: Sequence[float] | None, count: int, *,
                   normalize: bool) -> list[float] | None:
    if weights is None:
        return None
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"weights: {weights!r} is not a list of numbers ({exc}); give one "
                          f"number per parent") from exc
    if len(values) != count:
        raise ConfigError(f"weights: got {len(values)} for {count} parents; give one weight per "
                          f"parent, or none for uniform weights")
    bad = next((i for i, w in enumerate(values, start=1) if not math.isfinite(w)), None)
    if bad is not None:
        raise ConfigError(f"weights: weight {bad} is {values[bad - 1]}; weights must be finite")
    if normalize and math.fsum(values) == 0:
        raise ConfigError(f"weights: {values} sum to 0, and a normalised merge divides by their "
                          f"sum; use weights with a nonzero sum, or normalize=False")
    return values


def _check_density(density: float) -> None:
    if not 0 < density <= 1:  # also refuses NaN
        raise ConfigError(f"density: got {density}; expected the fraction of each task vector "
                          f"to keep, in (0, 1] (1 keeps everything)")


def _check_finite(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{field}: got {value}; expected a finite number")


def _check_sign_method(method: str) -> None:
    if method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method: got {method!r}; expected 'total' (sign of the "
                          f"summed task vectors) or 'frequency' (the sign most parents have)")


# --- the streaming loop -----------------------------------------------------------------------


class _Scratch:
    """Buffers reused from key to key within one merge, by name. A fresh large tensor per key
    costs its page faults every time (glibc hands big blocks back to the kernel when they are
    freed; ~2.5 us a 4 KiB page on a VM), about as much as the arithmetic done on it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[(name, dtype)] = torch.empty(size, dtype=dtype)
        return buffer[:size].view(tuple(shape))


MergeKey = Callable[[str, int, torch.dtype, _Scratch], torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision rounds away the small differences between forks that merges work on.
    return torch.float32 if dtype.itemsize < 4 else dtype


def _stream(first: Weights, merge_key: MergeKey) -> dict[str, torch.Tensor]:
    """The output model, one key at a time: ``merge_key(key, index, compute_dtype, scratch)``
    for the floating tensors (a new tensor, never a scratch buffer), a copy of the first
    parent's for the others (counters are not averaged)."""
    out: dict[str, torch.Tensor] = {}
    scratch = _Scratch()
    for index, key in enumerate(first.keys()):
        _, dtype = first.meta(key)
        if not dtype.is_floating_point:
            out[key] = first.get(key).clone()
            continue
        merged = merge_key(key, index, _compute_dtype(dtype), scratch)
        out[key] = merged.to(dtype)  # no copy when the dtype is already right
    return out


def _read_into(weights: Weights, key: str, out: torch.Tensor) -> torch.Tensor:
    """``key``'s tensor written into ``out`` (cast to its dtype); from a file, with no temporary."""
    if isinstance(weights, FileWeights) and weights.meta(key)[1] == out.dtype:
        return weights.read_into(key, out)
    return out.copy_(weights.get(key))


def _running_average(parents: Sequence[Weights], key: str, dtype: torch.dtype,
                     scratch: _Scratch) -> torch.Tensor:
    # AveragedModel's update on the CPU (swa_utils.get_swa_avg_fn): avg + (p - avg) / (n + 1).
    # addcdiv divides and adds in one pass and rounds exactly as the two ops do.
    shape = parents[0].meta(key)[0]
    first = _read_into(parents[0], key, scratch("first", shape, dtype))
    if len(parents) == 1:
        return first.clone()
    difference = _read_into(parents[1], key, scratch("difference", shape, dtype)).sub_(first)
    average = torch.addcdiv(first, difference, torch.tensor(2, dtype=dtype))
    for n, parent in enumerate(parents[2:], start=2):
        _read_into(parent, key, difference).sub_(average)
        average.addcdiv_(difference, torch.tensor(n + 1, dtype=dtype))
    return average


def _weighted_sum(parents: Sequence[Weights], key: str, dtype: torch.dtype,
                  weights: list[float], scratch: _Scratch) -> torch.Tensor:
    rows = scratch("rows", (len(parents), *parents[0].meta(key)[0]), dtype)
    for row, parent, weight in zip(rows, parents, weights, strict=True):
        _read_into(parent, key, row).mul_(weight)
    return rows.sum(dim=0)


def _task_vectors(base: Weights, parents: Sequence[Weights], key: str, dtype: torch.dtype,
                  scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """(parent - base) for ``key`` stacked, one row per parent, and the base (scratch buffers)."""
    shape = base.meta(key)[0]
    base_tensor = _read_into(base, key, scratch("base", shape, dtype))
    rows = scratch("rows", (len(parents), *shape), dtype)
    for row, parent in zip(rows, parents, strict=True):
        _read_into(parent, key, row).sub_(base_tensor)
    return rows, base_tensor


def _row_weights(weights: list[float], rows: torch.Tensor) -> torch.Tensor:
    # As peft's reshape_weight_task_tensors: one weight per row, broadcast over the rest.
    return torch.tensor(weights, dtype=rows.dtype).view(-1, *([1] * (rows.dim() - 1)))


def _add_to_base(base: torch.Tensor, merged: torch.Tensor, lambda_: float) -> torch.Tensor:
    if lambda_ != 1.0:  # x * 1.0 is x: skipping it changes no bit
        merged.mul_(lambda_)
    return merged.add_(base)


def _keep_largest(rows: torch.Tensor, density: float, scratch: _Scratch) -> None:
    """peft's magnitude pruning of each row, in place: keep the int(density * n) largest |x|."""
    if density >= 1:  # peft keeps everything at density 1
        return
    for row in rows:
        flat = row.view(-1)  # rows of a contiguous stack are contiguous: a view, never a copy
        magnitude = torch.abs(flat, out=scratch("magnitude", flat.shape, flat.dtype))
        # sorted=False selects the same elements as peft's sorted topk (torch sorts after it
        # selects) and skips sorting them.
        kept = torch.topk(magnitude, k=int(density * flat.numel()), largest=True, sorted=False)
        mask = scratch("mask", flat.shape, flat.dtype).zero_()
        mask[kept.indices] = 1
        flat.mul_(mask)


def _drop_and_rescale(rows: torch.Tensor, density: float, generator: torch.Generator,
                      scratch: _Scratch) -> None:
    """peft's random pruning with rescale of each row, in place, drawing from ``generator``."""
    if density >= 1:  # peft keeps everything, and draws nothing, at density 1
        return
    probability = scratch("probability", rows.shape[1:], rows.dtype).fill_(density)
    mask = scratch("mask", rows.shape[1:], rows.dtype)
    for row in rows:
        torch.bernoulli(probability, generator=generator, out=mask)  # as peft, on its own generator
        row.mul_(mask).div_(density)


def _disjoint_merge(rows: torch.Tensor, weights: list[float], method: SignMethod,
                    scratch: _Scratch) -> torch.Tensor:
    """peft's TIES sign election and disjoint merge of the (pruned) rows; modifies ``rows``."""
    positive = torch.gt(rows, 0, out=scratch("positive", rows.shape, torch.bool))
    negative = torch.lt(rows, 0, out=scratch("negative", rows.shape, torch.bool))
    if method == "total":
        elect_positive = rows.sum(dim=0) >= 0
    else:  # sum of signs >= 0  <=>  at least as many positive as negative
        elect_positive = positive.sum(dim=0) >= negative.sum(dim=0)
    # sign(x) == elected sign, without peft's float sign tensor and int64 majority tensor
    agree = torch.where(elect_positive, positive, negative,
                        out=scratch("agree", rows.shape, torch.bool))
    rows.mul_(_row_weights(weights, rows)).mul_(agree)
    merged = rows.sum(dim=0)
    return merged.div_(agree.sum(dim=0, dtype=rows.dtype).clamp_(min=1.0))


# --- the methods ------------------------------------------------------------------------------


def linear(parents: Sequence[Weights], weights: Sequence[float] | None = None, *,
           normalize: bool = True) -> dict[str, torch.Tensor]:
    """The (weighted) average of the parents. Uniform (``weights=None``): the running average
    ``AveragedModel`` keeps, bit for bit. Weighted: sum(w_i * p_i) / sum(w_i), or without the
    division when ``normalize`` is False."""
    _check_parents(parents)
    values = _check_weights(weights, len(parents), normalize=normalize)
    if values is None:
        return _stream(parents[0], lambda key, _, dtype, scratch: _running_average(
            parents, key, dtype, scratch))
    total = math.fsum(values)

    def merge_key(key: str, _: int, dtype: torch.dtype, scratch: _Scratch) -> torch.Tensor:
        merged = _weighted_sum(parents, key, dtype, values, scratch)
        return merged.div_(total) if normalize else merged

    return _stream(parents[0], merge_key)


def task_arithmetic(base: Weights, parents: Sequence[Weights],
                    weights: Sequence[float] | None = None, *, lambda_: float = 1.0,
                    normalize: bool = False) -> dict[str, torch.Tensor]:
    """base + lambda_ * sum(w_i * (p_i - base)), divided by sum(w) when ``normalize``;
    ``weights=None`` weighs every parent 1."""
    _check_parents(parents, base)
    values = _check_weights(weights, len(parents), normalize=normalize) or [1.0] * len(parents)
    _check_finite(lambda_, "lambda_")
    total = math.fsum(values)

    def merge_key(key: str, _: int, dtype: torch.dtype, scratch: _Scratch) -> torch.Tensor:
        rows, base_tensor = _task_vectors(base, parents, key, dtype, scratch)
        merged = rows.mul_(_row_weights(values, rows)).sum(dim=0)  # peft's task_arithmetic
        if normalize:
            merged.div_(total)
        return _add_to_base(base_tensor, merged, lambda_)

    return _stream(parents[0], merge_key)


def ties(base: Weights, parents: Sequence[Weights], weights: Sequence[float] | None = None, *,
         density: float, lambda_: float = 1.0,
         majority_sign_method: SignMethod = "total") -> dict[str, torch.Tensor]:
    """TIES: keep each task vector's ``density`` largest entries, elect a sign per entry, average
    the weighted entries that agree with it: base + lambda_ * peft's ``ties``."""
    _check_parents(parents, base)
    values = _check_weights(weights, len(parents), normalize=False) or [1.0] * len(parents)
    _check_density(density)
    _check_finite(lambda_, "lambda_")
    _check_sign_method(majority_sign_method)

    def merge_key(key: str, _: int, dtype: torch.dtype, scratch: _Scratch) -> torch.Tensor:
        rows, base_tensor = _task_vectors(base, parents, key, dtype, scratch)
        _keep_largest(rows, density, scratch)
        merged = _disjoint_merge(rows, values, majority_sign_method, scratch)
        return _add_to_base(base_tensor, merged, lambda_)

    return _stream(parents[0], merge_key)


def dare_seed(seed: int, key_index: int) -> int:
    """The seed of the generator that draws DARE's masks for the ``key_index``-th key (in the
    first parent's key order). One generator per key, so that a key's masks depend on nothing
    but (seed, key index), and ``torch.manual_seed(dare_seed(seed, k))`` replays them."""
    digest = hashlib.blake2b(f"onthefly.dare:{seed}:{key_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a seed every torch API accepts


def _dare_generator(seed: int, key_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(dare_seed(seed, key_index))


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: got {seed!r}; expected an integer")


def dare_linear(base: Weights, parents: Sequence[Weights], weights: Sequence[float] | None = None,
                *, density: float, lambda_: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE: drop each task-vector entry with probability 1 - ``density``, rescale the rest by
    1 / density, sum them weighted: base + lambda_ * peft's ``dare_linear``."""
    _check_parents(parents, base)
    values = _check_weights(weights, len(parents), normalize=False) or [1.0] * len(parents)
    _check_density(density)
    _check_finite(lambda_, "lambda_")
    _check_seed(seed)

    def merge_key(key: str, index: int, dtype: torch.dtype, scratch: _Scratch) -> torch.Tensor:
        rows, base_tensor = _task_vectors(base, parents, key, dtype, scratch)
        _drop_and_rescale(rows, density, _dare_generator(seed, index), scratch)
        return _add_to_base(base_tensor, rows.mul_(_row_weights(values, rows)).sum(dim=0), lambda_)

    return _stream(parents[0], merge_key)


def dare_ties(base: Weights, parents: Sequence[Weights], weights: Sequence[float] | None = None,
              *, density: float, lambda_: float = 1.0, seed: int = 0,
              majority_sign_method: SignMethod = "total") -> dict[str, torch.Tensor]:
    """DARE's random drop and rescale, then TIES's sign election and disjoint merge:
    base + lambda_ * peft's ``dare_ties``."""
    _check_parents(parents, base)
    values = _check_weights(weights, len(parents), normalize=False) or [1.0] * len(parents)
    _check_density(density)
    _check_finite(lambda_, "lambda_")
    _check_seed(seed)
    _check_sign_method(majority_sign_method)

    def merge_key(key: str, index: int, dtype: torch.dtype, scratch: _Scratch) -> torch.Tensor:
        rows, base_tensor = _task_vectors(base, parents, key, dtype, scratch)
        _drop_and_rescale(rows, density, _dare_generator(seed, index), scratch)
        merged = _disjoint_merge(rows, values, majority_sign_method, scratch)
        return _add_to_base(base_tensor, merged, lambda_)

    return _stream(parents[0], merge_key)


def fisher_weighted(parents: Sequence[Weights], fishers: Sequence[Weights],
                    weights: Sequence[float] | None = None, *,
                    floor: float = 1e-8) -> dict[str, torch.Tensor]:
    """Per entry: sum_i w_i * max(F_i, floor) * p_i / sum_i w_i * max(F_i, floor), with
    ``fishers[i]`` the (diagonal) Fisher information of ``parents[i]``. Keys the Fishers lack
    (buffers) get the plain (weighted) average. Weights must be >= 0, so the denominator is never
    0 (``floor`` > 0 keeps it positive where the Fisher is 0)."""
    _check_parents(parents)
    if len(fishers) != len(parents):
        raise ConfigError(f"fishers: got {len(fishers)} for {len(parents)} parents; give one "
                          f"Fisher (per-parameter importance, keyed like the parameters) per "
                          f"parent")
    check_same({f"fisher {i}": f for i, f in enumerate(fishers, start=1)}, "fishers")
    fisher_keys, parent_keys = set(fishers[0].keys()), set(parents[0].keys())
    for key in fishers[0].keys():
        if key not in parent_keys:
            raise ConfigError(f"fishers: fisher 1 has {key!r} that parent 1 lacks; expected the "
                              f"parents' parameter names")
        (shape, dtype), (expected, _) = fishers[0].meta(key), parents[0].meta(key)
        if shape != expected or not dtype.is_floating_point:
            raise ConfigError(f"fishers: {key!r} is {describe_meta((shape, dtype))} in fisher 1 but "
                              f"{expected} in parent 1; expected floating tensors shaped like "
                              f"the parameters")
    values = _check_weights(weights, len(parents), normalize=True)
    if values is not None and min(values) < 0:
        raise ConfigError(f"weights: {values} has a negative weight, which can make the Fisher "
                          f"denominator 0; use weights >= 0")
    if not (math.isfinite(floor) and floor > 0):
        raise ConfigError(f"floor: got {floor}; expected a small positive number (the least "
                          f"importance an entry gets, e.g. 1e-8)")

    def merge_key(key: str, _: int, dtype: torch.dtype, scratch: _Scratch) -> torch.Tensor:
        if key not in fisher_keys:
            if values is None:
                return _running_average(parents, key, dtype, scratch)
            return _weighted_sum(parents, key, dtype, values, scratch).div_(math.fsum(values))
        shape = parents[0].meta(key)[0]
        numerator = torch.zeros(shape, dtype=dtype)
        denominator = scratch("denominator", shape, dtype).zero_()
        importance = scratch("importance", shape, dtype)
        parameter = scratch("parameter", shape, dtype)
        uniform = [1.0] * len(parents)
        for parent, fisher, weight in zip(parents, fishers, values or uniform, strict=True):
            _read_into(fisher, key, importance).clamp_(min=floor)
            denominator.add_(importance, alpha=weight)  # fused: one pass for w * F and the sum
            numerator.addcmul_(importance, _read_into(parent, key, parameter), value=weight)
        return numerator.div_(denominator)

    return _stream(parents[0], merge_key)


def fuse_adapters(models: Sequence[Weights], weights: Sequence[float] | None = None, *,
                  rank: int | None = None) -> dict[str, torch.Tensor]:
    """Fuse the adapters of runs that share one frozen base into the plain model's state dict.

    Per adapted layer "x": D = sum_i w_i * B_i @ A_i (``weights=None``: 1/n each), replaced by
    its best rank-``rank`` approximation (truncated SVD) when ``rank`` is given; "x.weight" =
    base + D, "x.bias" = the base bias, every other key from the first model. Ranks may differ
    between models; the adapted layers and the base weights must not (checked as each layer is
    read)."""
    if not models:
        raise ConfigError("models: none given; pass the adapter runs to fuse")
    names = [f"model {i}" for i in range(1, len(models) + 1)]
    layers = adapter_layers(models[0])
    if not layers:
        raise ConfigError("models: model 1 has no adapters (no '<layer>.lora_a' keys); "
                          "fuse_adapters merges runs trained with add_adapters; merge full "
                          "weights with linear or ties instead")
    for name, model in zip(names[1:], models[1:], strict=True):
        other = adapter_layers(model)
        lacking = next((layer for layer in layers if layer not in other), None)
        if lacking is not None:
            raise ConfigError(f"models: {name} has no adapter on {lacking!r} that model 1 has; "
                              f"fuse only runs whose adapters sit on the same layers")
        extra = next((layer for layer in other if layer not in layers), None)
        if extra is not None:
            raise ConfigError(f"models: {name} has an adapter on {extra!r} that model 1 lacks; "
                              f"fuse only runs whose adapters sit on the same layers")
    views = [FoldedWeights(model, layers) for model in models]
    check_same(dict(zip(names, views, strict=True)), "models")
    count = len(models)
    values = _check_weights(weights, count, normalize=False) or [1 / count] * count
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank: got {rank!r}; expected a positive integer, or None to keep "
                          f"the fused update's full rank")

    first = views[0]
    out: dict[str, torch.Tensor] = {}
    for key in first.keys():
        source = first.source[key]
        tensor = first.inner.get(source)
        if source != key:  # an adapted layer's frozen base weight or bias
            for name, model in zip(names[1:], models[1:], strict=True):
                if not torch.equal(model.get(source), tensor):
                    raise ConfigError(f"models: {source!r} differs between model 1 and {name}; "
                                      f"fused adapters need one frozen base (forks of one "
                                      f"checkpoint); merge full weights with linear or ties")
        layer = first.layer_of.get(key)
        if layer is None:
            out[key] = tensor.clone()
            continue
        dtype = _compute_dtype(tensor.dtype)
        # sum_i w_i B_i @ A_i as one product: [w_1 B_1, w_2 B_2, ...] @ [A_1; A_2; ...]
        b = torch.cat([model.get(layer + LORA_B).to(dtype) * (w * ADAPTER_SCALE)
                       for model, w in zip(models, values, strict=True)], dim=1)
        a = torch.cat([model.get(layer + LORA_A).to(dtype) for model in models], dim=0)
        delta = b @ a
        if rank is not None and rank < min(a.shape[0], *delta.shape):  # else D has rank <= rank
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            delta = (u[:, :rank] * s[:rank]) @ vh[:rank]
        out[key] = delta.add_(tensor.to(dtype)).to(tensor.dtype)
    return out
