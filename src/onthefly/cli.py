"""The `onthefly` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from ._version import __version__
from .errors import OnTheFlyError

__all__ = ["main"]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


DEMO_EPOCHS = 30  # about a minute on a laptop CPU


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onthefly",
        description="On The Fly: a local-first control room for PyTorch training.",
    )
    parser.add_argument("--version", action="version", version=f"onthefly {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="train the quickstart's model on its toy data (about a minute)")
    demo.add_argument("--epochs", type=_positive, default=DEMO_EPOCHS,
                      help=f"epochs to train (default {DEMO_EPOCHS})")
    demo.add_argument("--samples", type=_positive, default=60_000, help="training samples (default 60000)")
    commands.add_parser("sessions", help="list the sessions on this machine, with status and size")
    return parser


def _sessions(console: Console) -> int:
    from .store import list_sessions, onthefly_home

    sessions = list_sessions()
    if not sessions:
        console.print(f"no sessions under {onthefly_home() / 'sessions'}")
        return 0
    table = Table(title=f"sessions under {onthefly_home() / 'sessions'}")
    for column in ("id", "project", "status", "process", "size", "created"):
        # The id is what `open_session` takes: never cut it; narrow terminals fold project/created.
        folds = column in ("project", "created")
        table.add_column(column, no_wrap=not folds, overflow="fold" if folds else "ellipsis")
    for s in sessions:
        table.add_row(s.id, s.project, s.status, "alive" if s.alive else "gone", _size(s.size_bytes),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)))
    console.print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        if args.command == "demo":
            from .demo import run_demo

            summary = run_demo(args.epochs, samples=args.samples)
            return 0 if summary.status == "finished" else 1
        if args.command == "sessions":
            return _sessions(console)
        parser.print_help()
        return 0
    except OnTheFlyError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
