// What became of the commands the page sent. A command is applied later, at a step boundary, and
// the event stream says how it went (`command_applied` with a result, or `command_rejected` with a
// reason); a view that sent one waits for that here. Command ids are counted per run. The event
// can arrive before the POST that queued the command has answered, so recent outcomes are kept.

import type { ServerEvent } from "./event-types";

export type Outcome =
  | { applied: true; result: Record<string, unknown> }
  | { applied: false; reason: string };

/** Outcomes kept for commands nobody waits for (yet). */
const KEPT = 200;

export class CommandOutcomes {
  private readonly settled = new Map<string, Outcome>();
  private readonly waiting = new Map<string, (outcome: Outcome) => void>();

  /** Take note of an event; anything but a command outcome is ignored. */
  receive(event: ServerEvent): void {
    if (event.kind !== "command_applied" && event.kind !== "command_rejected") return;
    const id = event.payload.id;
    if (id === null || event.run_id === null) return;
    const key = `${event.run_id}:${id}`;
    const outcome: Outcome =
      event.kind === "command_applied"
        ? { applied: true, result: event.payload.result }
        : { applied: false, reason: event.payload.reason ?? "not possible now" };
    const resolve = this.waiting.get(key);
    if (resolve !== undefined) {
      this.waiting.delete(key);
      resolve(outcome);
      return;
    }
    this.settled.set(key, outcome);
    if (this.settled.size > KEPT) {
      const oldest = this.settled.keys().next().value;
      if (oldest !== undefined) this.settled.delete(oldest);
    }
  }

  /** The outcome of run `runId`'s command `id`: at once if it already came, else when it comes,
   *  else (after `timeoutMs`) a rejection saying that no answer came. */
  wait(runId: number, id: number, timeoutMs: number): Promise<Outcome> {
    const key = `${runId}:${id}`;
    const known = this.settled.get(key);
    if (known !== undefined) {
      this.settled.delete(key);
      return Promise.resolve(known);
    }
    return new Promise((resolve) => {
      const timer = window.setTimeout(() => {
        this.waiting.delete(key);
        resolve({ applied: false, reason: `no answer within ${Math.round(timeoutMs / 1000)} s` });
      }, timeoutMs);
      this.waiting.set(key, (outcome) => {
        window.clearTimeout(timer);
        resolve(outcome);
      });
    });
  }
}
