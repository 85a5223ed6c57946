import { describe, expect, it } from "vitest";

import { ApiError, type ArchiveOut, type ArchivedCheckpoint, type ExportOut } from "../src/api";
import { describeArchive, describeOutcome, runArchive, runExport, waitForJob, type ArchiveApi, type ExportApi } from "../src/exports";

function exported(patch: Partial<ExportOut>): ExportOut {
  return {
    id: "x1", slice: "low loss", run_id: 1, epoch: 3, format: "csv", data: true, status: "pending",
    rows: null, error: null, note: null, filename: "low-loss.csv", ...patch,
  };
}

function archive(patch: Partial<ArchiveOut>): ArchiveOut {
  return {
    id: "a1", status: "pending", filename: "demo-s1.otf", created: 1_700_000_000, bytes: null,
    final_checkpoint: null, error: null, note: null, ...patch,
  };
}

const CHECKPOINT: ArchivedCheckpoint = { id: 4, run_id: 1, step: 800, epoch: 2, path: "checkpoints/run-1/checkpoint-00004", reason: "final" };

/** Answers from `answers` in order (an Error is thrown), each call noted in `calls`. */
function answering<T>(answers: (T | Error)[]) {
  const calls: string[] = [];
  const next = async (call: string): Promise<T> => {
    calls.push(call);
    const answer = answers.shift();
    if (answer === undefined) throw new Error("no more answers");
    if (answer instanceof Error) throw answer;
    return answer;
  };
  return { next, calls };
}

/** An API whose export answers come from `answers` in order. */
function fakeApi(...answers: (ExportOut | Error)[]) {
  const { next, calls } = answering(answers);
  const api: ExportApi = {
    createExport: (name, request) => next(`create ${name} ${request.format} ${request.data}`),
    exportStatus: (id) => next(`status ${id}`),
  };
  return { api, calls };
}

/** An API whose archive answers come from `answers` in order. */
function fakeArchiveApi(...answers: (ArchiveOut | Error)[]) {
  const { next, calls } = answering(answers);
  const api: ArchiveApi = { createArchive: () => next("create"), archiveStatus: (id) => next(`status ${id}`) };
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
    expect(outcome).toEqual({ ok: true, job: exported({ status: "ready", rows: 1234 }) });
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
      job: failed,
    });
  });

  it("reports a refusal (4xx) with its detail", async () => {
    const { api } = fakeApi(new ApiError(404, "no slice named 'gone'"));
    expect(await runExport(api, "gone", { format: "csv", data: true }, clock().options)).toEqual({
      ok: false,
      error: "no slice named 'gone'",
      job: null,
    });
  });

  it("reports a network failure while polling, keeping what it knew", async () => {
    const { api } = fakeApi(exported({}), new TypeError("Failed to fetch"));
    const outcome = await runExport(api, "a", { format: "csv", data: true }, clock().options);
    expect(outcome).toMatchObject({ ok: false, error: "TypeError: Failed to fetch", job: { status: "pending" } });
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
    expect(describeOutcome("low loss", "parquet", { ok: true, job: exported({ status: "ready", rows: 1234 }) })).toBe(
      "Exported 'low loss' as Parquet: 1,234 rows.",
    );
    expect(describeOutcome("one", "csv", { ok: true, job: exported({ status: "ready", rows: 1 }) })).toBe("Exported 'one' as CSV: 1 row.");
    const note = "Rows carry no sample data: the dataset is iterable.";
    expect(describeOutcome("it", "json", { ok: true, job: exported({ status: "ready", rows: 0, note }) })).toBe(
      `Exported 'it' as JSON: 0 rows. ${note}`,
    );
  });

  it("says why an export failed", () => {
    expect(describeOutcome("gone", "csv", { ok: false, error: "no slice named 'gone'", job: null })).toBe(
      "Could not export 'gone' as CSV: no slice named 'gone'",
    );
  });
});

describe("waitForJob", () => {
  it("says what may hold a job up when it is not ready by the deadline", async () => {
    const { next } = answering(Array.from({ length: 5 }, () => archive({})));
    const options = { ...clock().options, deadlineMs: 500, stalled: "the disk is slow" };
    const outcome = await waitForJob(() => next("start"), (id) => next(id), options);
    expect(outcome).toEqual({ ok: false, error: "it was not ready after 1 s (the disk is slow)", job: archive({}) });
  });

  it("names no cause when it was given none", async () => {
    const { next } = answering(Array.from({ length: 5 }, () => archive({})));
    const outcome = await waitForJob(() => next("start"), (id) => next(id), { ...clock().options, deadlineMs: 2000, pollMs: 1000 });
    expect(outcome).toMatchObject({ ok: false, error: "it was not ready after 2 s" });
  });

  it("says the server gave no reason for a failure without an error", async () => {
    const { next } = answering([archive({ status: "failed" })]);
    expect(await waitForJob(() => next("start"), (id) => next(id), clock().options)).toMatchObject({
      ok: false,
      error: "the server gave no reason",
    });
  });
});

describe("runArchive", () => {
  it("polls a pending archive until it is ready", async () => {
    const ready = archive({ status: "ready", bytes: 12_897_485, final_checkpoint: CHECKPOINT });
    const { api, calls } = fakeArchiveApi(archive({}), archive({}), ready);
    const time = clock();
    expect(await runArchive(api, time.options)).toEqual({ ok: true, job: ready });
    expect(calls).toEqual(["create", "status a1", "status a1"]);
    expect(time.waits).toEqual([300, 300]);
  });

  it("reports a failed archive with the server's error, never as a success", async () => {
    const failed = archive({ status: "failed", error: "OSError: [Errno 28] No space left on device" });
    const { api } = fakeArchiveApi(archive({}), failed);
    expect(await runArchive(api, clock().options)).toEqual({ ok: false, error: "OSError: [Errno 28] No space left on device", job: failed });
  });

  it("reports a refusal with its detail", async () => {
    const { api } = fakeArchiveApi(archive({}), new ApiError(404, "no session archive a1 was made by this server"));
    expect(await runArchive(api, clock().options)).toEqual({
      ok: false,
      error: "no session archive a1 was made by this server",
      job: archive({}),
    });
  });

  it("waits ten minutes by default, then gives up saying it may still be written", async () => {
    const { api, calls } = fakeArchiveApi(...Array.from({ length: 40 }, () => archive({})));
    const outcome = await runArchive(api, { ...clock().options, pollMs: 20_000 });
    expect(outcome).toMatchObject({ ok: false, error: expect.stringMatching(/^it was not ready after 600 s \(.*may still be written on the server\)$/) });
    expect(calls).toHaveLength(31); // created, then read every 20 s up to 600 s
  });
});

describe("describeArchive", () => {
  it("names the file, its size and the final model", () => {
    const ready = archive({ status: "ready", bytes: 12_897_485, final_checkpoint: CHECKPOINT });
    expect(describeArchive({ ok: true, job: ready })).toBe(
      "Saved the session as demo-s1.otf (12.3 MiB); final model: checkpoint 4 of run 1 at step 800.",
    );
  });

  it("says when the archive holds no model, and adds the server's note", () => {
    const note = "run 1's current weights were not saved (timed out); its newest checkpoint is in the archive";
    expect(describeArchive({ ok: true, job: archive({ status: "ready", bytes: 2048, note }) })).toBe(
      `Saved the session as demo-s1.otf (2.0 KiB); it holds no model (the session saved no checkpoint). ${note}`,
    );
  });

  it("says why the session could not be exported", () => {
    expect(describeArchive({ ok: false, error: "Failed to fetch", job: null })).toBe("Could not export the session: Failed to fetch");
  });
});
