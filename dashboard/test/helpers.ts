// Shared by the tests: events as the server sends them, and typed ones as the page uses them.

import type { ApiEvent } from "../src/api";
import { parseEvent, type ServerEvent } from "../src/event-types";

/** An event as the server's JSON has it. */
export function rawEvent(seq: number, kind: string, payload: Record<string, unknown> = {}, where: Partial<ApiEvent> = {}): ApiEvent {
  return { seq, kind, run_id: 1, step: seq * 10, epoch: 0, time: 1_700_000_000 + seq, payload, ...where };
}

/** The same event, typed (fails the test if it does not parse). */
export function event(seq: number, kind: string, payload: Record<string, unknown> = {}, where: Partial<ApiEvent> = {}): ServerEvent {
  const parsed = parseEvent(rawEvent(seq, kind, payload, where));
  if (parsed === null) throw new Error(`not an event: ${kind}`);
  return parsed;
}
