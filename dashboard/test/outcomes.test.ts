import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { CommandOutcomes } from "../src/outcomes";
import { event } from "./helpers";

describe("CommandOutcomes", () => {
  beforeEach(() => {
    vi.useFakeTimers();
    vi.stubGlobal("window", globalThis);
  });
  afterEach(() => {
    vi.useRealTimers();
    vi.unstubAllGlobals();
  });

  it("hands a waiting view its command's result", async () => {
    const outcomes = new CommandOutcomes();
    const waiting = outcomes.wait(1, 7, 10_000);
    outcomes.receive(event(1, "command_applied", { id: 6, command: "cluster", args: {}, result: { clustering: 1 } }));
    outcomes.receive(event(2, "command_applied", { id: 7, command: "cluster", args: {}, result: { clustering: 2 } }));
    expect(await waiting).toEqual({ applied: true, result: { clustering: 2 } });
  });

  it("keeps an outcome that came before anyone waited for it", async () => {
    const outcomes = new CommandOutcomes();
    outcomes.receive(event(1, "command_rejected", { id: 3, command: "cluster", args: {}, reason: "no samples yet" }));
    expect(await outcomes.wait(1, 3, 1000)).toEqual({ applied: false, reason: "no samples yet" });
  });

  it("tells commands of different runs apart", async () => {
    const outcomes = new CommandOutcomes();
    outcomes.receive(event(1, "command_applied", { id: 1, command: "pause", args: {} }, { run_id: 2 }));
    const waiting = outcomes.wait(1, 1, 1000);
    vi.advanceTimersByTime(1000);
    expect(await waiting).toEqual({ applied: false, reason: "no answer within 1 s" });
  });

  it("ignores events that are not command outcomes", async () => {
    const outcomes = new CommandOutcomes();
    const waiting = outcomes.wait(1, 1, 2000);
    outcomes.receive(event(1, "status", { status: "paused", id: 1 }));
    vi.advanceTimersByTime(2000);
    expect(await waiting).toMatchObject({ applied: false });
  });
});
