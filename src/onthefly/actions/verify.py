"""Verify suspects: spend extra compute to confirm "likely mislabelled" samples out of sample.

The flag in :mod:`onthefly.signals.dynamics` comes free from the run the user trained, but every
sample it judges was trained on with its label. Here each suspect is judged by a model that never
saw it: the suspects are split into ``folds``; for each fold a fresh copy of the user's model
trains for ``epochs`` on the dataset without that fold's suspects (the other suspects stay, as in
k-fold cross-validation), then predicts the held-out ones. A suspect is **confirmed** when that
model predicts another class than its label (cleanlab's ``predicted_neq_given``, on out-of-fold
probabilities of the same model). ``benchmarks/label_noise.py`` measures what it buys.

Compute: ``folds`` models, each ``epochs`` passes over ``len(dataset)`` minus its held-out
suspects (or ``max_train_samples`` drawn from them): about ``folds * epochs`` epochs of the user's
run. It runs on the caller's thread, with the global RNGs it touches (torch's, for the fresh
weights) saved and restored, so a training run it is called from is not perturbed; the server
calls it as a command the training process carries out at a step boundary, never from its own
threads. A pure function of its arguments: nothing is stored, the caller decides what to keep.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..engine.batch import BatchSpec, ForwardFn, to_device
from ..engine.device import model_device
from ..errors import ConfigError, DataError, StateError
from ..signals.per_sample import is_classification
from ..store.reader import SessionReader

__all__ = ["Verification", "attach", "verify_suspects"]

ModelSource = nn.Module | Callable[[], nn.Module]
OptimizerSource = torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None


@dataclass(frozen=True)
class Verification:
    """One row per suspect, in the order the suspects were given."""

    index: np.ndarray  # dataset index (int64)
    label: np.ndarray  # the label the dataset gives it (int64)
    label_probability: np.ndarray  # out-of-fold softmax probability of that label (float64)
    predicted: np.ndarray  # out-of-fold predicted class (int64)
    confirmed: np.ndarray  # bool: the model that never saw it predicts another class
    fold: np.ndarray  # which fold held it out (int64)
    samples_trained: int  # training compute: samples passed forward and backward, all folds together

    def table(self) -> pa.Table:
        return pa.table({"index": self.index, "label": self.label, "label_probability": self.label_probability,
                         "predicted": self.predicted, "confirmed": self.confirmed, "fold": self.fold})


def verify_suspects(model: ModelSource, dataset: Dataset[Any], suspects: Sequence[int] | np.ndarray, *,
                    optimizer: OptimizerSource = None, loss_fn: Callable[..., torch.Tensor] | None = None,
                    folds: int = 5, epochs: int = 5, batch_size: int = 64, max_train_samples: int | None = None,
                    seed: int = 0, device: str | torch.device | None = None,
                    collate_fn: Callable[[list[Any]], Any] | None = None,
                    inputs: Any = None, targets: Any = None, forward_fn: ForwardFn | None = None) -> Verification:
    """Out-of-fold verdicts on ``suspects`` (indices into the map-style ``dataset``).

    ``model``: a zero-argument factory returning a fresh module, or a module to copy with every
    parameter re-initialised (each submodule's ``reset_parameters``; a parameter none covers is an
    error - pass a factory). ``optimizer``: None (Adam, lr 1e-3), the user's optimizer (its class,
    rebuilt with its ``defaults``), or a factory over parameters. ``loss_fn``: default cross-entropy.
    ``inputs``/``targets``/``forward_fn``: how a batch becomes (outputs, targets), as for ``Trainer``.
    """
    suspect_index = _checked_suspects(suspects, len(dataset))  # type: ignore[arg-type]
    _check_budget(folds, epochs, batch_size, max_train_samples)
    build = _model_factory(model)
    spec = BatchSpec(inputs, targets, forward_fn)
    loss = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    n = suspect_index.size
    result_label = np.zeros(n, dtype=np.int64)
    result_prob = np.zeros(n, dtype=np.float64)
    result_pred = np.zeros(n, dtype=np.int64)
    result_fold = np.zeros(n, dtype=np.int64)
    if n == 0:
        return Verification(suspect_index, result_label, result_prob, result_pred, np.zeros(0, dtype=bool),
                            result_fold, 0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    folds = min(folds, n)
    for f, members in enumerate(np.array_split(order, folds)):
        fold_of[members] = f
    trained = 0
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # fresh weights draw from torch's RNG: the user's is restored
        for f in range(folds):
            held = np.flatnonzero(fold_of == f)
            train_rows = np.setdiff1d(np.arange(len(dataset)), suspect_index[held])  # type: ignore[arg-type]
            if max_train_samples is not None and train_rows.size > max_train_samples:
                train_rows = np.sort(rng.choice(train_rows, size=max_train_samples, replace=False))
            torch.manual_seed(seed * 1_000 + f)
            fold_model = build()
            run_on = torch.device(device) if device is not None else model_device(fold_model)
            fold_model.to(run_on)
            opt = _optimizer(optimizer, fold_model)
            loader = DataLoader(Subset(dataset, train_rows.tolist()), batch_size=batch_size, shuffle=True,
                                collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed * 1_000 + f))
            fold_model.train()
            for _ in range(epochs):
                for batch in loader:
                    outputs, target = spec.forward(fold_model, to_device(batch, run_on, False))
                    if trained == 0:
                        _check_classifier(outputs, target)  # on the first batch, not after a fold's training
                    value = loss(outputs, target)
                    opt.zero_grad(set_to_none=True)
                    (value.mean() if value.ndim else value).backward()
                    opt.step()
                    trained += int(target.shape[0])
            label, prob, pred = _predict(fold_model, spec, dataset, suspect_index[held], batch_size, collate_fn, run_on)
            result_label[held], result_prob[held], result_pred[held] = label, prob, pred
            result_fold[held] = f
    return Verification(suspect_index, result_label, result_prob, result_pred, result_pred != result_label,
                        result_fold, trained)


def attach(trainer: Any) -> None:
    """Let ``trainer``'s run carry out ``verify_suspects`` commands (the dashboard's "Verify
    suspects", ``POST /api/runs/{id}/verify``): at a step boundary, the run waiting meanwhile
    (status "paused"), the samples flagged likely mislabelled at the epoch asked for are verified
    with copies of the trainer's model (re-initialised), its optimizer's class and settings, its loss
    and its batch layout, on its training dataset; the confirmed ones are saved as a slice, and a
    ``suspects_verified`` event says how many of how many, at what compute. Every global RNG is
    restored afterwards: the run trains on as it would have."""
    from .export import isolated_rng
    from .slices import save_run_slice

    run = trainer.run

    def handle(args: dict[str, Any]) -> dict[str, Any]:
        if run.world is not None:
            raise ConfigError("verify_suspects trains out-of-fold models in one process; under torchrun it is not "
                              "carried out yet: call onthefly.actions.verify.verify_suspects from a single process")
        run.recorder.wait_idle()
        run.session.flush()
        reader = SessionReader(run.session.dir)
        epoch = args.get("epoch")
        epoch = reader.default_epoch(run.run_id) if epoch is None else int(epoch)
        if epoch is None:
            raise StateError("no complete epoch yet: samples are flagged once an epoch's rows are in")
        stats = reader.sample_stats(run.run_id, epoch)
        suspects = stats.filter(stats.column("mislabelled")).column("index").to_numpy().astype(np.int64)
        if suspects.size == 0:
            raise StateError(f"no sample is flagged likely mislabelled at epoch {epoch}: nothing to verify")
        name = _free_name(reader, args.get("slice"))  # checked before the compute is spent
        loader = trainer.train_loader.original
        status = run.controller.status
        began = time.perf_counter()
        run.controller.set_status("paused")  # the run waits at this step while the copies train
        try:
            with isolated_rng():
                found = verify_suspects(
                    trainer.model, loader.dataset, suspects, optimizer=trainer.optimizer,
                    loss_fn=trainer.loss.loss_fn, folds=int(args.get("folds", 5)), epochs=int(args.get("epochs", 5)),
                    batch_size=loader.batch_size or 64, device=trainer.device, collate_fn=loader.collate_fn,
                    inputs=trainer.spec.inputs, targets=trainer.spec.targets, forward_fn=trainer.spec.forward_fn)
        finally:
            run.controller.set_status(status)
        confirmed = found.index[found.confirmed]
        saved = save_run_slice(run, name, {"kind": "indices", "indices": confirmed.tolist()}, epoch) \
            if confirmed.size else None
        result = {"epoch": epoch, "suspects": int(suspects.size), "confirmed": int(confirmed.size),
                  "slice": name if saved is not None else None, "folds": int(args.get("folds", 5)),
                  "epochs": int(args.get("epochs", 5)), "samples_trained": found.samples_trained,
                  "seconds": round(time.perf_counter() - began, 3),
                  "confirmed_indices": confirmed[:200].tolist()}
        run.bus.publish("suspects_verified", result, run_id=run.run_id, step=run.global_step, epoch=run.epoch)
        return {k: v for k, v in result.items() if k != "confirmed_indices"}

    run.register_action("verify_suspects", handle)


DEFAULT_SLICE = "verified mislabelled"


def _free_name(reader: SessionReader, asked: Any) -> str:
    """The slice name to save the confirmed samples as: the one asked for (refused when taken), or
    the default with the first free number after it."""
    taken = {s["name"] for s in reader.slices()}
    if asked is not None and asked != DEFAULT_SLICE:
        if asked in taken:
            raise StateError(f"a slice named {asked!r} already exists in this session; pick another name")
        return str(asked)
    name, n = DEFAULT_SLICE, 1
    while name in taken:
        n += 1
        name = f"{DEFAULT_SLICE} {n}"
    return name


@torch.no_grad()
def _predict(model: nn.Module, spec: BatchSpec, dataset: Dataset[Any], rows: np.ndarray, batch_size: int,
             collate_fn: Callable[[list[Any]], Any] | None, device: torch.device
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, probability of the label, predicted class) of ``rows``, in their order."""
    model.eval()
    labels, probs, preds = [], [], []
    loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in loader:
        outputs, target = spec.forward(model, to_device(batch, device, False))
        _check_classifier(outputs, target)
        p = outputs.float().softmax(dim=1)
        target = target.long()
        labels.append(target.cpu())
        probs.append(p.gather(1, target.clamp(0, p.shape[1] - 1).unsqueeze(1)).squeeze(1).cpu())
        preds.append(p.argmax(dim=1).cpu())
    return (torch.cat(labels).numpy().astype(np.int64), torch.cat(probs).numpy().astype(np.float64),
            torch.cat(preds).numpy().astype(np.int64))


def _model_factory(model: ModelSource) -> Callable[[], nn.Module]:
    if isinstance(model, nn.Module):
        _check_resettable(model)
        template = model

        def fresh() -> nn.Module:
            copy_ = copy.deepcopy(template)
            for module in copy_.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            return copy_

        return fresh
    if callable(model):
        def built() -> nn.Module:
            made = model()
            if not isinstance(made, nn.Module):
                raise ConfigError(f"the model factory must return a torch.nn.Module, it returned {type(made).__name__}")
            return made

        return built
    raise ConfigError(f"model must be a torch.nn.Module or a function returning a fresh one, got {type(model).__name__}")


def _check_resettable(model: nn.Module) -> None:
    covered: set[int] = set()
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            covered.update(id(p) for p in module.parameters(recurse=False))
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:
        shown = ", ".join(missed[:5]) + (", ..." if len(missed) > 5 else "")
        raise ConfigError(f"cannot re-initialise the model's parameters {shown}: no reset_parameters() of their "
                          "modules covers them, so a copy would keep weights trained on the suspects' labels. "
                          "Pass a function that builds a fresh model instead, e.g. "
                          "verify_suspects(lambda: MyNet(), dataset, suspects).")


def _optimizer(source: OptimizerSource, model: nn.Module) -> torch.optim.Optimizer:
    if source is None:
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if isinstance(source, torch.optim.Optimizer):
        try:
            return type(source)(model.parameters(), **source.defaults)
        except TypeError as exc:
            raise ConfigError(f"cannot rebuild {type(source).__name__} from its defaults ({exc}); pass a function "
                              "of the parameters instead, e.g. optimizer=lambda params: "
                              f"torch.optim.{type(source).__name__}(params, lr=...)") from exc
    if callable(source):
        return source(model.parameters())
    raise ConfigError(f"optimizer must be None, a torch optimizer or a function of the parameters, got {type(source).__name__}")


def _checked_suspects(suspects: Sequence[int] | np.ndarray, size: int) -> np.ndarray:
    index = np.asarray(suspects)
    if index.size == 0:
        return np.zeros(0, dtype=np.int64)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise ConfigError(f"suspects must be a list of dataset indices (whole numbers), got an array of {index.dtype} "
                          f"with shape {index.shape}")
    index = index.astype(np.int64)
    if index.min() < 0 or index.max() >= size:
        bad = int(index[(index < 0) | (index >= size)][0])
        raise ConfigError(f"suspect index {bad} is outside the dataset (indices 0..{size - 1})")
    if np.unique(index).size != index.size:
        raise ConfigError("suspects must not repeat an index")
    return index


def _check_budget(folds: int, epochs: int, batch_size: int, max_train_samples: int | None) -> None:
    for name, value, low in (("folds", folds, 2), ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    if max_train_samples is not None and (isinstance(max_train_samples, bool) or not isinstance(max_train_samples, int)
                                          or max_train_samples < 1):
        raise ConfigError(f"max_train_samples must be a whole number >= 1 or None, got {max_train_samples!r}")


def _check_classifier(outputs: Any, target: Any) -> None:
    if not is_classification(outputs, target):
        raise DataError("verify_suspects needs a classifier: model outputs of shape [batch, classes] and "
                        f"class-index targets of shape [batch]; got outputs {_shape(outputs)} and targets "
                        f"{_shape(target)}. Samples are flagged likely mislabelled for classification only.")


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
