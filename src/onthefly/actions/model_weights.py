"""A model's tensors read one at a time: a state dict in memory (``TensorWeights``) or a
safetensors file (``FileWeights``, each tensor's bytes read on ``get`` and nothing kept), a view
that folds low-rank adapters into plain weights (``fold_adapters``), and the check that models
have one architecture (``check_same_architecture``: the first key, shape or dtype that differs).

What the merges (``onthefly.actions.merging``) stream their parents through, and what the
session's checks (``onthefly.actions.recipes``) read checkpoint files with.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ConfigError, StateError, StoreError

__all__ = [
    "ADAPTER_SCALE",
    "BASE_BIAS",
    "BASE_WEIGHT",
    "LORA_A",
    "LORA_B",
    "FileWeights",
    "FoldedWeights",
    "TensorWeights",
    "Weights",
    "adapter_layers",
    "check_same",
    "check_same_architecture",
    "describe_meta",
    "fold_adapters",
]


class Weights(Protocol):
    """A model's tensors, read one at a time (what lets a merge stream)."""

    def keys(self) -> list[str]:
        """The tensors' names, in a stable order."""
        ...

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``key``'s shape and dtype, without reading the tensor."""
        ...

    def get(self, key: str) -> torch.Tensor:
        """``key``'s tensor on the CPU. Callers must not modify it: it may be the owner's own."""
        ...


class TensorWeights:
    """``Weights`` over a state dict in memory; ``get`` hands out its tensors, not copies."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        tensor = self._tensors[key]
        return tuple(tensor.shape), tensor.dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach().to("cpu")


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
             "U8": "uint8", "BOOL": "bool", "C64": "complex64"}
    # Older torch builds lack some of them (uint16 came in 2.3); a file using one is refused.
    return {code: getattr(torch, name) for code, name in names.items() if hasattr(torch, name)}


_DTYPES = _safetensors_dtypes()


class FileWeights:
    """``Weights`` over a safetensors file: the header is read when it is opened, and each
    ``get`` reads that one tensor's bytes into a fresh tensor. Not thread-safe (one file
    position); ``close()`` is idempotent, and the object is its own context manager.

    Key order: a safetensors file keeps no state-dict order, so ``keys()`` is the file's listing
    (sorted by name, as ``safe_open`` gives it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # safe_open checks the header (offsets in range, sizes matching shapes) for us.
            with safe_open(str(self.path), framework="pt", device="cpu") as opened:
                names = list(opened.keys())
            # Tensors from safe_open are views of a memory map, and every page they touch stays
            # in this process's resident memory until the file is closed: streaming 4 parents
            # would end up holding 4 models. Plain reads keep only what the caller holds.
            self._file = open(self.path, "rb", buffering=0)  # closed by close()
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"FileWeights: cannot read {str(self.path)!r} as a safetensors file "
                              f"({exc}); expected a file written by safetensors.torch.save_file"
                              ) from exc
        header_size = struct.unpack("<Q", self._file.read(8))[0]
        header = json.loads(self._file.read(header_size))
        self._data_start = 8 + header_size
        self._entries: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
        for name in names:
            entry = header[name]
            if entry["dtype"] not in _DTYPES:
                self._file.close()
                raise ConfigError(f"FileWeights: {name!r} in {str(self.path)!r} has dtype "
                                  f"{entry['dtype']}, which this torch build cannot hold; "
                                  f"expected one of {', '.join(_DTYPES)}")
            self._entries[name] = (tuple(entry["shape"]), _DTYPES[entry["dtype"]],
                                   entry["data_offsets"][0])

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype, _ = self._entries[key]
        return shape, dtype

    def get(self, key: str) -> torch.Tensor:
        shape, dtype, _ = self._entries[key]
        return self.read_into(key, torch.empty(shape, dtype=dtype))

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``key`` into ``out`` (contiguous, of its shape and dtype) and return ``out``:
        what lets a merge reuse one buffer from key to key."""
        if self._file.closed:
            raise StateError(f"FileWeights: {str(self.path)!r} is closed; read tensors before "
                             f"close() or open it again")
        shape, dtype, offset = self._entries[key]
        if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"read_into: {key!r} is {shape} {dtype}, the buffer "
                             f"{tuple(out.shape)} {out.dtype} (contiguous: {out.is_contiguous()})")
        buffer = out.view(-1).view(torch.uint8).numpy().data  # the tensor's own bytes
        self._file.seek(self._data_start + offset)
        done = 0
        while done < len(buffer):  # a raw read may return fewer bytes than asked
            count = self._file.readinto(buffer[done:])
            if not count:
                raise StoreError(f"FileWeights: {str(self.path)!r} ends inside {key!r}; the file "
                                 f"was truncated or changed since it was opened")
            done += count
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FileWeights:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


# --- adapters: the keys LowRankAdapter puts in a state dict ---------------------------------

LORA_A, LORA_B, BASE_WEIGHT, BASE_BIAS = ".lora_a", ".lora_b", ".base.weight", ".base.bias"
# add_adapters leaves alpha unset, so its scale is rank / rank; the state dict does not record it.
ADAPTER_SCALE = 1.0


def adapter_layers(weights: Weights) -> list[str]:
    """The names of the layers that carry a LowRankAdapter ("x" for keys "x.lora_a",
    "x.lora_b", "x.base.weight"), in key order; [] when there are none."""
    keys = weights.keys()
    present = set(keys)
    layers: list[str] = []
    for key in keys:
        for suffix in (LORA_A, LORA_B):
            if key.endswith(suffix) and key[: -len(suffix)] not in layers:
                layers.append(key[: -len(suffix)])
    for layer in layers:
        missing = [layer + s for s in (LORA_A, LORA_B, BASE_WEIGHT) if layer + s not in present]
        if missing:
            raise ConfigError(f"adapters: layer {layer!r} lacks {missing[0]!r}; expected "
                              f"'{layer}.lora_a', '{layer}.lora_b' and '{layer}.base.weight', as "
                              f"add_adapters makes them")
    return layers


class FoldedWeights:
    """An adapter model seen as the plain model: "x.weight" = base + B @ A, "x.bias" = base bias."""

    def __init__(self, weights: Weights, layers: list[str]) -> None:
        self.inner = weights
        self.source: dict[str, str] = {}  # plain key -> the adapter model's key
        self.layer_of: dict[str, str] = {}  # "x.weight" -> "x", for the adapted layers
        adapted = set(layers)
        for key in weights.keys():
            layer, suffix = _split_adapter_key(key, adapted)
            if suffix in (LORA_A, LORA_B):
                continue
            plain = key if layer is None or suffix is None else layer + suffix.removeprefix(".base")
            if plain in self.source:
                raise ConfigError(f"adapters: both {self.source[plain]!r} and {key!r} would be "
                                  f"{plain!r} once folded; expected a model made by add_adapters")
            self.source[plain] = key
            if layer is not None and suffix == BASE_WEIGHT:
                self.layer_of[plain] = layer
        for layer in layers:
            a, b, w = (weights.meta(layer + s)[0] for s in (LORA_A, LORA_B, BASE_WEIGHT))
            if not (len(w) == len(a) == len(b) == 2 and a[1] == w[1] and b == (w[0], a[0])):
                raise ConfigError(f"adapters: {layer!r} has lora_a {a} and lora_b {b} for a base "
                                  f"weight {w}; expected lora_a (r, in) and lora_b (out, r)")

    def keys(self) -> list[str]:
        return list(self.source)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.inner.meta(self.source[key])

    def get(self, key: str) -> torch.Tensor:
        layer = self.layer_of.get(key)
        if layer is None:
            return self.inner.get(self.source[key])
        # As LowRankAdapter.merged_weight computes it, in the model's dtype.
        delta = self.inner.get(layer + LORA_B) @ self.inner.get(layer + LORA_A)
        return self.inner.get(layer + BASE_WEIGHT) + delta * ADAPTER_SCALE


def _split_adapter_key(key: str, layers: set[str]) -> tuple[str, str] | tuple[None, None]:
    for suffix in (LORA_A, LORA_B, BASE_WEIGHT, BASE_BIAS):
        if key.endswith(suffix) and key[: -len(suffix)] in layers:
            return key[: -len(suffix)], suffix
    return None, None


def fold_adapters(weights: Weights) -> Weights:
    """``weights`` of a model trained with LowRankAdapter, seen as the plain model's keys in the
    original order: "x.weight" = base.weight + lora_b @ lora_a, "x.bias" = base.bias, every other
    key unchanged. A model without adapters is returned as it is."""
    layers = adapter_layers(weights)
    return FoldedWeights(weights, layers) if layers else weights


# --- checks -----------------------------------------------------------------------------------

_SAME_FIX = "merge only models of one architecture (runs forked from one model)"


def check_same_architecture(parents: Mapping[str, Weights]) -> None:
    """Raise ConfigError naming the first key, shape or dtype on which a parent differs from
    the first one (names are the mapping's keys, e.g. "run 3")."""
    check_same(parents, "parents")


def check_same(named: Mapping[str, Weights], field: str) -> None:
    if not named:
        raise ConfigError(f"{field}: none given; pass at least one model")
    (first_name, first), *others = named.items()
    first_keys = first.keys()
    first_set = set(first_keys)
    for name, other in others:
        keys = other.keys()
        key_set = set(keys)
        lacking = next((k for k in first_keys if k not in key_set), None)
        if lacking is not None:
            raise ConfigError(f"{field}: {name} lacks {lacking!r} that {first_name} has; "
                              f"{_SAME_FIX}")
        extra = next((k for k in keys if k not in first_set), None)
        if extra is not None:
            raise ConfigError(f"{field}: {name} has {extra!r} that {first_name} lacks; {_SAME_FIX}")
    for key in first_keys:
        expected = first.meta(key)
        for name, other in others:
            found = other.meta(key)
            if found != expected:
                raise ConfigError(f"{field}: {key!r} is {describe_meta(expected)} in {first_name} but "
                                  f"{describe_meta(found)} in {name}; {_SAME_FIX}")


def describe_meta(meta: tuple[tuple[int, ...], torch.dtype]) -> str:
    shape, dtype = meta
    return f"{tuple(shape)} {str(dtype).removeprefix('torch.')}"
