"""Live data curation from plan cards: a dropped slice stops weighing in training from its step
(its samples still drawn and recorded), a restore card undoes it, a reweight scales its losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from conftest import toy_data, toy_model
from onthefly.actions import fork as forking
from onthefly.actions import slices as slicing
from onthefly.store import open_session


def make_trainer(callbacks: tuple[onthefly.Callback, ...]) -> onthefly.Trainer:
    model = toy_model()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               loss_fn=nn.CrossEntropyLoss(),
                               train_loader=DataLoader(toy_data(), batch_size=32, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0)),
                               project="curate", run_name="r", callbacks=callbacks, progress=False)
    forking.attach(trainer)
    return trainer


class Curate(onthefly.Callback):
    """Drop every sample at the end of epoch 0, restore them at the end of epoch 1; keep the
    weights seen at each epoch end."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, run: onthefly.Run) -> None:
        self.weights.append({k: v.clone() for k, v in run.model.state_dict().items()})
        if run.epoch == 0:
            run.recorder.wait_idle()
            slicing.save_slice(run.session, "everything", run.run_id, {"kind": "quantile_band", "low": 0.0})
            forking.approve(run, forking.propose(run, {"kind": "curate", "run_id": run.run_id,
                                                       "slice": "everything", "action": "drop"})["id"])
        if run.epoch == 1:
            forking.approve(run, forking.propose(run, {"kind": "curate", "run_id": run.run_id,
                                                       "slice": "everything", "action": "restore"})["id"])


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_dropped_slice_weighs_nothing_until_it_is_restored() -> None:
    curate = Curate()
    trainer = make_trainer((curate,))
    trainer.fit(3)
    after_0, after_1, after_2 = curate.weights
    assert same(after_0, after_1)  # every sample dropped for epoch 1: nothing moved
    assert not same(after_1, after_2)  # restored for epoch 2: training again
    reader = open_session(trainer.run.session.dir)
    applied = reader.events(kind="curation_applied")
    assert [(e["payload"]["action"], e["payload"]["weight"], e["payload"]["from_step"]) for e in applied] == [
        ("drop", 0.0, 9), ("restore", 1.0, 17)]
    assert all(e["payload"]["samples"] == 256 for e in applied)
    assert reader.samples(1, epoch=1).num_rows == 256  # dropped samples are still drawn and recorded
    assert {p["status"] for p in reader.plans()} == {"done"}


def test_the_curated_loss_is_the_weighted_mean_of_the_samples_losses() -> None:
    from onthefly.signals.per_sample import PerSampleLoss

    outputs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 1])
    per = nn.functional.cross_entropy(outputs, targets, reduction="none")
    weights = torch.tensor([3.0, 0.0, 1.0])
    loss, values = PerSampleLoss(nn.CrossEntropyLoss()).weighted(outputs, targets, 3, weights)
    assert torch.allclose(loss, (3 * per[0] + per[2]) / 4) and torch.equal(values, per.detach())
    loss.backward()
    assert outputs.grad is not None and torch.equal(outputs.grad[1], torch.zeros(2))  # a dropped sample: no gradient


def test_a_curation_card_from_a_later_step_waits_for_it() -> None:
    seen: dict[str, Any] = {}

    class Later(onthefly.Callback):
        def on_epoch_end(self, run: onthefly.Run) -> None:
            if run.epoch == 0:
                run.recorder.wait_idle()
                slicing.save_slice(run.session, "tail", run.run_id, {"kind": "quantile_band", "low": 0.5})
                plan = forking.propose(run, {"kind": "curate", "run_id": run.run_id, "slice": "tail",
                                             "action": "reweight", "weight": 3.0, "from_step": 20})
                forking.approve(run, plan["id"])
                seen["plan"] = plan["id"]

    trainer = make_trainer((Later(),))
    trainer.fit(3)
    (applied,) = open_session(trainer.run.session.dir).events(kind="curation_applied")
    assert (applied["payload"]["from_step"], applied["payload"]["weight"]) == (20, 3.0)
    assert applied["payload"]["samples"] == open_session(trainer.run.session.dir).slice("tail")["count"]


def test_the_per_sample_views_say_which_samples_are_dropped() -> None:
    from onthefly.actions.curate import curated_weights

    curate = Curate()
    trainer = make_trainer((curate,))
    trainer.fit(3)
    reader = open_session(trainer.run.session.dir)
    assert set(curated_weights(reader, 1).values()) == {1.0}  # dropped, then restored
    assert len(curated_weights(reader, 1)) == 256
