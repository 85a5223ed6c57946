"""Does the mixture beat a monolith given the same compute? Planted regimes, the whole method.

Two datasets, each with a rare regime a generalist handles badly (no download):

* **digits**: scikit-learn's 1,797 digits, ``--share`` (8 %) of every class flipped left-right and
  inverted (benchmarks/specialist.py's planted subgroup), split train / val / test 55 / 15 / 30 %
  stratified by class and subgroup; MLP 64-128-10, SGD momentum 0.9, lr 0.05, batch 32.
* **two tasks**: 8 Gaussian features; the first one's sign says the task; in the common task
  (75 %) the label is the argmax of features 1-3, in the rare one the argmin (the opposite rule);
  4,000 / 1,000 / 2,000 samples; MLP 8-32-3, SGD lr 0.1, batch 32.

The method as a user runs it, from plan cards carried out by the live run: the generalist trains
``--epochs``; at the end of its third epoch the ``hard`` flag (loss at or above p90, not the
planted mask) becomes a slice and a fork card forks a specialist oversampling it (ratio 0.5,
``--budget`` steps) and its matched control; after the next epoch a gate card (linear gate on the
inputs, top-1, load balancing 0.01, 300 steps on validation) makes the mixture of generalist and
specialist, and a benchmark card gives the monolith the FLOPs the specialist, its control and the
gate cost, from the same checkpoint. Printed: the compute, then every entrant on the test split,
its planted subgroup and the rest, against the mixture with 95 % paired bootstrap intervals, and
inference FLOPs and latency per sample. Nothing is chosen on the test split.

    .venv/bin/python benchmarks/moe.py [--data digits|tasks|both] [--seed 0] [--budget 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from onthefly.actions import fork as forking
from onthefly.actions import slices as slicing
from onthefly.actions.compare import compare, evaluate_set
from specialist import Split, interval, planted_digits, split


class Script(onthefly.Callback):
    def __init__(self, budget: int, seed: int) -> None:
        self.budget, self.seed = budget, seed
        self.plans: dict[str, int] = {}

    def on_epoch_end(self, run: onthefly.Run) -> None:
        reader = onthefly.open_session(run.session.dir)
        if run.epoch == 2:
            slicing.save_run_slice(run, "hard", {"kind": "flag", "flag": "hard"})
            card = {"kind": "fork", "name": "specialist", "run_id": run.run_id, "slice": "hard", "mix": "oversample",
                    "ratio": 0.5, "lr": run.config.get("lr", 0.05), "budget": self.budget, "budget_unit": "steps",
                    "seed": self.seed}
            self.plans["fork"] = forking.propose(run, card)["id"]
            forking.approve(run, self.plans["fork"])
        elif run.epoch == 3:
            specialist = reader.plan(self.plans["fork"])["runs"][0]
            card = {"kind": "gate", "name": "mixture", "run_id": run.run_id, "seed": self.seed,
                    "experts": [{"run_id": run.run_id}, {"run_id": specialist}]}
            self.plans["gate"] = forking.propose(run, card)["id"]
            forking.approve(run, self.plans["gate"])
        elif run.epoch == 4:
            mixture = reader.plan(self.plans["gate"])["runs"][0]
            card = {"kind": "benchmark", "run_id": run.run_id, "mixture": mixture, "seed": self.seed}
            self.plans["benchmark"] = forking.propose(run, card)["id"]
            forking.approve(run, self.plans["benchmark"])


def two_tasks(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, 8)).astype(np.float32)
    rare = g.random(n) < 0.25
    x[:, 0] = np.where(rare, -np.abs(x[:, 0]) - 0.5, np.abs(x[:, 0]) + 0.5)
    y = np.where(rare, x[:, 1:4].argmin(1), x[:, 1:4].argmax(1)).astype(np.int64)
    return x, y, rare


def datasets(name: str, seed: int) -> tuple[dict[str, Split], nn.Module, float]:
    torch.manual_seed(seed)
    if name == "digits":
        x, labels, planted = planted_digits(0.08, seed)
        return split(x, labels, planted, seed), nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), 0.05
    parts = {}
    for part, (n, offset) in {"train": (4000, 0), "val": (1000, 1), "test": (2000, 2)}.items():
        x, y, rare = two_tasks(n, seed * 10 + offset)
        parts[part] = Split(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), rare)
    return parts, nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)), 0.1


def run_one(name: str, args: argparse.Namespace) -> None:
    splits, model, lr = datasets(name, args.seed)
    script = Script(args.budget, args.seed)
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if name == "digits" else 0.0),
        loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(splits["train"].data, batch_size=32, shuffle=True,
                                generator=torch.Generator().manual_seed(args.seed)),
        val_loader=DataLoader(splits["val"].data, batch_size=256),
        test_loader=DataLoader(splits["test"].data, batch_size=256), project=f"moe-{name}", run_name="generalist",
        callbacks=(script,), progress=False, device="cpu")
    trainer.run.config["lr"] = lr
    forking.attach(trainer)
    started = time.perf_counter()
    trainer.fit(6)
    seconds = time.perf_counter() - started
    reader = onthefly.open_session(trainer.run.session.dir)
    for kind, plan_id in script.plans.items():
        plan = reader.plan(plan_id)
        if plan["status"] != "done":
            raise SystemExit(f"{name}: the {kind} card is {plan['status']}: {plan['error']}")
    gate = reader.plan(script.plans["gate"])["result"]
    bench = reader.plan(script.plans["benchmark"])
    report = bench["result"]["report"]
    print(f"\n== {name}: generalist, fork + control, gate, benchmark in {seconds:.1f} s ==")
    shares = gate["utilisation"]["sets"]["held-out"]["shares"]
    print(f"gate: routes {shares[1] * 100:.1f}% of validation to the specialist; "
          f"warnings: {[w['text'] for w in gate['utilisation']['warnings']] or 'none'}")
    compute = report["compute"]
    print(f"compute beyond the generalist ({compute['generalist_flops']:.3g} FLOPs to its checkpoint): "
          f"{compute['budget_flops']:.3g} FLOPs = the monolith's {compute['monolith_steps']} steps")
    for item in compute["items"]:
        print(f"  {item['what']:<38} {item['samples']:>9,} samples {item['flops']:>10.3g} FLOPs")
    print(f"  counted as zero FLOPs: {', '.join(compute['zero_flop_ops'])}")
    entrants = trainer.benchmarked[script.plans["benchmark"]]  # type: ignore[attr-defined]
    test = splits["test"]
    sets = {"test": None, "subgroup": np.flatnonzero(test.planted), "rest": np.flatnonzero(~test.planted)}
    results = {label: {s: evaluate_set(m, test.data, idx, loss=trainer.loss, spec=trainer.spec,
                                       device=trainer.device) for s, idx in sets.items()}
               for label, m in entrants.items()}
    table = compare(results, "mixture", seed=args.seed)
    cells = {(c["run"], c["set"]): c for c in table["cells"]}
    print(f"held-out test (n={cells[('mixture', 'test')]['n']}, planted subgroup "
          f"n={cells[('mixture', 'subgroup')]['n']}); differences vs the mixture, points, 95% paired bootstrap")
    print(f"  {'entrant':<11} {'test %':>7} {'vs mixture':<22} {'subgroup %':>10} {'vs mixture':<22} "
          f"{'rest %':>7} {'vs mixture':<22} {'FLOPs/sample':>12} {'µs/sample':>9}")
    for label in entrants:
        row = [f"  {label:<11}"]
        for s in sets:
            c = cells[(label, s)]
            row.append(f"{c['accuracy'] * 100:{7 if s != 'subgroup' else 10}.1f} "
                       f"{interval(c.get('diff')) if 'diff' in c else '(reference)':<22}")
        inference = report["inference"][label]
        row.append(f"{inference['flops_per_sample']:>12,.0f} {inference['latency_ms_per_sample'] * 1000:>9.2f}")
        print(" ".join(row))
    print(f"merge baseline: {report['merge']['method']} (tried {report['merge']['tried']} on validation)")
    print(report["summary"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("digits", "tasks", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=100, help="the fork's steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-moe-"))
    for name in (("digits", "tasks") if args.data == "both" else (args.data,)):
        run_one(name, args)


if __name__ == "__main__":
    main()
