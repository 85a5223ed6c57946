"""End to end in real VS Code: code-server, driven by Playwright in headless Debian chromium.

The extension's .vsix (built and packaged by scripts/test_vscode.sh) is installed into a fresh
code-server, which opens a temporary workspace holding a small training script. The test acts as
a person would: runs "On the Fly: Show Dashboard" from the Command Palette, picks an interpreter
that lacks On The Fly (the panel names the pip command), picks the project's one and the script,
presses Run, watches the loss curve grow in the webview, pauses (the panel's tab says "paused"),
stops the run from the dashboard and the process from the panel; runs a script that crashes (the
panel shows its last lines); exports the session and opens the .otf from the explorer's context
menu. Behind code-server the dashboard is reached through its /proxy/PORT/ path, so every URL
the page uses must be relative, and its live stream goes through the same proxy.

code-server is not part of the Python dev environment: scripts/test_vscode.sh installs it and
runs this file with ONTHEFLY_CODE_SERVER and ONTHEFLY_VSIX set; without them it is skipped.
Screenshots are saved to test-artifacts/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import FrameLocator, Page, expect, sync_playwright

from conftest import REPO
from test_e2e_dashboard import wait_until

pytestmark = [
    pytest.mark.vscode,
    pytest.mark.skipif(not os.environ.get("ONTHEFLY_CODE_SERVER") or not os.environ.get("ONTHEFLY_VSIX"),
                       reason="needs code-server and the packaged extension: run scripts/test_vscode.sh"),
]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
DEADLINE_MS = 90_000  # code-server's first start and a cold torch import are slow on 2 busy cores

TRAIN_SCRIPT = """\
# A small training run: long enough that the test pauses and stops it while it trains.
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from onthefly import quickstart

torch.manual_seed(0)
torch.set_num_threads(1)
X = torch.randn(2048, 32)
y = (X[:, :4].sum(dim=1) > 0).long()
data = TensorDataset(X, y)
model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
quickstart(
    project="vscode-e2e",
    run_name="baseline",
    model=model,
    optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
    loss_fn=nn.CrossEntropyLoss(),
    train_loader=DataLoader(data, batch_size=32, shuffle=True),
    val_loader=DataLoader(data, batch_size=256),
    max_epochs=5000,  # the test stops it long before
)
"""

CRASH_SCRIPT = """\
print("loading the data")
for shard in range(3):
    print(f"shard {shard} loaded")
raise ValueError("labels must be integers, got float32 (planted by the test)")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CodeServer:
    def __init__(self, url: str, workspace: Path, env: dict[str, str], log: Path) -> None:
        self.url = url
        self.workspace = workspace
        self.env = env
        self.log = log


@pytest.fixture
def code_server(tmp_path: Path, onthefly_home: Path) -> Iterator[CodeServer]:
    binary = os.environ["ONTHEFLY_CODE_SERVER"]
    vsix = os.environ["ONTHEFLY_VSIX"]
    workspace = tmp_path / "project"
    workspace.mkdir()
    (workspace / "train.py").write_text(TRAIN_SCRIPT)
    (workspace / "crash.py").write_text(CRASH_SCRIPT)
    # The workspace's own virtual environment, without On The Fly: the first one offered.
    venv.EnvBuilder(with_pip=False, symlinks=True).create(workspace / ".venv")
    user_data = tmp_path / "user-data"
    (user_data / "User").mkdir(parents=True)
    (user_data / "User" / "settings.json").write_text(json.dumps({
        "security.workspace.trust.enabled": False,
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.enableExperiments": False,
        "extensions.autoCheckUpdates": False,
        "extensions.autoUpdate": False,
        "extensions.ignoreRecommendations": True,
        "telemetry.telemetryLevel": "off",
        "update.mode": "none",
        "chat.disableAIFeatures": True,
        "workbench.secondarySideBar.defaultVisibility": "hidden",
    }))
    extensions = tmp_path / "extensions"
    env = {
        **os.environ,
        # The repository's venv is the active one, as after `source .venv/bin/activate`. (Not PATH:
        # the extension host takes PATH from a login shell, which resets it.)
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "ONTHEFLY_HOME": str(onthefly_home),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),  # code-server writes its config.yaml there
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("ONTHEFLY_PORT", None)
    common = ["--auth", "none", "--disable-telemetry", "--disable-update-check",
              "--user-data-dir", str(user_data), "--extensions-dir", str(extensions)]
    installed = subprocess.run([binary, *common, "--install-extension", vsix], env=env, capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert any(extensions.glob("onthefly-ai.onthefly-*/package.json")), installed.stdout + installed.stderr
    port = free_port()
    log = tmp_path / "code-server.log"
    with log.open("w") as out:
        process = subprocess.Popen([binary, *common, "--bind-addr", f"127.0.0.1:{port}", str(workspace)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"code-server exited: {log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"code-server did not answer: {log.read_text()}"
            time.sleep(0.2)  # polling a condition with a deadline
        yield CodeServer(url, workspace, env, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(10)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "vscode-code-server.log").write_text(log.read_text())
        # The extension's "On The Fly" output channel, as VS Code logged it.
        for channel in (user_data / "logs").rglob("*On The Fly*.log"):
            (ARTIFACTS / "vscode-output-channel.log").write_text(channel.read_text())


@pytest.fixture
def page(code_server: CodeServer) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(DEADLINE_MS)
        expect.set_options(timeout=DEADLINE_MS)
        try:
            yield page
        finally:
            browser.close()


@contextlib.contextmanager
def screenshot_on_failure(page: Page) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            shot(page, "failure")
        raise


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"vscode-{name}.png"))


def run_command(page: Page, title: str) -> None:
    """The Command Palette, as a person uses it: F1, the command's title, Enter. The palette lists
    the commands known when it opens: while the extension host is still starting, ours may not be
    there yet, so the palette is opened again until it is (within the deadline)."""
    box = page.locator(".quick-input-widget input")
    row = page.locator(".quick-input-widget .monaco-list-row", has_text=title).first
    deadline = time.monotonic() + DEADLINE_MS / 1000
    while True:
        page.keyboard.press("F1")
        expect(box).to_be_visible()
        box.fill(f">{title}")
        try:
            expect(row).to_be_visible(timeout=5_000)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            page.keyboard.press("Escape")
            expect(box).to_be_hidden()
    box.press("Enter")


def pick(page: Page, text: str, *, title: str) -> None:
    """Choose the row that shows `text` in the quick pick titled `title`, and wait until it is
    gone (the widget is reused: an earlier pick's rows must not be taken for this one's)."""
    widget = page.locator(".quick-input-widget")
    expect(widget).to_be_visible()
    expect(widget.locator(".quick-input-title")).to_contain_text(title)
    widget.locator("input").fill(text)
    row = widget.locator(".monaco-list-row", has_text=text).first
    expect(row).to_be_visible()
    row.click()
    # Gone, or showing the next question (the same widget, another title).
    open_here = widget.locator(":scope:not(.quick-input-widget-closing):visible .quick-input-title", has_text=title)
    expect(open_here).to_have_count(0)


def panel(page: Page) -> FrameLocator:
    """The extension's webview: VS Code's outer frame, then its content frame."""
    return page.frame_locator("iframe.webview.ready").frame_locator("iframe#active-frame")


def chart_points(frame: FrameLocator) -> int:
    return int(frame.get_by_test_id("chart-train-loss").get_attribute("data-points") or 0)


def test_the_extension_runs_pauses_and_stops_training_in_real_vscode(code_server: CodeServer, page: Page) -> None:
    with screenshot_on_failure(page):
        scenario(code_server, page)


def scenario(code_server: CodeServer, page: Page) -> None:
    started = time.monotonic()
    page.goto(code_server.url + "/?folder=" + str(code_server.workspace))
    expect(page.locator(".monaco-workbench")).to_be_visible()
    expect(page.locator(".explorer-folders-view .monaco-list-row", has_text="train.py")).to_be_visible()

    # Show Dashboard: first an interpreter that lacks the package: the panel says how to fix it.
    bare_python = str(code_server.workspace / ".venv" / "bin" / "python")
    run_command(page, "On the Fly: Show Dashboard")
    pick(page, bare_python, title="Python interpreter")
    pick(page, "train.py", title="training script")
    view = panel(page)
    problem = view.get_by_test_id("problem")
    expect(problem).to_contain_text("does not have the onthefly package")
    expect(problem).to_contain_text("pip install onthefly-ai")
    expect(problem).to_contain_text(f"{bare_python} -m pip install onthefly-ai")
    shot(page, "missing-package")

    # The project's interpreter, from the panel's own button.
    view.get_by_role("button", name="Interpreter…").click()
    pick(page, str(Path(code_server.env["VIRTUAL_ENV"]) / "bin" / "python"), title="Python interpreter")
    expect(view.get_by_test_id("problem")).to_have_count(0)
    expect(view.get_by_test_id("status")).to_have_text("Ready to run train.py")
    run_command(page, "Notifications: Clear All Notifications")  # the one about the first interpreter

    # Run: the dashboard comes up in the panel, through code-server's proxy.
    view.get_by_role("button", name="Run").click()
    expect(view.get_by_test_id("status")).to_have_text("Running train.py")
    frame = view.frame_locator("iframe#dashboard")
    src = view.locator("iframe#dashboard").get_attribute("src") or ""
    assert re.match(re.escape(code_server.url) + r"/proxy/\d+/\?token=", src), src
    expect(frame.get_by_test_id("project")).to_have_text("vscode-e2e")
    expect(frame.get_by_test_id("status")).to_have_text("running")
    # The live stream connects through the same proxy (no polling needed here).
    expect(frame.get_by_test_id("connection")).to_have_attribute("data-state", "open")

    # The loss curve grows.
    wait_until(lambda: chart_points(frame) > 5, "the loss chart has points", DEADLINE_MS / 1000)
    first = chart_points(frame)
    wait_until(lambda: chart_points(frame) > first + 5, "the loss chart grows", DEADLINE_MS / 1000)
    shot(page, "running")

    # Pause: the dashboard says so, and the panel's tab too (the dashboard tells the panel).
    frame.get_by_role("button", name="Pause").click()
    expect(frame.get_by_test_id("status")).to_have_text("paused")
    expect(frame.get_by_role("button", name="Resume")).to_be_enabled()
    expect(page.locator(".tabs-container .tab", has_text="On The Fly")).to_contain_text("(paused)")
    paused_step = frame.get_by_test_id("step").inner_text()
    shot(page, "paused")

    # Stop the run from the dashboard, then the process from the panel.
    frame.get_by_role("button", name="Stop").click()
    expect(frame.get_by_test_id("status")).to_have_text("stopped")
    assert frame.get_by_test_id("step").inner_text() == paused_step  # stopped where it paused
    view.get_by_role("button", name="Stop").click()
    expect(view.get_by_test_id("status")).to_have_text("train.py stopped")
    expect(view.locator("iframe#dashboard")).to_have_count(0)
    expect(view.get_by_role("button", name="Run")).to_be_visible()

    # A script that crashes: the panel shows its last lines, never a blank view.
    view.get_by_role("button", name="Script…").click()
    pick(page, "crash.py", title="training script")
    expect(view.get_by_test_id("facts")).to_contain_text("script: crash.py")  # chosen before Run
    view.get_by_role("button", name="Run").click()
    expect(view.get_by_test_id("status")).to_have_text("crash.py crashed (exit code 1)")
    last_lines = view.get_by_test_id("last-lines")
    expect(last_lines).to_contain_text("shard 2 loaded")
    expect(last_lines).to_contain_text("ValueError: labels must be integers, got float32 (planted by the test)")
    shot(page, "crash")

    # Export the session (as a person would from a terminal), then open the .otf from the
    # explorer's context menu: the dashboard shows what was recorded, with no training process.
    exported = subprocess.run([sys.executable, "-m", "onthefly.cli", "export", "--out",
                               str(code_server.workspace / "baseline.otf")],
                              env=code_server.env, capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    item = page.locator(".explorer-folders-view .monaco-list-row", has_text="baseline.otf")
    expect(item).to_be_visible()
    item.click(button="right")
    # Chosen with the keyboard once the pointer has highlighted it: the menu spans the webview,
    # whose frame may take a click at that point.
    menu_entry = page.locator(".context-view .action-menu-item", has_text="Open Session in Dashboard")
    expect(menu_entry).to_be_visible()
    menu_entry.hover()
    expect(page.locator(".context-view .action-item.focused")).to_contain_text("Open Session in Dashboard")
    page.keyboard.press("Enter")
    expect(page.locator(".context-view .monaco-menu")).to_have_count(0)
    view = panel(page)
    expect(view.get_by_test_id("status")).to_have_text("Showing baseline.otf (no training process)")
    frame = view.frame_locator("iframe#dashboard")
    expect(frame.get_by_test_id("project")).to_have_text("vscode-e2e")
    expect(frame.get_by_test_id("status")).to_have_text("stopped")
    wait_until(lambda: chart_points(frame) > first, "the session's loss curve is drawn", DEADLINE_MS / 1000)
    shot(page, "session")
    view.get_by_role("button", name="Stop").click()
    expect(view.get_by_test_id("status")).to_have_text("baseline.otf stopped")
    print(f"\nthe VS Code end-to-end scenario took {time.monotonic() - started:.0f} s")
