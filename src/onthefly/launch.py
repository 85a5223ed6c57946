"""Where the engine meets the dashboard: ``quickstart`` and ``start_run`` as users call them.

The engine runs training and knows nothing of HTTP; the server serves a session and knows
nothing of training. This module starts one beside the other (rank 0 only, in a background
thread) and decides how long the process stays up: with a dashboard attached when planned
training ends, or with ``keep_alive``, the session waits for commands; headless, it exits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .actions import cluster
from .engine.run import Run
from .engine.run import start_run as _start_engine_run
from .engine.trainer import FitSummary, Trainer
from .signals.per_sample import LossFn

__all__ = ["attach_dashboard", "quickstart", "start_run"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _dashboard_wanted(dashboard: bool | None) -> bool:
    if dashboard is not None:
        return dashboard
    return os.environ.get("ONTHEFLY_DASHBOARD", "1").strip().lower() not in ("0", "false", "no", "off")


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def attach_dashboard(run: Run, *, port: int | None = None, open_browser: bool = False) -> Any:
    """Serve ``run``'s session on 127.0.0.1 and print the URL. Returns the DashboardServer."""
    from .server import DashboardServer

    cluster.attach(run)  # the dashboard's "Cluster" button sends a command this carries out
    server = DashboardServer.for_run(run, port=port)
    try:
        server.start()
    except BaseException as exc:
        run.close(exc)  # the run never trained: do not leave its session looking alive
        raise
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    return server


def _keep_alive(keep_alive: bool | None, server: Any) -> bool | Callable[[], bool]:
    if keep_alive is not None:
        return keep_alive
    if _env_flag("ONTHEFLY_KEEP_ALIVE"):  # `onthefly run` sets it
        return True
    if server is None:
        return False
    return lambda: bool(server.attached)  # stay up while someone is watching


def quickstart(
    *,
    project: str,
    run_name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    test_loader: DataLoader | None = None,
    max_epochs: int = 1,
    do_test_after: bool = False,
    dashboard: bool | None = None,
    port: int | None = None,
    open_browser: bool = False,
    keep_alive: bool | None = None,
    **options: Any,
) -> FitSummary:
    """Train ``model`` with On The Fly watching: per-sample loss every epoch, validation every
    epoch, a test at the end with ``do_test_after=True``, a progress bar, a short summary, and a
    live dashboard (its URL is printed; ``dashboard=False`` or ONTHEFLY_DASHBOARD=0 turns it off).

    With a dashboard attached when training ends (or ``keep_alive=True``), the session stays up
    and waits for commands (train more, test, stop); otherwise it returns. ``options`` are
    :class:`~onthefly.Trainer`'s (device, amp, grad_clip, accumulate_grad_batches, scheduler,
    inputs/targets/forward_fn, callbacks, wait_for_run, resume_from, progress, grad_norm).
    """
    trainer = Trainer(
        model=model, optimizer=optimizer, loss_fn=loss_fn, train_loader=train_loader,
        val_loader=val_loader, test_loader=test_loader, project=project, run_name=run_name, **options,
    )
    server = None
    if _dashboard_wanted(dashboard) and _is_rank_zero():
        open_browser = open_browser or _env_flag("ONTHEFLY_OPEN_BROWSER")
        server = attach_dashboard(trainer.run, port=port, open_browser=open_browser)
    trainer.run.keep_alive = _keep_alive(keep_alive, server)
    try:
        summary = trainer.fit(max_epochs, do_test_after=do_test_after)
    finally:
        if server is not None:
            server.stop()
    if options.get("progress", True):
        print(summary, flush=True)
    return summary


def start_run(*, project: str, run_name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
              dashboard: bool | None = None, port: int | None = None, keep_alive: bool | None = None,
              **options: Any) -> Run:
    """Start a tracked run for a loop you write yourself (see :mod:`onthefly.engine.run`), with
    the dashboard like ``quickstart``. The dashboard stops when the run is closed."""
    run = _start_engine_run(project=project, run_name=run_name, model=model, optimizer=optimizer, **options)
    if _dashboard_wanted(dashboard) and _is_rank_zero():
        server = attach_dashboard(run, port=port, open_browser=_env_flag("ONTHEFLY_OPEN_BROWSER"))
        run.keep_alive = _keep_alive(keep_alive, server)
        run.on_close.append(server.stop)
    elif keep_alive is not None:
        run.keep_alive = keep_alive
    return run
