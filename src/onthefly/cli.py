"""The `onthefly` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._version import __version__
from .errors import OnTheFlyError
from .units import human_bytes

__all__ = ["main"]


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
    run.add_argument("--resume", metavar="FILE.otf[#CHECKPOINT]", default=None,
                     help="continue training from an exported session (its final model, or checkpoint "
                          "CHECKPOINT), in that session; the script's quickstart/start_run resume from it")
    commands.add_parser("sessions", help="list the sessions on this machine, with status and size")
    exp = commands.add_parser("export", help="save a session to one archive file (.otf) that opens on any machine",
                              description="Export = save: sessions are working storage, removed when a later "
                                          "session starts; an exported one can be imported, opened and trained "
                                          "further anywhere.")
    exp.add_argument("session", nargs="?", default=None, help="session id or folder (default: the latest session)")
    exp.add_argument("--out", required=True, help="the archive to write (e.g. baseline.otf)")
    imp = commands.add_parser("import", help="add an exported session (.otf) to this machine's sessions")
    imp.add_argument("archive", help="the .otf file")
    imp.add_argument("--replace", action="store_true", help="replace a session of the same id already here")
    opn = commands.add_parser("open", help="serve the dashboard over an ended or imported session (or a .otf file)")
    opn.add_argument("session", help="session id, folder, or .otf archive (imported first)")
    opn.add_argument("--port", type=int, default=None, help="dashboard port (default: ONTHEFLY_PORT or a free one)")
    opn.add_argument("--no-browser", action="store_true", help="only print the dashboard URL")
    rep = commands.add_parser("report", help="write a self-contained HTML report of a session (or a .otf file)")
    rep.add_argument("session", help="session id, folder, or .otf archive")
    rep.add_argument("--out", required=True, help="the HTML file to write")
    rm = commands.add_parser("remove", help="delete a session from this machine (imported ones are kept until then)")
    rm.add_argument("session", help="session id or folder")
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
    moe = commands.add_parser("export-moe", help="write a mixture of experts (a gate card's run) as one standalone "
                              "inference artifact: torch.export program, safetensors, ONNX, manifest")
    moe.add_argument("run", type=_positive, help="the mixture's run id")
    moe.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    moe.add_argument("--session", default=None, help="session id, folder or .otf archive (default: the latest)")
    bench = commands.add_parser("benchmark", help="print a mixture's benchmark at matched compute (a benchmark card "
                                "trains its baselines in the training process)")
    bench.add_argument("run", type=_positive, help="the mixture's run id")
    bench.add_argument("--session", default=None, help="session id, folder or .otf archive (default: the latest)")
    bench.add_argument("--json", action="store_true", help="print the whole report as JSON")
    return parser


def _export_moe(console: Console, args: argparse.Namespace) -> int:
    from .actions.mixture import export_moe

    folder = _session_folder(console, args.session or _latest_session())
    manifest = export_moe(folder, args.run, args.out)
    onnx = manifest["onnx"]
    console.print(f"wrote the mixture of run {args.run} ({len(manifest['experts'])} experts, {manifest['routing']} "
                  f"routing) to {args.out}: " + ", ".join(sorted(manifest["files"]))
                  + ("" if onnx["written"] else f" (no ONNX: {onnx['error']})"))
    console.print(f"load it with torch alone:\n{manifest['load']}")
    return 0


def _benchmark(console: Console, args: argparse.Namespace) -> int:
    import json

    from .actions.benchmark import report_of
    from .store.reader import SessionReader

    report = report_of(SessionReader(_session_folder(console, args.session or _latest_session())), args.run)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    compute = report["compute"]
    table = Table(title=f"mixture run {args.run} at matched compute ({compute['budget_flops']:.3g} FLOPs beyond "
                        "the generalist)")
    for column in ("entrant", *report["sets"], "inference FLOPs/sample", "latency ms/sample"):
        table.add_column(column)
    cells = {(c["run"], c["set"]): c for c in report["comparison"]["cells"]}
    for entrant in report["comparison"]["runs"]:
        row = [report["comparison"]["names"].get(entrant, entrant)]
        for name in report["sets"]:
            cell = cells[(entrant, name)]
            row.append(f"{cell['accuracy'] * 100:.2f}%" if cell["accuracy"] is not None else f"{cell['loss']:.4g}")
        inference = report["inference"][entrant]
        row += [f"{inference['flops_per_sample']:.3g}", f"{inference['latency_ms_per_sample']:.4f}"]
        table.add_row(*row)
    console.print(table)
    for item in compute["items"]:
        console.print(f"  {item['what']}" + (f" (run {item['run_id']})" if item["run_id"] else "")
                      + f": {item['samples']:,} samples, {item['flops']:.3g} FLOPs")
    if compute["zero_flop_ops"]:
        console.print("  counted as zero FLOPs: " + ", ".join(compute["zero_flop_ops"]))
    console.print(report["summary"])
    return 0


def _sessions(console: Console) -> int:
    from .store import list_sessions, onthefly_home

    sessions = list_sessions()
    if not sessions:
        console.print(f"no sessions under {onthefly_home() / 'sessions'}")
        return 0
    table = Table(title=f"sessions under {onthefly_home() / 'sessions'}")
    for column in ("id", "project", "status", "process", "kept", "size", "created"):
        # The id is what `open_session` takes: never cut it; narrow terminals fold project/created.
        folds = column in ("project", "created")
        table.add_column(column, no_wrap=not folds, overflow="fold" if folds else "ellipsis")
    for s in sessions:
        table.add_row(s.id, s.project, s.status, "alive" if s.alive else "gone",
                      "imported" if s.imported else ("-" if s.alive else "until next session"),
                      human_bytes(s.size_bytes),
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


def _latest_session() -> str:
    from .errors import NotFoundError
    from .store import list_sessions, onthefly_home

    sessions = list_sessions()
    if not sessions:
        raise NotFoundError(f"no sessions under {onthefly_home() / 'sessions'}")
    return str(sessions[-1].path)


def _export(console: Console, args: argparse.Namespace) -> int:
    from .store.archive import export_session
    from .store.reader import open_session

    reader = open_session(args.session or _latest_session())
    with console.status(f"exporting session {reader.dir.name} ..."):
        result = export_session(reader, args.out)
    final = result.final_checkpoint
    console.print(f"wrote {result.path} ({human_bytes(result.bytes)}, {result.members} files); final model: "
                  + (f"checkpoint {final['id']} of run {final['run_id']} at step {final['step']}" if final
                     else "none (no checkpoint was saved in this session)"))
    return 0


def _session_folder(console: Console, name: str) -> Path:
    """A session's folder from an id, a folder, or an archive (imported if it is not here yet)."""
    from .store.archive import import_session, is_archive, read_manifest
    from .store.reader import open_session
    from .store.session import sessions_root

    if is_archive(name):
        folder = sessions_root() / str(read_manifest(name)["session"]["id"])
        if not folder.is_dir():
            with console.status(f"importing {name} ..."):
                folder = import_session(name)
            console.print(f"imported {name} as session {folder.name}")
        return folder
    return open_session(name).dir


def _open(console: Console, args: argparse.Namespace) -> int:
    import threading

    from .errors import StoreError
    from .server.runner import DashboardServer
    from .store.reader import SessionReader
    from .store.session import SessionStore

    folder = _session_folder(console, args.session)
    info = SessionReader(folder).info()
    try:  # this process is the session's writer while it serves it (slices); its status stays as it was
        store: SessionStore | None = SessionStore.reopen(folder, mark_running=False)
        what = "views, slices and exports of what was recorded"
    except StoreError:  # its training process is still running: read only from here
        store, what = None, "read only: its training process still runs and serves its own dashboard"
    server = DashboardServer(folder, project=str(info.get("project", "?")), session_id=folder.name, port=args.port,
                             store=store)
    try:
        url = server.start()
    except BaseException:
        if store is not None:
            store.close()
        raise
    console.print(f"On The Fly dashboard for session {folder.name}: {url}\n(no training process: {what}; "
                  "Ctrl-C to stop)")
    if os.environ.get("ONTHEFLY_HANDSHAKE") == "json":  # for tools that start it (the VS Code extension)
        print(json.dumps({"onthefly": {"url": url, "token": server.token, "pid": os.getpid()}}), flush=True)
    if not args.no_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(drain_timeout=0.0)
        if store is not None:
            store.close()
    return 0


def _report(console: Console, args: argparse.Namespace) -> int:
    import tempfile

    from .actions.report import write_report
    from .store.archive import import_session, is_archive
    from .store.reader import SessionReader, open_session

    if is_archive(args.session):  # read from a temporary import: a report adds no session here
        with tempfile.TemporaryDirectory(prefix="onthefly-report-") as home:
            with console.status(f"reading {args.session} ..."):
                folder = import_session(args.session, home=Path(home))
            path = write_report(SessionReader(folder), args.out)
    else:
        path = write_report(open_session(args.session), args.out)
    console.print(f"wrote {path}")
    return 0


def _remove(console: Console, args: argparse.Namespace) -> int:
    from .store.reader import open_session
    from .store.session import remove_session

    folder = open_session(args.session).dir
    freed = remove_session(folder)
    console.print(f"removed session {folder.name} ({human_bytes(freed)})")
    return 0


def _import(console: Console, args: argparse.Namespace) -> int:
    from .store.archive import import_session

    with console.status(f"importing {args.archive} ..."):
        folder = import_session(args.archive, replace=args.replace)
    console.print(f"imported session {folder.name} into {folder} (kept until `onthefly remove {folder.name}`); "
                  f"`onthefly open {folder.name}` shows it")
    return 0


def _run_script(script: str, script_args: list[str], *, open_browser: bool, resume: str | None = None) -> int:
    import os
    import runpy

    path = Path(script)
    if not path.is_file():
        Console(stderr=True).print(f"[bold red]error:[/] no script {script!r}")
        return 2
    # The script's quickstart/start_run read these: dashboard on, stay up after training.
    os.environ["ONTHEFLY_DASHBOARD"] = "1"
    os.environ["ONTHEFLY_KEEP_ALIVE"] = "1"
    if open_browser:
        os.environ["ONTHEFLY_OPEN_BROWSER"] = "1"
    if resume is not None:
        os.environ["ONTHEFLY_RESUME_FROM"] = resume
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
            return _run_script(args.script, args.args, open_browser=not args.no_browser, resume=args.resume)
        if args.command == "sessions":
            return _sessions(console)
        handlers = {"export": _export, "import": _import, "open": _open, "report": _report, "remove": _remove,
                    "export-moe": _export_moe, "benchmark": _benchmark}
        if args.command in handlers:
            return handlers[args.command](console, args)
        if args.command == "export-slice":
            return _export_slice(console, args)
        parser.print_help()
        return 0
    except OnTheFlyError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
