import { describe, expect, it } from "vitest";

import {
  ENTRANTS,
  benchmarkCriterionText,
  benchmarkDraft,
  benchmarkOutcomeText,
  budgetText,
  entrantRow,
  inferenceText,
  mergeChoiceText,
  readBenchmarkReport,
  readBenchmarkVerdict,
  zeroFlopText,
  type BenchmarkCard,
} from "../src/benchmark-card";
import { BenchmarkCardSchema } from "../src/generated/schemas";
import { cardTitle, planText } from "../src/plan-text";

const diff = (value: number, low: number | null, high: number | null) => ({ value, low, high });

/** A done benchmark card's result as actions/benchmark.py writes it. */
const RESULT = {
  runs: [6],
  verdict: { met: false, summary: "Matched compute: 3.2e+09 FLOPs beyond the generalist, given to the monolith as 46 training steps." },
  report: {
    format: 1, mixture: 4, monolith_run: 6, sets: ["test", "tail"],
    merge: { method: "ties", chosen_on: "val", score: 0.912, tried: { linear: 0.905, ties: 0.912 } },
    compute: {
      budget_flops: 3.2e9, train_step_flops: 7.0e7, batch_size: 128, monolith_steps: 46, monolith_flops: 3.22e9,
      zero_flop_ops: ["aten.relu.default"], generalist_flops: 9.8e10,
      items: [
        { what: "specialist", run_id: 2, samples: 1600, flops: 8.8e8 },
        { what: "control", run_id: 3, samples: 1600, flops: 8.8e8 },
        { what: "experts on the gate's held-out data", run_id: null, samples: 8192, flops: 1.5e9 },
        { what: "gate training", run_id: null, samples: 25600, flops: 1.2e8 },
      ],
    },
    inference: {
      mixture: { flops_per_sample: 205_000, latency_ms_per_sample: 0.0021 },
      monolith: { flops_per_sample: 101_000, latency_ms_per_sample: 0.0009 },
      merge: { flops_per_sample: 101_000, latency_ms_per_sample: 0.0009 },
      generalist: { flops_per_sample: 101_000, latency_ms_per_sample: 0.0008 },
    },
    comparison: {
      reference: "mixture", runs: ["mixture", "monolith", "merge", "generalist"], sets: ["test", "tail"], confidence: 0.95, n_boot: 2000,
      names: { mixture: "mixture of baseline and tail specialist", monolith: "monolith (run 6)", merge: "merge (ties)", generalist: "generalist (run 1)" },
      cells: [
        { run: "mixture", set: "test", n: 4096, accuracy: 0.9, loss: 0.25 },
        { run: "mixture", set: "tail", n: 1600, accuracy: 0.7, loss: 0.6 },
        { run: "monolith", set: "test", n: 4096, accuracy: 0.905, loss: 0.24,
          diff: { accuracy: diff(0.005, -0.002, 0.012), loss: diff(-0.01, -0.02, 0), interval_note: null } },
        { run: "merge", set: "test", n: 4096, accuracy: 0.88, loss: 0.3,
          diff: { accuracy: diff(-0.02, -0.03, -0.01), loss: diff(0.05, 0.03, 0.07), interval_note: null } },
        { run: "generalist", set: "test", n: 4096, accuracy: 0.9, loss: null,
          diff: { accuracy: diff(0, null, null), loss: null, interval_note: "no interval: every sample agrees" } },
      ],
    },
    summary: "Matched compute: 3.2e+09 FLOPs beyond the generalist, given to the monolith as 46 training steps.",
  },
};

describe("the benchmark card", () => {
  it("is drafted for a mixture with the schema's defaults", () => {
    const card = benchmarkDraft(1, 4);
    const defaults = BenchmarkCardSchema.properties ?? {};
    expect(card).toEqual({ kind: "benchmark", run_id: 1, mixture: 4, merges: defaults["merges"]?.default, sets: defaults["sets"]?.default, seed: defaults["seed"]?.default });
    expect(card.merges).toEqual(["linear", "ties"]);
    expect(card.sets).toEqual(["test"]);
  });

  it("describes its plan, title and criterion", () => {
    const names: Record<number, string> = { 1: "baseline", 4: "mixture of a and b" };
    const card: BenchmarkCard = { kind: "benchmark", run_id: 1, mixture: 4, merges: ["linear", "ties"], sets: ["test"], seed: 0 };
    expect(planText(card, (id) => `${names[id]} (${id})`)).toBe("mixture of a and b (4) vs monolith, merge (linear, ties), generalist · on test · by baseline (1)");
    expect(cardTitle(card)).toBe("benchmark of run 4");
    expect(benchmarkCriterionText(card)).toBe("mixture above the monolith on test (95% interval above 0)");
  });

  it("says whether the mixture beat the monolith", () => {
    const verdict = readBenchmarkVerdict(RESULT)!;
    expect(verdict).toEqual({ met: false, summary: RESULT.verdict.summary });
    expect(benchmarkOutcomeText(verdict, "test")).toBe("the mixture does not beat the monolith on test");
    expect(benchmarkOutcomeText({ met: true, summary: "" }, "test")).toBe("the mixture beats the monolith on test");
    expect(benchmarkOutcomeText({ met: null, summary: "" }, "val")).toBe("no interval on val: undecided");
    expect(readBenchmarkVerdict({})).toBeNull();
  });
});

describe("the benchmark report", () => {
  const report = readBenchmarkReport(RESULT)!;

  it("reads the report: summary, sets, compute, inference, comparison, merge", () => {
    expect(report.summary).toBe(RESULT.report.summary);
    expect(report.sets).toEqual(["test", "tail"]);
    expect(report.monolithRun).toBe(6);
    expect(report.compute.items[0]).toEqual({ what: "specialist", runId: 2, samples: 1600, flops: 8.8e8 });
    expect(report.compute.items[2]!.runId).toBeNull();
    expect(report.inference.mixture).toEqual({ flopsPerSample: 205_000, latencyMs: 0.0021 });
    expect(report.table?.reference).toBe("mixture");
    expect(readBenchmarkReport({ verdict: {} })).toBeNull();
  });

  it("gives every entrant a row: accuracy per set, its difference from the mixture with the interval", () => {
    expect(ENTRANTS.map((e) => entrantRow(report, e).name)).toEqual(["mixture of baseline and tail specialist", "monolith (run 6)", "merge (ties)", "generalist (run 1)"]);
    expect(entrantRow(report, "mixture").cells).toEqual([{ set: "test", value: "90.00%", diff: null }, { set: "tail", value: "70.00%", diff: null }]);
    expect(entrantRow(report, "monolith").cells[0]).toEqual({ set: "test", value: "90.50%", diff: "+0.5 pt [-0.2, +1.2] vs mixture" });
    expect(entrantRow(report, "merge").cells[0]!.diff).toBe("-2.0 pt [-3.0, -1.0] vs mixture");
    expect(entrantRow(report, "generalist").cells[0]!.diff).toBe("0.0 pt vs mixture");
    expect(entrantRow(report, "monolith").cells[1]).toEqual({ set: "tail", value: "—", diff: null }); // not measured
  });

  it("writes the inference cost, the budget, the merge chosen and the zero-FLOP operators", () => {
    expect(inferenceText(report, "mixture")).toEqual({ flops: "205 kFLOPs", latency: "0.0021 ms" });
    expect(budgetText(report)).toBe("Budget 3.2 GFLOPs beyond the generalist (its own training: 98 GFLOPs); the monolith trains 46 steps of 128 samples (3.22 GFLOPs, 70 MFLOPs a step).");
    expect(mergeChoiceText(report)).toBe("merge: ties, chosen on val (linear 90.50%, ties 91.20%)");
    expect(zeroFlopText(report)).toBe("Counted as 0 FLOPs (no formula): aten.relu.default.");
    const empty = readBenchmarkReport({ report: { sets: [], compute: { zero_flop_ops: [] }, merge: { method: "linear", chosen_on: "test", tried: { linear: -0.3 } } } })!;
    expect(zeroFlopText(empty)).toBe("Every operator was counted.");
    expect(mergeChoiceText(empty)).toBe("merge: linear, chosen on test (linear loss 0.3)");
    expect(inferenceText(empty, "monolith")).toEqual({ flops: "—", latency: "—" });
  });
});
