"""End to end: health check-ups from the dashboard, in headless Chromium against a real training process.

The demo is a clean script. Once an epoch has ended the test presses "Run check-up": the cards
arrive (the live `health` event), none an error or a warning, each the page shows one the event
recorded, and the history has one entry with its counts. "Check determinism" then adds a second
entry whose card says the replay is identical; the determinism result shows the environment
contract as a table (the torch version the event reports, read over HTTP with the token) and the
advice. A click on the first entry shows its cards again. Stopping the run disables both buttons.
Screenshot: test-artifacts/health.png (the panel).
"""

from __future__ import annotations

from typing import Any

from playwright.sync_api import Page, expect

from test_e2e_dashboard import ARTIFACTS, Demo, demo, page, wait_until  # noqa: F401 - demo, page: the same fixtures

DEADLINE_MS = 60_000


def checkups(server: Demo) -> list[dict[str, Any]]:
    """The session's `health` events, oldest first (the event log, page by page)."""
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        events = server.api(f"/api/events?after_seq={after}&limit=10000")["events"]
        found += [e for e in events if e["kind"] == "health"]
        if len(events) < 10000:
            return found
        after = events[-1]["seq"]


def test_health_check_ups_and_determinism_from_the_panel(demo: Demo, page: Page) -> None:  # noqa: F811
    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    page.goto(demo.url)
    expect(page.get_by_test_id("status")).to_have_text("running")
    wait_until(lambda: demo.api("/api/runs/1")["epoch"] >= 1, "an epoch ends", timeout=120)

    panel = page.get_by_test_id("health")
    check = panel.get_by_role("button", name="Run check-up")
    determinism_button = panel.get_by_role("button", name="Check determinism")
    history = panel.get_by_test_id("health-history").locator("tbody tr:not(.empty)")
    cards = panel.get_by_test_id("health-card")
    expect(history).to_have_count(0)
    expect(panel.get_by_test_id("health-caption")).to_contain_text("No check-up yet")

    # Run check-up: accepted like any command, then the cards arrive on the stream.
    check.click()
    expect(page.get_by_test_id("message")).to_contain_text("health_check sent")
    expect(history).to_have_count(1)
    wait_until(lambda: len(checkups(demo)) == 1, "the check-up is in the event log", timeout=30)
    (recorded,) = checkups(demo)
    assert recorded["run_id"] == 1 and "determinism" not in recorded["payload"]["areas"]
    worrying = [c["title"] for c in recorded["payload"]["cards"] if c["severity"] != "info"]
    assert not worrying, f"the clean demo has findings: {worrying}"
    expect(cards).to_have_count(len(recorded["payload"]["cards"]))
    assert len(recorded["payload"]["cards"]) >= 1
    expect(panel.locator('[data-testid="health-card"]:not([data-severity="info"])')).to_have_count(0)
    throughput = panel.locator('[data-testid="health-card"][data-check="throughput"]')
    expect(throughput).to_have_attribute("data-severity", "info")
    expect(throughput).to_contain_text("-bound: a batch takes")
    expect(throughput).to_contain_text("Fix: ")
    expect(throughput.locator('.evidence [data-key="workers"] dd')).to_have_text("0")
    row = history.first
    expect(row).to_have_attribute("data-step", str(recorded["step"]))
    expect(row).to_have_attribute("aria-current", "true")
    expect(row.locator('td[data-severity="error"]')).to_have_text("0")
    expect(row.locator('td[data-severity="warning"]')).to_have_text("0")
    expect(row.locator('td[data-severity="info"]')).to_have_text(str(len(recorded["payload"]["cards"])))
    expect(row).to_contain_text("every area")
    expect(panel.get_by_test_id("determinism")).to_contain_text("No determinism check yet")

    # Check determinism: a second check-up, of that area alone, shown as it arrives.
    determinism_button.click()
    expect(history).to_have_count(2)
    wait_until(lambda: len(checkups(demo)) == 2, "the determinism check is in the event log", timeout=30)
    payload = checkups(demo)[1]["payload"]
    assert payload["areas"] == ["determinism"]
    (card,) = [c for c in payload["cards"] if c["check"] == "determinism"]
    (replayed,) = [c for c in payload["cards"] if c["check"] == "replay"]
    assert card["title"].startswith("identical"), card["title"]
    assert len(payload["cards"]) == 2 and "no checkpoint yet" in replayed["title"]  # the demo saves none
    shown = panel.locator('[data-testid="health-card"][data-check="determinism"]')
    expect(cards).to_have_count(2)
    expect(shown).to_have_attribute("data-severity", "info")
    expect(shown).to_contain_text("identical")
    result = panel.get_by_test_id("determinism")
    expect(result).to_have_attribute("data-identical", "true")
    expect(result.locator(".determinism-verdict")).to_have_text(card["title"])
    expect(result.get_by_test_id("determinism-replay")).to_have_text(replayed["title"])
    contract = result.get_by_test_id("determinism-contract")
    expect(contract.locator("tbody tr")).to_have_count(len(card["evidence"]["contract"]))
    expect(contract.locator('tr[data-key="torch"] td')).to_have_text(card["evidence"]["contract"]["torch"])
    expect(contract.locator('tr[data-key="device"] td')).to_have_text("cpu")
    advice = result.get_by_test_id("determinism-advice").locator("li")
    expect(advice).to_have_text(card["evidence"]["advice"])
    expect(history.first).to_contain_text("determinism")

    # The history: the first check-up's cards again on a click; the newest follows again.
    history.nth(1).click()
    expect(cards).to_have_count(len(recorded["payload"]["cards"]))
    expect(panel.get_by_test_id("health-caption")).to_contain_text("an earlier check-up")
    history.first.click()
    expect(cards).to_have_count(2)
    expect(history.first).to_have_attribute("aria-current", "true")

    ARTIFACTS.mkdir(exist_ok=True)
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(ARTIFACTS / "health.png"))

    # Stop: no live run carries a check-up out any more; the demo process exits cleanly.
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_test_id("status")).to_have_text("stopped")
    expect(check).to_be_disabled()
    expect(determinism_button).to_be_disabled()
    assert demo.process.wait(60) == 0
