// What a done gate card made, and what a done benchmark card found, under the plan cards. The
// gate's part: how the gate shares the samples among its experts on each set (with a warning,
// prominent, for an expert it has (almost) stopped using), the mixture against every expert
// (the comparison table), the standalone artifact (its download, ONNX's parity) and
// "Benchmark…", which proposes a benchmark card for this mixture. The benchmark's part: its
// summary in words, every entrant on every set against the mixture with inference cost, and what
// the compute budget was made of. Each shows the newest done card of its kind, or the one whose
// "Details" was pressed. The words and numbers come from gate-card.ts and benchmark-card.ts.

import type { PlanOut } from "./api";
import {
  ENTRANTS,
  benchmarkOutcomeText,
  budgetText,
  entrantRow,
  inferenceText,
  mergeChoiceText,
  readBenchmarkReport,
  readBenchmarkVerdict,
  zeroFlopText,
} from "./benchmark-card";
import { readComparison, renderComparison } from "./compare";
import { element } from "./dom";
import { formatCount, formatFlops } from "./format";
import {
  artifactText,
  formatShare,
  gateOutcomeText,
  gateTrainingText,
  onnxText,
  orderedSets,
  readArtifact,
  readGateVerdict,
  readUtilisation,
  setLabel,
  type GateCard,
} from "./gate-card";

export interface MixtureActions {
  runName: (id: number) => string;
  /** Where mixture run `runId`'s artifact downloads from (the link's address). */
  downloadUrl: (runId: number) => string;
  /** Download it (the page's authorised request); resolves when it is saved or refused. */
  download: (runId: number) => Promise<void>;
  /** Propose a benchmark card for the gate card's mixture. */
  benchmark: (plan: PlanOut) => Promise<void>;
}

type Kind = "gate" | "benchmark";

export class MixtureView {
  /** The two parts, for the panel to place. */
  readonly element: HTMLElement;
  private readonly parts: Record<Kind, HTMLElement>;
  private readonly actions: MixtureActions;
  private readonly chosen: Record<Kind, number | null> = { gate: null, benchmark: null };
  private readonly shown: Record<Kind, string> = { gate: "", benchmark: "" };
  private plans: readonly PlanOut[] = [];

  constructor(actions: MixtureActions) {
    this.actions = actions;
    this.element = element("div", "mixture-results");
    const gate = element("section", "mixture-part");
    gate.dataset["testid"] = "gate-result";
    gate.setAttribute("aria-labelledby", "gate-result-title");
    const report = element("section", "mixture-part");
    report.dataset["testid"] = "benchmark-report";
    report.setAttribute("aria-labelledby", "benchmark-report-title");
    this.parts = { gate, benchmark: report };
    this.element.append(gate, report);
    gate.hidden = report.hidden = true;
  }

  /** The cards were read again: draw what changed. */
  update(plans: readonly PlanOut[]): void {
    this.plans = plans;
    this.render("gate");
    this.render("benchmark");
  }

  /** The runs' names may have changed. */
  runsChanged(): void {
    this.shown.gate = this.shown.benchmark = "";
    this.update(this.plans);
  }

  /** Show this done card's part (from its row's "Details"), and bring it into view. */
  show(plan: PlanOut): void {
    const kind = plan.card.kind === "gate" ? "gate" : plan.card.kind === "benchmark" ? "benchmark" : null;
    if (kind === null) return;
    this.chosen[kind] = plan.id;
    this.render(kind);
    this.parts[kind].scrollIntoView({ block: "nearest" });
  }

  private render(kind: Kind): void {
    const done = this.plans.filter((p) => p.card.kind === kind && p.status === "done");
    const plan = done.find((p) => p.id === this.chosen[kind]) ?? done[done.length - 1];
    const part = this.parts[kind];
    part.hidden = plan === undefined;
    if (plan === undefined) {
      this.shown[kind] = "";
      part.replaceChildren();
      return;
    }
    // Drawn again only when the card or the names it shows changed (the list is re-read every
    // second while a card runs).
    const key = `${plan.id}:${plan.updated}:${this.namesKey(plan)}`;
    if (key === this.shown[kind]) return;
    this.shown[kind] = key;
    part.dataset["planId"] = String(plan.id);
    part.replaceChildren(...(kind === "gate" ? this.gate(plan) : this.report(plan)));
  }

  private namesKey(plan: PlanOut): string {
    const card = plan.card;
    const ids = card.kind === "gate" ? [...card.experts.map((e) => e.run_id), ...plan.runs] : card.kind === "benchmark" ? [card.mixture, ...plan.runs] : [];
    return ids.map((id) => this.actions.runName(id)).join("|");
  }

  // ---- a gate card's result ------------------------------------------------------------------------

  private gate(plan: PlanOut): HTMLElement[] {
    const card = plan.card as GateCard;
    const name = this.actions.runName;
    const mixture = plan.runs[0] ?? null;
    const title = element("h3", "", `Mixture · card ${plan.id} · ${mixture === null ? card.name : name(mixture)}`);
    title.id = "gate-result-title";
    const nodes: HTMLElement[] = [title];

    const verdict = readGateVerdict(plan.result);
    if (verdict !== null) {
      const line = element("p", `mixture-verdict ${verdict.worse === null ? "good" : "bad"}`, gateOutcomeText(verdict));
      line.dataset["testid"] = "gate-verdict";
      line.dataset["met"] = String(verdict.met);
      nodes.push(line);
    }

    const utilisation = readUtilisation(plan.result);
    for (const warning of utilisation?.warnings ?? []) {
      const line = element("p", "gate-warning", warning.text);
      line.dataset["testid"] = "gate-warning";
      line.dataset["runId"] = String(warning.runId ?? "");
      line.setAttribute("role", "alert");
      nodes.push(line);
    }
    nodes.push(element("h4", "", "Which expert the gate picks (share of samples, top choice)"));
    const table = element("table", "gate-utilisation");
    table.dataset["testid"] = "gate-utilisation";
    table.setAttribute("aria-label", "utilisation of every expert");
    if (utilisation === null || utilisation.experts.length === 0) {
      nodes.push(element("p", "muted", "The card's result holds no utilisation."));
    } else {
      const sets = orderedSets(utilisation, card.sets);
      const head = table.createTHead().insertRow();
      head.append(headCell("expert"));
      for (const set of sets) {
        const th = headCell(setLabel(set.name, card.data));
        th.dataset["set"] = set.name;
        th.append(element("span", "muted sub", `n ${formatCount(set.count)}`));
        head.append(th);
      }
      const body = table.createTBody();
      utilisation.experts.forEach((runId, i) => {
        const tr = body.insertRow();
        tr.dataset["runId"] = String(runId);
        const th = element("th", "compare-run", name(runId));
        th.scope = "row";
        th.append(element("span", "tag", i === 0 ? "generalist" : "specialist"));
        tr.append(th);
        for (const set of sets) {
          const share = set.shares[i] ?? null;
          const td = element("td", "share-cell");
          td.dataset["set"] = set.name;
          td.dataset["share"] = String(share ?? "");
          td.title = `mean gate probability ${formatShare(set.meanProbability[i])}`;
          const bar = element("span", "share-bar");
          bar.style.width = `${Math.round(Math.max(0, Math.min(1, share ?? 0)) * 100)}%`;
          td.append(bar, element("span", "share-text", formatShare(share)));
          if (utilisation.warnings.some((w) => w.runId === runId)) td.classList.add("low");
          tr.append(td);
        }
      });
      nodes.push(scroll(table));
    }

    const training = gateTrainingText(plan.result);
    if (training !== null) nodes.push(element("p", "muted small-text", training));

    nodes.push(element("h4", "", "The mixture against every expert"));
    const comparison = element("table");
    comparison.dataset["testid"] = "gate-comparison";
    comparison.setAttribute("aria-label", "the mixture against every expert");
    const compared = isRecord(plan.result?.["comparison"]) ? readComparison(plan.result["comparison"]) : null;
    renderComparison(comparison, compared, "The card's result holds no comparison.");
    nodes.push(element("p", "muted small-text", "The mixture is the reference: an expert's difference above 0 is an expert better than the mixture."), scroll(comparison));

    const artifact = readArtifact(plan.result);
    const files = element("div", "mixture-artifact");
    if (artifact !== null && artifact.written && mixture !== null) {
      const link = element("a", "button-link", "Download mixture (.tar)");
      link.dataset["testid"] = "mixture-download";
      link.href = this.actions.downloadUrl(mixture);
      link.download = "";
      link.addEventListener("click", (event) => {
        event.preventDefault(); // the request needs the token's header: the panel makes it
        if (link.getAttribute("aria-busy") === "true") return;
        link.setAttribute("aria-busy", "true");
        void this.actions.download(mixture).finally(() => link.removeAttribute("aria-busy"));
      });
      files.append(link);
    }
    if (artifact !== null) {
      files.append(element("span", "muted", artifactText(artifact)));
      const onnx = element("span", artifact.onnx?.written ? "good" : "muted", onnxText(artifact));
      onnx.dataset["testid"] = "gate-onnx";
      files.append(onnx);
    }
    const benchmark = element("button", "small", "Benchmark…");
    benchmark.type = "button";
    benchmark.title = "Propose a benchmark card: this mixture against a monolith given the same compute, the best weight merge and the generalist (nothing happens until it is approved)";
    benchmark.disabled = mixture === null;
    benchmark.addEventListener("click", () => {
      benchmark.disabled = true;
      void this.actions.benchmark(plan).finally(() => (benchmark.disabled = false));
    });
    files.append(benchmark);
    nodes.push(files);
    return nodes;
  }

  // ---- a benchmark card's report ----------------------------------------------------------------

  private report(plan: PlanOut): HTMLElement[] {
    const card = plan.card.kind === "benchmark" ? plan.card : null;
    const title = element("h3", "", `Benchmark · card ${plan.id}${card === null ? "" : ` · ${this.actions.runName(card.mixture)}`}`);
    title.id = "benchmark-report-title";
    const nodes: HTMLElement[] = [title];
    const report = readBenchmarkReport(plan.result);
    const verdict = readBenchmarkVerdict(plan.result);
    if (verdict !== null) {
      const line = element("p", `mixture-verdict ${verdict.met === true ? "good" : verdict.met === false ? "bad" : "muted"}`,
        benchmarkOutcomeText(verdict, report?.sets[0] ?? card?.sets[0] ?? "test"));
      line.dataset["testid"] = "benchmark-verdict";
      line.dataset["met"] = String(verdict.met);
      nodes.push(line);
    }
    if (report === null) {
      nodes.push(element("p", "muted", "The card's result holds no report."));
      return nodes;
    }
    const summary = element("p", "benchmark-summary", report.summary);
    summary.dataset["testid"] = "benchmark-summary";
    nodes.push(summary);

    const table = element("table", "benchmark-table");
    table.dataset["testid"] = "benchmark-table";
    table.setAttribute("aria-label", "every entrant against the mixture");
    const head = table.createTHead().insertRow();
    head.append(headCell("entrant"), ...report.sets.map((set) => headCell(set)), headCell("inference / sample", "num"), headCell("latency / sample", "num"));
    const body = table.createTBody();
    for (const entrant of ENTRANTS) {
      const row = entrantRow(report, entrant);
      const tr = body.insertRow();
      tr.dataset["entrant"] = entrant;
      const th = element("th", "compare-run", row.name);
      th.scope = "row";
      if (entrant === "mixture") th.append(element("span", "tag", "reference"));
      tr.append(th);
      for (const cell of row.cells) {
        const td = element("td", "compare-cell");
        td.dataset["set"] = cell.set;
        td.append(element("div", "line line-summary-strong", cell.value));
        if (cell.diff !== null) td.append(element("div", "line line-diff", cell.diff));
        tr.append(td);
      }
      const cost = inferenceText(report, entrant);
      tr.append(element("td", "num", cost.flops), element("td", "num", cost.latency));
    }
    nodes.push(element("p", "muted small-text", "Accuracy on each set; below it the entrant − mixture difference in points with its paired 95% interval."), scroll(table));
    nodes.push(element("p", "small-text", mergeChoiceText(report)));

    nodes.push(element("h4", "", "The compute budget"));
    const budget = element("p", "small-text", budgetText(report));
    budget.dataset["testid"] = "benchmark-budget";
    nodes.push(budget);
    const items = element("table", "benchmark-compute");
    items.dataset["testid"] = "benchmark-compute";
    items.setAttribute("aria-label", "what the mixture cost beyond the generalist");
    const itemsHead = items.createTHead().insertRow();
    itemsHead.append(headCell("what"), headCell("run"), headCell("samples", "num"), headCell("FLOPs", "num"));
    const itemsBody = items.createTBody();
    for (const item of report.compute.items) {
      const tr = itemsBody.insertRow();
      tr.append(
        element("td", "", item.what),
        element("td", "", item.runId === null ? "—" : this.actions.runName(item.runId)),
        element("td", "num", formatCount(item.samples)),
        element("td", "num", formatFlops(item.flops)),
      );
    }
    nodes.push(scroll(items));
    const zero = element("p", "muted small-text", zeroFlopText(report));
    zero.dataset["testid"] = "benchmark-zero-flops";
    nodes.push(zero);
    return nodes;
  }
}

function headCell(text: string, className = ""): HTMLTableCellElement {
  const th = element("th", className, text);
  th.scope = "col";
  return th;
}

function scroll(table: HTMLTableElement): HTMLElement {
  const wrap = element("div", "table-scroll short");
  wrap.append(table);
  return wrap;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
