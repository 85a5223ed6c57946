// Exporting a slice's rows: ask the server for an export, wait until it is written, and say how it
// went. An export with the samples' data is carried out by the training process at its next step
// boundary, so it may be "pending" for a moment: it is polled, with a deadline. The outcome is
// either a ready export (its row count, its note) or an error in the server's words; a failure is
// never reported as a success. The file itself is then a native download (slices.ts).

import { ApiError, type ApiClient, type ExportCreate, type ExportFormat, type ExportOut } from "./api";
import { formatCount } from "./format";

export type ExportApi = Pick<ApiClient, "createExport" | "exportStatus">;

export interface ExportOptions {
  /** Between two reads of a pending export. */
  pollMs?: number;
  /** Give up waiting after this long (the export may still finish on the server). */
  deadlineMs?: number;
  /** How to wait and what time it is (tests pass their own). */
  sleep?: (ms: number) => Promise<void>;
  now?: () => number;
}

export type ExportOutcome =
  | { ok: true; export: ExportOut }
  | { ok: false; error: string; export: ExportOut | null };

const DEFAULTS = {
  pollMs: 300,
  deadlineMs: 120_000,
  sleep: (ms: number) => new Promise<void>((resolve) => window.setTimeout(resolve, ms)),
  now: () => performance.now(),
};

export const FORMAT_TITLES: Readonly<Record<ExportFormat, string>> = { csv: "CSV", parquet: "Parquet", json: "JSON" };

/** Ask for the export of slice `name` and wait until it is ready or failed. */
export async function runExport(api: ExportApi, name: string, request: ExportCreate, options: ExportOptions = {}): Promise<ExportOutcome> {
  const { pollMs, deadlineMs, sleep, now } = { ...DEFAULTS, ...options };
  let current: ExportOut | null = null;
  try {
    current = await api.createExport(name, request);
    const deadline = now() + deadlineMs;
    while (current.status === "pending") {
      if (now() >= deadline) {
        const waited = Math.round(deadlineMs / 1000);
        return { ok: false, error: `it was not ready after ${waited} s (is the training process busy, or gone?)`, export: current };
      }
      await sleep(pollMs);
      current = await api.exportStatus(current.id);
    }
  } catch (error) {
    return { ok: false, error: error instanceof ApiError ? error.message : String(error), export: current };
  }
  if (current.status === "ready") return { ok: true, export: current };
  return { ok: false, error: current.error ?? "the server gave no reason", export: current };
}

/** What the page says about an outcome: "Exported 'low loss' as CSV: 1,234 rows." (and the note,
 *  e.g. why the rows carry no sample data), or "Could not export 'low loss' as CSV: <why>". */
export function describeOutcome(name: string, format: ExportFormat, outcome: ExportOutcome): string {
  const title = FORMAT_TITLES[format];
  const note = outcome.export?.note ? ` ${outcome.export.note}` : "";
  if (!outcome.ok) return `Could not export '${name}' as ${title}: ${outcome.error}${note}`;
  const rows = outcome.export.rows ?? null;
  const count = rows === null ? "" : `: ${formatCount(rows)} ${rows === 1 ? "row" : "rows"}`;
  return `Exported '${name}' as ${title}${count}.${note}`;
}
