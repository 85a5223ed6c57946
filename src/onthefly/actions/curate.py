"""Live data curation: a plan card drops a slice from a run's training, reweights it, or
restores it, from a step on.

The samples stay in the loader (the sample order, and so every other sample's trajectory, is
unchanged) and are still recorded; what changes is how much each one's loss weighs in what is
backpropagated: 0 when dropped, the card's weight when reweighted, 1 again when restored. The
card is recorded with the step it takes effect at (a ``curation_applied`` event), so the curves
show where it began, and another card undoes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from ..store.reader import SessionReader

__all__ = ["WEIGHTS", "curated_weights", "execute"]

WEIGHTS = {"drop": 0.0, "restore": 1.0}  # "reweight": the card's weight


def execute(trainer: Any, plan: dict[str, Any], indices: np.ndarray) -> dict[str, Any]:
    """Training thread, at a step boundary: schedule the card's weights for its slice's
    ``indices`` from its step on (on every rank under torchrun)."""
    run, card = trainer.run, plan["card"]
    if card["run_id"] != run.run_id:
        raise ConfigError(f"run_id: this card curates run {card['run_id']}, but it was sent to run {run.run_id}")
    n = len(trainer.train_loader.original.dataset)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ConfigError(f"slice {card['slice']!r} holds indices outside the training dataset (0..{n - 1})")
    weight = WEIGHTS.get(card["action"], card["weight"])
    from_step = max(card["from_step"] or 0, run.global_step + 1)
    trainer.schedule_curation(from_step, indices, weight, {"plan_id": plan["id"], "slice": card["slice"],
                                                           "action": card["action"]})
    return {"runs": [], "samples": int(indices.size), "weight": weight, "from_step": from_step,
            "verdict": {"met": None, "scheduled_from_step": from_step}}


def curated_weights(reader: SessionReader, run_id: int) -> dict[int, float]:
    """Sample index -> its curation weight now, for the samples of ``run_id`` a curation card
    changed (in the order the cards took effect); a sample not in the result weighs 1."""
    weights: dict[int, float] = {}
    plans = {p["id"]: p for p in reader.plans() if p["kind"] == "curate"}
    for event in reader.events(run_id, kind="curation_applied"):
        plan = plans.get(event["payload"].get("plan_id"))
        if plan is None:
            continue
        indices = reader.slice_indices(reader.slice(plan["card"]["slice"]))
        weight = float(event["payload"]["weight"])
        weights.update(dict.fromkeys(indices.tolist(), weight))
    return weights
