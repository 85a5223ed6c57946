// The store of what the page shows about the session and its run. Views subscribe to topics; every
// change in one task (one delivery of events, one fetch) reaches them as a single notification.

import type { RunInfo, SessionInfo } from "./api";
import type { StreamState } from "./socket";

export type Topic = "session" | "run" | "connection" | "log" | "tests" | "message";

export interface LogEntry {
  seq: number;
  kind: string;
  step: number | null;
  time: number;
  text: string;
  tone: "info" | "good" | "warn" | "bad";
}

export interface TestResult {
  seq: number;
  step: number | null;
  loss: number | null;
  accuracy: number | null;
  samples: number | null;
  time: number;
}

export interface Message {
  text: string;
  tone: "info" | "error";
}

export type Listener = (changed: ReadonlySet<Topic>) => void;

/** How many log entries the page keeps (newest first); older ones are in the session's store. */
export const LOG_LIMIT = 500;

/** A run that has ended takes no command, whatever an earlier snapshot of it listed: its status
 *  event can come before the server's state of the run says so. */
const ENDED = new Set(["stopped", "finished", "failed"]);

function settled(run: RunInfo): RunInfo {
  return ENDED.has(run.status) && run.commands.length > 0 ? { ...run, commands: [] } : run;
}

export class Store {
  session: SessionInfo | null = null;
  run: RunInfo | null = null;
  connection: StreamState = "connecting";
  log: LogEntry[] = [];
  tests: TestResult[] = [];
  message: Message | null = null;

  private readonly listeners: Listener[] = [];
  private readonly dirty = new Set<Topic>();
  private flushQueued = false;

  subscribe(listener: Listener): void {
    this.listeners.push(listener);
  }

  setSession(session: SessionInfo): void {
    this.session = session;
    this.changed("session");
  }

  setRun(run: RunInfo): void {
    this.run = settled(run);
    this.changed("run");
  }

  /** Merge live values (from a progress or status event) into the current run. */
  patchRun(patch: Partial<RunInfo>): void {
    if (this.run === null) return;
    this.run = settled({ ...this.run, ...patch });
    this.changed("run");
  }

  setConnection(state: StreamState): void {
    if (state === this.connection) return;
    this.connection = state;
    this.changed("connection");
  }

  /** Add entries in any order; the log stays newest first, without duplicates, bounded. */
  addLog(entries: LogEntry[]): void {
    if (entries.length === 0) return;
    const seen = new Set(this.log.map((entry) => entry.seq));
    const fresh = entries.filter((entry) => !seen.has(entry.seq));
    this.log = [...fresh, ...this.log].sort((a, b) => b.seq - a.seq).slice(0, LOG_LIMIT);
    this.changed("log");
  }

  addTests(results: TestResult[]): void {
    if (results.length === 0) return;
    const seen = new Set(this.tests.map((result) => result.seq));
    const fresh = results.filter((result) => !seen.has(result.seq));
    this.tests = [...fresh, ...this.tests].sort((a, b) => b.seq - a.seq);
    this.changed("tests");
  }

  /** Forget everything about the run (when the page switches to another run). */
  clearRun(): void {
    this.log = [];
    this.tests = [];
    this.changed("log");
    this.changed("tests");
  }

  showMessage(text: string, tone: Message["tone"] = "error"): void {
    this.message = { text, tone };
    this.changed("message");
  }

  clearMessage(): void {
    if (this.message === null) return;
    this.message = null;
    this.changed("message");
  }

  private changed(topic: Topic): void {
    this.dirty.add(topic);
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => this.flush());
  }

  private flush(): void {
    this.flushQueued = false;
    const changed = new Set(this.dirty);
    this.dirty.clear();
    for (const listener of this.listeners) listener(changed);
  }
}
