"""Continuous health checks: the cheap ones, every optimizer step, without a host sync.

At each optimizer step (the ``on_before_optimizer_step`` hook: gradients final, unscaled and
clipped) the monitor appends the total gradient norm to a device-side list (one fused
``_foreach_norm`` and a norm: a few small kernels), and with a GradScaler, whether the step
overflowed (the scale shrank). Every ``report_every`` steps it hands the window to the host with
one non-blocking copy and reads the *previous* window's copy, long finished: no step waits. From
each window it records the ``grad_norm`` series (a metric, on the dashboard's curves) and raises
a card (a ``health`` event with ``continuous: true``) when gradients turned non-finite, when a
gradient spiked far above its running median without clipping, or when AMP overflowed on more
than 5 % of the window's steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..engine.callbacks import Callback

__all__ = ["GradientMonitor"]

SPIKE = 10.0  # a norm this many times the running median is a spike
OVERFLOW_RATE = 0.05


class GradientMonitor(Callback):
    def __init__(self, run: Any, model: torch.nn.Module, *, scaler: Any = None, clipping: bool = False,
                 report_every: int = 100) -> None:
        self.run, self.model, self.scaler, self.clipping = run, model, scaler, clipping
        self.report_every = report_every
        self._norms: list[torch.Tensor] = []
        self._steps: list[int] = []
        self._scale_before: torch.Tensor | None = None
        self._overflows: list[torch.Tensor] = []
        self._in_flight: tuple[list[int], torch.Tensor, torch.Tensor | None, Any] | None = None
        self._history: list[float] = []
        self.cards: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, run: Any, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        self._norms.append(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))
        self._steps.append(run.global_step + 1)  # the step this update makes
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None and self.scaler.is_enabled() else None
        self._scale_before = scale.clone() if scale is not None else None

    def on_step_end(self, run: Any) -> None:
        if self._scale_before is not None:
            self._overflows.append(self.scaler._scale < self._scale_before)
            self._scale_before = None
        if len(self._norms) >= self.report_every:
            self.report()

    def report(self) -> None:
        """Send this window to the host (non-blocking) and read the last one's values."""
        if self._in_flight is not None:
            self._read(*self._in_flight)
            self._in_flight = None
        if not self._norms:
            return
        norms = torch.stack(self._norms)
        overflows = torch.stack(self._overflows) if self._overflows else None
        host = norms.to("cpu", non_blocking=True)
        flags = overflows.to("cpu", non_blocking=True) if overflows is not None else None
        event = None
        if norms.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._in_flight = (self._steps, host, flags, event)
        self._norms, self._steps, self._overflows = [], [], []

    def flush(self) -> None:
        """Everything measured so far read now (at the end of training: one wait)."""
        self.report()
        if self._in_flight is not None:
            self._read(*self._in_flight)
            self._in_flight = None

    def _read(self, steps: list[int], host: torch.Tensor, flags: torch.Tensor | None, event: Any) -> None:
        from .health import card

        if event is not None:
            event.synchronize()  # recorded a window ago: long done
        values = host.tolist()
        run = self.run
        now = time.time()
        run.session.metrics([(run.run_id, "grad_norm", step, run.epoch, now, value)
                             for step, value in zip(steps, values, strict=True)])
        found = []
        bad = [s for s, v in zip(steps, values, strict=True) if not torch.isfinite(torch.tensor(v))]
        if bad:
            found.append(card("nonfinite_gradient", "gradients", "error",
                              f"non-finite gradients at {len(bad)} step(s), first at step {bad[0]}",
                              "resume from a checkpoint before it with a lower learning rate or gradient clipping; "
                              "torch.autograd.set_detect_anomaly(True) finds the operation", steps=bad[:20]))
        finite = [v for v in values if v == v and v not in (float("inf"), float("-inf"))]
        history = self._history + finite
        if len(history) >= 20 and not self.clipping:
            median = sorted(history)[len(history) // 2]
            spikes = [s for s, v in zip(steps, values, strict=True) if median > 0 and v > SPIKE * median]
            if spikes:
                found.append(card("gradient_spikes", "gradients", "warning",
                                  f"{len(spikes)} gradient norm spike(s) above {SPIKE:g}x the median ({median:.3g}), "
                                  "and no gradient clipping", "set grad_clip (e.g. 1.0), or lower the learning rate",
                                  steps=spikes[:20], median=median))
        self._history = history[-1000:]
        if flags is not None and flags.numel():
            rate = float(flags.float().mean())
            if rate > OVERFLOW_RATE:
                found.append(card("amp_overflow_rate", "numerics", "warning",
                                  f"AMP overflowed on {rate:.0%} of {flags.numel()} steps (skipped updates)",
                                  "use amp='bf16', or find the layer that overflows float16", rate=rate,
                                  steps=flags.numel()))
        if found:
            self.cards += found
            run.bus.publish("health", {"cards": found, "areas": ["continuous"], "continuous": True,
                                       "steps": [steps[0], steps[-1]]},
                            run_id=run.run_id, step=run.global_step, epoch=run.epoch)
