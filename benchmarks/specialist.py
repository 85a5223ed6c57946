"""Does forking a specialist work? A planted hard subgroup, found from the hard-sample view, forked.

Data: the 1,797 digits bundled with scikit-learn (no download), 8x8 pixels scaled to [0, 1]. A
rare regime is planted: ``--share`` (8 %) of the samples of every class are flipped left-right
and inverted (``1 - x``), so the generalist has to learn them separately. Stratified, seeded split
(by class and subgroup) into train / val / test (55 / 15 / 30 %: the test split is the larger so
that its subgroup has enough samples for an interval); every split keeps its "in subgroup" mask.

1. **Generalist**: an MLP 64-128-10, SGD (momentum 0.9) lr 0.05, batch 32, ``--epochs`` epochs
   through ``onthefly.Trainer`` on the CPU (no dashboard, no progress bar).
2. **Slice** at the end of its last epoch, as a user would make it: the ``hard`` flag of that
   epoch (loss at or above its p90), not the planted mask. Printed: how much of the slice is the
   planted subgroup (precision) and how much of the subgroup it caught (recall).
3. **Forks** from plan cards, proposed and approved in the same ``on_epoch_end`` (as
   tests/test_fork.py does) and carried out at the next step boundary: for each setting, a
   specialist and its matched control (all data, same seed, lr and budget). The budget is in
   steps, so that a slice-only specialist trains as many steps as its control (a budget in
   epochs would give it epochs of the slice's size). The settings are fixed here beforehand and
   all of them are printed; none was chosen on the test split.
4. **Held out**: generalist, control and specialist evaluated on the test split's planted
   subgroup and on the rest of it (``evaluate_set``), each against the control with 95 % paired
   bootstrap intervals and McNemar's p (``compare``; b: right for the control only, c: the
   reverse). Then the card's own verdict, which the fork judges on the train slice (samples the
   specialist trained on: in-sample), the rest of train, and val.
5. **Latency**: approving the card to the fork starting (``plan_started``), to the specialist's
   first epoch starting (``epoch_started``: its first step follows) and to its first ``progress``
   event (the first flush of its per-sample values: 1 s after the child run was made, or at the
   end of its first epoch if that comes sooner), the card's ``first_step_seconds`` and the fork's total ``seconds``
   (both children and the judging). Comparing 4 runs on 5 sets of 60k samples is timed by
   benchmarks/compare.py, not here.

    .venv/bin/python benchmarks/specialist.py [--seed 0] [--epochs 3] [--budget 62] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from onthefly.actions import fork as forking
from onthefly.actions import slices as slicing
from onthefly.actions.compare import compare, evaluate_set

BATCH = 32
LR = 0.05


@dataclass(frozen=True)
class Setting:
    """One fork card's data and optimisation; the budget (steps) and seed come from the command line."""

    name: str
    mix: str  # "oversample" or "slice"
    ratio: float = 0.5
    lr: float = LR


SETTINGS = (
    Setting("oversample 0.5", "oversample", ratio=0.5),
    Setting("oversample 0.25", "oversample", ratio=0.25),
    Setting("slice only", "slice"),
    Setting("slice only lr 0.01", "slice", lr=0.01),
)


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class Split:
    data: TensorDataset
    planted: np.ndarray  # bool, one per sample of the split: in the planted subgroup


def planted_digits(share: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x [n, 64] float32 in [0, 1], labels, planted mask): ``share`` of every class flipped
    left-right and inverted."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images / 16.0
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    planted = np.zeros(labels.size, dtype=bool)
    for label in range(10):
        members = np.flatnonzero(labels == label)
        planted[rng.choice(members, size=round(share * members.size), replace=False)] = True
    images[planted] = 1.0 - images[planted][:, :, ::-1]
    return images.reshape(-1, 64).astype(np.float32), labels, planted


def split(x: np.ndarray, labels: np.ndarray, planted: np.ndarray, seed: int) -> dict[str, Split]:
    """Train / val / test, 55 / 15 / 30 %, stratified by class and subgroup."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(labels.size)
    strata = labels * 2 + planted
    train, held = train_test_split(everything, test_size=0.45, stratify=strata, random_state=seed)
    val, test = train_test_split(held, test_size=30 / 45, stratify=strata[held], random_state=seed)
    return {name: Split(TensorDataset(torch.from_numpy(x[part]), torch.from_numpy(labels[part])), planted[part])
            for name, part in (("train", train), ("val", val), ("test", test))}


# ---- the fork, from a callback ------------------------------------------------------------------
class ForkAtEnd(onthefly.Callback):
    """At the end of epoch ``epoch``: the ``hard`` flag saved as a slice, one fork card per setting
    proposed and approved. Also records when the fork's events happen: its bus subscribers run on
    the thread that publishes (training or transfer thread) and only store a time."""

    def __init__(self, epoch: int, settings: tuple[Setting, ...], budget: int, seed: int) -> None:
        self.epoch, self.settings, self.budget, self.seed = epoch, settings, budget, seed
        self.slice_indices: np.ndarray | None = None
        self.plans: dict[str, int] = {}  # setting name -> plan id
        self.approved: dict[int, float] = {}  # plan id -> time.time() when approved
        self.started: dict[int, float] = {}  # plan id -> its plan_started event's time
        self.child_events: dict[tuple[str, str], float] = {}  # (child run name, event kind) -> first time

    def on_fit_start(self, run: onthefly.Run) -> None:
        run.bus.subscribe(self._parent_event)

    def on_epoch_end(self, run: onthefly.Run) -> None:
        if run.epoch != self.epoch:
            return
        record = slicing.save_slice(run.session, "hard", run.run_id, {"kind": "flag", "flag": "hard"})
        reader = onthefly.open_session(run.session.dir)
        self.slice_indices = np.asarray(reader.slice_indices(reader.slice(record["name"])), dtype=np.int64)
        for setting in self.settings:
            card = {"kind": "fork", "name": setting.name, "run_id": run.run_id, "slice": "hard",
                    "mix": setting.mix, "ratio": setting.ratio, "lr": setting.lr, "budget": self.budget,
                    "budget_unit": "steps", "seed": self.seed}
            plan_id = forking.propose(run, card)["id"]
            self.approved[plan_id] = time.time()  # event times are time.time() too
            forking.approve(run, plan_id)  # carried out at the next step boundary (here: after this epoch)
            self.plans[setting.name] = plan_id

    def _parent_event(self, event: Any) -> None:
        if event.kind == "plan_started":
            self.started[int(event.payload["plan_id"])] = event.time

    def watch_child(self, child: onthefly.Run) -> None:
        """``attach``'s ``on_child``: told of each child run before it trains."""
        def on_event(event: Any) -> None:
            if event.kind in ("epoch_started", "progress") and event.run_id == child.run_id:
                self.child_events.setdefault((child.name, event.kind), event.time)

        child.bus.subscribe(on_event)


def make_trainer(splits: dict[str, Split], seed: int, forker: ForkAtEnd) -> onthefly.Trainer:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    trainer = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
        loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(splits["train"].data, batch_size=BATCH, shuffle=True,
                                generator=torch.Generator().manual_seed(seed)),
        val_loader=DataLoader(splits["val"].data, batch_size=256), project="specialist", run_name="generalist",
        callbacks=(forker,), progress=False, device="cpu")
    forking.attach(trainer, on_child=forker.watch_child)
    return trainer


# ---- held-out comparison ------------------------------------------------------------------------
def held_out(trainer: Any, models: dict[str, nn.Module], test: Split, seed: int) -> dict[str, Any]:
    """Paired comparison against "control" on the test split's planted subgroup and its rest."""
    sets = {"test subgroup": np.flatnonzero(test.planted), "test rest": np.flatnonzero(~test.planted)}
    results = {label: {name: evaluate_set(model, test.data, indices, loss=trainer.loss, spec=trainer.spec,
                                          device=trainer.device)
                       for name, indices in sets.items()}
               for label, model in models.items()}
    return compare(results, "control", seed=seed)


def interval(diff: dict[str, Any] | None) -> str:
    accuracy = (diff or {}).get("accuracy")
    if accuracy is None:
        return "-"
    if accuracy["low"] is None:
        return f"{accuracy['value'] * 100:+.1f} (n too small)"
    return f"{accuracy['value'] * 100:+5.1f} [{accuracy['low'] * 100:+5.1f}, {accuracy['high'] * 100:+5.1f}]"


def print_table(table: dict[str, Any]) -> None:
    print(f"  {'model':<11} {'set':<14} {'n':>4} {'acc %':>6}  {'vs control, pt [95% CI]':<26} McNemar p (b/c)")
    for cell in table["cells"]:
        p = cell.get("mcnemar", {}) or {}
        p_text = f"{p['p']:.3g} ({p['b']}/{p['c']})" if p else ""
        print(f"  {cell['run']:<11} {cell['set']:<14} {cell['n']:>4} {cell['accuracy'] * 100:6.1f}  "
              f"{interval(cell.get('diff')) if 'diff' in cell else '(reference)':<26} {p_text:>9}")


def ms_between(start: float | None, end: float | None) -> str:
    return "-" if start is None or end is None else f"{(end - start) * 1000:.0f} ms"


def report(setting: Setting, plan: dict[str, Any], trainer: onthefly.Trainer, forker: ForkAtEnd, test: Split,
           seed: int, queued_behind: int) -> dict[str, Any]:
    """Print one card's held-out table, its own verdict and its latencies; returns the table."""
    result = plan["result"]
    specialist, control = result["runs"]
    # The fork is at the parent's last epoch end, so the parent's final weights are the fork point's.
    models = {"generalist": trainer.model, "control": trainer.forks[control], "specialist": trainer.forks[specialist]}
    table = held_out(trainer, models, test, seed)
    print("  held out, test split:")
    print_table(table)
    verdict = result["verdict"]
    cells = {(c["run"], c["set"]): c for c in result["comparison"]["cells"]}
    print(f"  card verdict (specialist vs {result['reference']}, min slice gain "
          f"{verdict['criterion']['min_slice_gain_pt']} pt, max other drop {verdict['criterion']['max_other_drop_pt']}"
          f" pt): met={verdict['met']}")
    print("    " + "; ".join(f"{name} {interval(cells[('specialist', name)].get('diff'))}"
                             for name in result["comparison"]["sets"])
          + "   (slice and rest: train samples, which both children trained on)")
    plan_start = forker.started.get(plan["id"])
    queue = f", queued behind {queued_behind} card(s)" if queued_behind else ""
    print(f"  latency: approve -> plan_started {ms_between(forker.approved[plan['id']], plan_start)}{queue}; "
          f"plan_started -> specialist's first epoch "
          f"{ms_between(plan_start, forker.child_events.get((setting.name, 'epoch_started')))}, "
          f"-> its first progress event {ms_between(plan_start, forker.child_events.get((setting.name, 'progress')))}"
          f"; card first_step_seconds {result['first_step_seconds'] * 1000:.0f} ms; "
          f"fork total {result['seconds']:.2f} s")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="planting, split, model, data order, forks, bootstrap")
    parser.add_argument("--share", type=float, default=0.08, help="share of every class planted")
    parser.add_argument("--epochs", type=int, default=3, help="the generalist's epochs (the fork is at the last)")
    parser.add_argument("--budget", type=int, default=62, help="each fork's steps (62 ~ 2 epochs of the train split)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ONTHEFLY_DASHBOARD", "0")
    os.environ["ONTHEFLY_HOME"] = tempfile.mkdtemp(prefix="otf-specialist-")

    x, labels, planted = planted_digits(args.share, args.seed)
    splits = split(x, labels, planted, args.seed)
    print(f"digits: {labels.size} samples, {planted.sum()} planted (flipped + inverted); "
          + ", ".join(f"{name} {len(s.planted)} ({s.planted.sum()} planted)" for name, s in splits.items()))

    forker = ForkAtEnd(args.epochs - 1, SETTINGS, args.budget, args.seed)
    trainer = make_trainer(splits, args.seed, forker)
    started = time.perf_counter()
    trainer.fit(args.epochs)
    print(f"generalist ({args.epochs} epochs) + {len(SETTINGS)} forks x 2 children: "
          f"{time.perf_counter() - started:.1f} s")

    # The slice against the planted mask (the train dataset's indices are positions in the train split).
    truth = splits["train"].planted
    chosen = np.zeros(truth.size, dtype=bool)
    chosen[forker.slice_indices] = True
    hits = int((chosen & truth).sum())
    print(f"slice 'hard' (the flag at epoch {args.epochs - 1}): {chosen.sum()} train samples, {hits} planted: "
          f"precision {hits / max(1, chosen.sum()):.2f}, recall {hits / max(1, truth.sum()):.2f} "
          f"(of {truth.sum()} planted in train)")

    reader = onthefly.open_session(trainer.run.session.dir)
    summary: list[tuple[str, str, str, str, str]] = []
    for position, setting in enumerate(SETTINGS):
        plan = reader.plan(forker.plans[setting.name])
        ratio = f", ratio={setting.ratio}" if setting.mix == "oversample" else ""
        print(f"\n== {setting.name}: mix={setting.mix}{ratio}, lr={setting.lr}, {args.budget} steps, "
              f"seed {args.seed}; card {plan['id']} {plan['status']}")
        if plan["status"] != "done":
            print(f"  failed: {plan['error']}")
            continue
        table = report(setting, plan, trainer, forker, splits["test"], args.seed, position)
        cells = {(c["run"], c["set"]): c for c in table["cells"]}
        verdict = plan["result"]["verdict"]
        summary.append((setting.name, interval(cells[("specialist", "test subgroup")]["diff"]),
                        interval(cells[("specialist", "test rest")]["diff"]), str(verdict["met"]),
                        f"{verdict['slice_gain_pt']:+.1f} / " + " / ".join(
                            f"{v:+.1f}" for v in verdict["other_change_pt"].values())))

    print("\nspecialist - control, accuracy pt [95% paired bootstrap]:")
    print(f"  {'setting':<20} {'test subgroup':<24} {'test rest':<24} {'card met':<9} card slice / rest / val")
    for row in summary:
        print(f"  {row[0]:<20} {row[1]:<24} {row[2]:<24} {row[3]:<9} {row[4]}")
    print("comparing 4 runs on 5 sets of 60k samples: see benchmarks/compare.py")


if __name__ == "__main__":
    main()
