"""Training-time overhead of the Lightning callback against the same Lightning run without it.

An MLP (784-512-256-10) on 20k synthetic samples, batch 64, one torch thread (a step takes a few
ms), trained on the CPU by two ``lightning.Trainer`` fits at once: one plain, one with
``OnTheFlyCallback``. The LightningModule is the same in both: its ``training_step`` returns
``{"loss", "per_sample_loss", "logits"}`` (the documented change, with margins and predictions);
``--returns per_sample`` leaves the logits out, ``--returns plain`` returns the mean loss only.

On a shared machine whose speed drifts by tens of percent from one second to the next, whole
fits one after another cannot resolve a few percent (plain against plain read 0.92-1.06 here).
So the two fits run in two threads that hand the CPU to each other every ``--block`` steps (about
a second): only one trains at a time, and neighbouring blocks see the same machine. A block of
the callback's fit counts the time until the engine's threads have passed on and written what it
produced (``run.recorder.wait_idle()``, ``run.session.flush()``), so none of its work spills into
a plain block - an upper bound. Each callback block is compared with the mean of the plain blocks
before and after it; the median ratio is printed last, ``ratio: X.XXX`` (target: at most 1.03).
The same is first done for plain against plain (a second, identical fit): the noise floor. The
allocator is pinned as in overhead.py. Closing the run (flush, final checkpoint) happens once,
after training, and is printed apart.

    .venv/bin/python benchmarks/integrations.py [--blocks 20] [--block 128] [--samples 20000]
                                                [--batch 64] [--returns logits|per_sample|plain]
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from overhead import make_data, make_model, pin_allocator


class Turns:
    """Two fits take turns: ``wait(i)`` blocks until it is fit i's turn, ``hand_over(i)`` gives
    the turn to the other fit (or keeps it, once the other has finished)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._turn = 0
        self._done = [False, False]
        self.both_set_up = threading.Barrier(2)  # neither times a block while the other still sets up

    def wait(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == i or self._done[1 - i])

    def hand_over(self, i: int) -> None:
        with self._cond:
            self._turn = 1 - i
            self._cond.notify_all()

    def finish(self, i: int) -> None:
        with self._cond:
            self._done[i] = True
            self._turn = 1 - i
            self._cond.notify_all()


def fit(i: int, turns: Turns, data: TensorDataset, args: argparse.Namespace, with_callback: bool,
        blocks: list[float], drains: list[float], ended: list[float]) -> None:
    """Fit ``i`` (run in its own thread): trains in blocks of ``args.block`` steps when it is its
    turn, and appends each block's seconds to ``blocks`` (of which waiting for the engine's
    threads at its end: ``drains``)."""
    import lightning as L

    from onthefly.integrations.lightning import OnTheFlyCallback

    returns = args.returns

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            logits = self.net(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            if returns == "plain":
                return losses.mean()
            if returns == "per_sample":
                return {"loss": losses.mean(), "per_sample_loss": losses}
            return {"loss": losses.mean(), "per_sample_loss": losses, "logits": logits}

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    otf = OnTheFlyCallback(project="bench", run_name=f"lightning-{i}", dashboard=False) if with_callback else None

    def drain() -> None:  # the callback's work of this block is all done before the other's begins
        started = time.perf_counter()
        if otf is not None and otf.run is not None and not otf.run.closed:
            otf.run.recorder.wait_idle()
            otf.run.session.flush()
        drains.append(time.perf_counter() - started)

    class Blocks(L.Callback):
        """First in the list: a block is ``args.block`` whole steps, hooks of every callback included."""

        def __init__(self) -> None:
            self.steps = 0
            self.started = math.nan

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.steps == 0:
                turns.both_set_up.wait()
            if self.steps % args.block == 0:
                if self.steps:
                    drain()
                    blocks.append(time.perf_counter() - self.started)
                    turns.hand_over(i)
                turns.wait(i)
                self.started = time.perf_counter()
            self.steps += 1

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.trained = time.perf_counter()

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            ended.append(time.perf_counter() - self.trained)  # on_fit_end: the callback closed its run
            turns.finish(i)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            turns.finish(i)
            turns.both_set_up.abort()

    callbacks: list[Any] = [Blocks(), *([otf] if otf is not None else [])]
    steps = (args.blocks + 1) * args.block
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks)
    trainer.fit(MLP(), DataLoader(data, batch_size=args.batch, shuffle=True))


def compare(data: TensorDataset, args: argparse.Namespace,
            with_callback: bool) -> tuple[list[float], float, float, float]:
    """(each block's ratio to its plain neighbours, the median plain block, the median wait for
    the engine's threads at a block's end, seconds ending the fit)."""
    turns = Turns()
    plain: list[float] = []
    other: list[float] = []
    drains: list[float] = []
    ended: list[float] = []
    threads = [threading.Thread(target=fit, args=(0, turns, data, args, False, plain, [], [])),
               threading.Thread(target=fit, args=(1, turns, data, args, with_callback, other, drains, ended))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Block k of the other fit ran between plain blocks k and k + 1.
    ratios = [mine / ((before + after) / 2) for mine, before, after in zip(other, plain, plain[1:], strict=False)]
    return ratios, statistics.median(plain), statistics.median(drains), ended[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=20, help="blocks per fit")
    parser.add_argument("--block", type=int, default=128, help="steps per block (about a second here)")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--returns", choices=["logits", "per_sample", "plain"], default="logits",
                        help="what training_step returns: per-sample losses and logits, per-sample losses, the loss")
    args = parser.parse_args()
    pinned = pin_allocator()
    os.environ.setdefault("ONTHEFLY_HOME", tempfile.mkdtemp(prefix="otf-bench-"))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Lightning's advice (num_workers, ...) on every fit
    import lightning  # noqa: F401  (it sets its loggers' level when imported: set ours after)

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # "GPU available: ..." every fit
    data = make_data(args.samples)
    warm = argparse.Namespace(**{**vars(args), "blocks": 1, "block": 32})
    compare(data, warm, True)  # warm-up: imports, kernels, allocator
    gc.collect()
    gc.freeze()  # what was loaded so far is never garbage: keep it out of every later collection

    results: dict[str, tuple[list[float], float, float, float]] = {}
    for name, with_callback in (("control (plain vs plain)", False), ("callback vs plain", True)):
        results[name] = compare(data, args, with_callback)
    for name, (ratios, *_) in results.items():
        q1, q3 = np.percentile(ratios, [25, 75])
        print(f"{name}: median {statistics.median(ratios):.3f}, interquartile range {q1:.3f}-{q3:.3f} "
              f"({len(ratios)} blocks)")
    ratios, plain_block, drain, ended = results["callback vs plain"]
    step = plain_block / args.block
    added = (statistics.median(ratios) - 1) * step
    print(f"blocks of {args.block} steps (batch {args.batch}), plain step {step * 1e3:.2f} ms; the callback adds "
          f"about {added * 1e6:.0f} us a step; training_step returns {args.returns}; "
          f"torch threads: {torch.get_num_threads()}; allocator: {'glibc thresholds pinned' if pinned else 'as it is'}")
    print(f"of which waiting for the engine's threads at the end of a block (in a real run they work beside "
          f"training): {drain / args.block * 1e6:.0f} us a step")
    print(f"ending the fit with the callback (its run closed: flush, final checkpoint): {ended * 1e3:.0f} ms, once")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
