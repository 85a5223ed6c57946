import { describe, expect, it } from "vitest";

import { kindName, parseEvent, parseEvents } from "../src/event-types";
import { rawEvent } from "./helpers";

describe("parseEvent", () => {
  it("types a known kind's payload, keeping the envelope", () => {
    const parsed = parseEvent(rawEvent(7, "progress", { step: 70, loss: 0.5, lr: 0.001, samples_per_second: 900, batch_in_epoch: 3 }));
    expect(parsed).toEqual({
      seq: 7,
      kind: "progress",
      run_id: 1,
      step: 70,
      epoch: 0,
      time: 1_700_000_007,
      payload: { step: 70, loss: 0.5, lr: 0.001, samples_per_second: 900, batch_in_epoch: 3 },
    });
  });

  it("reads a missing, null or mistyped field as null", () => {
    const parsed = parseEvent(rawEvent(1, "eval", { split: "val", loss: null, accuracy: "high" }));
    expect(parsed?.kind === "eval" && parsed.payload).toEqual({ split: "val", loss: null, accuracy: null, samples: null });
  });

  it("gives epoch_summary the training split when the payload names none", () => {
    const parsed = parseEvent(rawEvent(1, "epoch_summary", { loss: 1.25 }));
    expect(parsed?.kind === "epoch_summary" && parsed.payload.split).toBe("train");
  });

  it("keeps a command's args and result as objects, whatever was sent", () => {
    const applied = parseEvent(rawEvent(1, "command_applied", { id: 4, command: "cluster", args: { k: 3 }, result: { clustering: 2 } }));
    expect(applied?.kind === "command_applied" && applied.payload).toEqual({ id: 4, command: "cluster", args: { k: 3 }, result: { clustering: 2 } });
    const rejected = parseEvent(rawEvent(2, "command_rejected", { id: 5, command: "pause", args: "nonsense", reason: "not running" }));
    expect(rejected?.kind === "command_rejected" && rejected.payload).toEqual({ id: 5, command: "pause", args: {}, reason: "not running" });
  });

  it("types plan and comparison events", () => {
    const finished = parseEvent(rawEvent(4, "plan_finished", { plan_id: 2, status: "done", runs: [2, 3, "x"], verdict: { met: true } }));
    expect(finished?.kind === "plan_finished" && finished.payload).toEqual({ plan_id: 2, status: "done", error: null, runs: [2, 3] });
    const compared = parseEvent(rawEvent(5, "comparison", { comparison_id: 1, runs: [1, 2], sets: ["val"] }));
    expect(compared?.kind === "comparison" && compared.payload).toEqual({ comparison_id: 1, runs: [1, 2], sets: ["val"] });
  });

  it("types a health check-up's cards, areas and duration", () => {
    const cards = [{ check: "throughput", area: "throughput", severity: "info", title: "compute-bound", evidence: { workers: 0 }, fix: "none" }, "junk"];
    const health = parseEvent(rawEvent(6, "health", { cards, areas: ["determinism", 3], seconds: "slow" }));
    expect(health?.kind === "health" && health.payload).toEqual({
      cards: [{ check: "throughput", area: "throughput", severity: "info", title: "compute-bound", evidence: { workers: 0 }, fix: "none" }],
      areas: ["determinism"],
      seconds: null,
    });
  });

  it("keeps an unknown kind as 'other', with its name and payload", () => {
    const parsed = parseEvent(rawEvent(3, "export_ready", { id: "abc" }));
    expect(parsed).toMatchObject({ kind: "other", name: "export_ready", payload: { id: "abc" } });
    expect(parsed && kindName(parsed)).toBe("export_ready");
  });

  it("does not mistake an inherited property name for a kind", () => {
    expect(parseEvent(rawEvent(3, "toString"))).toMatchObject({ kind: "other", name: "toString" });
  });

  it.each([
    ["not an object", "progress"],
    ["no seq", { kind: "status", payload: {} }],
    ["a string seq", { seq: "1", kind: "status", payload: {} }],
    ["no kind", { seq: 1, payload: {} }],
  ])("refuses %s", (_, raw) => {
    expect(parseEvent(raw)).toBeNull();
  });

  it("reads a missing payload as empty, and the envelope's nulls as nulls", () => {
    const parsed = parseEvent({ seq: 2, kind: "status", run_id: null, step: null, epoch: null, time: 5 });
    expect(parsed).toEqual({ seq: 2, kind: "status", run_id: null, step: null, epoch: null, time: 5, payload: { status: null } });
  });

  it("parses a page of events, leaving out what is not one", () => {
    const events = parseEvents([rawEvent(1, "status", { status: "running" }), { seq: "x" } as never, rawEvent(2, "waiting")]);
    expect(events.map((e) => e.seq)).toEqual([1, 2]);
  });
});
