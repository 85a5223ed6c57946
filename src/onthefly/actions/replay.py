"""The K-step replay: the steps trained since the last checkpoint, trained again bit for bit.

Part of the determinism check (``areas=["determinism"]``) for a run that ``Trainer`` (or
``quickstart``) drives. At a step boundary, in the training process, touching nothing of the run:

1. the last checkpoint (saved or resumed from) is read back: weights, optimizer, scheduler,
   scaler and every random state;
2. copies of the model, optimizer, scheduler and scaler take that state;
3. the batches trained since are drawn again the way a resume draws them (the epoch's order from
   the RNG and sampler state saved when the epoch began, the batches before the checkpoint
   skipped, every RNG as it was at the checkpoint), through a copy of the loader (its own
   sampler, batch sampler and generator; the dataset is shared), and each must hold the dataset
   indices the run trained;
4. each is trained on the copies with the ``Trainer``'s own step (``Trainer.compute_step``: the
   same accumulation windows, clipping, autocast and scheduler steps), and its loss compared bit
   for bit with the loss the run computed for it;
5. every tensor of the result - the model's state, the optimizer's state and hyperparameters, the
   scheduler's and the scaler's state - is compared bit for bit with the live run's.

"identical", or the first step whose loss differs and the first tensor that differs. On a
difference the step is trained twice more from the state before it under the hashing dispatch mode
of :mod:`onthefly.actions.determinism`, which names the first operation that differs; when the
step replays the same both times, the difference came from outside it (the data, an RNG another
part of the program drew from, a change to the weights between steps).

What a replay needs, and says when missing: a checkpoint in the epoch now training (the epoch's
end - validation, the epoch scheduler - is not replayed), at most ``REPLAY_WINDOW`` batches since
it, a map-style dataset, no mid-epoch validation, curation or learning-rate command in between.
Every global RNG is restored afterwards (the caller's ``isolated_rng``), and so is a stateful
dataset's state.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..engine.loader import TrackedLoader
from ..engine.resume import Progress, ResumePoint
from ..engine.state import capture_rng, restore_rng
from ..engine.trainer import REPLAY_WINDOW, ReplayedBatch, StepObjects, Trainer
from ..store.checkpoints import read_checkpoint
from ..store.reader import SessionReader

__all__ = ["replay", "step_copies"]

# Commands that change what the following steps compute; the replay does not apply them again.
CHANGES_TRAINING = frozenset({"set_lr", "set_weight_decay"})


def replay(trainer: Trainer, op_hashes: Any) -> dict[str, Any]:
    """The replay's card. ``op_hashes(objects, batch, boundary, forward)`` trains one step under the
    hashing dispatch mode and returns its operation records (given by the determinism check)."""
    from .health import card

    run = trainer.run
    if run.last_checkpoint is None:
        return card("replay", "determinism", "info", "no checkpoint yet: nothing to replay from",
                    "save a checkpoint (the Checkpoint button, run.save_checkpoint(), or the ModelCheckpoint callback), then "
                    "check determinism again a few steps later", replayed=0)
    start_step, folder = run.last_checkpoint
    refusal, window, progress, state, tensors = _window(trainer, start_step, folder)
    if refusal is not None:
        return card("replay", "determinism", "info", f"the last {run.global_step - start_step} step(s) cannot be "
                    f"replayed: {refusal}", "check determinism again within the epoch of a checkpoint",
                    checkpoint_step=start_step, replayed=0)
    assert progress is not None and state is not None and tensors is not None
    objects = step_copies(trainer)
    objects.model.load_state_dict(tensors)
    objects.optimizer.load_state_dict(state["optimizer"])
    if objects.scheduler is not None and state["scheduler"] is not None:
        objects.scheduler.load_state_dict(state["scheduler"])
    if objects.scaler is not None and state["scaler"] is not None:
        objects.scaler.load_state_dict(state["scaler"])
    dataset: Any = trainer.train_loader.original.dataset
    kept = dataset.state_dict() if callable(getattr(dataset, "state_dict", None)) \
        and callable(getattr(dataset, "load_state_dict", None)) else None
    try:
        found = _train_again(trainer, objects, window, progress, state, op_hashes)
    finally:
        if kept is not None:
            dataset.load_state_dict(kept)
    evidence: dict[str, Any] = {"checkpoint_step": start_step, "replayed": found["replayed"],
                                "batches": len(window)}
    if found["indices_differ"] is not None:
        return card("replay", "determinism", "error",
                    f"the replay drew other samples for batch {found['indices_differ']} of {len(window)} than the "
                    "run trained: the sampler's order is not a function of its saved state",
                    "give the sampler its own seeded torch.Generator (DataLoader(generator=...)), or a sampler with "
                    "state_dict()/load_state_dict()", **evidence, step=start_step + found["indices_differ"])
    differing = _first_difference(trainer.live, objects)
    if found["loss_step"] is None and differing is None:
        return card("replay", "determinism", "info",
                    f"identical: the {len(window)} batch(es) since the checkpoint at step {start_step} replayed bit "
                    "for bit (every loss, every weight and optimizer tensor)", "keep the contract below to keep it so",
                    **evidence, tensors=found["tensors"])
    if found["loss_step"] is not None:
        evidence.update(step=found["loss_step"], live_loss=found["live_loss"], replayed_loss=found["replayed_loss"])
    if differing is not None:
        evidence["first_tensor"] = differing
    title = "the replay from the checkpoint at step {} differs: {}".format(
        start_step, f"the loss of step {found['loss_step']} first" if found["loss_step"] is not None
        else "no loss, but the result")
    if differing is not None:
        title += f"; the first differing tensor is {differing}"
    op = found["op"]
    if op is not None:
        evidence.update(first_op=op["name"], module=op["module"], op_index=op["index"], ops=op["ops"])
        title += f"; the first differing operation: {op['name']} in {op['module']}"
        fix = ("look at that module: a source of randomness outside the seeded generators (the clock, an unseeded "
               "torch.Generator, os.urandom) or a nondeterministic kernel (torch.use_deterministic_algorithms(True) "
               "names those)")
    else:
        title += "; the step itself trains the same twice, so the difference came from outside it"
        fix = ("look for what changes between steps: a loader worker seeded from the clock, a callback that changes "
               "weights or draws from the global RNG, a command applied in between")
        if trainer.train_loader.original.num_workers and progress.batch_in_epoch:
            fix = ("the checkpoint lies inside an epoch and the loader has workers: random augmentations drawn in "
                   "a worker follow that worker's own stream, which no checkpoint holds (a resume from it skips "
                   "the epoch's first batches without loading them, so the workers' streams start elsewhere). "
                   "Checkpoint at epoch ends, draw augmentations from a generator seeded by the sample index, or "
                   "use num_workers=0. Otherwise: " + fix)
    return card("replay", "determinism", "error", title, fix, **evidence)


def _window(trainer: Trainer, start_step: int, folder: Any) -> tuple[
        str | None, list[ReplayedBatch], Progress | None, dict[str, Any] | None, dict[str, torch.Tensor] | None]:
    """The batches to replay and the checkpoint's state, or why there is nothing to replay."""
    run = trainer.run
    nothing: tuple[list[ReplayedBatch], None, None, None] = ([], None, None, None)
    if run.global_step == start_step:
        return f"no step since the checkpoint at step {start_step}", *nothing
    if trainer.world is not None:
        return "under torchrun a step's gradients come from every rank (the replay trains one process)", *nothing
    if trainer.train_loader.iterable:
        return "the dataset is an IterableDataset (its order cannot be drawn again from a saved state)", *nothing
    run.session.flush()  # the store's writer thread writes the checkpoint's files
    tensors, state = read_checkpoint(folder)
    progress = Progress(**state["progress"])
    if progress.epoch != run.epoch:
        return (f"the checkpoint is at the start of epoch {progress.epoch} or inside it, and training is in epoch "
                f"{run.epoch} (an epoch's end - validation, the epoch scheduler - is not replayed)"), *nothing
    if progress.batch_in_epoch % trainer.accumulate:
        return "the checkpoint was saved inside a gradient-accumulation window", *nothing
    window = [b for b in trainer.replayable if b.epoch == run.epoch and b.batch_in_epoch > progress.batch_in_epoch]
    expected = run.batch_in_epoch - progress.batch_in_epoch
    if len(window) != expected or [b.batch_in_epoch for b in window] != list(
            range(progress.batch_in_epoch + 1, run.batch_in_epoch + 1)):
        return f"{expected} batches were trained since the checkpoint; a replay keeps the last {REPLAY_WINDOW}", *nothing
    if any(b.kind == "curated" for b in window):
        return "curation weights were applied to the losses since the checkpoint", *nothing
    if trainer.val_every_steps is not None:
        every = trainer.val_every_steps
        if any(s % every == 0 for s in range(start_step + 1, run.global_step)):
            return f"a validation ran between the steps (val_every_steps={every})", *nothing
    applied = [e for e in SessionReader(run.session.dir).events(run.run_id, kind="command_applied")
               if e["step"] is not None and e["step"] >= start_step and e["payload"]["command"] in CHANGES_TRAINING]
    if applied:
        return f"the {applied[0]['payload']['command']} command changed the run at step {applied[0]['step']}", *nothing
    return None, window, progress, state, tensors


def _train_again(trainer: Trainer, objects: StepObjects, window: list[ReplayedBatch], progress: Progress,
                 state: dict[str, Any], op_hashes: Any) -> dict[str, Any]:
    """Train ``window`` again on ``objects`` from the checkpoint's state; what was found."""
    found: dict[str, Any] = {"replayed": 0, "indices_differ": None, "loss_step": None, "live_loss": None,
                             "replayed_loss": None, "op": None, "tensors": 0}
    tracked = TrackedLoader(_loader_copy(trainer.train_loader.original))
    point = ResumePoint()
    point.restore(state, progress)
    batches: Iterator[tuple[Any, Any]] = point.begin(tracked)  # every RNG now as at the checkpoint
    n_batches = trainer.train_loader.length
    step = progress.global_step
    try:
        for number, recorded in enumerate(window, start=1):
            batch, indices = next(batches)
            if not np.array_equal(np.asarray(indices, dtype=np.int64), np.asarray(recorded.indices, dtype=np.int64)):
                found["indices_differ"] = number
                return found
            at_end = n_batches is not None and recorded.batch_in_epoch == n_batches
            boundary = at_end or recorded.batch_in_epoch % trainer.accumulate == 0
            forward = trainer.forward_for(recorded.kind)
            before = None if found["loss_step"] is not None else _snapshot(objects)
            loss = trainer.compute_step(objects, batch, boundary, forward)[2]
            step += int(boundary)
            found["replayed"] = number
            if found["loss_step"] is None and recorded.loss is not None and not _bits_equal(loss.detach(),
                                                                                           recorded.loss):
                found.update(loss_step=step if boundary else step + 1, live_loss=float(recorded.loss),
                             replayed_loss=float(loss.detach()))
                assert before is not None
                found["op"] = _first_differing_op(objects, before, batch, boundary, forward, op_hashes)
    finally:
        del batches  # a multi-worker iterator's workers end here
    found["tensors"] = len(trainer.live.model.state_dict())
    return found


def _first_differing_op(objects: StepObjects, before: dict[str, Any], batch: Any, boundary: bool,
                        forward: Any, op_hashes: Any) -> dict[str, Any] | None:
    """Train the step twice from ``before`` under the hashing mode; the first operation whose
    output differs, or None when both passes agree. ``objects`` is left as it was."""
    after = _snapshot(objects)
    passes = []
    for _ in range(2):
        _load_snapshot(objects, before)
        passes.append(op_hashes(objects, batch, boundary, forward))
    _load_snapshot(objects, after)
    first, second = passes
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return {"name": a[0], "module": a[1], "index": index, "ops": len(first)}
    return None


def _snapshot(objects: StepObjects) -> dict[str, Any]:
    return {"model": copy.deepcopy(objects.model.state_dict()),
            "optimizer": copy.deepcopy(objects.optimizer.state_dict()),
            "scheduler": copy.deepcopy(objects.scheduler.state_dict()) if objects.scheduler is not None else None,
            "scaler": copy.deepcopy(objects.scaler.state_dict()) if objects.scaler is not None else None,
            "zero_grad_next": objects.zero_grad_next, "rng": capture_rng(),
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in objects.model.parameters()]}


def _load_snapshot(objects: StepObjects, snapshot: dict[str, Any]) -> None:
    objects.model.load_state_dict(snapshot["model"])
    objects.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
    if objects.scheduler is not None:
        objects.scheduler.load_state_dict(copy.deepcopy(snapshot["scheduler"]))
    if objects.scaler is not None:
        objects.scaler.load_state_dict(copy.deepcopy(snapshot["scaler"]))
    objects.zero_grad_next = snapshot["zero_grad_next"]
    for p, grad in zip(objects.model.parameters(), snapshot["grads"], strict=True):
        p.grad = None if grad is None else grad.clone()
    restore_rng(snapshot["rng"])


def step_copies(trainer: Trainer) -> StepObjects:
    """Copies of the run's model, optimizer, scheduler and scaler that train apart from it: one
    deep copy keeps their links (the optimizer holds the copied parameters, the scheduler the
    copied optimizer), On The Fly's own hooks are left out, and the step wrapper a scheduler puts
    on its optimizer (which would step the live optimizer) is dropped."""
    live = trainer.live
    memo: dict[int, Any] = {}
    ours = _our_hooks(live.model)
    for owner in ours:
        memo[id(owner)] = owner  # referenced, not copied, then removed from the copy below
    model, optimizer, scheduler, scaler = copy.deepcopy((live.model, live.optimizer, live.scheduler, live.scaler),
                                                        memo)
    _drop_our_hooks(model, {id(o) for o in ours})
    if getattr(optimizer.__dict__.get("step"), "_wrapped_by_lr_sched", False):
        del optimizer.__dict__["step"]  # the wrapper holds a reference to the live optimizer
    return StepObjects(model, optimizer, scheduler, scaler, zero_grad_next=live.zero_grad_next)


def _hook_dicts(module: nn.Module) -> list[dict[int, Any]]:
    return [module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
            getattr(module, "_backward_pre_hooks", {})]


def _our_hooks(model: nn.Module) -> list[Any]:
    """The objects behind On The Fly's own hooks on ``model`` (gradient norms, embeddings)."""
    owners = []
    for module in model.modules():
        for hooks in _hook_dicts(module):
            for hook in hooks.values():
                owner = getattr(hook, "__self__", None)
                if owner is not None and type(owner).__module__.startswith("onthefly."):
                    owners.append(owner)
    return owners


def _drop_our_hooks(model: nn.Module, owners: set[int]) -> None:
    for module in model.modules():
        for hooks in _hook_dicts(module):
            for key in [k for k, h in hooks.items() if id(getattr(h, "__self__", None)) in owners]:
                del hooks[key]


def _loader_copy(loader: DataLoader) -> DataLoader:
    """The user's loader with its own sampler, batch sampler and generator (the dataset shared),
    never its iterator (persistent workers stay the run's)."""
    memo: dict[int, Any] = {id(loader.dataset): loader.dataset}
    clone = copy.copy(loader)
    for name in ("sampler", "batch_sampler", "generator"):
        object.__setattr__(clone, name, copy.deepcopy(getattr(loader, name), memo))
    clone._iterator = None
    return clone


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN equals NaN of the same bits; 0.0 and -0.0 differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    if a.dtype == torch.bool or a.numel() == 0:
        return torch.equal(a, b)
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _bits_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if callable(a) and callable(b):
        return True  # a scheduler's lambdas: code, not state
    return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _first_difference(live: StepObjects, replica: StepObjects) -> str | None:
    """The first tensor (or state entry) of the replay that differs from the live run's."""
    mine = replica.model.state_dict()
    for name, tensor in live.model.state_dict().items():
        if not _bits_equal(tensor, mine[name]):
            return f"model.{name}"
    names = {id(p): n for n, p in live.model.named_parameters()}
    live_params = [p for g in live.optimizer.param_groups for p in g["params"]]
    replica_params = [p for g in replica.optimizer.param_groups for p in g["params"]]
    for p, q in zip(live_params, replica_params, strict=True):
        ours, theirs = live.optimizer.state.get(p, {}), replica.optimizer.state.get(q, {})
        for key in sorted(set(ours) | set(theirs)):
            if key not in ours or key not in theirs or not _same(ours[key], theirs[key]):
                return f"optimizer.{key} of {names.get(id(p), 'a parameter')}"
    for i, (group, other) in enumerate(zip(live.optimizer.param_groups, replica.optimizer.param_groups, strict=True)):
        for key in group:
            if key != "params" and not _same(group[key], other.get(key)):
                return f"optimizer param group {i} {key}"
    if live.scheduler is not None and not _same(live.scheduler.state_dict(), replica.scheduler.state_dict()):
        return "the scheduler's state"
    if live.scaler is not None and replica.scaler is not None \
            and not _same(live.scaler.state_dict(), replica.scaler.state_dict()):
        return "the GradScaler's state"
    return None
