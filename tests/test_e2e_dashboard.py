"""End to end: the dashboard in headless Chromium against a real training process.

One `onthefly demo` process trains with the dashboard attached; the test opens the page with its
token (which leaves the address bar at once) and acts as a person would: watches the loss curve
grow, pauses, tests, changes the learning rate, resumes, reloads mid-run, and stops; every API call
the page makes carries the token in its Authorization header. Another acts on per-sample evidence:
sees the epoch in progress marked live in the per-sample table, drags a loss range on the
distribution, saves it as a slice and exports it (the page says how many rows; the file is checked
against the stored per-sample rows), sees a failed export's error, clusters the samples, sorts and
filters the per-sample table. A third saves the session's files from the page: its archive (which
imports as that session) and its HTML report. Screenshots are saved to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from playwright.sync_api import Page, Request, expect, sync_playwright

import onthefly
from conftest import REPO
from onthefly.store.archive import read_manifest

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
    # Enough epochs that training is still going while the test acts; the test stops it itself.
    yield from training([sys.executable, "-m", "onthefly.cli", "demo", "--no-browser", "--epochs", "200",
                         "--samples", "8000"], subprocess_env)


def training(command: list[str], subprocess_env: dict[str, str]) -> Iterator[Demo]:
    """The body of a fixture: a training process with its dashboard, from its handshake line."""
    if not (REPO / "src" / "onthefly" / "dashboard" / "index.html").is_file():
        pytest.fail("the dashboard is not built: run `bash scripts/setup.sh` (npm ci && npm run build)")
    env = {**subprocess_env, "ONTHEFLY_HANDSHAKE": "json", "ONTHEFLY_DASHBOARD": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=REPO)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the handshake is printed once the server listens
        assert line, f"the training process exited without a handshake: {process.stderr.read() if process.stderr else ''}"
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
    api_calls: list[Request] = []
    page.on("request", lambda request: api_calls.append(request) if "/api/" in request.url else None)
    streams: list[str] = []
    page.on("websocket", lambda socket: streams.append(socket.url))
    page.goto(demo.url)
    expect(page.get_by_test_id("project")).to_have_text("demo")
    expect(page.get_by_test_id("status")).to_have_text("running")
    # The token leaves the address bar (and so the history) as soon as the page has read it.
    assert "token" not in page.url and page.url == demo.base + "/"

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

    # Reload mid-run (the address has no token now: the tab kept it): the history is complete
    # (charts from the store, the log from the feed).
    before = chart_points(page, "chart-train-loss")
    page.reload()
    expect(page.get_by_test_id("status")).to_have_text("running")
    assert "token" not in page.url
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

    # Every API call carried the token in its header (the server takes the page's cookie only for
    # the page, its assets and export downloads); the stream, which cannot send headers, in its URL.
    assert api_calls and streams
    for request in api_calls:
        assert request.headers.get("authorization") == f"Bearer {demo.token}", request.url
    assert all("/api/stream?" in url and f"token={demo.token}" in url for url in streams)


def column_values(page: Page, table_id: str, column: int) -> list[str]:
    """The text of one column (0-based) in every data row of a table."""
    rows = page.get_by_test_id(table_id).locator("tbody tr:not(.empty)")
    return [text.strip() for text in rows.locator(f"td:nth-child({column + 1})").all_inner_texts()]


def as_number(text: str) -> float:
    return float("nan") if text == "—" else float(text.replace(",", ""))


def expected_band(session_dir: str, run_id: int, epoch: int, low: float, high: float) -> set[int]:
    """The samples whose loss at `epoch` lies in [low, high], from the stored per-sample rows (the
    mean per index: a sampler may draw an index more than once in an epoch)."""
    rows = onthefly.open_session(session_dir).samples(run_id, epoch=epoch)
    means = rows.group_by("index").aggregate([("loss", "mean")])
    loss = means.column("loss_mean").to_numpy(zero_copy_only=False)
    index = means.column("index").to_numpy()
    return {int(i) for i in index[(loss >= low) & (loss <= high)]}


def test_dashboard_turns_per_sample_evidence_into_slices(demo: Demo, page: Page, tmp_path: Path) -> None:
    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    page.goto(demo.url)
    expect(page.get_by_test_id("status")).to_have_text("running")
    # A few epochs, so the training dynamics (AUM, forgetting) have something to say.
    wait_until(lambda: demo.api("/api/runs/1")["epoch"] >= 3, "three epochs end")
    # The table shows the newest finished epoch and says, marked live, which one is in progress.
    live = page.get_by_test_id("samples-caption").locator(".caption-live")
    expect(live).to_contain_text(re.compile(r"Epoch \d+ is in progress: its per-sample table fills when the epoch ends"))
    expect(live.locator(".mode")).to_have_text("live")
    table = page.get_by_test_id("hard-samples")
    assert int(table.get_attribute("data-live-epoch") or -1) > int(table.get_attribute("data-epoch") or -1)

    # Pause, so the histogram holds still under the mouse.
    page.get_by_role("button", name="Pause").click()
    expect(page.get_by_test_id("status")).to_have_text("paused")
    quantiles = page.get_by_test_id("quantiles")
    for text in ("p50", "p90", "p95", "p99", "median", "MAD"):
        expect(quantiles).to_contain_text(text)
    expect(page.get_by_test_id("distribution-mode")).to_have_text(re.compile(r"^(exact|live · (exact|approximate))$"))

    # Drag across the left part of the histogram (where the mass is): the range and a form appear.
    plot = page.get_by_test_id("distribution").locator(".u-over")
    plot.evaluate("node => node.scrollIntoView({ block: 'center' })")  # the mouse acts in the viewport, below the sticky header
    box = plot.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.02, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, y, steps=8)
    page.mouse.up()
    expect(page.get_by_test_id("selection")).to_contain_text("loss")
    page.get_by_label("Slice name").fill("low loss")
    page.get_by_role("button", name="Save slice").click()
    message = page.get_by_test_id("message")
    expect(message).to_contain_text("Saved slice 'low loss'")

    saved = demo.api("/api/slices/low loss")
    definition = saved["definition"]
    assert definition["kind"] == "loss_band"
    assert definition["low"] == pytest.approx(float(page.get_by_test_id("selection").get_attribute("data-low") or "nan"))
    assert definition["high"] == pytest.approx(float(page.get_by_test_id("selection").get_attribute("data-high") or "nan"))
    expect(message).to_have_text(f"Saved slice 'low loss': {saved['count']:,} samples at epoch {saved['epoch']}")
    slices = page.get_by_test_id("slices")
    expect(slices.locator("tr", has_text="low loss")).to_contain_text(f"{saved['count']:,}")

    # Export it as Parquet: the page says how many rows, and the file holds exactly the samples
    # whose stored loss at that epoch lies in the band.
    with page.expect_download() as download:
        page.get_by_role("button", name="Export low loss as Parquet").click()
    expect(message).to_contain_text(f"Exported 'low loss' as Parquet: {saved['count']:,} rows")
    assert download.value.suggested_filename == "low-loss.parquet"  # the server's file name
    path = tmp_path / "low-loss.parquet"
    download.value.save_as(path)
    exported = pq.read_table(path)
    session_dir = demo.api("/api/session")["dir"]
    expected = expected_band(session_dir, saved["run_id"], saved["epoch"], definition["low"], definition["high"])
    assert expected, "the dragged band should hold samples"
    assert exported.num_rows == saved["count"] == len(expected)
    assert set(exported.column("index").to_pylist()) == expected
    assert {"x_0", "x_783", "y", "loss", "hard", "mislabelled"} <= set(exported.column_names)

    # Cluster on signals: the scatter draws the points, the table lists the clusters.
    page.get_by_role("button", name="Cluster", exact=True).click()
    scatter = page.get_by_test_id("clusters")
    # The caption names the new clustering (or, on failure, says why there is none).
    expect(page.get_by_test_id("clusters-caption")).to_have_text(re.compile(r"^clustering \d+ · "))
    wait_until(lambda: int(scatter.get_attribute("data-points") or 0) > 0, "the scatter shows points")
    clustering = demo.api(f"/api/clusterings/{scatter.get_attribute('data-clustering')}")
    assert int(scatter.get_attribute("data-points") or 0) == len(clustering["points"]["index"])
    expect(page.get_by_test_id("cluster-table").locator("tbody tr:not(.empty)")).to_have_count(clustering["k"])
    expect(page.get_by_test_id("clusters-caption")).to_contain_text(f"clustering {clustering['id']} · ")

    # A failed export says why, and downloads nothing: a cluster saved as a slice, then deleted
    # behind the page's back.
    downloads: list[Any] = []
    page.on("download", lambda download: downloads.append(download))  # a bound builtin cannot be a handler
    page.get_by_role("button", name="Save cluster 0 as slice").click()
    gone = f"clustering {clustering['id']} cluster 0"
    expect(slices.locator("tr", has_text=gone)).to_be_visible()
    httpx.delete(f"{demo.base}/api/slices/{gone}", headers={"Authorization": f"Bearer {demo.token}"},
                 timeout=10).raise_for_status()
    page.get_by_role("button", name=f"Export {gone} as CSV").click()
    expect(message).to_contain_text(f"Could not export '{gone}' as CSV: ")
    expect(message).to_have_attribute("data-tone", "error")
    assert "Exported" not in message.inner_text() and not downloads

    # The per-sample table: sort by AUM both ways, then show only the hard samples.
    aum = table.get_by_role("columnheader", name="AUM")
    expect(aum).to_have_attribute("aria-sort", "none")
    aum.get_by_role("button").click()
    expect(aum).to_have_attribute("aria-sort", "descending")
    expect(table.get_by_role("columnheader", name="loss")).to_have_attribute("aria-sort", "none")
    aum_column = 6

    def aum_sorted(descending: bool) -> bool:
        if table.get_attribute("aria-busy") is not None:
            return False
        values = [as_number(v) for v in column_values(page, "hard-samples", aum_column)]
        finite = [v for v in values if v == v]
        return len(finite) > 1 and finite == sorted(finite, reverse=descending)

    wait_until(lambda: aum_sorted(True), "the table is sorted by AUM, largest first")
    aum.get_by_role("button").click()
    expect(aum).to_have_attribute("aria-sort", "ascending")
    wait_until(lambda: aum_sorted(False), "the table is sorted by AUM, smallest first")

    page.get_by_label("Show").select_option("hard")
    hard = demo.api("/api/runs/1/samples?flag=hard&limit=1")
    expect(table).to_have_attribute("data-total", str(hard["total"]))
    flags = column_values(page, "hard-samples", 11)
    assert flags and all("hard" in flag for flag in flags)
    expect(page.get_by_test_id("samples-caption")).to_contain_text(f"{hard['flags']['hard']:,} hard")
    expect(page.get_by_test_id("samples-caption")).to_contain_text("grad norm: off")

    # A row's history: the sample's loss and margin epoch by epoch.
    table.locator("tbody tr:not(.empty)").first.click()
    history = page.get_by_test_id("sample-history")
    expect(history).to_be_visible()
    wait_until(lambda: int(history.get_attribute("data-points") or 0) >= 3, "the history has an epoch each")

    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the picture
    page.screenshot(path=str(ARTIFACTS / "dashboard-evidence.png"), full_page=True)

    # Delete the slice: it leaves the list.
    page.get_by_role("button", name="Delete low loss").click()
    expect(message).to_contain_text("Deleted slice 'low loss'")
    expect(slices.locator("tr", has_text="low loss")).to_have_count(0)


def test_dashboard_exports_the_session_and_its_report(demo: Demo, page: Page, tmp_path: Path) -> None:
    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    page.goto(demo.url)
    expect(page.get_by_test_id("status")).to_have_text("running")
    session = demo.api("/api/session")
    message = page.get_by_test_id("message")

    # Export the session while it trains: the page says what it saved, and the browser downloads
    # an archive that is this session, with the weights saved for the export as its final model.
    with page.expect_download() as archive:
        page.get_by_role("button", name="Export session (.otf)").click()
    expect(message).to_contain_text("Saved the session as ")
    expect(message).to_have_attribute("data-tone", "info")
    path = tmp_path / archive.value.suggested_filename
    archive.value.save_as(path)
    manifest = read_manifest(path)
    assert manifest["session"]["id"] == session["id"]
    final = manifest["final_checkpoint"]
    assert final is not None and final["run_id"] == 1
    expect(message).to_contain_text(f"Saved the session as {path.name} (")
    expect(message).to_contain_text(f"final model: checkpoint {final['id']} of run 1 at step {final['step']:,}.")

    # The report: one HTML file, under the server's name, with its charts drawn in.
    with page.expect_download() as report:
        page.get_by_role("button", name="Report (HTML)").click()
    expect(message).to_contain_text("report")
    assert report.value.suggested_filename == f"demo-{session['id']}-report.html"
    path = tmp_path / report.value.suggested_filename
    report.value.save_as(path)
    html = path.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "<svg" in html


def test_dashboard_page_needs_the_token(demo: Demo, page: Page) -> None:
    response = page.goto(demo.base + "/")
    assert response is not None and response.status == 401
