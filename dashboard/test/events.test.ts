import { describe, expect, it } from "vitest";

import { STATE_CHANGING, logEntry, testResult } from "../src/events";
import { event } from "./helpers";

describe("logEntry", () => {
  it.each([
    ["command_applied", { id: 1, command: "set_lr", args: { lr: 0.001, group: null } }, "set_lr lr=0.001", "good"],
    ["command_rejected", { id: 2, command: "resume", args: {}, reason: "the run is not paused" }, "resume rejected: the run is not paused", "warn"],
    ["status", { status: "paused" }, "status paused", "info"],
    ["eval", { split: "val", loss: 0.123456, accuracy: 0.9 }, "val loss 0.1235 · accuracy 90.00%", "info"],
    ["epoch_summary", { split: "train", loss: 2 }, "epoch 0 done · train loss 2", "info"],
    ["error", { type: "ValueError", message: "bad" }, "error ValueError: bad", "bad"],
    ["run_finished", { status: "failed", seconds: 65 }, "run failed in 1 min 5 s", "bad"],
    ["run_finished", { status: "finished" }, "run finished", "good"],
    ["run_created", { name: "baseline" }, 'run created "baseline"', "info"],
    ["store_overflow", { dropped_records: 1200, reason: "disk too slow" }, "store dropped 1,200 records: disk too slow", "warn"],
    ["plan_started", { plan_id: 2 }, "plan card 2 started", "info"],
    ["plan_finished", { plan_id: 2, status: "done", runs: [2, 3] }, "plan card 2 done: runs 2, 3", "good"],
    ["plan_finished", { plan_id: 2, status: "failed", error: "slice 'tail' is empty" }, "plan card 2 failed: slice 'tail' is empty", "bad"],
    ["comparison", { comparison_id: 1, runs: [1, 2], sets: ["tail", "val"] }, "comparison 1 of runs 1, 2 on tail, val", "good"],
    ["health", { cards: [{ check: "throughput", area: "throughput", severity: "info", title: "compute-bound" }], areas: ["determinism"] }, "health check-up (determinism): 1 info", "good"],
    ["health", { cards: [{ check: "lr_jump", severity: "warning", title: "jump" }, { check: "dead_units", severity: "error", title: "dead" }], areas: ["data"] }, "health check-up (data): 1 error · 1 warning", "bad"],
    ["health", { cards: [{ check: "lr_jump", severity: "warning", title: "jump" }], areas: [] }, "health check-up (—): 1 warning", "warn"],
    ["some_new_kind", {}, "some new kind", "info"],
  ])("describes %s", (kind, payload, text, tone) => {
    const entry = logEntry(event(3, kind, payload));
    expect(entry).toMatchObject({ seq: 3, kind, step: 30, text: `step 30 · ${text}`, tone });
  });

  it("leaves progress and epoch starts out of the log", () => {
    expect(logEntry(event(1, "progress", { loss: 1 }))).toBeNull();
    expect(logEntry(event(2, "epoch_started", { batches: 10 }))).toBeNull();
  });

  it("says no step for an event that has none", () => {
    expect(logEntry(event(1, "status", { status: "running" }, { step: null }))?.text).toBe("status running");
  });
});

describe("testResult", () => {
  it("is the test split's evaluation", () => {
    const result = testResult(event(4, "eval", { split: "test", loss: 0.5, accuracy: 0.75, samples: 100 }));
    expect(result).toEqual({ seq: 4, step: 40, loss: 0.5, accuracy: 0.75, samples: 100, time: 1_700_000_004 });
  });

  it("is null for validation and for other kinds", () => {
    expect(testResult(event(1, "eval", { split: "val", loss: 0.5 }))).toBeNull();
    expect(testResult(event(2, "status", { status: "running" }))).toBeNull();
  });
});

it("re-reads the run after the kinds that change what it can do", () => {
  expect(STATE_CHANGING.has("status")).toBe(true);
  expect(STATE_CHANGING.has("command_applied")).toBe(true);
  expect(STATE_CHANGING.has("progress")).toBe(false);
});
