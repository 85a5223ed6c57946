"""Which merges help on a planted hard subgroup? (``benchmarks/merge.py --part subgroup``)

The fork issue's data (benchmarks/specialist.py): scikit-learn's digits with ``--share`` (8 %) of
every class flipped and inverted, split train / val / test stratified by class and subgroup. A
generalist (MLP 64-128-10, SGD momentum 0.9, lr 0.05, batch 32) trains; at the end of epoch 2 the
``hard`` flag becomes a slice and two fork cards are approved: full-weight and low-rank adapters
(rank 4), each a specialist oversampling the slice at 0.25 and its matched control, ``--budget``
steps. At the end of epoch 3 one merge card per method is proposed and approved, all with
``override`` (every merge is kept so that all are measured; the greedy-soup rule's verdict - kept,
or refused for losing to its best parent on validation - is printed as "rule"):

* on the full-weight specialist and control: linear (uniform soup = SWA average), greedy soup,
  task arithmetic (lambda 1, the fork point as base), TIES and DARE-TIES (density 0.5), Fisher
  (512 samples, empirical), distillation (a student from the control, ``--budget`` steps);
* on the adapter specialist and control: adapter fusion.

Held out: every model on the test split's planted subgroup and on the rest, against the matched
control, with 95 % paired bootstrap intervals (``compare``); and validation accuracy (what the
rule judges on). Nothing is chosen on the test split.

    .venv/bin/python benchmarks/merge.py --part subgroup [--seed 0] [--budget 62] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from onthefly.actions import fork as forking
from onthefly.actions import slices as slicing
from onthefly.actions.compare import compare, evaluate_set
from specialist import BATCH, LR, Split, interval, planted_digits, split

__all__ = ["run"]

WEIGHT_METHODS = (
    ("linear", {}), ("greedy_soup", {}), ("task_arithmetic", {"lambda": 1.0, "normalize": False}),
    ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("fisher", {"fisher_samples": 512}),
)


class Script(onthefly.Callback):
    """Epoch 2: the hard slice and the two fork cards; epoch 3: every merge card, approved (both
    carried out at the next step boundaries, in order)."""

    def __init__(self, budget: int, seed: int) -> None:
        self.budget, self.seed = budget, seed
        self.forks: dict[str, int] = {}
        self.merges: dict[str, int] = {}

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if run.epoch == 2:
            slicing.save_run_slice(run, "hard", {"kind": "flag", "flag": "hard"})
            for trains in ("all", "adapters"):
                card = {"kind": "fork", "name": f"specialist {trains}", "run_id": run.run_id, "slice": "hard",
                        "mix": "oversample", "ratio": 0.25, "lr": LR, "budget": self.budget, "budget_unit": "steps",
                        "seed": self.seed, "trains": trains, "rank": 4}
                self.forks[trains] = forking.propose(run, card)["id"]
                forking.approve(run, self.forks[trains])
        if run.epoch == 3:
            reader = onthefly.open_session(run.session.dir)
            full = reader.plan(self.forks["all"])["runs"]
            adapters = reader.plan(self.forks["adapters"])["runs"]
            cards = [(m, fields, full) for m, fields in WEIGHT_METHODS]
            cards.append(("distill", {"budget": self.budget, "student": full[1]}, full))
            cards.append(("adapter_fusion", {}, adapters))
            for method, fields, parents in cards:
                card = {"kind": "merge", "name": method, "run_id": run.run_id, "method": method, "override": True,
                        "seed": self.seed, "parents": [{"run_id": p} for p in parents], **fields}
                plan_id = forking.propose(run, card)["id"]
                forking.approve(run, plan_id)  # its comparison with the parents is made when it is carried out
                self.merges[method] = plan_id


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-merge-subgroup-"))
    x, labels, planted = planted_digits(args.share, args.seed)
    splits = split(x, labels, planted, args.seed)
    script = Script(args.budget, args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(splits["train"].data, batch_size=BATCH, shuffle=True,
                                generator=torch.Generator().manual_seed(args.seed)),
        val_loader=DataLoader(splits["val"].data, batch_size=256), project="merge-subgroup", run_name="generalist",
        callbacks=(script,), progress=False, device="cpu")
    forking.attach(trainer)
    started = time.perf_counter()
    trainer.fit(5)
    print(f"generalist, 2 forks with controls and {len(script.merges)} merges: {time.perf_counter() - started:.1f} s")
    reader = onthefly.open_session(trainer.run.session.dir)
    full = reader.plan(script.forks["all"])["runs"]
    adapters = reader.plan(script.forks["adapters"])["runs"]
    models: dict[str, nn.Module] = {"control": trainer.forks[full[1]], "specialist": trainer.forks[full[0]],
                                    "adapter spec.": trainer.forks[adapters[0]],
                                    "adapter ctrl": trainer.forks[adapters[1]]}
    rules: dict[str, str] = {}
    for method, plan_id in script.merges.items():
        plan = reader.plan(plan_id)
        if plan["status"] != "done":
            print(f"  {method}: {plan['status']} {plan['error']}")
            continue
        models[method] = trainer.forks[plan["runs"][0]]
        verdict = plan["result"]["verdict"]
        rules[method] = "kept" if verdict["met"] else "refused"
        if method == "greedy_soup":
            rules[method] += f" ({len(plan['result']['recipe']['soup']['ingredients'])} ingr.)"
    report(trainer, models, splits, rules, args.seed)


def report(trainer: Any, models: dict[str, nn.Module], splits: dict[str, Split], rules: dict[str, str],
           seed: int) -> None:
    test = splits["test"]
    sets = {"subgroup": np.flatnonzero(test.planted), "rest": np.flatnonzero(~test.planted)}
    results = {label: {name: evaluate_set(model, test.data, indices, loss=trainer.loss, spec=trainer.spec,
                                          device=trainer.device) for name, indices in sets.items()}
               for label, model in models.items()}
    table = compare(results, "control", seed=seed)
    val = {label: float(evaluate_set(model, splits["val"].data, None, loss=trainer.loss, spec=trainer.spec,
                                     device=trainer.device).correct.mean())  # type: ignore[union-attr]
           for label, model in models.items()}
    cells = {(c["run"], c["set"]): c for c in table["cells"]}
    n_sub, n_rest = cells[("control", "subgroup")]["n"], cells[("control", "rest")]["n"]
    print(f"\nheld-out test: subgroup n={n_sub}, rest n={n_rest}; differences vs the matched control, points, "
          "95 % paired bootstrap")
    print(f"  {'model':<15} {'val %':>6} {'rule':<16} {'subgroup %':>10} {'vs control':<22} {'rest %':>7} "
          f"{'vs control':<22}")
    for label in models:
        sub, rest = cells[(label, "subgroup")], cells[(label, "rest")]
        print(f"  {label:<15} {val[label] * 100:6.1f} {rules.get(label, ''):<16} {sub['accuracy'] * 100:10.1f} "
              f"{interval(sub.get('diff')) if 'diff' in sub else '(reference)':<22} {rest['accuracy'] * 100:7.1f} "
              f"{interval(rest.get('diff')) if 'diff' in rest else '(reference)':<22}")
