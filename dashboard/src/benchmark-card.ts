// The benchmark card and its report, in words. A benchmark card pits a mixture (a gate card's
// run) against baselines given the same compute: a monolith (the generalist trained on for as
// many steps as the mixture's making cost, in FLOPs), the best weight merge of the same experts,
// and the generalist alone; every entrant evaluated paired against the mixture, with inference
// FLOPs and latency. The card has no form: "Benchmark…" on a done gate card proposes it with the
// schema's defaults. No DOM here (mixture-view.ts draws the report), so it is tested on its own.

import type { components } from "./generated/api-types";
import { cellKey, formatAccuracyDiff, formatLossDiff, readComparison, type Cell, type ComparisonTable } from "./compare";
import { formatCount, formatFlops, formatPercent, formatValue } from "./format";
import { BenchmarkCardSchema } from "./generated/schemas";

export type BenchmarkCard = components["schemas"]["BenchmarkCard"];

/** The entrants, in the report's order (the mixture is every difference's reference). */
export const ENTRANTS = ["mixture", "monolith", "merge", "generalist"] as const;
export type Entrant = (typeof ENTRANTS)[number];

/** A new benchmark card for mixture run `mixture`, carried out by live run `runId`, the rest the
 *  schema's defaults. */
export function benchmarkDraft(runId: number, mixture: number): BenchmarkCard {
  const defaults = BenchmarkCardSchema.properties ?? {};
  const given = (name: "merges" | "sets" | "seed") => {
    const value = defaults[name]?.default;
    if (value === undefined) throw new Error(`the server's BenchmarkCard gives no default for ${name}`);
    return value;
  };
  // The defaults are the schema's (typed there as unknown): the server checks the card anyway.
  return { kind: "benchmark", run_id: runId, mixture, merges: given("merges"), sets: given("sets"), seed: given("seed") } as BenchmarkCard;
}

/** "mixture of a and b (4) vs monolith, merge (linear, ties), generalist · on test · by baseline (1)". */
export function benchmarkPlanText(card: Pick<BenchmarkCard, "mixture" | "merges" | "sets" | "run_id">, runName: (id: number) => string): string {
  const merges = card.merges ?? ["linear", "ties"];
  const sets = card.sets ?? ["test"];
  return `${runName(card.mixture)} vs monolith, merge (${merges.join(", ")}), generalist · on ${sets.join(", ")} · by ${runName(card.run_id)}`;
}

/** What the verdict is: the mixture above the monolith, the 95% interval of the difference
 *  entirely above zero, on the card's first set. */
export function benchmarkCriterionText(card: Pick<BenchmarkCard, "sets">): string {
  return `mixture above the monolith on ${(card.sets ?? ["test"])[0] ?? "test"} (95% interval above 0)`;
}

// ---- the report ------------------------------------------------------------------------------------

export interface CostItem {
  what: string;
  runId: number | null;
  samples: number | null;
  flops: number | null;
}

export interface BenchmarkReport {
  summary: string;
  sets: string[];
  compute: {
    budgetFlops: number | null;
    items: CostItem[];
    trainStepFlops: number | null;
    batchSize: number | null;
    monolithSteps: number | null;
    monolithFlops: number | null;
    zeroFlopOps: string[];
    generalistFlops: number | null;
  };
  inference: Partial<Record<Entrant, { flopsPerSample: number | null; latencyMs: number | null }>>;
  table: ComparisonTable | null;
  merge: { method: string; chosenOn: string; score: number | null; tried: [string, number | null][] } | null;
  monolithRun: number | null;
}

export interface BenchmarkVerdict {
  /** null: the difference has no interval (too few samples). */
  met: boolean | null;
  summary: string;
}

// TODO(generated): the server's PlanOut declares `result` as a plain object (its shape is
// actions/benchmark.py's `execute`); once it declares the models, the schema types them and this goes.
export function readBenchmarkReport(result: Record<string, unknown> | null | undefined): BenchmarkReport | null {
  const raw = result?.["report"];
  if (!isRecord(raw)) return null;
  const compute = isRecord(raw["compute"]) ? raw["compute"] : {};
  const inference = isRecord(raw["inference"]) ? raw["inference"] : {};
  const merge = isRecord(raw["merge"]) ? raw["merge"] : null;
  const comparison = isRecord(raw["comparison"]) ? raw["comparison"] : null;
  return {
    summary: typeof raw["summary"] === "string" ? raw["summary"] : "",
    sets: strings(raw["sets"]),
    compute: {
      budgetFlops: finite(compute["budget_flops"]),
      items: (Array.isArray(compute["items"]) ? compute["items"] : []).filter(isRecord).map((item) => ({
        what: String(item["what"] ?? ""),
        runId: finite(item["run_id"]),
        samples: finite(item["samples"]),
        flops: finite(item["flops"]),
      })),
      trainStepFlops: finite(compute["train_step_flops"]),
      batchSize: finite(compute["batch_size"]),
      monolithSteps: finite(compute["monolith_steps"]),
      monolithFlops: finite(compute["monolith_flops"]),
      zeroFlopOps: strings(compute["zero_flop_ops"]),
      generalistFlops: finite(compute["generalist_flops"]),
    },
    inference: Object.fromEntries(
      ENTRANTS.filter((e) => isRecord(inference[e])).map((e) => {
        const at = inference[e] as Record<string, unknown>;
        return [e, { flopsPerSample: finite(at["flops_per_sample"]), latencyMs: finite(at["latency_ms_per_sample"]) }];
      }),
    ),
    table: comparison === null ? null : readComparison(comparison),
    merge: merge === null ? null : {
      method: String(merge["method"] ?? ""),
      chosenOn: String(merge["chosen_on"] ?? ""),
      score: finite(merge["score"]),
      tried: isRecord(merge["tried"]) ? Object.entries(merge["tried"]).map(([m, s]): [string, number | null] => [m, finite(s)]) : [],
    },
    monolithRun: finite(raw["monolith_run"]),
  };
}

export function readBenchmarkVerdict(result: Record<string, unknown> | null | undefined): BenchmarkVerdict | null {
  const verdict = result?.["verdict"];
  if (!isRecord(verdict)) return null;
  return { met: typeof verdict["met"] === "boolean" ? verdict["met"] : null, summary: typeof verdict["summary"] === "string" ? verdict["summary"] : "" };
}

/** A done benchmark's outcome: whether the mixture beat the monolith on the first set. */
export function benchmarkOutcomeText(verdict: BenchmarkVerdict, set: string): string {
  if (verdict.met === true) return `the mixture beats the monolith on ${set}`;
  if (verdict.met === false) return `the mixture does not beat the monolith on ${set}`;
  return `no interval on ${set}: undecided`;
}

/** One entrant's cell on one set: its accuracy (its loss for a model without one) and, for an
 *  entrant other than the mixture, the paired difference from the mixture with its interval. */
export function entrantCellText(cell: Cell | undefined): { value: string; diff: string | null } {
  if (cell === undefined) return { value: "—", diff: null };
  const value = cell.accuracy !== null ? formatPercent(cell.accuracy) : `loss ${formatValue(cell.loss)}`;
  const diff = cell.diff;
  if (diff === null) return { value, diff: null };
  if (cell.accuracy !== null && diff.accuracy !== null) return { value, diff: `${formatAccuracyDiff(diff.accuracy)} vs mixture` };
  if (diff.loss !== null) return { value, diff: `loss ${formatLossDiff(diff.loss)} vs mixture` };
  return { value, diff: diff.note };
}

/** The entrant's row: its name as the report gives it, and its cells in the report's sets. */
export function entrantRow(report: BenchmarkReport, entrant: Entrant): { name: string; cells: { set: string; value: string; diff: string | null }[] } {
  const table = report.table;
  const name = table?.names[entrant] ?? entrant;
  const cells = report.sets.map((set) => ({ set, ...entrantCellText(table?.cells.get(cellKey(entrant, set))) }));
  return { name, cells };
}

/** "4.1 GFLOPs" and "0.012 ms" per sample for an entrant ("—" where not measured). */
export function inferenceText(report: BenchmarkReport, entrant: Entrant): { flops: string; latency: string } {
  const at = report.inference[entrant];
  return { flops: formatFlops(at?.flopsPerSample), latency: at?.latencyMs == null ? "—" : `${formatValue(at.latencyMs)} ms` };
}

/** The budget in words: "Budget 3.21 GFLOPs beyond the generalist (its own training: 9.8 GFLOPs);
 *  the monolith trains 46 steps of 128 samples (3.2 GFLOPs)." */
export function budgetText(report: BenchmarkReport): string {
  const c = report.compute;
  const generalist = c.generalistFlops === null ? "" : ` (its own training: ${formatFlops(c.generalistFlops)})`;
  const batch = c.batchSize === null ? "" : ` of ${formatCount(c.batchSize)} samples`;
  return `Budget ${formatFlops(c.budgetFlops)} beyond the generalist${generalist}; the monolith trains ${formatCount(c.monolithSteps)} steps${batch} (${formatFlops(c.monolithFlops)}, ${formatFlops(c.trainStepFlops)} a step).`;
}

/** The merge baseline in words: "merge: ties, chosen on val (linear 91.2%, ties 92.0%)". */
export function mergeChoiceText(report: BenchmarkReport): string {
  const merge = report.merge;
  if (merge === null) return "merge: —";
  // The score is the accuracy, or for a model without one the loss negated (higher is better).
  const score = (value: number | null) => (value !== null && value < 0 ? `loss ${formatValue(-value)}` : formatPercent(value));
  const tried = merge.tried.map(([method, value]) => `${method} ${score(value)}`).join(", ");
  return `merge: ${merge.method}, chosen on ${merge.chosenOn}${tried ? ` (${tried})` : ""}`;
}

/** Operators the FLOP counter has no formula for (counted as zero), or that there were none. */
export function zeroFlopText(report: BenchmarkReport): string {
  const ops = report.compute.zeroFlopOps;
  return ops.length === 0 ? "Every operator was counted." : `Counted as 0 FLOPs (no formula): ${ops.join(", ")}.`;
}

function strings(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === "string") : [];
}

function finite(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
