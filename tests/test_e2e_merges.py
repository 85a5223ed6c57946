"""End to end: a merge from the dashboard, in headless Chromium against a real training process.

The fork it merges is made through the API (test_e2e_forks drives a fork from the page): a slice
of the loss tail, a fork card with its matched control, approved and carried out. Then the test
acts as a person would: ticks the specialist and the control in the lineage and presses
"Merge…"; the merge card's form is prefilled (name, the live run that carries it out, the two
parents with weight 1, linear) and shows only the method's parameters. A refusal (TIES with
density 0) is shown next to the form naming the field. It proposes the linear merge, previews it
(the table: the candidate against both parents on validation) and approves it: when the preview
lost to a parent, the page warns, approving is refused until "override" is ticked, and the
override is saved with the approval. The merged run then appears in the lineage after both
parents, with a merge edge from each. Screenshots: test-artifacts/merges.png (and merges-card.png,
the form with its preview; merges-lineage.png, the graph).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from playwright.sync_api import Page, expect

from test_e2e_dashboard import ARTIFACTS, Demo, demo, page, wait_until  # noqa: F401 - demo, page: the same fixtures

DEADLINE_MS = 30_000
NAME = "merge of tail specialist and tail specialist control"


def post(server: Demo, path: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.post(server.base + path, json=body, headers={"Authorization": f"Bearer {server.token}"},
                          timeout=30)
    assert response.is_success, f"POST {path}: {response.status_code} {response.text}"
    return response.json()


def fork_with_control(server: Demo) -> tuple[int, int]:
    """A specialist on the loss tail and its matched control: two children of one fork point."""
    post(server, "/api/slices", {"name": "tail", "run_id": 1, "definition": {"kind": "quantile_band", "low": 0.8}})
    plan = post(server, "/api/plans", {"kind": "fork", "name": "tail specialist", "run_id": 1, "slice": "tail",
                                       "lr": 0.003, "budget": 1, "control": True})
    post(server, f"/api/plans/{plan['id']}/approve")
    wait_until(lambda: server.api(f"/api/plans/{plan['id']}")["status"] in ("done", "failed"), "the fork is done",
               timeout=180)
    done = server.api(f"/api/plans/{plan['id']}")
    assert done["status"] == "done", done["error"]
    specialist, control = done["runs"]
    return specialist, control


def test_a_merge_of_a_fork_and_its_control_from_the_lineage(demo: Demo, page: Page) -> None:  # noqa: F811
    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    page.goto(demo.url)
    expect(page.get_by_test_id("status")).to_have_text("running")
    wait_until(lambda: demo.api("/api/runs/1")["epoch"] >= 1, "an epoch ends", timeout=120)
    specialist, control = fork_with_control(demo)

    # "Merge…" needs two ticked runs; ticking the two children enables it.
    picks = page.get_by_test_id("lineage-picks")
    merge_button = page.get_by_role("button", name="Merge…")
    expect(picks.get_by_label("tail specialist control", exact=True)).to_be_attached()
    expect(merge_button).to_be_disabled()
    picks.get_by_label("tail specialist", exact=True).check()
    expect(merge_button).to_be_disabled()
    picks.get_by_label("tail specialist control", exact=True).check()
    merge_button.click()

    # The form is prefilled: the ticked runs as parents with weight 1, run 1 (live) carries it out.
    form = page.get_by_test_id("merge-form")
    expect(form).to_be_visible()
    expect(form.get_by_role("heading")).to_have_text("New merge card")
    expect(form.get_by_label("Name", exact=True)).to_have_value(NAME)
    expect(form.get_by_label("Carried out by")).to_have_value("1")
    expect(form.get_by_label("Method")).to_have_value("linear")
    parents = form.get_by_test_id("merge-parents")
    expect(parents.locator("tbody tr")).to_have_count(2)
    expect(parents.locator(f'tr[data-run-id="{specialist}"]')).to_contain_text(f"tail specialist ({specialist})")
    expect(parents.locator(f'tr[data-run-id="{control}"]')).to_contain_text(f"tail specialist control ({control})")
    for run_id in (specialist, control):
        expect(form.get_by_label(f"Weight of run {run_id}")).to_have_value("1")
        expect(form.get_by_label(f"Checkpoint of run {run_id}")).to_have_value("")
    expect(form.get_by_label("val", exact=True)).to_be_checked()
    expect(form.get_by_label("Override")).not_to_be_checked()
    expect(form).to_contain_text("linear, task_arithmetic: divide by the sum of the weights")  # the schema's words

    # Only the chosen method's parameters are shown.
    for label in ("Density", "Lambda", "Temperature", "Fisher samples", "Fused rank"):
        expect(form.get_by_label(label, exact=True)).to_be_hidden()
    expect(form.get_by_label("Normalize", exact=True)).to_be_visible()
    form.get_by_label("Method").select_option("ties")
    for label in ("Density", "Lambda", "Majority sign", "Base checkpoint"):
        expect(form.get_by_label(label, exact=True)).to_be_visible()
    expect(form.get_by_label("Normalize", exact=True)).to_be_hidden()

    # A refusal is shown next to the form in the server's words, naming the field; nothing is saved.
    form.get_by_label("Density", exact=True).fill("0")
    form.get_by_role("button", name="Propose").click()
    errors = page.get_by_test_id("merge-errors")
    expect(errors).to_contain_text(re.compile(r"^density: Input should be greater than 0"))
    expect(form.get_by_label("Density", exact=True)).to_have_attribute("aria-invalid", "true")
    assert [p["kind"] for p in demo.api("/api/plans")] == ["fork"]

    # Back to linear (the hidden density goes as its default), propose.
    form.get_by_label("Method").select_option("linear")
    form.get_by_role("button", name="Propose").click()
    proposed = form.get_by_role("heading", name=re.compile(r"^Merge card \d+ · proposed$"))
    expect(proposed.or_(errors).first).to_be_visible()
    expect(errors).to_have_text("")  # no refusal (else its words are in the failure)
    expect(proposed).to_be_visible()
    (plan,) = [p for p in demo.api("/api/plans") if p["kind"] == "merge"]
    card = plan["card"]
    assert plan["status"] == "proposed"
    assert (card["name"], card["run_id"], card["method"], card["density"], card["override"], card["sets"]) == \
        (NAME, 1, "linear", 0.5, False, ["val"])
    assert card["parents"] == [{"run_id": specialist, "checkpoint_id": None, "weight": 1.0},
                               {"run_id": control, "checkpoint_id": None, "weight": 1.0}]
    row = page.get_by_test_id("plan-cards").locator(f'tr[data-plan-id="{plan["id"]}"]')
    expect(row.locator(".status")).to_have_text("proposed")
    expect(row).to_contain_text(
        f"linear of tail specialist ({specialist}) + tail specialist control ({control}) · by baseline (1)")
    expect(row).to_contain_text("not worse than its best parent on val")
    for action in ("Edit", "Preview", "Approve", "Discard"):
        expect(row.get_by_role("button", name=f"{action} card {plan['id']}")).to_be_visible()

    # Preview: the candidate (the reference) against both parents on validation.
    form.get_by_role("button", name="Preview").click()
    table = form.get_by_test_id("merge-preview-table")
    for run in ("merge", str(specialist), str(control)):
        expect(table.locator(f'[data-testid="comparison-cell"][data-run="{run}"][data-set="val"]')).to_be_visible(
            timeout=180_000)
    expect(table.locator('tr[data-run="merge"]')).to_contain_text(f"{NAME} (merge)")
    expect(table.locator('tr[data-run="merge"]')).to_contain_text("reference")
    expect(table.locator(f'[data-run="{specialist}"][data-set="val"] [data-field="mcnemar"]')).to_contain_text(
        "McNemar p")
    previewed = demo.api(f"/api/plans/{plan['id']}")
    assert previewed["status"] == "proposed"
    preview = previewed["result"]["preview"]
    assert table.get_attribute("data-comparison") == str(preview["comparison_id"])
    warning = form.get_by_test_id("merge-warning")
    worse = preview["worse"]
    if worse is not None:
        # It lost to a parent: the page says so and that approving needs override; approving
        # without it is refused (409) in the server's words; ticking it lets the approval through.
        expect(warning).to_be_visible()
        expect(warning).to_contain_text(worse["text"])
        expect(warning).to_contain_text("needs “override” ticked")
        expect(row.locator(".plan-outcome")).to_contain_text(f"previewed · {worse['text']}")
        form.get_by_role("button", name="Approve").click()
        expect(errors).to_contain_text("not kept")
        expect(errors).to_contain_text("override")
        assert demo.api(f"/api/plans/{plan['id']}")["status"] == "proposed"
        form.get_by_label("Override").check()
        expect(warning).to_contain_text("override is ticked")
    else:
        expect(warning).to_be_hidden()
        expect(row.locator(".plan-outcome")).to_contain_text("previewed · not worse than any parent")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#plans").screenshot(path=str(ARTIFACTS / "merges-card.png"))  # the form with its preview

    # Approve (the override, when ticked, is saved first): the card is done with the merged run.
    form.get_by_role("button", name="Approve").click()
    expect(form).to_be_hidden()
    expect(row.locator(".status")).to_have_text("done", timeout=180_000)
    done = demo.api(f"/api/plans/{plan['id']}")
    assert done["status"] == "done", done["error"]
    assert done["card"]["override"] is (worse is not None)
    (merged,) = done["runs"]
    expect(row).to_contain_text(f"{NAME} ({merged})")
    expect(row.locator(".plan-outcome")).to_contain_text(
        "kept · not worse than any parent" if worse is None else "kept by override · ")

    # The lineage: the merged run after both parents, a dashed merge edge from each.
    graph = page.get_by_test_id("lineage")
    node = graph.locator(f'[data-testid="lineage-node"][data-run-id="{merged}"]')
    expect(node).to_be_visible()
    expect(node).to_contain_text(f"run {merged}")
    edges = graph.locator(f'[data-testid="lineage-edge"][data-kind="merge"][data-child="{merged}"]')
    expect(edges).to_have_count(2)
    for parent in (specialist, control):
        edge = graph.locator(f'[data-testid="lineage-edge"][data-child="{merged}"][data-parent="{parent}"]')
        expect(edge).to_have_attribute("data-kind", "merge")
        expect(edge).to_have_attribute("aria-label", re.compile(rf"^merge( · step [\d,]+)?: tail specialist.* → {NAME}"))
    dash = edges.first.locator("path").evaluate("path => getComputedStyle(path).strokeDasharray")
    assert dash not in ("", "none"), "merge edges are dashed"
    expect(graph.get_by_test_id("lineage-legend")).to_contain_text("merge (one edge from each parent)")
    merged_box = node.bounding_box()
    for parent in (specialist, control):
        parent_box = graph.locator(f'[data-testid="lineage-node"][data-run-id="{parent}"]').bounding_box()
        assert merged_box is not None and parent_box is not None
        assert merged_box["x"] > parent_box["x"] + parent_box["width"], "the merge sits after its parents"
    lineage = demo.api("/api/lineage")
    assert sorted(e["parent"] for e in lineage["edges"] if e["child"] == merged and e["kind"] == "merge") == \
        sorted([specialist, control])
    node.click()
    expect(page.get_by_test_id("lineage-detail")).to_contain_text(
        f"merge of tail specialist ({specialist}), tail specialist control ({control}) · card {plan['id']}")

    page.locator("#lineage").screenshot(path=str(ARTIFACTS / "merges-lineage.png"))
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the picture
    page.screenshot(path=str(ARTIFACTS / "merges.png"), full_page=True)
