"""Where the engine meets the dashboard: ``quickstart`` and ``start_run`` as users call them.

The engine runs training and knows nothing of HTTP; the server serves a session and knows
nothing of training. This module starts one beside the other (rank 0 only; the server in a process
of its own) and decides how long the process stays up: with a dashboard attached when planned
training ends, or with ``keep_alive``, the session waits for commands; headless, it exits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .actions import autofork as autoforking
from .actions import cluster, health
from .actions import export as exporting
from .actions import fork as forking
from .actions import verify as verifying
from .engine.batch import BatchSpec
from .engine.device import model_device
from .engine.distributed import is_wrapped, unwrapped, world
from .engine.evaluate import Evaluator
from .engine.run import Run
from .engine.trainer import FitSummary, Trainer
from .errors import ConfigError
from .signals.per_sample import LossFn, PerSampleLoss

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
    """Serve ``run``'s session on 127.0.0.1 (a server process of its own) and print the URL.
    Returns the DashboardProcess."""
    from .server import DashboardProcess

    cluster.attach(run)  # the dashboard's "Cluster" button sends a command this carries out
    exporting.attach(run)  # and its export with sample data
    server = DashboardProcess.for_run(run, port=port)
    try:
        server.start()
    except BaseException as exc:
        run.close(exc)  # the run never trained: do not leave its session looking alive
        raise
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    return server


class _Dashboard:
    """The dashboard a run gets once it exists (the server needs the run, the run how long to
    stay up): decides whether the session stays up when planned training ends."""

    def __init__(self, keep_alive: bool | None) -> None:
        self.server: Any = None
        self._keep_alive = keep_alive

    def keep_alive(self) -> bool | Callable[[], bool]:
        if self._keep_alive is not None:
            return self._keep_alive
        if _env_flag("ONTHEFLY_KEEP_ALIVE"):  # `onthefly run` sets it
            return True
        return lambda: self.server is not None and bool(self.server.attached)  # while someone watches

    def attach(self, run: Run, *, wanted: bool | None, port: int | None, open_browser: bool) -> None:
        if _dashboard_wanted(wanted) and _is_rank_zero():
            open_browser = open_browser or _env_flag("ONTHEFLY_OPEN_BROWSER")
            self.server = attach_dashboard(run, port=port, open_browser=open_browser)
            run.add_close_callback(self.server.stop)


def _resume_from_env(options: dict[str, Any]) -> None:
    """`onthefly run SCRIPT --resume FILE.otf` says where to resume through ONTHEFLY_RESUME_FROM; a job
    torchrun restarts resumes from its last checkpoint."""
    if options.get("resume_from") is None and os.environ.get("ONTHEFLY_RESUME_FROM"):
        options["resume_from"] = os.environ["ONTHEFLY_RESUME_FROM"]
    if options.get("resume_from") is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        options["resume_from"] = "last"  # torchrun restarted the job (--max-restarts): on from its last checkpoint


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
    autofork: str = "suggest",
    health_every: int | None = None,
    health_continuous: bool = False,
    **options: Any,
) -> FitSummary:
    """Train ``model`` with On The Fly watching: per-sample loss every epoch, validation every
    epoch, a test at the end with ``do_test_after=True``, a progress bar, a short summary, and a
    live dashboard (its URL is printed; ``dashboard=False`` or ONTHEFLY_DASHBOARD=0 turns it off).

    ``autofork`` ("suggest", the default; "approve"; "off"): when the loss tail stops improving
    while the rest does, a fork card is proposed (see :mod:`onthefly.actions.autofork`); it is
    carried out only with "approve". Health check-ups (:mod:`onthefly.actions.health`) run on
    request, with ``health_every=N`` every N steps, and with ``health_continuous=True`` the gradient
    norm and AMP overflows of every step, on the device.

    With a dashboard attached when training ends (or ``keep_alive=True``), the session stays up
    and waits for commands (train more, test, stop); otherwise it returns. ``options`` are
    :class:`~onthefly.Trainer`'s (device, amp, grad_clip, accumulate_grad_batches, scheduler,
    inputs/targets/forward_fn, callbacks, wait_for_run, resume_from, progress, grad_norm).
    """
    _resume_from_env(options)
    board = _Dashboard(keep_alive)
    trainer = Trainer(
        model=model, optimizer=optimizer, loss_fn=loss_fn, train_loader=train_loader,
        val_loader=val_loader, test_loader=test_loader, project=project, run_name=run_name,
        keep_alive=board.keep_alive(), **options,
    )
    board.attach(trainer.run, wanted=dashboard, port=port, open_browser=open_browser)
    # Plan cards (forks) and comparisons: carried out by this run; children served live too.
    forking.attach(trainer, on_child=board.server.add_run if board.server is not None else None)
    autoforking.attach(trainer, mode=autofork)  # type: ignore[arg-type]  # checked there
    # Check-ups on request, every health_every steps, and with health_continuous every step's gradients.
    health.attach(trainer, every_steps=health_every, continuous=health_continuous)
    verifying.attach(trainer)  # "Verify suspects": out-of-fold copies confirm the likely mislabelled
    summary = trainer.fit(max_epochs, do_test_after=do_test_after)  # closing the run stops the server
    if options.get("progress", True):
        print(summary, flush=True)
    return summary


def start_run(
    *, project: str, run_name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
    loss_fn: LossFn | None = None, val_loader: DataLoader | None = None, test_loader: DataLoader | None = None,
    inputs: Any = None, targets: Any = None, forward_fn: Any = None,
    dashboard: bool | None = None, port: int | None = None, keep_alive: bool | None = None, **options: Any,
) -> Run:
    """Start a tracked run for a loop you write yourself (see :mod:`onthefly.engine.run`), with
    the dashboard like ``quickstart``; the dashboard stops when the run is closed.

    With ``loss_fn`` and a ``val_loader``/``test_loader``, ``run.evaluate("val")`` and the "test"
    command work as in ``quickstart`` (``inputs``/``targets``/``forward_fn`` say how a batch
    feeds the model). Other ``options`` are :class:`~onthefly.Run`'s."""
    where = world()
    if where is not None and not is_wrapped(model):
        raise ConfigError(
            "under torchrun, a loop of your own trains the model through DistributedDataParallel: wrap it before "
            "start_run - model = torch.nn.parallel.DistributedDataParallel(model) (the process group is started; "
            "pass device_ids=[local_rank] on CUDA) - and call model(x) on the wrapper in the loop. quickstart wraps "
            "it for you. Each loader given to run.batches() gets a DistributedSampler unless it has one.")
    if is_wrapped(model):
        model = unwrapped(model)  # saved, evaluated and checked as the user's module; trained through the wrapper
    evaluator = None
    if loss_fn is not None:
        device = options.get("device") or model_device(model)
        evaluator = Evaluator(model, PerSampleLoss(loss_fn), BatchSpec(inputs, targets, forward_fn), device,
                              {"val": val_loader, "test": test_loader})
    _resume_from_env(options)
    board = _Dashboard(keep_alive)
    run = Run(project=project, run_name=run_name, model=model, optimizer=optimizer, evaluator=evaluator,
              keep_alive=board.keep_alive(),
              **options)
    board.attach(run, wanted=dashboard, port=port, open_browser=False)
    return run
