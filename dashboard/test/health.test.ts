import { describe, expect, it } from "vitest";

import type { HealthEvent } from "../src/event-types";
import {
  ALL_AREAS,
  CheckupHistory,
  DEFAULT_AREAS,
  KEPT_CHECKUPS,
  areasText,
  bySeverity,
  checkupOf,
  checkupSummary,
  countsText,
  determinismOf,
  evidenceEntries,
  formatEvidence,
  latestDeterminism,
  readCards,
  severityCounts,
  worstSeverity,
  type Checkup,
  type HealthCard,
} from "../src/health";
import { event } from "./helpers";

const card = (check: string, severity: string, evidence: Record<string, unknown> = {}, area = check): Record<string, unknown> => ({
  check,
  area,
  severity,
  title: `${check} title`,
  evidence,
  fix: `${check} fix`,
});

const CONTRACT = {
  torch: "2.5.1+cpu",
  cuda: null,
  cudnn: null,
  device: "cpu",
  deterministic_algorithms: false,
  cudnn_deterministic: false,
  cudnn_benchmark: false,
  cublas_workspace_config: null,
  world_size: 1,
  loader_workers: 0,
  loader_generator: true,
  worker_init_fn: null,
};
const ADVICE = ["replays are bit-identical on the same machine, torch and device only"];

function healthEvent(seq: number, cards: Record<string, unknown>[], areas: readonly string[] = DEFAULT_AREAS, run_id: number | null = 1): HealthEvent {
  const parsed = event(seq, "health", { cards, areas, seconds: 0.42 }, { run_id });
  if (parsed.kind !== "health") throw new Error("not a health event");
  return parsed;
}

function checkup(seq: number, cards: Record<string, unknown>[], areas: readonly string[] = DEFAULT_AREAS, runId = 1): Checkup {
  const read = checkupOf(healthEvent(seq, cards, areas, runId));
  if (read === null) throw new Error("no check-up");
  return read;
}

describe("reading check-ups", () => {
  it("knows the server's areas, determinism only on request", () => {
    expect(ALL_AREAS).toContain("determinism");
    expect(DEFAULT_AREAS).toEqual(["gradients", "activations", "numerics", "data", "configuration", "throughput"]);
  });

  it("reads a health event's cards, worst first, with its envelope", () => {
    const read = checkupOf(healthEvent(5, [card("throughput", "info"), card("dead_units", "error", { layers: { fc1: 0.95 } }, "activations"), card("lr_jump", "warning", {}, "configuration")]));
    expect(read).toMatchObject({ seq: 5, runId: 1, step: 50, epoch: 0, time: 1_700_000_005, seconds: 0.42, areas: DEFAULT_AREAS });
    expect(read?.cards.map((c) => [c.check, c.area, c.severity])).toEqual([
      ["dead_units", "activations", "error"],
      ["lr_jump", "configuration", "warning"],
      ["throughput", "throughput", "info"],
    ]);
    expect(read?.cards[0]).toEqual({ check: "dead_units", area: "activations", severity: "error", title: "dead_units title", fix: "dead_units fix", evidence: { layers: { fc1: 0.95 } } });
  });

  it("skips entries that are not cards and reads an unknown severity as info", () => {
    const cards = readCards([null, "card", { check: "x", severity: "error" }, { title: "odd", severity: "fatal", evidence: [1] }]);
    expect(cards).toEqual([{ check: "?", area: "?", severity: "info", title: "odd", fix: "", evidence: {} }]);
    expect(readCards({ cards: [] })).toEqual([]);
  });

  it("has no check-up for an event of no run", () => {
    expect(checkupOf(healthEvent(1, [], DEFAULT_AREAS, null))).toBeNull();
  });
});

describe("CheckupHistory", () => {
  it("keeps each run's check-ups once, oldest first", () => {
    const history = new CheckupHistory();
    expect(history.add(checkup(9, []))).toBe(true);
    expect(history.add(checkup(3, []))).toBe(true);
    expect(history.add(checkup(9, []))).toBe(false); // from the log and the stream both
    expect(history.add(checkup(4, [], DEFAULT_AREAS, 2))).toBe(true);
    expect(history.of(1).map((c) => c.seq)).toEqual([3, 9]);
    expect(history.of(2).map((c) => c.seq)).toEqual([4]);
    expect(history.of(3)).toEqual([]);
    expect(history.of(null)).toEqual([]);
  });

  it("keeps a bounded number per run, dropping the oldest", () => {
    const history = new CheckupHistory();
    for (let seq = 1; seq <= KEPT_CHECKUPS + 5; seq++) history.add(checkup(seq, []));
    const kept = history.of(1);
    expect(kept).toHaveLength(KEPT_CHECKUPS);
    expect(kept[0]?.seq).toBe(6);
  });
});

describe("grouping and counting", () => {
  const cards: HealthCard[] = readCards([card("a", "info"), card("b", "warning"), card("c", "info"), card("d", "warning")]);

  it("groups by severity, worst first, only severities that have cards", () => {
    expect(bySeverity(cards).map((g) => [g.severity, g.cards.map((c) => c.check)])).toEqual([
      ["warning", ["b", "d"]],
      ["info", ["a", "c"]],
    ]);
    expect(bySeverity([])).toEqual([]);
  });

  it("counts each severity and names the worst", () => {
    expect(severityCounts(cards)).toEqual({ error: 0, warning: 2, info: 2 });
    expect(worstSeverity(cards)).toBe("warning");
    expect(worstSeverity([])).toBeNull();
  });

  it.each([
    [{ error: 1, warning: 2, info: 3 }, "1 error · 2 warnings · 3 info"],
    [{ error: 0, warning: 1, info: 0 }, "1 warning"],
    [{ error: 2, warning: 0, info: 1 }, "2 errors · 1 info"],
    [{ error: 0, warning: 0, info: 0 }, "no findings"],
  ])("says %o as %s", (counts, text) => {
    expect(countsText(counts)).toBe(text);
  });

  it.each([
    [DEFAULT_AREAS, "every area"],
    [[...DEFAULT_AREAS, "determinism"], "every area + determinism"],
    [["determinism"], "determinism"],
    [["gradients", "data"], "gradients, data"],
    [[], "—"],
  ])("names the areas %j as %s", (areas, text) => {
    expect(areasText(areas)).toBe(text);
  });

  it("sums a check-up up in one line", () => {
    expect(checkupSummary(checkup(120, [card("throughput", "info"), card("lr_jump", "warning")]))).toBe(
      "step 1,200 · epoch 0 · every area · 0.42 s · 1 warning · 1 info",
    );
  });
});

describe("evidence", () => {
  it.each([
    [null, "—"],
    [true, "yes"],
    [false, "no"],
    [12000, "12,000"],
    [0.000123, "1.23e-4"],
    [3.14159, "3.142"],
    ["cpu", "cpu"],
    [[], "none"],
    [{}, "none"],
    [["fc1.weight", "fc1.bias"], "fc1.weight, fc1.bias"],
    [{ fc1: 0.95, fc2: 1 }, "fc1: 0.95, fc2: 1"],
    [[{ train: 3, val: 7 }], "(train: 3, val: 7)"],
  ])("writes %j as %s", (value, text) => {
    expect(formatEvidence(value)).toBe(text);
  });

  it("truncates a long list and a long object with how many more there are", () => {
    const ids = Array.from({ length: 20 }, (_, i) => i * 1000);
    expect(formatEvidence(ids)).toBe("0, 1,000, 2,000, 3,000 … +16 more");
    const layers = Object.fromEntries(Array.from({ length: 7 }, (_, i) => [`layer${i}`, i]));
    expect(formatEvidence(layers, { items: 2 })).toBe("layer0: 0, layer1: 1 … +5 more");
  });

  it("cuts a long text and stops at nesting two deep", () => {
    expect(formatEvidence("x".repeat(200), { chars: 10 })).toBe(`${"x".repeat(9)}…`);
    expect(formatEvidence([[[1, 2]]])).toBe("([2 items])");
    expect(formatEvidence({ a: { b: { c: 1 } } })).toBe("a: (b: {…})");
  });

  it("lists a card's evidence in the server's order, without the keys left out", () => {
    expect(evidenceEntries({ load_ms: 1.23456, step_ms: 4, workers: 0, contract: { torch: "2" } }, { omit: ["contract"] })).toEqual([
      ["load_ms", "1.235"],
      ["step_ms", "4"],
      ["workers", "0"],
    ]);
  });
});

describe("determinism", () => {
  const identical = card("determinism", "info", { parameters: 6, ops: 151, contract: CONTRACT, advice: ADVICE });

  it("reads an identical replay: the contract as a table in the server's order, the advice", () => {
    const result = determinismOf(checkup(7, [identical], ["determinism"]));
    expect(result?.identical).toBe(true);
    expect(result?.contract.slice(0, 5)).toEqual([
      ["torch", "2.5.1+cpu"],
      ["cuda", "—"],
      ["cudnn", "—"],
      ["device", "cpu"],
      ["deterministic_algorithms", "no"],
    ]);
    expect(result?.contract).toHaveLength(12);
    expect(result?.advice).toEqual(ADVICE);
    expect(result?.details).toEqual([
      ["parameters", "6"],
      ["ops", "151"],
    ]);
  });

  it("reads a differing step: where it differs", () => {
    const differs = card("determinism", "error", {
      differs: "step",
      parameters: ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight"],
      contract: CONTRACT,
      advice: ADVICE,
      first_op: "add",
      module: "noisy",
      op_index: 3,
      ops: 40,
    });
    const result = determinismOf(checkup(8, [differs], ["determinism"]));
    expect(result?.identical).toBe(false);
    expect(result?.details).toEqual([
      ["differs", "step"],
      ["parameters", "fc1.weight, fc1.bias, fc2.weight, fc2.bias … +1 more"],
      ["first_op", "add"],
      ["module", "noisy"],
      ["op_index", "3"],
      ["ops", "40"],
    ]);
  });

  it("reads the replay since the last checkpoint beside it; a differing replay is not identical", () => {
    const same = card("replay", "info", { checkpoint_step: 38, replayed: 13, batches: 13 });
    const result = determinismOf(checkup(9, [identical, same], ["determinism"]));
    expect(result?.replay?.card.check).toBe("replay");
    expect(result?.replay?.details).toEqual([
      ["checkpoint_step", "38"],
      ["replayed", "13"],
      ["batches", "13"],
    ]);
    expect(result?.identical).toBe(true);
    const differs = card("replay", "error", { checkpoint_step: 38, step: 39, first_tensor: "model.0.weight" });
    expect(determinismOf(checkup(10, [identical, differs], ["determinism"]))?.identical).toBe(false);
    expect(determinismOf(checkup(11, [identical], ["determinism"]))?.replay).toBeNull();
  });

  it("is null for a check-up that did not check it", () => {
    expect(determinismOf(checkup(1, [card("throughput", "info")]))).toBeNull();
  });

  it("finds the newest result up to the check-up shown", () => {
    const history = [checkup(2, [identical], ["determinism"]), checkup(5, [card("throughput", "info")]), checkup(9, [identical], ["determinism"])];
    expect(latestDeterminism(history)?.checkup.seq).toBe(9);
    expect(latestDeterminism(history, 5)?.checkup.seq).toBe(2);
    expect(latestDeterminism(history, 1)).toBeNull();
    expect(latestDeterminism([])).toBeNull();
  });
});
