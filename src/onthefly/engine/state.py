"""Everything a run needs to continue exactly where it stopped, as tensors-only data.

Random states: Python, NumPy, torch CPU and CUDA now, plus the state at the start of the current
epoch (torch CPU and the loader's generators), from which the epoch's sample order is drawn
again on resume. Copies are taken to the CPU at the step boundary (a checkpoint is the one place
a host sync is acceptable).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "capture_rng",
    "generator_states",
    "restore_generators",
    "restore_rng",
    "to_cpu",
]


def to_cpu(value: Any) -> Any:
    """Deep copy of a state structure with every tensor detached and copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value) if not hasattr(value, "_fields") else value
    return value


def capture_rng() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_states(generators: list[torch.Generator]) -> list[torch.Tensor]:
    return [g.get_state() for g in generators]


def restore_generators(generators: list[torch.Generator], states: list[torch.Tensor]) -> None:
    if not states:  # saved before the loader was first iterated: nothing drawn from them yet
        return
    if len(generators) != len(states):
        raise ValueError(
            f"the checkpoint saved {len(states)} sampler generator(s) but the loader has {len(generators)}"
        )
    for gen, st in zip(generators, states, strict=True):
        gen.set_state(st)
