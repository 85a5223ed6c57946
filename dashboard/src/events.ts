// What the server's events mean to the page: the line each one adds to the event log, and the
// test results they carry. The events arrive typed (event-types.ts), one payload type per kind.

import { kindName, type EventKind, type ServerEvent } from "./event-types";
import { formatCount, formatDuration, formatPercent, formatValue } from "./format";
import { areasText, countsText, severityCounts, worstSeverity } from "./health";
import type { LogEntry, TestResult } from "./state";

/** Kinds after which the run's state (and so the commands possible) may have changed. */
export const STATE_CHANGING: ReadonlySet<EventKind> = new Set<EventKind>([
  "status",
  "command_applied",
  "command_rejected",
  "run_finished",
  "run_created",
  "waiting",
  "error",
]);

/** The event log's line for an event, or null for kinds the log leaves out (progress). */
export function logEntry(event: ServerEvent): LogEntry | null {
  const described = describe(event);
  if (described === null) return null;
  const [text, tone] = described;
  const where = event.step === null ? "" : `step ${formatCount(event.step)} · `;
  return { seq: event.seq, kind: kindName(event), step: event.step, time: event.time, text: where + text, tone };
}

/** The test result an `eval` event with split "test" carries, or null for any other event. */
export function testResult(event: ServerEvent): TestResult | null {
  if (event.kind !== "eval" || event.payload.split !== "test") return null;
  const { loss, accuracy, samples } = event.payload;
  return { seq: event.seq, step: event.step, loss, accuracy, samples, time: event.time };
}

function describe(event: ServerEvent): [string, LogEntry["tone"]] | null {
  switch (event.kind) {
    case "command_applied":
      return [commandText(event.payload.command, event.payload.args), "good"];
    case "command_rejected":
      return [`${commandText(event.payload.command, event.payload.args)} rejected: ${event.payload.reason ?? "not possible now"}`, "warn"];
    case "status":
      return [`status ${event.payload.status ?? "?"}`, "info"];
    case "eval": {
      const { split, loss, accuracy } = event.payload;
      const parts = [`${split ?? "eval"} loss ${formatValue(loss)}`];
      if (accuracy !== null) parts.push(`accuracy ${formatPercent(accuracy)}`);
      return [parts.join(" · "), "info"];
    }
    case "epoch_summary": {
      const epoch = event.epoch === null ? "" : ` ${event.epoch}`;
      return [`epoch${epoch} done · ${event.payload.split} loss ${formatValue(event.payload.loss)}`, "info"];
    }
    case "checkpoint":
      return [`checkpoint (${event.payload.reason ?? "saved"}) ${event.payload.path ?? ""}`.trim(), "info"];
    case "resumed_from_checkpoint":
      return [`resumed from checkpoint ${event.payload.path ?? ""}`.trim(), "info"];
    case "resume_fast_forward":
      return [`resume skipped ${formatCount(event.payload.batches)} batches: ${event.payload.reason ?? ""}`, "warn"];
    case "samples_dropped":
      return [`per-sample values dropped (${formatCount(event.payload.packets)} packets): ${event.payload.reason ?? ""}`, "warn"];
    case "store_overflow":
      return [`store dropped ${formatCount(event.payload.dropped_records)} records: ${event.payload.reason ?? ""}`, "warn"];
    case "error":
      return [`error ${event.payload.type ?? ""}: ${event.payload.message ?? ""}`, "bad"];
    case "run_finished": {
      const status = event.payload.status ?? "finished";
      const seconds = event.payload.seconds;
      const took = seconds === null ? "" : ` in ${formatDuration(seconds)}`;
      return [`run ${status}${took}`, status === "failed" ? "bad" : "good"];
    }
    case "run_created":
      return [`run created${event.payload.name ? ` "${event.payload.name}"` : ""}`, "info"];
    case "waiting":
      return ["waiting for Run", "info"];
    case "plan_proposed":
      return [`plan card ${event.payload.plan_id ?? "?"} proposed${event.payload.source ? ` (${event.payload.source})` : ""}`, "info"];
    case "plan_discarded":
      return [`plan card ${event.payload.plan_id ?? "?"} discarded`, "info"];
    case "plan_started":
      return [`plan card ${event.payload.plan_id ?? "?"} started`, "info"];
    case "plan_finished": {
      const { plan_id: id, status, error, runs } = event.payload;
      if (status === "failed") return [`plan card ${id ?? "?"} failed: ${error ?? "no reason given"}`, "bad"];
      return [`plan card ${id ?? "?"} done${runs.length ? `: runs ${runs.join(", ")}` : ""}`, "good"];
    }
    case "comparison":
      return [`comparison ${event.payload.comparison_id ?? "?"} of runs ${event.payload.runs.join(", ")} on ${event.payload.sets.join(", ")}`, "good"];
    case "health": {
      const worst = worstSeverity(event.payload.cards);
      const tone = worst === "error" ? "bad" : worst === "warning" ? "warn" : "good";
      return [`health check-up (${areasText(event.payload.areas)}): ${countsText(severityCounts(event.payload.cards))}`, tone];
    }
    case "progress":
    case "epoch_started":
      return null;
    case "other":
      return [event.name.replaceAll("_", " "), "info"];
  }
}

/** "set_lr lr=0.01", "train_more epochs=2", "pause". */
function commandText(command: string | null, args: Record<string, unknown>): string {
  const given = Object.entries(args).filter(([, value]) => value !== null);
  const parts = given.map(([name, value]) => {
    // Arguments as given (0.001 stays 0.001), so the log matches what was typed.
    const shown = typeof value === "number" ? String(value) : JSON.stringify(value);
    return `${name}=${shown}`;
  });
  return [command ?? "command", ...parts].join(" ");
}
