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
    demo.add_argument("--no-browser", action="store_true", help="only print the dashboard URL")
    demo.add_argument("--port", type=int, default=None, help="dashboard port (default: ONTHEFLY_PORT or a free one)")
    demo.add_argument("--exit-after", action="store_true",
                      help="exit when training ends instead of waiting for commands")
    run = commands.add_parser("run", help="run your training script with the dashboard attached (stays up "
                              "after training until stopped)")
    run.add_argument("script", help="the Python script to run (it calls onthefly.quickstart or start_run)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    run.add_argument("--no-browser", action="store_true", help="only print the dashboard URL")
    commands.add_parser("sessions", help="list the sessions on this machine, with status and size")
    export = commands.add_parser(
        "export-slice", help="export a slice of a session's samples to CSV, Parquet or JSON",
        description="Export a slice: a saved slice's name, 'hard' or 'mislabelled', or a slice definition "
                    "as JSON (e.g. '{\"kind\": \"quantile_band\", \"low\": 0.9}'). Rows carry the index, "
                    "the per-sample signals and flags, and the label; the sample's own data is added by "
                    "the dashboard's export or onthefly.export_slice(..., dataset=...), which can read the dataset.")
    export.add_argument("session", help="a session id (see `onthefly sessions`) or folder")
    export.add_argument("slice", help="saved slice name, 'hard', 'mislabelled', or a JSON definition")
    export.add_argument("out", help="the file to write (.csv, .parquet or .json)")
    export.add_argument("--format", choices=("csv", "parquet", "json"), default=None,
                        help="default: from the file name's suffix")
    export.add_argument("--run", type=_positive, default=None, help="run id (default: the session's only run)")
    export.add_argument("--epoch", type=int, default=None, help="epoch (default: the latest complete one)")
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


def _export_slice(console: Console, args: argparse.Namespace) -> int:
    import json

    from .actions.export import export_slice
    from .errors import ConfigError, NotFoundError
    from .store import open_session

    session = open_session(args.session)
    slice_: str | dict[str, object] = args.slice
    if args.slice.lstrip().startswith("{"):
        try:
            slice_ = json.loads(args.slice)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the slice definition is not valid JSON: {exc}") from exc
    elif args.slice in ("hard", "mislabelled"):
        try:
            session.slice(args.slice)
        except NotFoundError:  # no saved slice of that name: the flag itself
            slice_ = {"kind": "flag", "flag": args.slice}
    with console.status(f"exporting {args.slice} ..."):
        result = export_slice(session, slice_, args.out, format=args.format, run_id=args.run, epoch=args.epoch)
    console.print(f"wrote {result['rows']:,} rows ({len(result['columns'])} columns) to {result['path']}")
    return 0


def _run_script(script: str, script_args: list[str], *, open_browser: bool) -> int:
    import os
    import runpy
    from pathlib import Path

    path = Path(script)
    if not path.is_file():
        Console(stderr=True).print(f"[bold red]error:[/] no script {script!r}")
        return 2
    # The script's quickstart/start_run read these: dashboard on, stay up after training.
    os.environ["ONTHEFLY_DASHBOARD"] = "1"
    os.environ["ONTHEFLY_KEEP_ALIVE"] = "1"
    if open_browser:
        os.environ["ONTHEFLY_OPEN_BROWSER"] = "1"
    sys.argv = [str(path), *script_args]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        if args.command == "demo":
            from .demo import run_demo

            summary = run_demo(args.epochs, samples=args.samples, dashboard=True, port=args.port,
                               open_browser=not args.no_browser, keep_alive=not args.exit_after)
            return 0 if summary.status in ("finished", "stopped") else 1
        if args.command == "run":
            return _run_script(args.script, args.args, open_browser=not args.no_browser)
        if args.command == "sessions":
            return _sessions(console)
        if args.command == "export-slice":
            return _export_slice(console, args)
        parser.print_help()
        return 0
    except OnTheFlyError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
