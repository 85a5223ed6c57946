import { describe, expect, it } from "vitest";

import type { RunInfo } from "../src/api";
import { LOG_LIMIT, Store, type LogEntry, type Topic } from "../src/state";

const run: RunInfo = {
  id: 1, name: "baseline", status: "running", live: true, step: 10, epoch: 0, target_epochs: 2,
  batches_per_epoch: 100, samples_per_second: null, loss: null, lr: 0.1, commands: ["pause"],
};

const entry = (seq: number): LogEntry => ({ seq, kind: "status", step: null, time: seq, text: `e${seq}`, tone: "info" });

describe("Store", () => {
  it("notifies once per task, with every topic that changed", async () => {
    const store = new Store();
    const notes: Topic[][] = [];
    store.subscribe((changed) => notes.push([...changed].sort()));
    store.setRun(run);
    store.patchRun({ step: 11 });
    store.setConnection("open");
    store.showMessage("hello", "info");
    expect(notes).toEqual([]); // nothing until the task ends
    await Promise.resolve();
    expect(notes).toEqual([["connection", "message", "run"]]);
    expect(store.run?.step).toBe(11);
  });

  it("ignores a live patch when there is no run, and an unchanged connection", async () => {
    const store = new Store();
    const notes: Topic[][] = [];
    store.subscribe((changed) => notes.push([...changed]));
    store.patchRun({ step: 5 });
    store.setConnection("connecting");
    await Promise.resolve();
    expect(store.run).toBeNull();
    expect(notes).toEqual([]);
  });

  it("takes no command for a run that has ended, whatever its last snapshot listed", () => {
    const store = new Store();
    store.setRun(run);
    expect(store.run?.commands).toEqual(["pause"]);
    store.patchRun({ status: "stopped" }); // the status event, before the server's state says so
    expect(store.run?.commands).toEqual([]);
    store.setRun({ ...run, status: "finished" }); // a stale snapshot of a finished run
    expect(store.run?.commands).toEqual([]);
    store.setRun({ ...run, status: "paused" });
    expect(store.run?.commands).toEqual(["pause"]);
  });

  it("keeps the log newest first, without duplicates, bounded", () => {
    const store = new Store();
    store.addLog([entry(2), entry(1)]);
    store.addLog([entry(3), entry(2)]);
    expect(store.log.map((e) => e.seq)).toEqual([3, 2, 1]);
    store.addLog(Array.from({ length: LOG_LIMIT + 10 }, (_, i) => entry(100 + i)));
    expect(store.log).toHaveLength(LOG_LIMIT);
    expect(store.log[0]!.seq).toBe(100 + LOG_LIMIT + 9);
  });

  it("keeps each test result once, newest first, and forgets them with the run", () => {
    const store = new Store();
    const result = (seq: number) => ({ seq, step: seq, loss: 1, accuracy: null, samples: 10, time: seq });
    store.addTests([result(1)]);
    store.addTests([result(3), result(1)]);
    expect(store.tests.map((r) => r.seq)).toEqual([3, 1]);
    store.clearRun();
    expect([store.tests, store.log]).toEqual([[], []]);
  });

  it("clears a message only when there is one", async () => {
    const store = new Store();
    const notes: Topic[][] = [];
    store.subscribe((changed) => notes.push([...changed]));
    store.clearMessage();
    await Promise.resolve();
    expect(notes).toEqual([]);
    store.showMessage("no");
    expect(store.message).toEqual({ text: "no", tone: "error" });
    store.clearMessage();
    expect(store.message).toBeNull();
  });
});
