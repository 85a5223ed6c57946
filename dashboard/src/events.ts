// What the server's events mean to the page: the line each one adds to the event log, and the
// values read from their payloads. Payloads are untyped JSON, so every read is checked.

import type { ApiEvent } from "./api";
import { formatCount, formatDuration, formatPercent, formatValue } from "./format";
import type { LogEntry, TestResult } from "./state";

/** A finite number from the payload, or null. */
export function numberField(event: ApiEvent, name: string): number | null {
  const value = event.payload[name];
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

export function stringField(event: ApiEvent, name: string): string | null {
  const value = event.payload[name];
  return typeof value === "string" ? value : null;
}

/** Kinds after which the run's state (and so the commands possible) may have changed. */
export const STATE_CHANGING = new Set([
  "status",
  "command_applied",
  "command_rejected",
  "run_finished",
  "run_created",
  "waiting",
  "error",
]);

/** The event log's line for an event, or null for kinds the log leaves out (progress). */
export function logEntry(event: ApiEvent): LogEntry | null {
  const described = describe(event);
  if (described === null) return null;
  const [text, tone] = described;
  const where = event.step === null ? "" : `step ${formatCount(event.step)} · `;
  return { seq: event.seq, kind: event.kind, step: event.step, time: event.time, text: where + text, tone };
}

/** The test result an `eval` event with split "test" carries, or null for any other event. */
export function testResult(event: ApiEvent): TestResult | null {
  if (event.kind !== "eval" || stringField(event, "split") !== "test") return null;
  return {
    seq: event.seq,
    step: event.step,
    loss: numberField(event, "loss"),
    accuracy: numberField(event, "accuracy"),
    samples: numberField(event, "samples"),
    time: event.time,
  };
}

function describe(event: ApiEvent): [string, LogEntry["tone"]] | null {
  switch (event.kind) {
    case "command_applied":
      return [`${commandText(event)}`, "good"];
    case "command_rejected":
      return [`${commandText(event)} rejected: ${stringField(event, "reason") ?? "not possible now"}`, "warn"];
    case "status":
      return [`status ${stringField(event, "status") ?? "?"}`, "info"];
    case "eval": {
      const accuracy = numberField(event, "accuracy");
      const parts = [`${stringField(event, "split") ?? "eval"} loss ${formatValue(numberField(event, "loss"))}`];
      if (accuracy !== null) parts.push(`accuracy ${formatPercent(accuracy)}`);
      return [parts.join(" · "), "info"];
    }
    case "epoch_summary": {
      const epoch = event.epoch === null ? "" : ` ${event.epoch}`;
      return [`epoch${epoch} done · ${stringField(event, "split") ?? "train"} loss ${formatValue(numberField(event, "loss"))}`, "info"];
    }
    case "checkpoint":
      return [`checkpoint (${stringField(event, "reason") ?? "saved"}) ${stringField(event, "path") ?? ""}`.trim(), "info"];
    case "error":
      return [`error ${stringField(event, "type") ?? ""}: ${stringField(event, "message") ?? ""}`, "bad"];
    case "run_finished": {
      const status = stringField(event, "status") ?? "finished";
      const seconds = numberField(event, "seconds");
      const took = seconds === null ? "" : ` in ${formatDuration(seconds)}`;
      return [`run ${status}${took}`, status === "failed" ? "bad" : "good"];
    }
    case "run_created":
      return [`run created${stringField(event, "name") ? ` "${stringField(event, "name")}"` : ""}`, "info"];
    case "waiting":
      return ["waiting for Run", "info"];
    case "progress":
    case "epoch_started":
      return null;
    default:
      return [event.kind.replaceAll("_", " "), "info"];
  }
}

/** "set_lr lr=0.01", "train_more epochs=2", "pause". */
function commandText(event: ApiEvent): string {
  const command = stringField(event, "command") ?? "command";
  const args = event.payload["args"];
  if (typeof args !== "object" || args === null) return command;
  const given = Object.entries(args as Record<string, unknown>).filter(([, value]) => value !== null);
  const parts = given.map(([name, value]) => {
    // Arguments as given (0.001 stays 0.001), so the log matches what was typed.
    const shown = typeof value === "number" ? String(value) : JSON.stringify(value);
    return `${name}=${shown}`;
  });
  return [command, ...parts].join(" ");
}
