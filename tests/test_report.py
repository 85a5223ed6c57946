"""The HTML report of a session: one file that fetches nothing, every string from the database
escaped, every section present (saying "none" when it has nothing), non-finite values kept out
of the charts, and a page that headless Chromium renders offline. Its screenshot is saved to
test-artifacts/report.png."""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from playwright.sync_api import Request, Route, expect, sync_playwright
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import onthefly
from conftest import REPO, toy_data, toy_model
from onthefly import Callback, Run
from onthefly.actions.cluster import save_clustering
from onthefly.actions.report import (
    EVENTS_HEAD,
    EVENTS_TAIL,
    SUMMARY_CHARS,
    TOP_SAMPLES,
    write_report,
)
from onthefly.actions.slices import save_run_slice
from onthefly.errors import StoreError
from onthefly.store import SessionReader, SessionStore, open_session

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
RUN_NAME = 'net <b>&"'
FORK_NAME = "fork <i>"
SECTIONS = ("runs", "curves", "distribution", "flagged", "slices", "clusterings", "tests", "checkpoints", "events")
EMPTY_SECTIONS = ("curves", "distribution", "flagged", "slices", "clusterings", "tests", "checkpoints")


class Evidence(Callback):
    """Saves a checkpoint mid-run, and a slice and a clustering once training is done."""

    def on_step_end(self, run: Run) -> None:
        if run.global_step == 10:
            run.save_checkpoint()

    def on_fit_end(self, run: Run) -> None:
        save_run_slice(run, "top decile", {"kind": "quantile_band", "low": 0.9, "high": 1.0})
        save_clustering(run.session, run.run_id, k=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A session trained once for the module: run 1 with validation, a test at the end, noisy
    labels (so that some samples are flagged likely mislabelled), a slice and a clustering; then
    run 2, a fork of run 1 that never trained, whose train_loss has NaN and inf values and whose
    one test lost its loss."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ONTHEFLY_HOME", str(tmp_path_factory.mktemp("otf-home")))
        env.setenv("ONTHEFLY_DASHBOARD", "0")
        x, y = toy_data().tensors
        y = y.clone()
        y[::8] = (y[::8] + 1) % 3  # one label in 8 is wrong
        model = toy_model()
        summary = onthefly.quickstart(
            project="report", run_name=RUN_NAME, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(), train_loader=DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
            val_loader=DataLoader(toy_data(64, seed=1), batch_size=32),
            test_loader=DataLoader(toy_data(64, seed=2), batch_size=32),
            max_epochs=5, do_test_after=True, callbacks=(Evidence(),), progress=False,
        )
        store = SessionStore.reopen(summary.session_dir)
        fork = store.new_run(FORK_NAME, parent_id=summary.run_id, parent_checkpoint_id=1)
        now = time.time()
        losses = [1.0, math.nan, math.inf, 0.5, 0.4]
        store.metrics([(fork, "train_loss", step, 0, now, loss) for step, loss in enumerate(losses, 1)])
        store.event(store.next_seq(), fork, 5, 0, "eval", {"split": "test", "loss": math.nan, "accuracy": 0.5}, now)
        store.close()
        yield {"dir": summary.session_dir, "test": summary.test}


def section(page: str, key: str) -> str:
    found = re.search(rf'<section id="{key}">(.*?)</section>', page, re.DOTALL)
    assert found, f"no section {key!r} in the report"
    return found.group(1)


def rows(fragment: str) -> list[list[str]]:
    """The cells (HTML unescaped) of every body row of the tables in ``fragment``."""
    return [[html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment) if "<td" in row]


def rows_after(fragment: str, heading: str) -> list[list[str]]:
    """The body rows of the table under the first heading that starts with ``heading`` (none
    when the heading is followed by "none")."""
    found = re.search(rf'<h4>{heading}.*?</h4>(<table>.*?</table>|<p class="none">)', fragment, re.DOTALL)
    assert found, f"no heading {heading!r} followed by a table or 'none'"
    return rows(found.group(1))


def test_report_is_one_file_that_fetches_nothing(trained: dict[str, Any], tmp_path: Path) -> None:
    out = write_report(open_session(trained["dir"]), tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")

    assert out == tmp_path / "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left
    assert page.startswith("<!doctype html>")
    assert f'<meta name="generator" content="onthefly {onthefly.__version__}">' in page
    assert "default-src 'none'" in page  # the browser is told to load nothing
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.IGNORECASE)
    assert references and all(ref.startswith("#") for ref in references), references
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    assert page.count("<svg") >= 3
    for key in SECTIONS:
        assert f'id="{key}"' in page


def test_report_escapes_what_the_session_holds(trained: dict[str, Any], tmp_path: Path) -> None:
    page = write_report(open_session(trained["dir"]), tmp_path / "report.html").read_text(encoding="utf-8")

    assert "net &lt;b&gt;&amp;&quot;" in page and "fork &lt;i&gt;" in page
    assert "<b>" not in page and "<i>" not in page


def test_report_shows_runs_tests_checkpoints_and_events(trained: dict[str, Any], tmp_path: Path) -> None:
    reader = open_session(trained["dir"])
    page = write_report(reader, tmp_path / "report.html").read_text(encoding="utf-8")

    runs = section(page, "runs")
    assert "forked from run 1 at checkpoint 1" in runs and 'class="lineage"' in runs
    tests = rows(section(page, "tests"))  # run, step, epoch, loss, accuracy, samples, checkpoint
    (test_event,) = [e for e in reader.events(run_id=1, kind="eval") if e["payload"]["split"] == "test"]
    assert tests[0] == ["1", str(test_event["step"]), str(test_event["epoch"]), f"{trained['test']['loss']:.4g}",
                        f"{trained['test']['accuracy']:.4g}", "64", str(test_event["payload"]["checkpoint_id"])]
    assert tests[1][:5] == ["2", "5", "0", "nan", "0.5"]  # the fork's test, whose loss is NaN
    assert tests[1][6] == "—"  # it names no checkpoint
    checkpoints = section(page, "checkpoints")
    assert all(f"<td>{c['reason']}</td>" in checkpoints for c in reader.checkpoints())
    assert "<td>top decile</td>" in section(page, "slices")
    assert "<td>signals</td>" in section(page, "clusterings")
    events = section(page, "events")
    assert "<td>run_created</td>" in events and "<td>run_finished</td>" in events
    assert "left out" not in events  # a short log is shown whole
    assert "none (no per-sample values)" in section(page, "distribution")  # the fork never trained


def test_report_lists_flagged_samples_worst_first(trained: dict[str, Any], tmp_path: Path) -> None:
    reader = open_session(trained["dir"])
    page = write_report(reader, tmp_path / "report.html").read_text(encoding="utf-8")
    epoch, table = reader.sample_stats_at(1)
    rows_of_stats = table.to_pylist()

    flagged = section(page, "flagged")
    hard = [r for r in rows_of_stats if r["hard"]]
    assert f"<h4>Hard: {len(hard)} of {len(rows_of_stats)} samples at epoch {epoch}" in flagged
    shown = rows_after(flagged, "Hard")  # index, label, pred, loss, margin, AUM, forgetting
    assert len(shown) == min(len(hard), TOP_SAMPLES)
    assert int(shown[0][0]) == max(hard, key=lambda r: r["loss"])["index"]
    assert [float(r[3]) for r in shown] == sorted((float(r[3]) for r in shown), reverse=True)
    mislabelled = [r for r in rows_of_stats if r["mislabelled"]]
    assert f"<h4>Likely mislabelled: {len(mislabelled)} of {len(rows_of_stats)}" in flagged
    shown = rows_after(flagged, "Likely mislabelled")
    assert len(shown) == min(len(mislabelled), TOP_SAMPLES)
    if mislabelled:  # one label in 8 is wrong: after 5 epochs, some are flagged
        assert int(shown[0][0]) == min(mislabelled, key=lambda r: r["aum"])["index"]
        assert [float(r[5]) for r in shown] == sorted(float(r[5]) for r in shown)

    distribution = section(page, "distribution")
    assert 'data-testid="distribution-1"' in distribution
    assert all(f">{q} " in distribution for q in ("p50", "p90", "p99"))


def test_non_finite_metric_values_are_gaps_in_the_curve(trained: dict[str, Any], tmp_path: Path) -> None:
    page = write_report(open_session(trained["dir"]), tmp_path / "report.html").read_text(encoding="utf-8")

    chart = re.search(r'<svg[^>]*data-testid="curve-2-loss"[^>]*data-points="(\d+)".*?</svg>', page, re.DOTALL)
    assert chart, "no loss chart for the fork"
    assert chart.group(1) == "3"  # 1.0, 0.5 and 0.4; NaN and inf are left out
    (path,) = re.findall(r'<path d="([^"]*)"', chart.group(0))
    assert path.count("M") == 2  # the line stops at the gap and starts again after it
    assert "nan" not in path.lower() and "inf" not in path.lower()


def test_a_long_event_log_shows_its_start_and_end(tmp_path: Path) -> None:
    store = SessionStore("long")
    run = store.new_run("r")
    total = EVENTS_HEAD + EVENTS_TAIL + 120
    for i in range(total):
        store.event(store.next_seq(), run, i, 0, "note", {"i": i, "text": "x" * 300}, time.time())
    store.close()

    events = section(write_report(SessionReader(store.dir), tmp_path / "r.html").read_text(encoding="utf-8"),
                      "events")

    assert f"{total} events: 120 left out here" in events
    shown = rows(events)
    assert [int(r[0]) for r in shown] == [*range(1, EVENTS_HEAD + 1), *range(total - EVENTS_TAIL + 1, total + 1)]
    assert all(len(r[5]) <= SUMMARY_CHARS for r in shown) and shown[0][5].endswith("…")


def no_runs() -> Path:
    store = SessionStore("empty")
    store.close()
    return store.dir


def untrained_run() -> Path:
    model = toy_model()
    run = onthefly.start_run(project="empty", run_name="idle", model=model,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    run.close()
    return run.session.dir


@pytest.mark.parametrize("make", [no_runs, untrained_run], ids=["no runs", "a run that never trained"])
def test_an_empty_session_says_none(make: Any, tmp_path: Path) -> None:
    page = write_report(open_session(make()), tmp_path / "report.html").read_text(encoding="utf-8")

    for key in EMPTY_SECTIONS:
        assert '<p class="none">none' in section(page, key), key
    assert "<svg" not in page
    runs = section(page, "runs")
    assert ('<p class="none">none' in runs) == (make is no_runs)


def test_writing_where_no_folder_is_says_so(trained: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot write the report to .*missing.*folder that exists"):
        write_report(open_session(trained["dir"]), tmp_path / "missing" / "report.html")


def test_report_renders_offline_in_chromium(trained: dict[str, Any], tmp_path: Path) -> None:
    report = write_report(open_session(trained["dir"]), tmp_path / "report.html")
    fetched: list[str] = []  # every request that is not the report itself
    problems: list[str] = []

    def only_files(route: Route, request: Request) -> None:
        if request.url.startswith("file:"):
            route.continue_()
        else:
            fetched.append(request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900}, offline=True)
            context.route("**/*", only_files)
            page = context.new_page()
            page.on("request", lambda r: None if r.url.startswith("file:") else fetched.append(r.url))
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(report.as_uri())

            expect(page.locator("#curves")).to_be_visible()
            curve = page.get_by_test_id("curve-1-loss")
            expect(curve).to_be_visible()
            assert (curve.locator("path").first.get_attribute("d") or "").startswith("M")
            expect(page.get_by_test_id("distribution-1")).to_be_visible()
            assert page.evaluate("performance.getEntriesByType('resource').length") == 0
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert fetched == []
    assert problems == []  # a Content-Security-Policy violation would be logged here
