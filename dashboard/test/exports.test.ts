import { describe, expect, it } from "vitest";

import { ApiError, type ExportOut } from "../src/api";
import { describeOutcome, runExport, type ExportApi } from "../src/exports";

function exported(patch: Partial<ExportOut>): ExportOut {
  return {
    id: "x1", slice: "low loss", run_id: 1, epoch: 3, format: "csv", data: true, status: "pending",
    rows: null, error: null, note: null, filename: "low-loss.csv", ...patch,
  };
}

/** An API whose export answers come from `answers` in order (an Error is thrown). */
function fakeApi(...answers: (ExportOut | Error)[]) {
  const calls: string[] = [];
  const next = async (call: string): Promise<ExportOut> => {
    calls.push(call);
    const answer = answers.shift();
    if (answer === undefined) throw new Error("no more answers");
    if (answer instanceof Error) throw answer;
    return answer;
  };
  const api: ExportApi = {
    createExport: (name, request) => next(`create ${name} ${request.format} ${request.data}`),
    exportStatus: (id) => next(`status ${id}`),
  };
  return { api, calls };
}

/** A clock that moves only when the export waits. */
function clock() {
  let now = 0;
  const waits: number[] = [];
  return {
    waits,
    options: { now: () => now, sleep: async (ms: number) => void (waits.push(ms), (now += ms)) },
  };
}

describe("runExport", () => {
  it("polls a pending export until it is ready", async () => {
    const { api, calls } = fakeApi(exported({}), exported({}), exported({ status: "ready", rows: 1234 }));
    const time = clock();
    const outcome = await runExport(api, "low loss", { format: "csv", data: true }, time.options);
    expect(outcome).toEqual({ ok: true, export: exported({ status: "ready", rows: 1234 }) });
    expect(calls).toEqual(["create low loss csv true", "status x1", "status x1"]);
    expect(time.waits).toEqual([300, 300]);
  });

  it("is ready at once when the server wrote it at once", async () => {
    const { api, calls } = fakeApi(exported({ status: "ready", rows: 5 }));
    expect((await runExport(api, "a", { format: "json", data: false }, clock().options)).ok).toBe(true);
    expect(calls).toHaveLength(1);
  });

  it("reports a failed export with the server's error, never as a success", async () => {
    const failed = exported({ status: "failed", error: "the dataset cannot be read at index 7" });
    const { api } = fakeApi(exported({}), failed);
    expect(await runExport(api, "a", { format: "csv", data: true }, clock().options)).toEqual({
      ok: false,
      error: "the dataset cannot be read at index 7",
      export: failed,
    });
  });

  it("reports a refusal (4xx) with its detail", async () => {
    const { api } = fakeApi(new ApiError(404, "no slice named 'gone'"));
    expect(await runExport(api, "gone", { format: "csv", data: true }, clock().options)).toEqual({
      ok: false,
      error: "no slice named 'gone'",
      export: null,
    });
  });

  it("reports a network failure while polling, keeping what it knew", async () => {
    const { api } = fakeApi(exported({}), new TypeError("Failed to fetch"));
    const outcome = await runExport(api, "a", { format: "csv", data: true }, clock().options);
    expect(outcome).toMatchObject({ ok: false, error: "TypeError: Failed to fetch", export: { status: "pending" } });
  });

  it("gives up at its deadline", async () => {
    const { api, calls } = fakeApi(...Array.from({ length: 20 }, () => exported({})));
    const outcome = await runExport(api, "a", { format: "csv", data: true }, { ...clock().options, deadlineMs: 1000, pollMs: 300 });
    expect(outcome).toMatchObject({ ok: false, error: expect.stringContaining("not ready after 1 s") });
    expect(calls).toHaveLength(5); // created, then read at 300, 600, 900, 1200 ms
  });
});

describe("describeOutcome", () => {
  it("says how many rows were exported, and the server's note", () => {
    expect(describeOutcome("low loss", "parquet", { ok: true, export: exported({ status: "ready", rows: 1234 }) })).toBe(
      "Exported 'low loss' as Parquet: 1,234 rows.",
    );
    expect(describeOutcome("one", "csv", { ok: true, export: exported({ status: "ready", rows: 1 }) })).toBe("Exported 'one' as CSV: 1 row.");
    const note = "Rows carry no sample data: the dataset is iterable.";
    expect(describeOutcome("it", "json", { ok: true, export: exported({ status: "ready", rows: 0, note }) })).toBe(
      `Exported 'it' as JSON: 0 rows. ${note}`,
    );
  });

  it("says why an export failed", () => {
    expect(describeOutcome("gone", "csv", { ok: false, error: "no slice named 'gone'", export: null })).toBe(
      "Could not export 'gone' as CSV: no slice named 'gone'",
    );
  });
});
