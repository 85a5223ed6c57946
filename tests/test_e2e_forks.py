"""End to end: a fork from the dashboard, in headless Chromium against a real training process.

The test acts as a person would: it waits for an epoch to end, drags the loss tail on the
distribution and saves it as a slice, presses "Fork…" on it, edits the card's learning rate and
budget, proposes and approves it, and waits until the card is done with its verdict. The lineage
then shows the parent, the specialist and its control; the test picks the three, chooses the
slice and validation, and compares: the table shows every run on both sets, with the
differences' intervals (or the note saying there are too few samples for one). A screenshot is
saved to test-artifacts/forks.png (and the card's form, with a refusal, to forks-card.png).
"""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from test_e2e_dashboard import ARTIFACTS, Demo, demo, page, wait_until  # noqa: F401 - demo, page: the same fixtures

DEADLINE_MS = 30_000


def test_a_fork_from_a_slice_to_its_comparison(demo: Demo, page: Page) -> None:  # noqa: F811 - the fixtures
    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    page.goto(demo.url)
    expect(page.get_by_test_id("status")).to_have_text("running")
    wait_until(lambda: demo.api("/api/runs/1")["epoch"] >= 1, "an epoch ends", timeout=120)
    expect(page.get_by_test_id("quantiles")).to_contain_text("p90")

    # Drag across the histogram's right half (the loss tail) and save it as a slice.
    plot = page.get_by_test_id("distribution").locator(".u-over")
    plot.evaluate("node => node.scrollIntoView({ block: 'center' })")  # below the sticky header
    box = plot.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.35, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.995, y, steps=8)
    page.mouse.up()
    expect(page.get_by_test_id("selection")).to_contain_text("loss")
    page.get_by_label("Slice name").fill("tail")
    page.get_by_role("button", name="Save slice").click()
    expect(page.get_by_test_id("message")).to_contain_text("Saved slice 'tail'")
    tail = demo.api("/api/slices/tail")
    assert tail["count"] > 0, "the dragged tail should hold samples"

    # "Fork…" opens a card prefilled for the slice, every field with its help text.
    page.get_by_role("button", name="Fork tail").click()
    form = page.get_by_test_id("plan-form")
    expect(form).to_be_visible()
    expect(form.get_by_label("Name")).to_have_value("tail specialist")
    expect(form.get_by_label("Slice", exact=True)).to_have_value("tail")
    expect(form.get_by_label("Parent run")).to_have_value("1")
    expect(form.get_by_label("Matched control")).to_be_checked()
    expect(form.get_by_label("Budget")).to_have_value("1")
    expect(form.get_by_label("Unit")).to_have_value("epochs")
    expect(form).to_contain_text("how long the fork trains, in budget_unit")  # the schema's description
    for label in ("Mix", "Slice share", "Weight decay", "Batch size", "Trains", "Adapter rank", "Seed",
                  "Checkpoint", "Min slice gain (pt)", "Max other drop (pt)"):
        expect(form.get_by_label(label, exact=True)).to_be_attached()

    # A refusal is shown next to the form in the server's words, naming the field.
    form.get_by_label("lr", exact=True).fill("-1")
    form.get_by_role("button", name="Propose").click()
    errors = page.get_by_test_id("plan-errors")
    expect(errors).to_contain_text(re.compile(r"^lr: Input should be greater than 0"))
    expect(form.get_by_label("lr", exact=True)).to_have_attribute("aria-invalid", "true")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#plans").screenshot(path=str(ARTIFACTS / "forks-card.png"))  # the form, with the refusal

    # Edit the learning rate and the budget; propose, then approve.
    form.get_by_label("lr", exact=True).fill("0.003")
    form.get_by_label("Budget").fill("2")
    form.get_by_role("button", name="Propose").click()
    expect(form.get_by_role("heading")).to_have_text(re.compile(r"^Card \d+ · proposed$"))
    (plan,) = demo.api("/api/plans")
    assert plan["status"] == "proposed"
    assert (plan["card"]["lr"], plan["card"]["budget"], plan["card"]["slice"]) == (0.003, 2, "tail")
    cards = page.get_by_test_id("plan-cards")
    row = cards.locator(f'tr[data-plan-id="{plan["id"]}"]')
    expect(row.locator(".status")).to_have_text("proposed")
    expect(row).to_contain_text("slice ≥ 0.0 pt, held-out ≥ -1.0 pt vs the control")
    # An edit before approval sends the changed field.
    form.get_by_label("Seed").fill("3")
    form.get_by_role("button", name="Save changes").click()
    wait_until(lambda: demo.api(f"/api/plans/{plan['id']}")["card"]["seed"] == 3, "the edit is saved")
    form.get_by_role("button", name="Approve").click()
    expect(form).to_be_hidden()

    # The card is carried out (approved -> running -> done) and shows its verdict and runs.
    expect(row.locator(".status")).to_have_text("done", timeout=180_000)
    done = demo.api(f"/api/plans/{plan['id']}")
    assert done["status"] == "done", done["error"]
    specialist, control = done["runs"]
    outcome = row.locator(".plan-outcome")
    expect(outcome).to_contain_text(re.compile(r"^(met|not met|no verdict) · slice [+-]?\d+\.\d pt · "))
    expect(row).to_contain_text(f"tail specialist ({specialist})")
    expect(row).to_contain_text(f"tail specialist control ({control})")

    # The lineage: the parent, the specialist and the control, the edges labelled.
    graph = page.get_by_test_id("lineage")
    expect(graph.locator('[data-testid="lineage-node"]')).to_have_count(3)
    for run_id in (1, specialist, control):
        expect(graph.locator(f'[data-testid="lineage-node"][data-run-id="{run_id}"]')).to_be_visible()
    expect(graph.locator(f'.lineage-edge[data-child="{specialist}"]')).to_contain_text("fork · step ")
    expect(graph.locator(f'.lineage-edge[data-child="{control}"]')).to_contain_text("control · step ")
    expect(graph.locator(f'[data-testid="lineage-node"][data-run-id="{specialist}"]')).to_have_attribute(
        "data-status", "finished")

    # Clicking a run makes it the page's run; back to the parent.
    graph.locator('[data-testid="lineage-node"][data-run-id="1"]').click()
    expect(page.get_by_test_id("run-name")).to_have_text("baseline")
    expect(page.get_by_test_id("lineage-detail")).to_contain_text("baseline (run 1)")

    # Pick the three, the slice and validation; the control is the default reference.
    picks = page.get_by_test_id("lineage-picks")
    for name in ("baseline", "tail specialist", "tail specialist control"):
        picks.get_by_label(name, exact=True).check()
    compare = page.locator("#compare")
    expect(compare.get_by_label("Reference")).to_have_value(str(control))
    sets = page.get_by_test_id("compare-sets")
    sets.get_by_label("tail", exact=True).check()
    expect(sets.get_by_label("val", exact=True)).to_be_checked()
    compare.get_by_role("button", name="Compare").click()

    table = page.get_by_test_id("comparison-table")
    expect(table.locator('[data-testid="comparison-cell"]')).to_have_count(6)
    stored = demo.api(f"/api/comparisons/{table.get_attribute('data-comparison')}")
    assert stored["request"] == {"runs": [1, specialist, control], "reference": control, "sets": ["tail", "val"],
                                 "n_boot": 2000, "seed": 0}
    for run_id in (1, specialist, control):
        expect(table.locator(f'tr[data-run="{run_id}"]')).to_be_visible()
    expect(table.locator(f'tr[data-run="{control}"]')).to_contain_text("reference")
    cells = {(c["run"], c["set"]): c for c in stored["result"]["cells"]}
    for run_id in (1, specialist):
        cell = table.locator(f'[data-testid="comparison-cell"][data-run="{run_id}"][data-set="tail"]')
        expect(cell).to_contain_text(f"n {tail['count']:,}")
        diff = cells[(str(run_id), "tail")]["diff"]
        if diff["accuracy"]["low"] is not None:
            expect(cell.locator('[data-field="diff"]')).to_have_text(
                re.compile(r"^[+-]?\d+\.\d pt \[[+-]?\d+\.\d, [+-]?\d+\.\d\]$"))
        else:
            expect(cell.locator('[data-field="note"]')).to_contain_text("too few samples for an interval")
        expect(cell.locator('[data-field="mcnemar"]')).to_contain_text(re.compile(r"McNemar p [=<] "))
    reference_cell = table.locator(f'[data-testid="comparison-cell"][data-run="{control}"][data-set="val"]')
    expect(reference_cell.locator('[data-field="diff"]')).to_have_count(0)

    page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the picture
    page.screenshot(path=str(ARTIFACTS / "forks.png"), full_page=True)
