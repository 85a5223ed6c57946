"""End to end: "Verify suspects" from the dashboard, in headless Chromium against a real training
process on digits with 10 % wrong labels. The test shows the likely mislabelled samples, presses
Verify suspects, and waits until the line beside it says how many were confirmed out of fold; the
confirmed ones are a slice in the slice list and over the API, most of them truly wrong labels.
Screenshot: test-artifacts/verify.png."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, expect

from test_e2e_dashboard import ARTIFACTS, Demo, page, training, wait_until  # noqa: F401 - page: the same fixture

HERE = Path(__file__).parent
DEADLINE_MS = 60_000


@pytest.fixture
def noisy(subprocess_env: dict[str, str]) -> Iterator[Demo]:
    yield from training([sys.executable, str(HERE / "e2e_noisy.py")], subprocess_env)


def test_verify_suspects_from_the_samples_table(noisy: Demo, page: Page) -> None:  # noqa: F811 - the fixture
    from sklearn.datasets import load_digits

    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    wait_until(lambda: noisy.api("/api/runs/1")["epoch"] >= 12, "12 epochs have trained", timeout=180)
    page.goto(noisy.url)
    # An epoch chosen by hand: the table stays on it while the run trains on (the one verified).
    page.locator("#select-epoch").select_option("10")
    expect(page.get_by_test_id("samples-caption")).to_contain_text("epoch 10 ·")
    button = page.get_by_role("button", name="Verify suspects")
    expect(button).to_be_visible()
    page.locator("#select-sample-flag").select_option("mislabelled")
    expect(page.get_by_test_id("samples-caption")).to_contain_text("likely mislabelled")
    expect(button).to_be_enabled()
    button.click()
    status = page.get_by_test_id("verify-status")
    expect(status).to_contain_text("next step boundary")
    expect(status).to_contain_text("confirmed out of fold", timeout=180_000)
    found = re.search(r"([\d,]+) of ([\d,]+) suspects confirmed", status.inner_text())
    assert found is not None, status.inner_text()
    confirmed, suspects = (int(g.replace(",", "")) for g in found.groups())
    # The epoch the table shows is the one verified: as many suspects as its caption counts.
    caption = page.get_by_test_id("samples-caption").inner_text()
    shown = re.search(r"epoch (\d+) · [\d,]+ hard · ([\d,]+) likely mislabelled", caption)
    assert shown is not None and shown.group(1) == "10" and int(shown.group(2).replace(",", "")) == suspects, caption
    assert 0 < confirmed <= suspects
    expect(status).to_contain_text("saved as slice “verified mislabelled”")
    expect(page.get_by_test_id("slices")).to_contain_text("verified mislabelled")
    saved = noisy.api("/api/slices/verified mislabelled")
    assert saved["count"] == confirmed
    # The confirmed samples are the wrong labels, nearly all of them.
    y = load_digits().target
    wrong = set(np.random.default_rng(0).choice(len(y), size=len(y) // 10, replace=False).tolist())
    indices = set(saved["definition"]["indices"])
    assert len(indices & wrong) >= 0.9 * len(indices)
    expect(page.get_by_test_id("status")).to_have_text("running")  # the run trains on
    ARTIFACTS.mkdir(exist_ok=True)
    page.get_by_test_id("verify-status").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "verify.png"))
