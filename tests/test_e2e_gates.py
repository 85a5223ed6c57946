"""End to end: a mixture of experts and its benchmark from the dashboard, in headless Chromium
against a real training process.

The specialist it routes to is made through the API (as test_e2e_merges does: a slice of the loss
tail, a fork card with its matched control). Then the test acts as a person would: ticks the
specialist and the generalist (run 1) in the lineage and presses "Gate…"; the gate card's form is
prefilled (name, the live run that carries it out, the experts with the generalist first whatever
the order of the ticks, the schema's defaults). A refusal (0 gate steps) is shown next to the form
naming the field. It proposes the card with 100 steps and approves it. The done card shows how the
gate shares the samples among the experts on every set (each warning of an unused expert shown),
the mixture against both experts, the ONNX status and the artifact's download (a tar, through the
page and over HTTP with the token). The mixture appears in the lineage with a gate edge from each
expert. "Benchmark…" proposes a benchmark card for the mixture; approved, its report shows the
four entrants, the summary, the compute items and the zero-FLOP operators; the monolith appears in
the lineage with a benchmark edge from the generalist. Screenshots: test-artifacts/gates.png (the
gate's result), gates-report.png (the benchmark's report) and gates-lineage.png (the graph).
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import Any

import httpx
from playwright.sync_api import Page, expect

from test_e2e_dashboard import ARTIFACTS, Demo, demo, page, wait_until  # noqa: F401 - demo, page: the same fixtures
from test_e2e_merges import fork_with_control

DEADLINE_MS = 30_000
CARD_MS = 240_000  # a card is carried out at a step boundary of the training run, on 2 shared cores
NAME = "mixture of baseline and tail specialist"


def plan_of(server: Demo, kind: str) -> dict[str, Any]:
    (plan,) = [p for p in server.api("/api/plans") if p["kind"] == kind]
    return plan


def test_a_gate_over_a_generalist_and_its_specialist_then_its_benchmark(demo: Demo, page: Page) -> None:  # noqa: F811
    page.set_default_timeout(DEADLINE_MS)
    expect.set_options(timeout=DEADLINE_MS)
    page.goto(demo.url)
    expect(page.get_by_test_id("status")).to_have_text("running")
    wait_until(lambda: demo.api("/api/runs/1")["epoch"] >= 1, "an epoch ends", timeout=120)
    specialist, _control = fork_with_control(demo)

    # "Gate…" needs two ticked runs. The specialist is ticked first: the form still puts the
    # generalist (the run without a parent) first.
    picks = page.get_by_test_id("lineage-picks")
    gate_button = page.get_by_role("button", name="Gate…")
    expect(picks.get_by_label("tail specialist", exact=True)).to_be_attached()
    expect(gate_button).to_be_disabled()
    picks.get_by_label("tail specialist", exact=True).check()
    expect(gate_button).to_be_disabled()
    picks.get_by_label("baseline", exact=True).check()
    gate_button.click()

    form = page.get_by_test_id("gate-form")
    expect(form).to_be_visible()
    expect(form.get_by_role("heading")).to_have_text("New gate card")
    expect(form.get_by_label("Name", exact=True)).to_have_value(NAME)
    expect(form.get_by_label("Carried out by")).to_have_value("1")
    expect(form.get_by_label("Routing")).to_have_value("top1")
    expect(form.get_by_label("Held-out data")).to_have_value("val")
    expect(form.get_by_label("Gate steps")).to_have_value("300")
    experts = form.get_by_test_id("gate-experts").locator("tbody tr")
    expect(experts).to_have_count(2)
    expect(experts.nth(0)).to_have_attribute("data-run-id", "1")
    expect(experts.nth(0)).to_contain_text("baseline (1)")
    expect(experts.nth(0)).to_contain_text("generalist")
    expect(experts.nth(1)).to_have_attribute("data-run-id", str(specialist))
    expect(experts.nth(1)).to_contain_text(f"tail specialist ({specialist})")
    expect(experts.nth(1)).to_contain_text("specialist")
    expect(form.get_by_label(f"Checkpoint of run {specialist}")).to_have_value("")
    expect(form.get_by_label("test", exact=True)).to_be_checked()
    expect(form.get_by_label("val", exact=True)).not_to_be_checked()
    expect(form).to_contain_text("the gate's hidden width (0: a linear gate)")  # the schema's words

    # A refusal is shown next to the form in the server's words, naming the field; nothing is saved.
    form.get_by_label("Gate steps").fill("0")
    form.get_by_role("button", name="Propose").click()
    errors = page.get_by_test_id("gate-errors")
    expect(errors).to_contain_text(re.compile(r"^steps: "))
    expect(form.get_by_label("Gate steps")).to_have_attribute("aria-invalid", "true")
    assert [p["kind"] for p in demo.api("/api/plans")] == ["fork"]

    # 100 steps keep it quick; a min share of 60% makes sure of a warning (two experts' shares
    # add up to 1, so one of them has at most half the samples); propose, then approve.
    form.get_by_label("Gate steps").fill("100")
    form.get_by_label("Min share").fill("0.6")
    form.get_by_role("button", name="Propose").click()
    proposed = form.get_by_role("heading", name=re.compile(r"^Gate card \d+ · proposed$"))
    expect(proposed.or_(errors).first).to_be_visible()
    expect(errors).to_have_text("")  # no refusal (else its words are in the failure)
    plan = plan_of(demo, "gate")
    card = plan["card"]
    assert plan["status"] == "proposed"
    assert (card["name"], card["run_id"], card["steps"], card["min_share"], card["routing"], card["data"], card["sets"]) \
        == (NAME, 1, 100, 0.6, "top1", "val", ["test"])
    assert card["experts"] == [{"run_id": 1, "checkpoint_id": None}, {"run_id": specialist, "checkpoint_id": None}]
    row = page.get_by_test_id("plan-cards").locator(f'tr[data-plan-id="{plan["id"]}"]')
    expect(row.locator(".status")).to_have_text("proposed")
    expect(row).to_contain_text(f"top1 gate over baseline (1) + tail specialist ({specialist}) · on val · 100 steps")
    expect(row).to_contain_text("not worse than its best expert on test · warns under 60.0% of samples")
    form.get_by_role("button", name="Approve").click()
    expect(form).to_be_hidden()
    expect(row.locator(".status")).to_have_text("done", timeout=CARD_MS)
    done = demo.api(f"/api/plans/{plan['id']}")
    assert done["status"] == "done", done["error"]
    (mixture,) = done["runs"]
    result = done["result"]
    expect(row).to_contain_text(f"{NAME} ({mixture})")

    # The result: which expert the gate picks on every set, every warning, the comparison.
    view = page.get_by_test_id("gate-result")
    expect(view).to_be_visible()
    expect(view).to_have_attribute("data-plan-id", str(plan["id"]))
    table = view.get_by_test_id("gate-utilisation")
    utilisation = result["utilisation"]
    assert utilisation["experts"] == [1, specialist]
    assert {"held-out", "test", "slice:tail"} <= set(utilisation["sets"])
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator('tr[data-run-id="1"] th')).to_contain_text("baseline (1)")
    expect(table.locator(f'tr[data-run-id="{specialist}"] th')).to_contain_text(f"tail specialist ({specialist})")
    expect(table.locator("thead")).to_contain_text("held-out (val)")
    expect(table.locator("thead")).to_contain_text("tail (slice)")
    for name, shares in utilisation["sets"].items():
        for run_id, share in zip(utilisation["experts"], shares["shares"], strict=True):
            cell = table.locator(f'tr[data-run-id="{run_id}"] td[data-set="{name}"]')
            expect(cell).to_have_text(re.compile(r"^\d+\.\d%$"))
            assert abs(float(cell.inner_text()[:-1]) - share * 100) <= 0.051, (run_id, name, cell.inner_text(), share)
    warnings = view.get_by_test_id("gate-warning")
    assert utilisation["warnings"], "an expert under 60% of the samples is warned about"
    expect(warnings).to_have_count(len(utilisation["warnings"]))
    for i, warning in enumerate(utilisation["warnings"]):
        expect(warnings.nth(i)).to_have_text(warning["text"])
        expect(warnings.nth(i)).to_be_visible()
        expect(warnings.nth(i)).to_have_attribute("data-run-id", str(warning["run_id"]))
        expect(table.locator(f'tr[data-run-id="{warning["run_id"]}"] td.low').first).to_be_visible()
    expect(row.locator(".plan-outcome")).to_contain_text("unused: run ")
    comparison = view.get_by_test_id("gate-comparison")
    for run in ("mixture", "1", str(specialist)):
        expect(comparison.locator(f'[data-testid="comparison-cell"][data-run="{run}"][data-set="test"]')).to_be_visible()
    expect(comparison.locator('tr[data-run="mixture"]')).to_contain_text("reference")
    artifact = result["artifact"]
    assert artifact["written"], artifact
    onnx = view.get_by_test_id("gate-onnx")
    expect(onnx).to_have_text(re.compile(r"^ONNX: (written|not written \(.+\))"))
    assert onnx.inner_text().startswith("ONNX: written") is artifact["onnx"]["written"]

    # The artifact downloads through the page (its request carries the token) and over HTTP.
    link = view.get_by_role("link", name="Download mixture (.tar)")
    assert link.get_attribute("href") == f"{demo.base}/api/runs/{mixture}/mixture"
    with page.expect_download() as downloaded:
        link.click()
    assert downloaded.value.suggested_filename == f"demo-mixture-run-{mixture}.tar"
    assert downloaded.value.failure() is None
    response = httpx.get(f"{demo.base}/api/runs/{mixture}/mixture", headers={"Authorization": f"Bearer {demo.token}"},
                         timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = {member.name.split("/", 1)[-1] for member in tar.getmembers()}
    assert {"manifest.json", "program.pt2", "weights.safetensors"} <= names

    # The lineage: the mixture after both experts, a gate edge from each.
    graph = page.get_by_test_id("lineage")
    node = graph.locator(f'[data-testid="lineage-node"][data-run-id="{mixture}"]')
    expect(node).to_be_visible()
    edges = graph.locator(f'[data-testid="lineage-edge"][data-kind="gate"][data-child="{mixture}"]')
    expect(edges).to_have_count(2)
    for parent in (1, specialist):
        expect(graph.locator(f'[data-testid="lineage-edge"][data-child="{mixture}"][data-parent="{parent}"]')) \
            .to_have_attribute("data-kind", "gate")
    expect(graph.get_by_test_id("lineage-legend")).to_contain_text("gate (one edge from each expert into the mixture)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#lineage").screenshot(path=str(ARTIFACTS / "gates-lineage.png"))
    page.locator("#plans").screenshot(path=str(ARTIFACTS / "gates.png"))

    # "Benchmark…" proposes a benchmark card for the mixture; approved from the list, it reports.
    view.get_by_role("button", name="Benchmark…").click()
    expect(page.get_by_test_id("plan-cards").locator("tr[data-status]")).to_have_count(3)
    benchmark = plan_of(demo, "benchmark")
    assert benchmark["status"] == "proposed"
    assert (benchmark["card"]["run_id"], benchmark["card"]["mixture"]) == (1, mixture)
    bench_row = page.get_by_test_id("plan-cards").locator(f'tr[data-plan-id="{benchmark["id"]}"]')
    expect(bench_row).to_contain_text(f"{NAME} ({mixture}) vs monolith, merge (linear, ties), generalist · on test")
    bench_row.get_by_role("button", name=f"Approve card {benchmark['id']}").click()
    expect(bench_row.locator(".status")).to_have_text("done", timeout=CARD_MS)
    finished = demo.api(f"/api/plans/{benchmark['id']}")
    assert finished["status"] == "done", finished["error"]
    (monolith,) = finished["runs"]
    report = finished["result"]["report"]

    panel = page.get_by_test_id("benchmark-report")
    expect(panel).to_be_visible()
    expect(panel.get_by_test_id("benchmark-summary")).to_have_text(report["summary"])
    entrants = panel.get_by_test_id("benchmark-table").locator("tbody tr")
    expect(entrants).to_have_count(4)
    for i, entrant in enumerate(("mixture", "monolith", "merge", "generalist")):
        expect(entrants.nth(i)).to_have_attribute("data-entrant", entrant)
        expect(entrants.nth(i).locator("th")).to_contain_text(report["comparison"]["names"][entrant])
        for name in report["sets"]:
            cell = next(c for c in report["comparison"]["cells"] if c["run"] == entrant and c["set"] == name)
            shown = entrants.nth(i).locator(f'td[data-set="{name}"] .line').first.inner_text()
            assert shown.endswith("%") and abs(float(shown[:-1]) - cell["accuracy"] * 100) <= 0.0051, (entrant, name, shown)
        expect(entrants.nth(i)).to_contain_text(" ms")  # latency per sample
    expect(entrants.nth(1)).to_contain_text("vs mixture")  # the paired difference from the mixture
    compute = report["compute"]
    expect(panel.get_by_test_id("benchmark-compute").locator("tbody tr")).to_have_count(len(compute["items"]))
    expect(panel.get_by_test_id("benchmark-compute")).to_contain_text(f"tail specialist ({specialist})")
    expect(panel.get_by_test_id("benchmark-budget")).to_contain_text(f"the monolith trains {compute['monolith_steps']:,} steps")
    for op in compute["zero_flop_ops"]:
        expect(panel.get_by_test_id("benchmark-zero-flops")).to_contain_text(op)
    expect(bench_row.locator(".plan-outcome")).to_contain_text("the mixture ")
    expect(graph.locator(f'[data-testid="lineage-edge"][data-kind="benchmark"][data-child="{monolith}"]')) \
        .to_have_attribute("data-parent", "1")
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(ARTIFACTS / "gates-report.png"))

    # Stop: the page's run is the live one again; the demo process exits cleanly.
    graph.locator('[data-testid="lineage-node"][data-run-id="1"]').click()
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_test_id("status")).to_have_text("stopped")
    assert demo.process.wait(60) == 0
