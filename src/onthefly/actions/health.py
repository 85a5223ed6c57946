"""Health check-ups: the silent training bugs a loss curve does not show, found on any nn.Module.

A check-up runs on the training thread at a step boundary (the ``health_check`` command, the
``every_steps`` schedule of ``attach``, or ``checkup(trainer)`` from a callback) and touches
nothing of the run: gradients, updates and activations are measured on a copy of the model and
its optimizer (its state loaded from the live one), on a few training batches drawn with their own
generator; every RNG is restored. What it looks at:

* **gradients**: non-finite values; parameters that require a gradient and never receive one;
  layers whose gradient norm is far above or below the others' (exploding / vanishing); the
  update one optimizer step makes relative to the weights (‖Δw‖/‖w‖ far above ~1e-3: the learning
  rate is too high; ~0: nothing learns); frozen parameters (``requires_grad=False``) whose values
  changed since the run began;
* **activations**: dead units (ReLU-family outputs zero for every sample) and saturated ones
  (tanh / sigmoid at their bounds), per layer, through forward hooks removed afterwards;
* **numerics**: non-finite weights and buffers; a GradScaler's loss scale collapsed;
* **data**: inputs duplicated across train / validation / test (content hashes); label balance
  per split; loader workers whose NumPy or ``random`` streams start alike (a probe dataset run
  through the loader's own ``worker_init_fn``); labels that look independent of the inputs (neither the
  nearest neighbour's label nor a held-out linear probe agrees more than chance);
* **configuration**: the model in eval mode while it trains; parameters the optimizer does not
  hold; gradients that accumulate across steps (``zero_grad`` missing); a learning rate that is
  zero, not finite or jumps; a loss that diverges; outputs that are probabilities given to a loss
  that expects logits; loss spikes without gradient clipping;
* **throughput**: input-bound (waiting for batches) or compute-bound;
* **determinism** (on request, ``areas=["determinism"]``): see :mod:`onthefly.actions.determinism`.

Each finding is a card: ``check``, ``area``, ``severity`` ("info", "warning", "error"), ``title``,
``evidence`` (numbers, layers, sample ids) and ``fix``. A check-up's cards are recorded in the
session as a ``health`` event (exported with it) and returned.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..engine.batch import to_device
from ..engine.callbacks import Callback
from ..errors import ConfigError
from ..store.reader import SessionReader
from .export import isolated_rng

__all__ = ["ALL_AREAS", "AREAS", "attach", "checkup"]

AREAS = ("gradients", "activations", "numerics", "data", "configuration", "throughput")  # a check-up's default
ALL_AREAS = (*AREAS, "determinism")  # the determinism check trains a copy twice: on request
SEVERITIES = ("info", "warning", "error")
PROBE_BATCHES = 3
HASH_LIMIT = 50_000  # samples hashed per split for duplicates
NEIGHBOURS = 2_000  # samples in the nearest-neighbour label check
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh)


def card(check: str, area: str, severity: str, title: str, fix: str, **evidence: Any) -> dict[str, Any]:
    return {"check": check, "area": area, "severity": severity, "title": title, "evidence": evidence, "fix": fix}


# ---- the API ---------------------------------------------------------------------------------------
def attach(owner: Any, *, every_steps: int | None = None, continuous: bool = False,
           report_every: int = 100) -> None:
    """Let the run of ``owner`` (a Trainer, or a Run of start_run) carry out ``health_check``
    commands; with ``every_steps``, run a check-up every that many steps; with ``continuous``,
    watch every optimizer step's gradient norm and AMP overflows on the device (``monitor``),
    reported every ``report_every`` steps."""
    if every_steps is not None and (isinstance(every_steps, bool) or not isinstance(every_steps, int)
                                    or every_steps < 1):
        raise ConfigError(f"every_steps must be a whole number >= 1 or None, got {every_steps!r}")
    run = getattr(owner, "run", owner)
    if continuous:
        from .monitor import GradientMonitor

        watcher = GradientMonitor(run, getattr(owner, "model", None) or run._objects.model,
                                  scaler=getattr(owner, "scaler", None) or run._objects.scaler,
                                  clipping=bool(getattr(owner, "grad_clip", None)), report_every=report_every)
        run.add_hook("on_before_optimizer_step", watcher)
        run.add_hook("on_step_end", watcher)
        run.add_closing_callback(watcher.flush)
        run.health_monitor = watcher
    run.health_frozen = _frozen_snapshot(getattr(owner, "model", None) or run._objects.model)

    def command(args: dict[str, Any]) -> dict[str, Any]:
        cards = checkup(owner, areas=args.get("areas"))
        return {"cards": len(cards), "worst": _worst(cards)}

    run.register_action("health_check", command)
    if every_steps is not None:
        run.add_hook("on_step_end", _Every(owner, every_steps))


class _Every(Callback):
    def __init__(self, owner: Any, every: int) -> None:
        self.owner, self.every = owner, every

    def on_step_end(self, run: Any) -> None:
        if run.global_step % self.every == 0:
            checkup(self.owner)


def checkup(owner: Any, *, areas: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the check-up now (training thread, at a step boundary) for ``owner`` (a Trainer, or a
    Run of start_run); its cards, worst first."""
    wanted = list(areas or AREAS)
    unknown = [a for a in wanted if a not in ALL_AREAS]
    if unknown:
        raise ConfigError(f"areas: unknown {unknown}; the areas are {', '.join(ALL_AREAS)}")
    started = time.perf_counter()
    run = getattr(owner, "run", owner)
    cards: list[dict[str, Any]] = []
    with isolated_rng():
        probe = _Probe(owner)
        checks: dict[str, Callable[[_Probe], list[dict[str, Any]]]] = {
            "gradients": _gradients, "activations": _activations, "numerics": _numerics, "data": _data,
            "configuration": _configuration, "throughput": _throughput, "determinism": _determinism}
        for area in wanted:
            try:
                cards += checks[area](probe)
            except Exception as exc:  # a check that cannot run on this model says so; the others go on
                cards.append(card(f"{area}_not_checked", area, "info", f"the {area} check could not run",
                                  "see the error; the other checks ran", error=f"{type(exc).__name__}: {exc}"))
    cards.sort(key=lambda c: -SEVERITIES.index(c["severity"]))
    run.bus.publish("health", {"cards": cards, "areas": wanted, "seconds": round(time.perf_counter() - started, 3)},
                    run_id=run.run_id, step=run.global_step, epoch=run.epoch)
    return cards


def _worst(cards: list[dict[str, Any]]) -> str | None:
    return cards[0]["severity"] if cards else None


def _frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


# ---- what the checks share --------------------------------------------------------------------------
class _Probe:
    """The run's objects, a few training batches, and (made when first asked) a copy of the
    model and optimizer that the checks may train."""

    def __init__(self, owner: Any) -> None:
        self.trainer = owner if hasattr(owner, "spec") and hasattr(owner, "run") else None
        if self.trainer is not None:  # a Trainer (quickstart)
            self.run = owner.run
            self.model, self.optimizer, self.device = owner.model, owner.optimizer, owner.device
            self.spec, self.per_sample_loss = owner.spec, owner.loss
            self.grad_clip, self.scaler, self.accumulate = owner.grad_clip, owner.scaler, owner.accumulate
            loader = owner.train_loader.original
            self.splits = {"val": owner.val_loader, "test": owner.test_loader}
        else:  # a Run of start_run: its objects, the evaluator's loss, the loader run.batches() was given
            run = owner
            self.run = run
            self.model, self.optimizer = run._objects.model, run._objects.optimizer
            self.scaler, self.device = run._objects.scaler, run.device
            evaluator = run.evaluator
            if evaluator is None:
                raise ConfigError("a health check-up runs the model's loss: start_run(..., loss_fn=...) gives it")
            self.spec, self.per_sample_loss = evaluator._spec, evaluator._loss
            self.grad_clip, self.accumulate = None, 1
            if run._tracked is None:
                raise ConfigError("a health check-up draws training batches: call it once run.batches(loader) "
                                  "has started")
            loader = run._tracked.original
            self.splits = {name: evaluator._loaders.get(name) for name in ("val", "test")}
        self.frozen: dict[str, torch.Tensor] = getattr(self.run, "health_frozen", {})
        self.loader = loader
        n = len(loader.dataset)
        size = loader.batch_size or 1
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(self.run.global_step))[: size * PROBE_BATCHES]
        self.indices = chosen.sort().values.tolist()
        self.batches = list(DataLoader(Subset(loader.dataset, self.indices), batch_size=size, shuffle=False,
                                       collate_fn=loader.collate_fn))
        self._copy: tuple[nn.Module, torch.optim.Optimizer] | None = None
        self.fresh_grad_norm: float | None = None

    def on_device(self, batch: Any) -> Any:
        return to_device(batch, self.device, non_blocking=False)

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, Any]:
        return self.spec.forward(model, self.on_device(batch))

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        return self.per_sample_loss(outputs, targets, _rows(outputs))[0]

    def copy(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A copy of the model and an optimizer over it holding the live optimizer's state."""
        if self._copy is None:
            model = copy.deepcopy(self.model)
            live = list(self.model.parameters())
            mine = list(model.parameters())
            where = {id(p): i for i, p in enumerate(live)}
            groups = []
            for group in self.optimizer.param_groups:
                params = [mine[where[id(p)]] for p in group["params"] if id(p) in where]
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
            optimizer = type(self.optimizer)(groups, **self.optimizer.defaults)
            try:
                optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
            except (ValueError, KeyError):
                pass  # a state that does not map: a fresh optimizer's first step is measured instead
            self._copy = (model, optimizer)
        return self._copy

    def inputs_and_targets(self, dataset: Dataset, limit: int) -> tuple[list[Any], list[Any]]:
        """The model inputs and targets of up to ``limit`` samples (in order), batch by batch."""
        n = min(len(dataset), limit)  # type: ignore[arg-type]
        loader = DataLoader(Subset(dataset, range(n)), batch_size=256, shuffle=False,
                            collate_fn=self.loader.collate_fn)
        xs, ys = [], []
        for batch in loader:
            args, kwargs, y = self.spec.arguments(batch)
            xs.append(args[0] if len(args) == 1 and not kwargs else (args, kwargs))
            ys.append(y)
        return xs, ys


def _rows(outputs: Any) -> int:
    return int(outputs.shape[0]) if isinstance(outputs, torch.Tensor) and outputs.ndim else 1


def _norm(t: torch.Tensor) -> float:
    return float(t.detach().float().norm())


# ---- gradients -------------------------------------------------------------------------------------
def _gradients(probe: _Probe) -> list[dict[str, Any]]:
    model, optimizer = probe.copy()
    model.train(probe.model.training)
    optimizer.zero_grad(set_to_none=True)
    for batch in probe.batches[:1]:
        outputs, targets = probe.forward(model, batch)
        probe.loss(outputs, targets).backward()
    cards = []
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    if missing:
        cards.append(card("no_gradient", "gradients", "warning",
                          f"{len(missing)} parameter(s) that require a gradient never receive one",
                          "they take no part in the loss: remove them, or find the branch of forward that skips them "
                          "(or freeze them with requires_grad_(False))", parameters=missing[:20]))
    grads = {n: p.grad for n, p in named if p.grad is not None}
    bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
    if bad:
        cards.append(card("nonfinite_gradient", "gradients", "error", f"non-finite gradients in {len(bad)} parameter(s)",
                          "find the first non-finite value (torch.autograd.set_detect_anomaly(True) for one step); "
                          "check the loss and inputs for inf/NaN, lower the learning rate, use gradient clipping",
                          parameters=bad[:20]))
        return cards
    norms = {n: _norm(g) for n, g in grads.items()}
    probe.fresh_grad_norm = math.sqrt(sum(v * v for v in norms.values()))
    weights = [n for n, p in named if p.ndim >= 2 and n in norms]
    if len(weights) >= 2:
        median = float(np.median([norms[n] for n in weights]))
        exploding = [n for n in weights if median > 0 and norms[n] > 1e3 * median]
        vanishing = [n for n in weights if norms[n] < 1e-6 * max(median, 1e-30) or norms[n] == 0.0]
        if exploding:
            cards.append(card("exploding_gradient", "gradients", "warning", "gradients far larger in some layers",
                              "normalise the layer's inputs, lower its learning rate, or clip gradients",
                              layers={n: norms[n] for n in exploding}, median_norm=median))
        if vanishing:
            cards.append(card("vanishing_gradient", "gradients", "warning",
                              f"{len(vanishing)} layer(s) get (almost) no gradient",
                              "look for dead activations or saturation before them (the activations check), or a "
                              "detach() in forward", layers={n: norms[n] for n in vanishing}, median_norm=median))
    before = {n: p.detach().clone() for n, p in named if p.ndim >= 2}
    if probe.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), probe.grad_clip)
    optimizer.step()
    ratios = {n: _norm(p - before[n]) / max(_norm(before[n]), 1e-12) for n, p in named if n in before}
    if ratios:
        median_ratio = float(np.median(list(ratios.values())))
        lr = optimizer.param_groups[0].get("lr")
        if median_ratio > 0.1:
            cards.append(card("update_too_large", "gradients", "error" if median_ratio > 0.3 else "warning",
                              f"one step changes the weights by {median_ratio:.1%} (median over layers)",
                              "lower the learning rate (updates of ~1e-3 of the weights are typical)",
                              median_update_ratio=median_ratio, lr=lr, layers=_top(ratios)))
        elif median_ratio < 1e-7:
            cards.append(card("update_too_small", "gradients", "warning",
                              f"one step changes the weights by {median_ratio:.1e} (median over layers)",
                              "raise the learning rate, or check that the scheduler has not driven it to ~0",
                              median_update_ratio=median_ratio, lr=lr))
    frozen = probe.frozen
    changed = [n for n, p in probe.model.named_parameters()
               if n in frozen and not p.requires_grad and not torch.equal(p.detach(), frozen[n])]
    if changed:
        cards.append(card("frozen_changed", "gradients", "error", f"{len(changed)} frozen parameter(s) changed",
                          "something other than the optimizer writes them (an EMA, a manual update, load_state_dict); "
                          "if they should train, set requires_grad_(True)", parameters=changed[:20]))
    return cards


def _top(values: dict[str, float], k: int = 5) -> dict[str, float]:
    return dict(sorted(values.items(), key=lambda kv: -kv[1])[:k])


# ---- activations -----------------------------------------------------------------------------------
def _activations(probe: _Probe) -> list[dict[str, Any]]:
    model, _ = probe.copy()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ACTIVATIONS)}
    if not layers:
        return [card("activations_unseen", "activations", "info", "no activation modules to watch",
                     "activations called as functions (F.relu) are not seen; use nn.ReLU modules to have them checked")]
    alive: dict[str, torch.Tensor] = {}
    saturated: dict[str, list[float]] = {}

    def hook(name: str, module: nn.Module) -> Callable[..., None]:
        def seen(_: nn.Module, __: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or output.ndim < 2:
                return
            units = output.detach().transpose(0, 1).reshape(output.shape[1], -1)  # [units, samples...]
            nonzero = (units != 0).any(dim=1)
            alive[name] = nonzero if name not in alive else alive[name] | nonzero
            if isinstance(module, nn.Tanh | nn.Hardtanh):
                saturated.setdefault(name, []).append(float((units.abs() > 0.99).float().mean()))
            elif isinstance(module, nn.Sigmoid):
                saturated.setdefault(name, []).append(float(((units < 0.01) | (units > 0.99)).float().mean()))
        return seen

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in probe.batches:
                probe.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    cards = []
    relu_like = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
    dead = {n: 1 - float(a.float().mean()) for n, a in alive.items() if isinstance(layers[n], relu_like)}
    bad = {n: v for n, v in dead.items() if v >= 0.5}
    if bad:
        cards.append(card("dead_units", "activations", "error" if max(bad.values()) >= 0.9 else "warning",
                          f"dead units: {', '.join(f'{n} {v:.0%}' for n, v in bad.items())} output 0 for every sample",
                          "lower the learning rate, check the initialisation and the layer before (a large negative "
                          "bias), or use LeakyReLU", layers=bad, samples=len(probe.indices)))
    sat = {n: float(np.mean(v)) for n, v in saturated.items() if np.mean(v) >= 0.5}
    if sat:
        cards.append(card("saturated_units", "activations", "warning",
                          f"saturated units: {', '.join(f'{n} {v:.0%}' for n, v in sat.items())} at their bounds",
                          "scale the inputs of these layers (normalisation) or lower the learning rate", layers=sat))
    return cards


# ---- numerics --------------------------------------------------------------------------------------
def _numerics(probe: _Probe) -> list[dict[str, Any]]:
    cards = []
    bad = [n for n, t in [*probe.model.named_parameters(), *probe.model.named_buffers()]
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        cards.append(card("nonfinite_weights", "numerics", "error", f"non-finite values in {len(bad)} weight(s)",
                          "resume from the last checkpoint before it happened with a lower learning rate or gradient "
                          "clipping; find the step with the loss curve", tensors=bad[:20]))
    where = probe.run.world
    if where is not None:  # under torchrun: the same weights on every rank (DDP keeps them so, if nothing else writes)
        agree, hashes = where.weights_agree(probe.model)
        if not agree:
            cards.append(card("ranks_differ", "numerics", "error",
                              f"the ranks' weights differ ({len(set(hashes))} different hashes over {len(hashes)} ranks)",
                              "something changes the weights on one rank only (a rank-dependent branch in the model or a "
                              "callback, a parameter outside DDP): resume every rank from the last checkpoint",
                              hashes=hashes))
    scaler = probe.scaler
    if scaler is not None and scaler.is_enabled():
        scale = float(scaler.get_scale())
        if scale < 1.0:
            cards.append(card("loss_scale_collapsed", "numerics", "error",
                              f"the AMP loss scale collapsed to {scale:.3g}: gradients overflow on most steps",
                              "float16 overflows: use amp='bf16', lower the learning rate, or find the layer that "
                              "produces inf", scale=scale))
        elif scale < 2.0 ** 8:
            cards.append(card("loss_scale_low", "numerics", "warning", f"the AMP loss scale fell to {scale:.3g}",
                              "frequent overflows in float16: consider amp='bf16'", scale=scale))
    return cards


# ---- data ------------------------------------------------------------------------------------------
def _digest(value: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, torch.Tensor):
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return h.digest()


def _row_digests(xs: list[Any]) -> list[bytes]:
    digests = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            digests += [_digest(row) for row in x]
        else:
            args, kwargs = x
            first = args[0] if args else next(iter(kwargs.values()))
            digests += [_digest((row, *[_index(v, i) for v in (*args[1:], *kwargs.values())]))
                        for i, row in enumerate(first)]
    return digests


def _index(value: Any, i: int) -> Any:
    return value[i] if isinstance(value, torch.Tensor) and value.ndim else value


def _data(probe: _Probe) -> list[dict[str, Any]]:
    splits = {"train": probe.loader.dataset}
    for name, loader in probe.splits.items():
        if loader is not None:
            splits[name] = loader.dataset
    gathered = {name: probe.inputs_and_targets(ds, HASH_LIMIT) for name, ds in splits.items()}
    cards = []
    hashes = {name: _row_digests(xs) for name, (xs, _) in gathered.items()}
    seen_train = {d: i for i, d in enumerate(hashes["train"])}
    for name in ("val", "test"):
        if name not in hashes:
            continue
        shared = [(seen_train[d], j) for j, d in enumerate(hashes[name]) if d in seen_train]
        if shared:
            cards.append(card("split_leakage", "data", "error",
                              f"{len(shared)} {name} sample(s) are also in the training data "
                              f"({len(shared) / len(hashes[name]):.1%} of {name})",
                              f"split before any augmentation or duplication, and remove the duplicates from {name}",
                              split=name, count=len(shared), examples=[{"train": a, name: b} for a, b in shared[:10]]))
    counts = {}
    for name, (_, ys) in gathered.items():
        labels = torch.cat([y.reshape(-1).cpu() for y in ys]) if ys and all(isinstance(y, torch.Tensor) for y in ys) \
            else None
        if labels is not None and not labels.is_floating_point():
            valid = labels[labels >= 0]
            counts[name] = torch.bincount(valid).tolist() if valid.numel() else []
    if counts.get("train"):
        train = np.asarray(counts["train"], dtype=float)
        present = train > 0
        if present.sum() >= 2 and train[present].max() / train[present].min() > 20:
            cards.append(card("label_imbalance", "data", "info", "the training labels are very imbalanced",
                              "weight the loss or resample if the rare classes matter", counts=counts["train"]))
        for name in ("val", "test"):
            if counts.get(name):
                other = np.zeros(max(len(train), len(counts[name])))
                other[: len(counts[name])] = counts[name]
                base = np.zeros_like(other)
                base[: len(train)] = train
                tv = 0.5 * np.abs(base / base.sum() - other / max(other.sum(), 1)).sum()
                if tv > 0.2:
                    cards.append(card("label_shift", "data", "warning",
                                      f"the label balance of {name} differs from train's (total variation {tv:.2f})",
                                      "stratify the split by label", split=name, train=counts["train"],
                                      other=counts[name]))
    cards += _independent_labels(gathered["train"])
    cards += _worker_seeds(probe.loader)
    return cards


def _independent_labels(train: tuple[list[Any], list[Any]]) -> list[dict[str, Any]]:
    xs, ys = train
    if not xs or not all(isinstance(x, torch.Tensor) for x in xs) or not all(isinstance(y, torch.Tensor) for y in ys):
        return []
    x = torch.cat([t.reshape(t.shape[0], -1).float().cpu() for t in xs])[:NEIGHBOURS]
    y = torch.cat([t.reshape(-1).cpu() for t in ys])[:NEIGHBOURS]
    if y.is_floating_point() or x.shape[0] < 50 or x.shape[0] != y.shape[0]:
        return []
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(float("inf"))
    agree = float((y[distances.argmin(dim=1)] == y).float().mean())
    share = torch.bincount(y[y >= 0]).double() / max(int((y >= 0).sum()), 1)
    chance = float((share ** 2).sum())
    if agree > chance + 0.1 * (1 - chance):
        return []
    # Neighbours in input space miss a label that depends on a few of many features (the demo's:
    # the sign of 50 of 784); a linear probe scored on held-out samples sees those.
    probe = _linear_probe(x, y)
    if probe > chance + 0.1 * (1 - chance):
        return []
    return [card("labels_independent", "data", "error",
                 f"labels look independent of the inputs: a sample's nearest neighbour has its label "
                 f"{agree:.1%} of the time, a linear probe {probe:.1%} on held-out samples, chance is {chance:.1%}",
                 "check that inputs and labels are shuffled or indexed together (one permutation for both)",
                 neighbour_agreement=agree, linear_probe=probe, chance=chance, samples=int(x.shape[0]))]


def _linear_probe(x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out accuracy of ridge regression onto one-hot labels (standardised ``x``, ridge = the
    feature count), fit on half the samples in its dual form (a Gram matrix of half by half, not
    features by features), scored on the other half."""
    keep = y >= 0
    x, y = x[keep], y[keep]
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fit, held = order[: n // 2], order[n // 2:]
    design = torch.cat([x, torch.ones(n, 1)], dim=1)
    targets = torch.nn.functional.one_hot(y[fit], int(y.max()) + 1).double()
    gram = (design[fit] @ design[fit].T).double()
    alpha = torch.linalg.solve(gram + x.shape[1] * torch.eye(len(fit), dtype=torch.double), targets)
    scores = (design[held] @ design[fit].T).double() @ alpha
    return float((scores.argmax(dim=1) == y[held]).float().mean())


class _SeedProbe(Dataset[Any]):
    """What each worker's random streams give for its first sample (run by the loader's workers)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, float, float, float]:
        info = torch.utils.data.get_worker_info()
        return (info.id if info is not None else -1, float(np.random.random()), random.random(),
                float(torch.rand(1)))


def _worker_seeds(loader: DataLoader) -> list[dict[str, Any]]:
    if loader.num_workers < 2:
        return []
    probe = DataLoader(_SeedProbe(loader.num_workers), batch_size=1, num_workers=loader.num_workers,
                       worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context)
    firsts: dict[int, tuple[float, float, float]] = {}
    for worker, numpy_value, python_value, torch_value in probe:
        firsts.setdefault(int(worker), (float(numpy_value), float(python_value), float(torch_value)))
    values = list(firsts.values())
    same = [stream for k, stream in enumerate(("numpy", "random", "torch"))
            if len({v[k] for v in values}) < len(values)]
    if same:
        return [card("worker_seeds", "data", "warning",
                     f"the loader's {len(values)} workers start with the same {' and '.join(same)} random stream",
                     "seed each worker differently in worker_init_fn (e.g. np.random.seed(torch.initial_seed() % 2**32)); "
                     "identical streams give every worker the same augmentations", streams=same, workers=len(values))]
    return []


# ---- configuration ---------------------------------------------------------------------------------
def _configuration(probe: _Probe) -> list[dict[str, Any]]:
    cards = []
    model = probe.model
    if not model.training:
        sensitive = sorted({type(m).__name__ for m in model.modules()
                            if isinstance(m, nn.Dropout | nn.modules.batchnorm._BatchNorm)})
        cards.append(card("eval_mode_training", "configuration", "error" if sensitive else "info",
                          "the model is in eval mode while it trains",
                          "call model.train() before the training steps (and model.eval() only around evaluation)",
                          affected_modules=sensitive))
    held = {id(p) for g in probe.optimizer.param_groups for p in g["params"]}
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if left_out:
        cards.append(card("optimizer_missing_params", "configuration", "error",
                          f"{len(left_out)} trainable parameter(s) are not in the optimizer",
                          "build the optimizer from model.parameters() after the model is complete (layers added "
                          "later are left out)", parameters=left_out[:20]))
    live = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None and id(p) in held]
    if live and probe.fresh_grad_norm and probe.accumulate == 1:
        live_norm = math.sqrt(sum(_norm(g) ** 2 for g in live))
        if live_norm > 5 * probe.fresh_grad_norm:
            cards.append(card("gradients_accumulate", "configuration", "error",
                              f"the gradients held now are {live_norm / probe.fresh_grad_norm:.0f}x one batch's: they "
                              "accumulate across steps", "call optimizer.zero_grad() every step (or use "
                              "accumulate_grad_batches on purpose)", held_norm=live_norm,
                              one_batch_norm=probe.fresh_grad_norm))
    cards += _history(probe)
    cards += _outputs(probe)
    return cards


def _history(probe: _Probe) -> list[dict[str, Any]]:
    run = probe.run
    run.session.flush()
    reader = SessionReader(run.session.dir)
    cards = []
    lr = [m["value"] for m in reader.metrics(run.run_id, "lr") if m["value"] is not None]
    current = [g["lr"] for g in probe.optimizer.param_groups]
    if any(not math.isfinite(v) or v <= 0 for v in current):
        cards.append(card("lr_zero", "configuration", "error", f"the learning rate is {current}",
                          "check the scheduler (a warmup from 0 that never rises, a decay to 0)", lr=current))
    elif len(lr) >= 2 and max((b / a for a, b in itertools.pairwise(lr) if a > 0), default=0.0) > 10:
        cards.append(card("lr_jump", "configuration", "warning", "the learning rate jumped more than 10x in one step",
                          "check the scheduler's milestones and warmup", lr_history=lr[-20:]))
    losses = [m["value"] for m in reader.metrics(run.run_id, "train_loss") if m["value"] is not None]
    if len(losses) >= 10:
        first = float(np.median(losses[: max(3, len(losses) // 10)]))
        last = float(np.median(losses[-max(3, len(losses) // 10):]))
        if last > 2 * first:
            cards.append(card("loss_diverging", "configuration", "error",
                              f"the training loss rose from {first:.3g} to {last:.3g}",
                              "lower the learning rate (or add warmup and gradient clipping)", first=first, last=last))
        median = float(np.median(losses))
        spikes = [v for v in losses[-200:] if median > 0 and v > 5 * median]
        if spikes and not probe.grad_clip:
            cards.append(card("spikes_without_clipping", "configuration", "warning",
                              f"{len(spikes)} loss spike(s) above 5x the median, and no gradient clipping",
                              "set grad_clip (e.g. 1.0)", spikes=len(spikes), median=median))
    return cards


def _outputs(probe: _Probe) -> list[dict[str, Any]]:
    with torch.no_grad():
        outputs, _ = probe.forward(probe.copy()[0].eval(), probe.batches[0])
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2 or outputs.shape[1] < 2:
        return []
    loss_fn = getattr(probe.per_sample_loss, "loss_fn", None)
    expects_logits = isinstance(loss_fn, nn.CrossEntropyLoss | nn.BCEWithLogitsLoss | nn.MultiLabelSoftMarginLoss)
    looks = bool(((outputs >= 0) & (outputs <= 1)).all()) and bool(
        torch.allclose(outputs.float().sum(dim=1), torch.ones(outputs.shape[0], device=outputs.device), atol=1e-3))
    if looks and expects_logits:
        return [card("probabilities_to_logit_loss", "configuration", "error",
                     f"the model outputs probabilities (rows sum to 1) and {type(loss_fn).__name__} expects logits",
                     "remove the final softmax/sigmoid from the model (the loss applies it), or use NLLLoss on "
                     "log-probabilities")]
    return []


def _determinism(probe: _Probe) -> list[dict[str, Any]]:
    from .determinism import check

    return check(probe)


# ---- throughput ------------------------------------------------------------------------------------
def _throughput(probe: _Probe) -> list[dict[str, Any]]:
    loader = probe.loader
    batches = 6
    sample = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                        multiprocessing_context=loader.multiprocessing_context)
    fetched: Iterator[Any] = iter(sample)
    next(fetched)  # workers start
    began = time.perf_counter()
    got = 0
    for _ in range(batches):
        try:
            next(fetched)
        except StopIteration:
            break
        got += 1
    fetch = (time.perf_counter() - began) / max(got, 1)
    del fetched
    model, optimizer = probe.copy()
    model.train()
    began = time.perf_counter()
    for batch in probe.batches:
        optimizer.zero_grad(set_to_none=True)
        outputs, targets = probe.forward(model, batch)
        probe.loss(outputs, targets).backward()
        optimizer.step()
    if probe.device.type == "cuda":
        torch.cuda.synchronize(probe.device)
    step = (time.perf_counter() - began) / len(probe.batches)
    bound = "input" if fetch > step else "compute"
    # A warning only when loading clearly dominates (and is not a few microseconds either way).
    severity = "warning" if fetch > 3 * step and fetch > 5e-3 else "info"
    return [card("throughput", "throughput", severity, f"{bound}-bound: a batch takes {fetch * 1e3:.1f} ms to load and "
                 f"{step * 1e3:.1f} ms to train", "more DataLoader workers, pin_memory, lighter transforms"
                 if bound == "input" else "the model's step is the limit (AMP, a larger batch, a faster device)",
                 load_ms=fetch * 1e3, step_ms=step * 1e3, workers=loader.num_workers)]
