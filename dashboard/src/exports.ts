// Files the server writes in the background: a slice's rows (an export) and the whole session (an
// archive, .otf). Both are jobs: asked for, then read again while "pending", with a deadline, until
// they are ready or failed. An export with the samples' data is carried out by the training process
// at its next step boundary; an archive first has the training process save its current weights;
// so either may be pending for a while. The outcome is the ready job or an error in the server's
// words: a failure is never reported as a success. The file itself is then a native download
// (dom.ts `download`).

import { ApiError, type ApiClient, type ArchiveOut, type ExportCreate, type ExportFormat, type ExportOut } from "./api";
import { formatBytes, formatCount } from "./format";

/** What the waiting reads of a job: fields every job answer of the server has. */
export type Job = Pick<ExportOut | ArchiveOut, "id" | "status" | "error">;

/** A ready job, or why there is none (with the job as last read, if it was read at all). */
export type JobOutcome<J extends Job> = { ok: true; job: J } | { ok: false; error: string; job: J | null };

export interface JobOptions {
  /** Between two reads of a pending job. */
  pollMs?: number;
  /** Give up waiting after this long (the job may still finish on the server). */
  deadlineMs?: number;
  /** What may hold a job up, said when it is not ready by the deadline. */
  stalled?: string;
  /** How to wait and what time it is (tests pass their own). */
  sleep?: (ms: number) => Promise<void>;
  now?: () => number;
}

const DEFAULTS: Required<JobOptions> = {
  pollMs: 300,
  deadlineMs: 120_000,
  stalled: "",
  sleep: (ms: number) => new Promise<void>((resolve) => window.setTimeout(resolve, ms)),
  now: () => performance.now(),
};

/** Start a job and wait until it is ready or failed: `poll` reads it again by id while it is pending. */
export async function waitForJob<J extends Job>(
  start: () => Promise<J>,
  poll: (id: string) => Promise<J>,
  options: JobOptions = {},
): Promise<JobOutcome<J>> {
  const { pollMs, deadlineMs, stalled, sleep, now } = { ...DEFAULTS, ...options };
  let current: J | null = null;
  try {
    current = await start();
    const deadline = now() + deadlineMs;
    while (current.status === "pending") {
      if (now() >= deadline) {
        const waited = Math.round(deadlineMs / 1000);
        return { ok: false, error: `it was not ready after ${waited} s${stalled ? ` (${stalled})` : ""}`, job: current };
      }
      await sleep(pollMs);
      current = await poll(current.id);
    }
  } catch (error) {
    return { ok: false, error: error instanceof ApiError ? error.message : String(error), job: current };
  }
  if (current.status === "ready") return { ok: true, job: current };
  return { ok: false, error: current.error ?? "the server gave no reason", job: current };
}

// ---- a slice's rows ---------------------------------------------------------------------------

export type ExportApi = Pick<ApiClient, "createExport" | "exportStatus">;
export type ExportOutcome = JobOutcome<ExportOut>;

export const FORMAT_TITLES: Readonly<Record<ExportFormat, string>> = { csv: "CSV", parquet: "Parquet", json: "JSON" };

/** Ask for the export of slice `name` and wait until it is ready or failed. */
export function runExport(api: ExportApi, name: string, request: ExportCreate, options: JobOptions = {}): Promise<ExportOutcome> {
  return waitForJob(() => api.createExport(name, request), (id) => api.exportStatus(id), {
    stalled: "is the training process busy, or gone?",
    ...options,
  });
}

/** What the page says about an outcome: "Exported 'low loss' as CSV: 1,234 rows." (and the note,
 *  e.g. why the rows carry no sample data), or "Could not export 'low loss' as CSV: <why>". */
export function describeOutcome(name: string, format: ExportFormat, outcome: ExportOutcome): string {
  const title = FORMAT_TITLES[format];
  const note = outcome.job?.note ? ` ${outcome.job.note}` : "";
  if (!outcome.ok) return `Could not export '${name}' as ${title}: ${outcome.error}${note}`;
  const rows = outcome.job.rows ?? null;
  const count = rows === null ? "" : `: ${formatCount(rows)} ${rows === 1 ? "row" : "rows"}`;
  return `Exported '${name}' as ${title}${count}.${note}`;
}

// ---- the whole session ------------------------------------------------------------------------

export type ArchiveApi = Pick<ApiClient, "createArchive" | "archiveStatus">;
export type ArchiveOutcome = JobOutcome<ArchiveOut>;

/** Ask for an archive of the session and wait until it is ready or failed. The server waits up to
 *  two minutes for a training step to save the weights, then copies the whole session: a longer
 *  deadline than a slice's. */
export function runArchive(api: ArchiveApi, options: JobOptions = {}): Promise<ArchiveOutcome> {
  return waitForJob(() => api.createArchive(), (id) => api.archiveStatus(id), {
    deadlineMs: 600_000,
    stalled: "a large session takes a while to copy: the archive may still be written on the server",
    ...options,
  });
}

/** "Saved the session as demo-1a2b.otf (12.3 MiB); final model: checkpoint 4 of run 1 at step 800."
 *  (and the note, e.g. a run whose current weights could not be saved), or
 *  "Could not export the session: <why>". */
export function describeArchive(outcome: ArchiveOutcome): string {
  const note = outcome.job?.note ? ` ${outcome.job.note}` : "";
  if (!outcome.ok) return `Could not export the session: ${outcome.error}${note}`;
  const { filename, bytes, final_checkpoint: final } = outcome.job;
  const size = bytes == null ? "" : ` (${formatBytes(bytes)})`;
  const model = final == null
    ? "it holds no model (the session saved no checkpoint)"
    : `final model: checkpoint ${final.id} of run ${final.run_id} at step ${formatCount(final.step)}`;
  return `Saved the session as ${filename}${size}; ${model}.${note}`;
}
