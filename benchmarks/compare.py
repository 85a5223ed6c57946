"""Compare experts at scale: 4 models on 5 sets of 60,000 samples, on the CPU.

Synthetic data: 5 sets of 60,000 x 64 features, labels from a fixed random linear teacher over
10 classes. Four MLPs (64-128-10) trained for different numbers of steps, so they differ. Each set
is evaluated as a ``Subset`` over a shuffled permutation of its samples (what forks and slices
pass), batch 1024. Timed separately: the 20 ``evaluate_set`` calls, and one ``compare`` call
(3 runs against the reference on 5 sets, accuracy and loss intervals, 2000 paired resamples, McNemar).
Training is not timed.

    .venv/bin/python benchmarks/compare.py [--samples 60000] [--sets 5] [--models 4] [--n-boot 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from onthefly.actions.compare import PerSample, compare, evaluate_set
from onthefly.engine.batch import BatchSpec
from onthefly.signals.per_sample import PerSampleLoss

FEATURES, CLASSES = 64, 10


def make_set(samples: int, teacher: torch.Tensor, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(samples, CLASSES, generator=gen)).argmax(dim=1)
    return TensorDataset(x, y)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, CLASSES))


def train(model: nn.Module, data: TensorDataset, steps: int, batch: int = 256) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data.tensors
    for step in range(steps):
        rows = slice((step * batch) % (len(y) - batch), (step * batch) % (len(y) - batch) + batch)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(123))
    sets = {f"set{i}": make_set(args.samples, teacher, seed=i) for i in range(args.sets)}
    orders = {name: np.random.default_rng(i).permutation(args.samples) for i, name in enumerate(sets)}
    models = {}
    for i in range(args.models):
        model = make_model(seed=i)
        train(model, sets["set0"], steps=50 * (i + 1))
        models[f"model{i}"] = model

    loss, spec, cpu = PerSampleLoss(nn.CrossEntropyLoss()), BatchSpec(None, None, None), torch.device("cpu")
    start = time.perf_counter()
    results: dict[str, dict[str, PerSample]] = {
        run: {name: evaluate_set(model, data, orders[name], loss=loss, spec=spec, device=cpu, batch_size=1024)
              for name, data in sets.items()}
        for run, model in models.items()}
    evaluation = time.perf_counter() - start

    start = time.perf_counter()
    result = compare(results, "model0", n_boot=args.n_boot)
    statistics = time.perf_counter() - start

    for c in result["cells"]:
        if c["run"] != "model0" and c["set"] == "set1":
            acc = c["diff"]["accuracy"]
            print(f"{c['run']} - model0 on set1: accuracy {acc['value']:+.4f} "
                  f"[{acc['low']:+.4f}, {acc['high']:+.4f}], McNemar p = {c['mcnemar']['p']:.3g}")
    pairs = args.models * args.sets
    print(f"evaluation: {evaluation:.2f} s for {pairs} (model, set) pairs of {args.samples} samples "
          f"({evaluation / pairs:.3f} s each)")
    print(f"statistics: {statistics:.2f} s for {(args.models - 1) * args.sets} paired comparisons, "
          f"{args.n_boot} resamples each")


if __name__ == "__main__":
    main()
