"""End to end: the dashboard in headless Chromium against a real training process.

One `onthefly demo` process trains with the dashboard attached; the test opens the page with its
token and acts as a person would: watches the loss curve grow, pauses, tests, changes the
learning rate, resumes, reloads mid-run, and stops. A screenshot is saved to test-artifacts/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from conftest import REPO

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
DEADLINE_MS = 60_000


class Demo:
    def __init__(self, process: subprocess.Popen[str], url: str, token: str) -> None:
        self.process = process
        self.url = url
        self.token = token
        self.base = url.split("/?")[0]

    def api(self, path: str) -> Any:
        response = httpx.get(self.base + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        response.raise_for_status()
        return response.json()


@pytest.fixture
def demo(subprocess_env: dict[str, str]) -> Iterator[Demo]:
    if not (REPO / "src" / "onthefly" / "dashboard" / "index.html").is_file():
        pytest.fail("the dashboard is not built: run `bash scripts/setup.sh` (npm ci && npm run build)")
    env = {**subprocess_env, "ONTHEFLY_HANDSHAKE": "json", "ONTHEFLY_DASHBOARD": "1"}
    # Enough epochs that training is still going while the test acts; the test stops it itself.
    process = subprocess.Popen(
        [sys.executable, "-m", "onthefly.cli", "demo", "--no-browser", "--epochs", "200",
         "--samples", "8000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the handshake is printed once the server listens
        assert line, f"the demo exited without a handshake: {process.stderr.read() if process.stderr else ''}"
        handshake = json.loads(line)["onthefly"]
        yield Demo(process, handshake["url"], handshake["token"])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert not errors, f"the page raised: {errors}"


def step_of(page: Page) -> int:
    return int(page.get_by_test_id("step").inner_text().replace(",", "").strip() or 0)


def chart_points(page: Page, test_id: str) -> int:
    return int(page.get_by_test_id(test_id).get_attribute("data-points") or 0)


def wait_until(predicate: Any, message: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {message}")
        time.sleep(0.1)  # polling a condition with a deadline, not papering over a race


def test_dashboard_controls_a_live_training_run(demo: Demo, page: Page) -> None:
    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    page.goto(demo.url)
    expect(page.get_by_test_id("project")).to_have_text("demo")
    expect(page.get_by_test_id("status")).to_have_text("running")

    # The loss curve grows while training runs.
    wait_until(lambda: chart_points(page, "chart-train-loss") > 5, "the loss chart has points")
    first = chart_points(page, "chart-train-loss")
    wait_until(lambda: chart_points(page, "chart-train-loss") > first + 5, "the loss chart grows")

    # Pause: the status says so and the step stops advancing.
    expect(page.get_by_role("button", name="Resume")).to_be_disabled()
    page.get_by_role("button", name="Pause").click()
    expect(page.get_by_test_id("status")).to_have_text("paused")
    expect(page.get_by_role("button", name="Resume")).to_be_enabled()
    expect(page.get_by_role("button", name="Pause")).to_be_disabled()
    paused_at = demo.api("/api/runs/1")["step"]
    expect(page.get_by_test_id("step")).to_have_text(f"{paused_at:,}")

    # Test now (applied while paused): the results appear; meanwhile the step has not moved.
    page.get_by_role("button", name="Test now").click()
    expect(page.get_by_test_id("test-results").locator("tbody tr:not(.empty)").first).to_be_visible()
    assert demo.api("/api/runs/1")["step"] == paused_at
    assert step_of(page) == paused_at

    # A new learning rate, applied at the paused step: the event log shows it with that step.
    page.get_by_label("Learning rate").fill("0.0005")
    page.get_by_role("button", name="Apply").click()
    log = page.get_by_test_id("event-log")
    expect(log).to_contain_text("set_lr")
    expect(log.locator("li", has_text="set_lr").first).to_contain_text(f"step {paused_at:,}")

    # Resume: training goes on, and the learning-rate chart reaches the new value.
    page.get_by_role("button", name="Resume").click()
    expect(page.get_by_test_id("status")).to_have_text("running")
    wait_until(lambda: step_of(page) > paused_at, "the step advances after resume")
    lr_chart = page.get_by_test_id("chart-lr")
    wait_until(lambda: float(lr_chart.get_attribute("data-last") or "nan") == pytest.approx(0.0005),
               "the lr chart shows 0.0005")
    lr_series = demo.api(f"/api/runs/1/metrics?names=lr&start_step={paused_at + 1}&points=20000")["series"]["lr"]
    assert lr_series["value"] and all(v == pytest.approx(0.0005) for v in lr_series["value"])

    # Reload mid-run: the history is complete (charts from the store, the log from the feed).
    before = chart_points(page, "chart-train-loss")
    page.reload()
    expect(page.get_by_test_id("status")).to_have_text("running")
    wait_until(lambda: chart_points(page, "chart-train-loss") >= min(before, 1000), "the history reloads")
    expect(page.get_by_test_id("event-log")).to_contain_text("set_lr")
    expect(page.get_by_test_id("test-results").locator("tbody tr:not(.empty)").first).to_be_visible()

    # Distribution and hard samples appear once an epoch has ended.
    wait_until(lambda: demo.api("/api/runs/1")["epoch"] >= 1, "an epoch ends")
    expect(page.get_by_test_id("quantiles")).to_contain_text("p90")
    expect(page.get_by_test_id("hard-samples").locator("tbody tr:not(.empty)").first).to_be_visible()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # Stop: the run ends and the demo process exits cleanly.
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_test_id("status")).to_have_text("stopped")
    assert demo.process.wait(60) == 0


def test_dashboard_page_needs_the_token(demo: Demo, page: Page) -> None:
    response = page.goto(demo.base + "/")
    assert response is not None and response.status == 401
