"""Weight-space merges of 4 checkpoints of a ~100M-parameter model: speed and peak memory
(``--part speed``); and which merges help on a planted hard subgroup (``--part subgroup``,
benchmarks/merge_subgroup.py).

Writes a base, 4 parents and 4 Fishers as safetensors files in a temporary folder (float32:
24 tensors of 2048 x 2048, their 2048-long biases and one int64 counter, 100.7M parameters,
403 MB a file; ``--small``: 640 x 640, 9.8M parameters). Then, for each weight-space method
(linear uniform and weighted, task_arithmetic, ties, dare_linear, dare_ties, fisher_weighted),
it measures ours (``onthefly.actions.merging``, parents streamed from the files through
``FileWeights``) against a plain loop computing the same thing (``safetensors.torch.load_file``
every file, then a loop over the keys with torch ops). Every measurement runs in a fresh child
process, so its peak memory is its own: the child's peak RSS (``VmHWM``; ``ru_maxrss`` where
there is no /proc, though it also counts the forking parent) less that of a bare child (torch
and the merging module imported, nothing merged). Each pair runs ``--repeats``
times, the order alternating, and the best of each is kept.

Targets: time ours / plain <= 1.2; peak ours <= 2 x one model + 4 x the largest tensor (the
output, one tensor per parent, room for the temporaries). The plain loop's peak includes the
pages of every file it read: load_file's tensors are views of memory maps.

    .venv/bin/python benchmarks/merge.py [--small] [--repeats 2] [--threads 1] [--part speed]
    .venv/bin/python benchmarks/merge.py --part subgroup [--seed 0] [--budget 62]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from onthefly.actions import merging
from onthefly.actions.model_weights import FileWeights

PARENTS = 4
WEIGHTS = [0.4, 0.3, 0.2, 0.1]
DENSITY = 0.5
FLOOR = 1e-8
TIME_TARGET = 1.2

Merged = dict[str, torch.Tensor]


# --- the checkpoints ------------------------------------------------------------------------


def write_checkpoints(folder: Path, width: int, layers: int = 24) -> tuple[int, int]:
    """base, parent0..3, fisher0..3 as safetensors; returns (a model's bytes, its largest
    tensor's bytes)."""
    gen = torch.Generator().manual_seed(0)
    base = {}
    for i in range(layers):
        base[f"layers.{i}.weight"] = torch.randn(width, width, generator=gen) / width**0.5
        base[f"layers.{i}.bias"] = torch.randn(width, generator=gen) / width**0.5
    base["steps"] = torch.tensor(0)
    save_file(base, folder / "base.safetensors")
    for p in range(PARENTS):
        parent = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                  else torch.tensor(1000 + p) for k, v in base.items()}
        save_file(parent, folder / f"parent{p}.safetensors")
        del parent
        fisher = {k: torch.rand(v.shape, generator=gen) for k, v in base.items()
                  if v.is_floating_point()}
        save_file(fisher, folder / f"fisher{p}.safetensors")
        del fisher
    sizes = [v.numel() * v.element_size() for v in base.values()]
    return sum(sizes), max(sizes)


def files(folder: Path, prefix: str) -> list[Path]:
    return [folder / f"{prefix}{i}.safetensors" for i in range(PARENTS)]


# --- ours: streamed from the files ----------------------------------------------------------


def ours(method: str, folder: Path) -> Merged:
    with ExitStack() as stack:
        parents = [stack.enter_context(FileWeights(p)) for p in files(folder, "parent")]
        base = stack.enter_context(FileWeights(folder / "base.safetensors"))
        if method == "linear uniform":
            return merging.linear(parents)
        if method == "linear weighted":
            return merging.linear(parents, WEIGHTS)
        if method == "task_arithmetic":
            return merging.task_arithmetic(base, parents, WEIGHTS)
        if method == "ties":
            return merging.ties(base, parents, WEIGHTS, density=DENSITY)
        if method == "dare_linear":
            return merging.dare_linear(base, parents, WEIGHTS, density=DENSITY)
        if method == "dare_ties":
            return merging.dare_ties(base, parents, WEIGHTS, density=DENSITY)
        fishers = [stack.enter_context(FileWeights(p)) for p in files(folder, "fisher")]
        return merging.fisher_weighted(parents, fishers, WEIGHTS, floor=FLOOR)


# --- the plain loop: every file loaded, then torch ops key by key ---------------------------


def keep_largest(tv: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(tv).flatten()
    mask[tv.abs().flatten().topk(int(DENSITY * tv.numel())).indices] = 1
    return tv * mask.view_as(tv)


def drop_and_rescale(tv: torch.Tensor) -> torch.Tensor:
    return tv * torch.bernoulli(torch.full_like(tv, DENSITY)) / DENSITY


def elect_and_merge(tvs: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(tvs)
    agree = stacked.sign() == torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    weighted = stacked * torch.tensor(WEIGHTS).view(-1, *[1] * tvs[0].dim())
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def weighted_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum(w * t for w, t in zip(WEIGHTS, tensors, strict=True))  # type: ignore[return-value]


PLAIN: dict[str, Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor]], torch.Tensor]] = {
    "linear uniform": lambda ps, b, fs: sum(ps) / len(ps),  # type: ignore[dict-item]
    "linear weighted": lambda ps, b, fs: weighted_sum(ps) / sum(WEIGHTS),
    "task_arithmetic": lambda ps, b, fs: b + weighted_sum([p - b for p in ps]),
    "ties": lambda ps, b, fs: b + elect_and_merge([keep_largest(p - b) for p in ps]),
    "dare_linear": lambda ps, b, fs: b + weighted_sum([drop_and_rescale(p - b) for p in ps]),
    "dare_ties": lambda ps, b, fs: b + elect_and_merge([drop_and_rescale(p - b) for p in ps]),
    "fisher_weighted": lambda ps, b, fs: (
        weighted_sum([f.clamp(min=FLOOR) * p for f, p in zip(fs, ps, strict=True)])
        / weighted_sum([f.clamp(min=FLOOR) for f in fs])),
}
METHODS = list(PLAIN)


def plain(method: str, folder: Path) -> Merged:
    torch.manual_seed(0)
    parents = [load_file(p) for p in files(folder, "parent")]
    base = load_file(folder / "base.safetensors")
    fishers = [load_file(p) for p in files(folder, "fisher")] if method == "fisher_weighted" else []
    out = {}
    for key, first in parents[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        ps = [p[key] for p in parents]
        if fishers and key not in fishers[0]:
            out[key] = weighted_sum(ps) / sum(WEIGHTS)
        else:
            out[key] = PLAIN[method](ps, base[key], [f[key] for f in fishers])
    return out


# --- one measurement per child process ------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    start = time.perf_counter()
    if args.impl != "bare":
        merged = (ours if args.impl == "ours" else plain)(args.child, folder)
        assert merged, "the merge returned no tensors"
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_kib": peak_rss_kib()}))


def peak_rss_kib() -> int:
    """This process's peak resident memory. On Linux, VmHWM: ru_maxrss also counts the memory
    of the parent that forked this child (the kernel carries it across exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def measure(method: str, impl: str, folder: Path, threads: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", method, "--impl", impl,
                           "--folder", str(folder), "--threads", str(threads)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def speed(args: argparse.Namespace) -> None:
    width = 640 if args.small else 2048
    scratch = Path(tempfile.mkdtemp(prefix="otf-bench-merge-"))
    try:
        model_bytes, largest = write_checkpoints(scratch, width)
        bound_mib = (2 * model_bytes + PARENTS * largest) / 2**20
        print(f"model: {model_bytes / 4e6:.1f}M float32 parameters, "
              f"{model_bytes / 2**20:.0f} MiB a file; largest tensor {largest / 2**20:.0f} MiB; "
              f"{args.threads} thread(s)")
        bare = min(measure("bare", "bare", scratch, args.threads)["peak_kib"] for _ in range(2))
        best: dict[tuple[str, str], dict[str, float]] = {}
        for round_ in range(args.repeats):
            for method in args.methods:
                order = ("ours", "plain") if round_ % 2 == 0 else ("plain", "ours")
                for impl in order:
                    result = measure(method, impl, scratch, args.threads)
                    seen = best.setdefault((method, impl), result)
                    seen["seconds"] = min(seen["seconds"], result["seconds"])
                    seen["peak_kib"] = min(seen["peak_kib"], result["peak_kib"])
        print(f"{'method':<16} {'ours s':>7} {'plain s':>7} {'ratio':>6} {'ours MiB':>9} "
              f"{'plain MiB':>9} {'bound MiB':>9}  time<={TIME_TARGET}  memory<=bound")
        for method in args.methods:
            ours_run, plain_run = best[(method, "ours")], best[(method, "plain")]
            ratio = ours_run["seconds"] / plain_run["seconds"]
            ours_mib = (ours_run["peak_kib"] - bare) / 1024
            plain_mib = (plain_run["peak_kib"] - bare) / 1024
            print(f"{method:<16} {ours_run['seconds']:>7.2f} {plain_run['seconds']:>7.2f} "
                  f"{ratio:>6.2f} {ours_mib:>9.0f} {plain_mib:>9.0f} {bound_mib:>9.0f}  "
                  f"{'yes' if ratio <= TIME_TARGET else 'NO':<9} "
                  f"{'yes' if ours_mib <= bound_mib else 'NO'}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def subgroup(args: argparse.Namespace) -> None:
    import merge_subgroup  # this folder is on sys.path when the script runs

    torch.set_num_threads(args.threads)
    merge_subgroup.run(args)


PARTS: dict[str, Callable[[argparse.Namespace], None]] = {"speed": speed, "subgroup": subgroup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), default="speed",
                        help="what to measure (one entry of PARTS per part)")
    parser.add_argument("--small", action="store_true",
                        help="a ~10M-parameter model, for a quick run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, metavar="METHOD",
                        help=f"a subset of: {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0, help="subgroup: the data split's and the cards' seed")
    parser.add_argument("--budget", type=int, default=62, help="subgroup: steps of every fork and the distillation")
    parser.add_argument("--share", type=float, default=0.08, help="subgroup: share of every class planted")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "plain", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        PARTS[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
