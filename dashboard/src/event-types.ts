// The events the server streams, as a discriminated union on `kind`: what each kind's payload
// holds, read once, here, from the untyped JSON (every field checked; a missing or malformed one
// is null). The code that consumes events switches on `kind` and gets typed payloads.
//
// Where each kind is published: engine/run.py (run_created, waiting, status, epoch_started,
// eval, epoch_summary of an evaluation, checkpoint, resumed_from_checkpoint, resume_fast_forward,
// samples_dropped, store_overflow, error, run_finished), engine/transfer.py (progress and the
// training epoch_summary), engine/controller.py (command_applied, command_rejected),
// actions/health.py (health: a check-up's cards, read by health.ts). The envelope (seq, kind,
// run_id, step, epoch, time) is the OpenAPI document's EventOut. A kind this
// page does not know yet arrives as `{ kind: "other", name }`, so a newer server never breaks it.

import type { ApiEvent } from "./api";
import { readCards, type HealthCard } from "./health";

interface Envelope {
  seq: number;
  run_id: number | null;
  step: number | null;
  epoch: number | null;
  /** Seconds since the Unix epoch. */
  time: number;
}

type Event<K extends string, P> = Envelope & { kind: K; payload: P };

/** Why something was dropped or skipped, in the engine's words. */
interface Reason {
  reason: string | null;
}

interface CommandPayload {
  /** The command's id, counted per run. */
  id: number | null;
  command: string | null;
  args: Record<string, unknown>;
}

export type ProgressEvent = Event<
  "progress",
  { step: number | null; loss: number | null; lr: number | null; samples_per_second: number | null; batch_in_epoch: number | null }
>;
export type StatusEvent = Event<"status", { status: string | null }>;
export type EpochStartedEvent = Event<"epoch_started", { batches: number | null }>;
/** An epoch's per-sample rows are stored: of training ("train") or of an evaluation ("val"). */
export type EpochSummaryEvent = Event<"epoch_summary", { split: string; loss: number | null; samples: number | null }>;
export type EvalEvent = Event<"eval", { split: string | null; loss: number | null; accuracy: number | null; samples: number | null }>;
export type CheckpointEvent = Event<"checkpoint", { path: string | null; reason: string | null }>;
export type ResumedEvent = Event<"resumed_from_checkpoint", { path: string | null; global_step: number | null }>;
export type FastForwardEvent = Event<"resume_fast_forward", Reason & { batches: number | null }>;
export type SamplesDroppedEvent = Event<"samples_dropped", Reason & { packets: number | null }>;
export type StoreOverflowEvent = Event<"store_overflow", Reason & { dropped_records: number | null }>;
export type ErrorEvent = Event<"error", { type: string | null; message: string | null }>;
export type RunFinishedEvent = Event<"run_finished", { status: string | null; seconds: number | null; steps: number | null }>;
export type RunCreatedEvent = Event<"run_created", { name: string | null; project: string | null }>;
export type WaitingEvent = Event<"waiting", { for: string | null }>;
export type CommandAppliedEvent = Event<"command_applied", CommandPayload & { result: Record<string, unknown> }>;
export type CommandRejectedEvent = Event<"command_rejected", CommandPayload & Reason>;
/** A plan card proposed from Python (one proposed over HTTP is no event: the page that proposed
 *  it knows), discarded, started or finished (done or failed) by its run. */
export type PlanProposedEvent = Event<"plan_proposed", { plan_id: number | null; source: string | null }>;
export type PlanDiscardedEvent = Event<"plan_discarded", { plan_id: number | null }>;
export type PlanStartedEvent = Event<"plan_started", { plan_id: number | null }>;
export type PlanFinishedEvent = Event<"plan_finished", { plan_id: number | null; status: string | null; error: string | null; runs: number[] }>;
/** A comparison's table is stored: GET /api/comparisons/{comparison_id}. */
export type ComparisonEvent = Event<"comparison", { comparison_id: number | null; runs: number[]; sets: string[] }>;
/** A health check-up: its cards (worst first), the areas it looked at, how long it took. */
export type HealthEvent = Event<"health", { cards: HealthCard[]; areas: string[]; seconds: number | null }>;
/** A kind this page does not know: `name` is the server's kind. */
export type OtherEvent = Envelope & { kind: "other"; name: string; payload: Record<string, unknown> };

export type ServerEvent =
  | ProgressEvent
  | StatusEvent
  | EpochStartedEvent
  | EpochSummaryEvent
  | EvalEvent
  | CheckpointEvent
  | ResumedEvent
  | FastForwardEvent
  | SamplesDroppedEvent
  | StoreOverflowEvent
  | ErrorEvent
  | RunFinishedEvent
  | RunCreatedEvent
  | WaitingEvent
  | CommandAppliedEvent
  | CommandRejectedEvent
  | PlanProposedEvent
  | PlanDiscardedEvent
  | PlanStartedEvent
  | PlanFinishedEvent
  | ComparisonEvent
  | HealthEvent
  | OtherEvent;

export type EventKind = ServerEvent["kind"];

/** The kind as the server names it ("other" events keep their own name). */
export function kindName(event: ServerEvent): string {
  return event.kind === "other" ? event.name : event.kind;
}

type Payload = Record<string, unknown>;
type KnownKind = Exclude<EventKind, "other">;
type PayloadOf<K extends KnownKind> = Extract<ServerEvent, { kind: K }>["payload"];

const reason = (p: Payload): Reason => ({ reason: text(p, "reason") });
const command = (p: Payload): CommandPayload => ({ id: number(p, "id"), command: text(p, "command"), args: record(p["args"]) });

/** How each known kind's payload is read (checked against its type above). */
const DECODERS: { [K in KnownKind]: (payload: Payload) => PayloadOf<K> } = {
  progress: (p) => ({
    step: number(p, "step"),
    loss: number(p, "loss"),
    lr: number(p, "lr"),
    samples_per_second: number(p, "samples_per_second"),
    batch_in_epoch: number(p, "batch_in_epoch"),
  }),
  status: (p) => ({ status: text(p, "status") }),
  epoch_started: (p) => ({ batches: number(p, "batches") }),
  epoch_summary: (p) => ({ split: text(p, "split") ?? "train", loss: number(p, "loss"), samples: number(p, "samples") }),
  eval: (p) => ({ split: text(p, "split"), loss: number(p, "loss"), accuracy: number(p, "accuracy"), samples: number(p, "samples") }),
  checkpoint: (p) => ({ path: text(p, "path"), reason: text(p, "reason") }),
  resumed_from_checkpoint: (p) => ({ path: text(p, "path"), global_step: number(p, "global_step") }),
  resume_fast_forward: (p) => ({ ...reason(p), batches: number(p, "batches") }),
  samples_dropped: (p) => ({ ...reason(p), packets: number(p, "packets") }),
  store_overflow: (p) => ({ ...reason(p), dropped_records: number(p, "dropped_records") }),
  error: (p) => ({ type: text(p, "type"), message: text(p, "message") }),
  run_finished: (p) => ({ status: text(p, "status"), seconds: number(p, "seconds"), steps: number(p, "steps") }),
  run_created: (p) => ({ name: text(p, "name"), project: text(p, "project") }),
  waiting: (p) => ({ for: text(p, "for") }),
  command_applied: (p) => ({ ...command(p), result: record(p["result"]) }),
  command_rejected: (p) => ({ ...command(p), ...reason(p) }),
  plan_proposed: (p) => ({ plan_id: number(p, "plan_id"), source: text(p, "source") }),
  plan_discarded: (p) => ({ plan_id: number(p, "plan_id") }),
  plan_started: (p) => ({ plan_id: number(p, "plan_id") }),
  plan_finished: (p) => ({ plan_id: number(p, "plan_id"), status: text(p, "status"), error: text(p, "error"), runs: numbers(p["runs"]) }),
  comparison: (p) => ({ comparison_id: number(p, "comparison_id"), runs: numbers(p["runs"]), sets: texts(p["sets"]) }),
  health: (p) => ({ cards: readCards(p["cards"]), areas: texts(p["areas"]), seconds: number(p, "seconds") }),
};

/** An event as the page uses it, from the server's JSON; null when even its envelope is not an
 *  event's (no numeric seq, no kind). */
export function parseEvent(raw: unknown): ServerEvent | null {
  if (!isRecord(raw)) return null;
  const seq = raw["seq"];
  const kind = raw["kind"];
  if (typeof seq !== "number" || !Number.isFinite(seq) || typeof kind !== "string") return null;
  const envelope: Envelope = {
    seq,
    run_id: number(raw, "run_id"),
    step: number(raw, "step"),
    epoch: number(raw, "epoch"),
    time: number(raw, "time") ?? 0,
  };
  const payload = record(raw["payload"]);
  if (!isKnown(kind)) return { ...envelope, kind: "other", name: kind, payload };
  // DECODERS[kind] builds exactly that kind's payload; TypeScript cannot follow the pairing.
  return { ...envelope, kind, payload: DECODERS[kind](payload) } as ServerEvent;
}

/** The events of a page of the event log, in order, without any that are not events. */
export function parseEvents(raw: readonly ApiEvent[]): ServerEvent[] {
  return raw.map(parseEvent).filter((event): event is ServerEvent => event !== null);
}

function isKnown(kind: string): kind is KnownKind {
  return Object.hasOwn(DECODERS, kind);
}

/** A finite number, or null (JSON has no NaN: the server sends null for one). */
function number(value: Payload, name: string): number | null {
  const field = value[name];
  return typeof field === "number" && Number.isFinite(field) ? field : null;
}

function text(value: Payload, name: string): string | null {
  const field = value[name];
  return typeof field === "string" ? field : null;
}

function numbers(value: unknown): number[] {
  return Array.isArray(value) ? value.filter((v): v is number => typeof v === "number" && Number.isFinite(v)) : [];
}

function texts(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === "string") : [];
}

function record(value: unknown): Record<string, unknown> {
  return isRecord(value) ? value : {};
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
