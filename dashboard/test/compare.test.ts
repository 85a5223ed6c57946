import { describe, expect, it } from "vitest";

import { cellKey, cellLines, formatAccuracyDiff, formatLossDiff, formatP, readComparison } from "../src/compare";

/** A comparison's result as actions/compare.py writes it: parent 1 and specialist 2 against control 3. */
const RESULT = {
  reference: "3",
  sets: ["tail", "val"],
  runs: ["1", "2", "3"],
  confidence: 0.95,
  n_boot: 2000,
  names: { "1": "baseline", "2": "tail specialist", "3": "tail specialist control" },
  cells: [
    { run: "2", set: "tail", n: 412, loss: 0.61, nan_losses: 0, accuracy: 0.7, per_class: null,
      diff: { accuracy: { value: 0.031, low: 0.004, high: 0.059 }, loss: { value: -0.012, low: -0.02, high: -0.004 }, interval_note: null },
      mcnemar: { b: 4, c: 17, p: 0.0072, method: "exact" }, fixed: [1, 2, 3], broken: [9] },
    { run: "2", set: "val", n: 12, loss: 0.5, nan_losses: 0, accuracy: 0.75, per_class: null,
      diff: { accuracy: { value: -0.0833, low: null, high: null }, loss: { value: 0.1, low: null, high: null }, interval_note: "n = 12 < 30: too few samples for an interval" },
      mcnemar: { b: 1, c: 0, p: 1, method: "exact" }, fixed: [], broken: [5] },
    { run: "3", set: "tail", n: 412, loss: 0.62, nan_losses: 0, accuracy: 0.669, per_class: null },
  ],
};

describe("a comparison's table", () => {
  it("reads the server's result: reference, runs, sets, names and cells", () => {
    const table = readComparison(RESULT)!;
    expect(table).toMatchObject({ reference: "3", runs: ["1", "2", "3"], sets: ["tail", "val"], confidence: 0.95, nBoot: 2000 });
    expect(table.names["2"]).toBe("tail specialist");
    expect(table.cells.get(cellKey("2", "tail"))).toMatchObject({ n: 412, accuracy: 0.7, mcnemarP: 0.0072, fixed: 3, broken: 1 });
    expect(table.cells.get(cellKey("3", "tail"))?.diff).toBeNull(); // the reference's own row
    expect(table.cells.has(cellKey("1", "tail"))).toBe(false);
  });

  it("is null for a result without a reference or cells", () => {
    expect(readComparison({})).toBeNull();
    expect(readComparison({ reference: "1" })).toBeNull();
  });

  it("writes a difference in points with its interval", () => {
    expect(formatAccuracyDiff({ value: 0.031, low: 0.004, high: 0.059 })).toBe("+3.1 pt [+0.4, +5.9]");
    expect(formatAccuracyDiff({ value: -0.0251, low: -0.05, high: 0.0004 })).toBe("-2.5 pt [-5.0, 0.0]");
    expect(formatAccuracyDiff({ value: 0.5, low: null, high: null })).toBe("+50.0 pt");
    expect(formatLossDiff({ value: -0.012, low: -0.02, high: -0.004 })).toBe("-0.012 [-0.02, -0.004]");
    expect(formatLossDiff({ value: 0.1, low: null, high: null })).toBe("+0.1");
  });

  it("writes McNemar's p", () => {
    expect([formatP(0.0072), formatP(0.00001), formatP(1), formatP(null)]).toEqual(["p = 0.0072", "p < 0.001", "p = 1", "p —"]);
  });

  it("gives each cell its lines: summary, difference, McNemar; the note when there is no interval", () => {
    const table = readComparison(RESULT)!;
    expect(cellLines(table.cells.get(cellKey("2", "tail"))!)).toEqual([
      ["summary", "n 412 · acc 70.00% · loss 0.61"],
      ["diff", "+3.1 pt [+0.4, +5.9]"],
      ["loss-diff", "loss -0.012 [-0.02, -0.004]"],
      ["mcnemar", "McNemar p = 0.0072 · fixed 3 · broken 1"],
    ]);
    expect(cellLines(table.cells.get(cellKey("2", "val"))!)).toEqual([
      ["summary", "n 12 · acc 75.00% · loss 0.5"],
      ["diff", "-8.3 pt"],
      ["loss-diff", "loss +0.1"],
      ["note", "n = 12 < 30: too few samples for an interval"],
      ["mcnemar", "McNemar p = 1 · fixed 0 · broken 1"],
    ]);
    expect(cellLines(table.cells.get(cellKey("3", "tail"))!)).toEqual([["summary", "n 412 · acc 66.90% · loss 0.62"]]);
  });
});
