"""The `onthefly` command and the quickstart example, as a user runs them.

Real processes for what only a process can show (the console script, the demo end to end, the
example unchanged); they start together, once per module, each with its own ONTHEFLY_HOME, since
most of their time is Python importing torch. Argument handling and listing run ``main``
in-process, which is the same code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import onthefly
from onthefly.cli import main
from onthefly.store import SessionStore, list_sessions, open_session

REPO = Path(__file__).resolve().parents[1]
ONTHEFLY = Path(sys.executable).parent / "onthefly"
DEADLINE = 120.0

COMMANDS = {
    "version": [str(ONTHEFLY), "--version"],
    "demo": [str(ONTHEFLY), "demo", "--epochs", "1", "--samples", "2000", "--no-browser", "--exit-after"],
    "quickstart": [sys.executable, str(REPO / "examples" / "quickstart.py")],
}


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    home: Path  # the process's ONTHEFLY_HOME
    cwd: Path  # its working directory, empty at the start


class Launched:
    def __init__(self, argv: list[str], root: Path) -> None:
        self.home, self.cwd = root / "home", root / "cwd"
        self.cwd.mkdir()
        self._out, self._err = root / "stdout", root / "stderr"
        env = {**os.environ, "ONTHEFLY_HOME": str(self.home), "COLUMNS": "80",
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        with self._out.open("w") as out, self._err.open("w") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=self.cwd)

    def result(self) -> Finished:
        returncode = self.process.wait(DEADLINE)
        return Finished(returncode, self._out.read_text(), self._err.read_text(), self.home, self.cwd)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Launched]]:
    processes = {name: Launched(argv, tmp_path_factory.mktemp(name)) for name, argv in COMMANDS.items()}
    yield processes
    for launched in processes.values():
        if launched.process.poll() is None:
            launched.process.kill()
            launched.process.wait(DEADLINE)


@pytest.fixture(autouse=True)
def narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # what rich assumes for a pipe; also a classic terminal


# ---- real processes ------------------------------------------------------------------------
def test_console_script_prints_the_version(launched: dict[str, Launched]) -> None:
    assert ONTHEFLY.is_file()
    result = launched["version"].result()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"onthefly {onthefly.__version__}"


def test_demo_trains_prints_the_summary_and_leaves_a_session(launched: dict[str, Launched]) -> None:
    result = launched["demo"].result()
    assert result.returncode == 0, result.stderr

    lines = result.stdout.splitlines()
    assert lines[0].startswith("On The Fly: run 1 finished after 1 epoch(s), 16 step(s)")
    assert any(line.startswith("  train  loss ") for line in lines)
    assert any(line.startswith("  val    loss ") and "accuracy" in line for line in lines)
    assert any(line.startswith("  test   loss ") and "accuracy" in line for line in lines)
    (session_line,) = [line for line in lines if line.startswith("  session ")]
    folder = Path(session_line.removeprefix("  session "))

    (info,) = list_sessions(result.home)
    assert info.path == folder
    assert folder.parent == result.home / "sessions"
    assert (info.project, info.status, info.alive) == ("demo", "finished", False)
    assert open_session(folder).samples(1).num_rows == 2000
    assert list(result.cwd.iterdir()) == []  # nothing written outside ONTHEFLY_HOME


def test_quickstart_example_runs_unchanged(launched: dict[str, Launched]) -> None:
    result = launched["quickstart"].result()
    assert result.returncode == 0, result.stderr
    assert "On The Fly: run 1 finished after 1 epoch(s), 32 step(s)" in result.stdout
    assert "\n  test   loss " in result.stdout
    assert "\n  val    loss " in result.stdout
    (info,) = list_sessions(result.home)
    assert (info.project, info.status) == ("mnist-demo", "finished")
    assert list(result.cwd.iterdir()) == []


# ---- arguments -----------------------------------------------------------------------------
def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: onthefly" in out
    assert "demo" in out
    assert "sessions" in out
    assert "--version" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "sessions" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--epochs", "0"], "argument --epochs: expected a number >= 1, got 0"),
        (["demo", "--epochs", "-3"], "argument --epochs: expected a number >= 1, got -3"),
        (["demo", "--epochs", "two"], "argument --epochs: expected a whole number, got 'two'"),
        (["demo", "--samples", "0"], "argument --samples: expected a number >= 1, got 0"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["train"], "invalid choice: 'train'"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], onthefly_home: Path,
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    assert message in capsys.readouterr().err
    assert list_sessions() == []  # nothing was started


# ---- sessions ------------------------------------------------------------------------------
def test_sessions_with_no_sessions(capsys: pytest.CaptureFixture[str], onthefly_home: Path) -> None:
    assert main(["sessions"]) == 0
    out = capsys.readouterr().out
    assert "no sessions under" in out
    assert "otf-home" in out


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of a rich table keyed by their first cell; cells folded over lines are joined."""
    rows: list[list[str]] = []
    for line in out.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if cells[0]:
            rows.append(cells)
        else:
            rows[-1] = [a + b for a, b in zip(rows[-1], cells, strict=True)]
    return {row[0]: row for row in rows}


def test_sessions_lists_sessions_with_their_whole_id(capsys: pytest.CaptureFixture[str]) -> None:
    live = SessionStore("p")
    ended = SessionStore("mnist-demo")  # ended, but its process (this one) still runs
    ended.close()
    try:
        assert main(["sessions"]) == 0
    finally:
        live.close()
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {live.id, ended.id}
    assert rows[ended.id][1:4] == ["mnist-demo", "finished", "alive"]
    assert rows[live.id][1:4] == ["p", "running", "alive"]
    assert rows[live.id][4] == "-"  # a running session is not cleaned up
    assert rows[live.id][5].endswith("KiB")


USER_SCRIPT = """
import sys, torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from onthefly import quickstart
print("args:", sys.argv[1:], flush=True)
X = torch.randn(256, 10); y = (X[:, 0] > 0).long()
m = nn.Sequential(nn.Linear(10, 2))
quickstart(project="user", run_name="r", model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
           loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(TensorDataset(X, y), batch_size=64),
           max_epochs=1, progress=False)
print("returned", flush=True)
"""


def test_run_serves_a_users_script_and_keeps_it_alive_until_stopped(
    tmp_path: Path, subprocess_env: dict[str, str],
) -> None:
    import httpx

    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    env = {**subprocess_env, "ONTHEFLY_HANDSHAKE": "json"}
    process = subprocess.Popen([str(ONTHEFLY), "run", "--no-browser", str(script), "--lr", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "args: ['--lr', '3']"
        handshake = json.loads(process.stdout.readline())["onthefly"]
        base, headers = handshake["url"].split("/?")[0], {"Authorization": f"Bearer {handshake['token']}"}
        deadline = time.monotonic() + DEADLINE
        while httpx.get(f"{base}/api/runs/1", headers=headers).json()["status"] != "idle":
            assert time.monotonic() < deadline, "the script's run never went idle"
            time.sleep(0.1)  # polling a condition with a deadline
        assert process.poll() is None  # kept alive after training, waiting for commands
        httpx.post(f"{base}/api/runs/1/commands", headers=headers, json={"kind": "stop"}).raise_for_status()
        out, _ = process.communicate(timeout=DEADLINE)
        assert "returned" in out
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
