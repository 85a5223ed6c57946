"""How a batch becomes (model outputs, targets): the default rules and the user's overrides.

Default: a tuple/list batch is ``(inputs, targets)``; a dict batch uses the keys named by
``inputs``/``targets`` (or a common name such as "input"/"label"). ``inputs`` may name several
fields: a dict's become keyword arguments of the model, a tuple's positional ones. A Hugging
Face-style dict (``input_ids``, ``pixel_values`` or ``input_values`` in it) gives the model every
key but the targets by name (``attention_mask``, ``token_type_ids``...), and the targets are
``labels``. For any other model, pass ``forward_fn(model, batch) -> (outputs, targets)``.

A model's outputs that are not a tensor are reduced to their logits before the loss sees them
(``logits_of``): a Hugging Face ``ModelOutput``, a dict or a dataclass with ``logits``, or a
tuple whose first element is a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError

__all__ = ["BatchSpec", "ForwardFn", "batch_size_of", "describe", "logits_of", "to_device"]

ForwardFn = Callable[[nn.Module, Any], tuple[Any, Any]]
Field = str | int
Fields = Field | tuple[Field, ...] | list[Field]

_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "features", "input_ids", "data")
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")
_BY_NAME_KEYS = ("input_ids", "pixel_values", "input_values")  # a Hugging Face batch: every key by name


def logits_of(outputs: Any) -> Any:
    """``outputs`` as the loss takes them: a tensor stays; a ``ModelOutput``, dict or object with
    ``logits`` gives them; a tuple or list gives its first element when that is a tensor (the
    convention of models that return extras after the logits). Anything else is left as it is."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"] if "logits" in outputs else outputs
    if isinstance(outputs, (tuple, list)):
        return outputs[0] if outputs and isinstance(outputs[0], torch.Tensor) else outputs
    found = getattr(outputs, "logits", None)
    return found if isinstance(found, torch.Tensor) else outputs


def to_device(value: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(v, device, non_blocking) for v in value)
    return value


def describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__module__}.{type(batch).__qualname__}"


class BatchSpec:
    """Splits a batch into model inputs and targets and runs the model."""

    def __init__(self, inputs: Fields | None = None, targets: Field | None = None,
                 forward_fn: ForwardFn | None = None) -> None:
        if forward_fn is not None and not callable(forward_fn):
            raise ConfigError(f"forward_fn must be callable(model, batch) -> (outputs, targets), got {forward_fn!r}")
        self.inputs = inputs
        self.targets = targets
        self.forward_fn = forward_fn

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, Any]:
        if self.forward_fn is not None:
            result = self.forward_fn(model, batch)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise ConfigError(
                    f"forward_fn must return a pair (outputs, targets), got {describe(result)}"
                )
            return logits_of(result[0]), result[1]
        if isinstance(batch, Mapping):
            outputs, targets = self._forward_dict(model, batch)
            return logits_of(outputs), targets
        if isinstance(batch, (list, tuple)):
            outputs, targets = self._forward_sequence(model, batch)
            return logits_of(outputs), targets
        raise DataError(
            f"the loader yielded {describe(batch)}; On The Fly understands tuple, list and dict "
            "batches. Return (inputs, targets) from your dataset, or pass "
            "forward_fn=lambda model, batch: (model(...), targets)."
        )

    def arguments(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """What the model is called with for ``batch`` (positional and keyword arguments) and the
        targets, without running the model."""
        stand_in = _Arguments()
        _, targets = self.forward(stand_in, batch)
        return stand_in.seen[0], stand_in.seen[1], targets

    def _forward_dict(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, Any]:
        by_name = self.inputs is None and any(key in batch for key in _BY_NAME_KEYS)
        inputs = self.inputs if self.inputs is not None or by_name else _first_key(batch, _INPUT_KEYS, "inputs")
        targets = self.targets if self.targets is not None else _first_key(batch, _TARGET_KEYS, "targets")
        y = _field(batch, targets)
        if by_name:
            # Not the labels: a Hugging Face model given them computes its own (mean) loss besides ours.
            return model(**{str(k): v for k, v in batch.items() if k != targets}), y
        assert inputs is not None
        if isinstance(inputs, (list, tuple)):
            return model(**{str(k): _field(batch, k) for k in inputs}), y
        return model(_field(batch, inputs)), y

    def _forward_sequence(self, model: nn.Module, batch: Sequence[Any]) -> tuple[Any, Any]:
        if self.inputs is None and self.targets is None:
            if len(batch) != 2:
                raise DataError(
                    f"the loader yielded {describe(batch)}; without `inputs`/`targets`, a tuple batch "
                    "must be (inputs, targets). Say which items are which, e.g. inputs=(0, 1), targets=2."
                )
            return model(batch[0]), batch[1]
        inputs = self.inputs if self.inputs is not None else 0
        targets = self.targets if self.targets is not None else len(batch) - 1
        y = _field(batch, targets)
        if isinstance(inputs, (list, tuple)):
            return model(*(_field(batch, i) for i in inputs)), y
        return model(_field(batch, inputs)), y


class _Arguments(nn.Module):
    """Stands in for the model to see what it is called with."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.seen = (args, kwargs)
        return torch.zeros(1)


def _first_key(batch: Mapping[str, Any], names: tuple[str, ...], what: str) -> str:
    for name in names:
        if name in batch:
            return name
    raise DataError(
        f"the loader yielded a dict with keys {sorted(map(str, batch))} and On The Fly cannot tell "
        f"which are the {what}. Pass {what}=<key> (e.g. inputs='pixels', targets='label')."
    )


def _field(batch: Any, key: Field) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError):
        raise DataError(f"the batch has no field {key!r}; it is {describe(batch)}") from None


def batch_size_of(outputs: Any, targets: Any) -> int:
    """The number of samples in a batch, read from tensor shapes (host metadata, no sync)."""
    for value in (targets, outputs):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise DataError(
        f"cannot tell the batch size: targets are {describe(targets)} and outputs {describe(outputs)}; "
        "expected tensors whose first dimension is the batch."
    )
