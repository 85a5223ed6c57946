"""The determinism check: is a training step a function of its inputs and seeds, bit for bit?

Run as the ``determinism`` area of a health check-up (on request: it trains a copy twice), at a
step boundary, touching nothing of the run:

1. **Data**: the batch the run trained last (its recorded dataset indices) is loaded twice
   through a loader made like the run's (its dataset, collate function, workers and
   ``worker_init_fn``), with the same generator seed and every RNG reset in between; the two
   must be equal tensor by tensor. A worker seeded from the clock (or any other outside source)
   shows here.
2. **Step**: one training step (forward, backward, optimizer step) on that batch, from a copy of
   the model and optimizer, twice, from the same state and RNG; every parameter must come out
   equal. When they differ, a hashing dispatch mode (``TorchDispatchMode``) records a digest of
   every operator's output in both passes and names the first one that differs, with the module
   it ran in (or "backward").
3. **Contract**: what bit-identity depends on - torch, CUDA and cuDNN versions, the device, the
   deterministic-algorithm flags, ``CUBLAS_WORKSPACE_CONFIG``, the world size, the loader's seeding
   - with advice for what is not set for it.

The card ("determinism") says "identical" or names the first difference. A second card
("replay") trains the steps since the last checkpoint again and compares every tensor with the
live run (:mod:`onthefly.actions.replay`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader

__all__ = ["check", "contract"]

UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def _rng() -> tuple[Any, ...]:
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng(state: tuple[Any, ...]) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def _digest(t: torch.Tensor) -> str:
    data = t.detach()
    if data.is_complex() or data.dtype in (torch.bfloat16, torch.float16):
        data = data.float()
    raw = data.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


class _OpHashes(TorchDispatchMode):
    """Every operator's name, the module it ran in, and a digest of its outputs."""

    def __init__(self, where: list[str]) -> None:
        super().__init__()
        self.where = where
        self.records: list[tuple[str, str, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if name in UNINITIALISED:  # memory not yet written: its bytes mean nothing
            return out
        digests = [_digest(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.records.append((name, self.where[-1] if self.where else "backward",
                             ",".join(digests)))
        return out


def _where_hooks(model: nn.Module, where: list[str]) -> list[Any]:
    """Hooks that keep ``where[-1]`` the name of the module running now (removed by the caller)."""
    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            where.append(name or "(model)")
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if where:
            where.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    return handles


def _same(a: Any, b: Any) -> tuple[bool, str | None]:
    flat_a, flat_b = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(flat_a) != len(flat_b):
        return False, "the batch's structure"
    for i, (x, y) in enumerate(zip(flat_a, flat_b, strict=True)):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or not torch.equal(x, y):
                return False, f"field {i} of the batch"
        elif x != y:
            return False, f"field {i} of the batch"
    return True, None


def check(probe: Any) -> list[dict[str, Any]]:
    return [*_one_step(probe), _replayed(probe)]


def _replayed(probe: Any) -> dict[str, Any]:
    """The K-step replay's card (:mod:`onthefly.actions.replay`), for a run the Trainer drives."""
    from .health import card
    from .replay import replay

    trainer = probe.trainer
    if trainer is None:
        return card("replay", "determinism", "info", "the steps since the last checkpoint are replayed for runs the "
                    "Trainer (or quickstart) drives only", "your own loop's step is code On The Fly cannot call "
                    "again; the one-step check above still applies", replayed=0)

    def hashed(objects: Any, batch: Any, boundary: bool, forward: Any) -> list[tuple[str, str, str]]:
        where: list[str] = []
        handles = _where_hooks(objects.model, where)
        try:
            with _OpHashes(where) as hashes:
                trainer.compute_step(objects, batch, boundary, forward)
        finally:
            for handle in handles:
                handle.remove()
        return hashes.records

    return replay(trainer, hashed)


def _one_step(probe: Any) -> list[dict[str, Any]]:
    from .health import card

    indices = probe.indices[: probe.loader.batch_size or 1]
    loader = probe.loader
    start = _rng()
    loads = []
    for _ in range(2):
        _set_rng(start)
        again = DataLoader(loader.dataset, batch_sampler=[indices], num_workers=loader.num_workers,
                           collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
                           multiprocessing_context=loader.multiprocessing_context,
                           generator=torch.Generator().manual_seed(0))
        loads.append(next(iter(again)))
    terms = contract(probe)
    same, what = _same(*loads)
    if not same:
        return [card("determinism", "determinism", "error",
                     f"data loading is not deterministic: the same batch loaded twice with the same seeds differs "
                     f"({what})", "seed every worker from torch.initial_seed() in worker_init_fn, never from the clock "
                     "or os.urandom; give the DataLoader a seeded generator", differs="data", indices=indices[:8],
                     contract=terms, advice=advice(terms))]
    batch = loads[0]
    model, optimizer = probe.copy()
    state = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    passes = []
    for _ in range(2):
        model.load_state_dict(state[0])
        optimizer.load_state_dict(copy.deepcopy(state[1]))
        _set_rng(start)
        where: list[str] = []
        handles = _where_hooks(model, where)
        try:
            model.train(probe.model.training)
            optimizer.zero_grad(set_to_none=True)
            with _OpHashes(where) as hashes:
                outputs, targets = probe.forward(model, batch)
                probe.loss(outputs, targets).backward()
                optimizer.step()
        finally:
            for handle in handles:
                handle.remove()
        passes.append(({n: p.detach().clone() for n, p in model.named_parameters()}, hashes.records))
    _set_rng(start)
    (first, ops_a), (second, ops_b) = passes
    differing = [n for n in first if not torch.equal(first[n], second[n])]
    op = next(((i, a, b) for i, (a, b) in enumerate(zip(ops_a, ops_b, strict=False)) if a != b), None)
    if not differing and op is None:
        return [card("determinism", "determinism", "info",
                     "identical: the same batch loads the same, and one step replayed twice gives the same weights "
                     "bit for bit", "keep the contract below to keep it so", parameters=len(first), ops=len(ops_a),
                     contract=terms, advice=advice(terms))]
    evidence: dict[str, Any] = {"differs": "step", "parameters": differing[:20], "contract": terms,
                                "advice": advice(terms)}
    title = f"one step replayed twice from the same state differs in {len(differing)} parameter(s)"
    if op is not None:
        i, a, _ = op
        evidence.update({"first_op": a[0], "module": a[1], "op_index": i, "ops": len(ops_a)})
        title += f"; the first differing operation: {a[0]} in {a[1]} (operation {i + 1} of {len(ops_a)})"
    return [card("determinism", "determinism", "error", title,
                 "look at that module: a source of randomness outside the seeded generators (the clock, an unseeded "
                 "torch.Generator, os.urandom) or a nondeterministic kernel (torch.use_deterministic_algorithms(True) "
                 "names those)", **evidence)]


def contract(probe: Any) -> dict[str, Any]:
    """What bit-identical replay depends on, as this run has it."""
    import torch.distributed as dist

    loader = probe.loader
    device = probe.device
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
        if torch.backends.cudnn.is_available() else None, "device": str(device),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "loader_workers": loader.num_workers,
        "loader_generator": loader.generator is not None,
        "worker_init_fn": getattr(loader.worker_init_fn, "__qualname__", None) if loader.worker_init_fn else None,
    }


def advice(terms: dict[str, Any]) -> list[str]:
    """What to change so that replays stay bit-identical."""
    said = []
    if terms["device"].startswith("cuda"):
        if not terms["deterministic_algorithms"]:
            said.append("torch.use_deterministic_algorithms(True): CUDA kernels such as index_add and scatter_add "
                        "are nondeterministic by default")
        if terms["cublas_workspace_config"] not in (":4096:8", ":16:8"):
            said.append("set CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts (cuBLAS reductions)")
        if terms["cudnn_benchmark"]:
            said.append("torch.backends.cudnn.benchmark = False: benchmarking may pick different kernels per run")
    if not terms["loader_generator"]:
        said.append("give the DataLoader generator=torch.Generator().manual_seed(seed): its shuffling and worker "
                    "seeds then follow the seed, not the global RNG")
    if terms["world_size"] > 1:
        said.append("resume with the same world size: gradient all-reduce order depends on it")
    said.append("replays are bit-identical on the same machine, torch and device only")
    return said
