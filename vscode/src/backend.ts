// One backend process: a training script run through `onthefly run`, or `onthefly open` over an
// exported session. It is started, reports where its dashboard is (the handshake), and ends:
// stopped by the user, finished, or crashed, with its last lines kept for the panel.
//
// No VS Code here (unit tests drive real processes). Runs on the extension host's event loop.

import { spawn, type ChildProcess } from "node:child_process";

import { LineSplitter, Tail, redactTokens, type Dashboard } from "./handshake";

/** Why a backend ended. */
export type EndReason =
  | "stopped" // Stop, or the panel closed
  | "finished" // exit 0 after its dashboard was up
  | "crashed" // a non-zero exit, or killed by a signal it was not sent
  | "no-dashboard" // exit 0 without ever starting a dashboard
  | "timeout" // no dashboard within the start-up time: stopped
  | "failed-to-start"; // the interpreter could not be run at all

export type BackendState =
  | { kind: "idle" }
  | { kind: "starting"; pid: number }
  | { kind: "running"; pid: number; dashboard: Dashboard }
  | { kind: "stopping"; pid: number; dashboard: Dashboard | null }
  | { kind: "ended"; reason: EndReason; code: number | null; signal: string | null; lastLines: string[]; error?: string };

export interface BackendOptions {
  command: string;
  args: readonly string[];
  cwd: string;
  env: NodeJS.ProcessEnv;
  /** Which output line says where the dashboard is (null: not this one). */
  findDashboard: (line: string, pid: number) => Dashboard | null;
  /** Every line the process prints (tokens removed), for the output channel. */
  onOutput?: (line: string, stream: "stdout" | "stderr") => void;
  onState?: (state: BackendState) => void;
  startupTimeoutMs?: number;
  /** After Stop: how long an interrupt (Ctrl-C: a clean stop) gets, then a terminate, then a kill. */
  graceMs?: number;
  tailLines?: number;
}

const DEFAULTS = { startupTimeoutMs: 300_000, graceMs: 10_000, tailLines: 40 };
/** After the process exited, how long its output pipes may stay open (held by a child of it). */
const PIPE_GRACE_MS = 3_000;

export class Backend {
  private readonly options: BackendOptions & typeof DEFAULTS;
  private child: ChildProcess | null = null;
  private current: BackendState = { kind: "idle" };
  private readonly tail: Tail;
  private stopRequested = false;
  private timedOut = false;
  private startupTimer: NodeJS.Timeout | undefined;
  private killTimers: NodeJS.Timeout[] = [];
  private readonly endedWaiters: (() => void)[] = [];

  constructor(options: BackendOptions) {
    this.options = { ...DEFAULTS, ...options };
    this.tail = new Tail(this.options.tailLines);
  }

  get state(): BackendState {
    return this.current;
  }

  /** Starts the process; its progress comes through `onState`. Once only. */
  start(): void {
    if (this.current.kind !== "idle") throw new Error(`the backend was already started (${this.current.kind})`);
    let child: ChildProcess;
    try {
      // Its own process group (POSIX): Stop reaches the script's data-loader workers too.
      child = spawn(this.options.command, [...this.options.args], {
        cwd: this.options.cwd,
        env: this.options.env,
        stdio: ["ignore", "pipe", "pipe"],
        detached: process.platform !== "win32",
      });
    } catch (error) {
      this.end("failed-to-start", null, null, String(error));
      return;
    }
    this.child = child;
    const failed = (error: Error) => {
      if (this.current.kind === "ended") return;
      if (child.pid === undefined) this.end("failed-to-start", null, null, error.message);
    };
    child.on("error", failed);
    if (child.pid === undefined) {
      // spawn reports ENOENT asynchronously, through "error"
      return;
    }
    this.setState({ kind: "starting", pid: child.pid });
    this.read(child, "stdout");
    this.read(child, "stderr");
    // "close" comes once the output pipes are closed too, so the last lines are in. A process
    // left behind holding them (a stray grandchild) must not keep the panel waiting for ever.
    child.on("close", (code, signal) => this.exited(code, signal));
    child.on("exit", (code, signal) => {
      const late = setTimeout(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
        this.exited(code, signal);
      }, PIPE_GRACE_MS);
      late.unref();
      this.killTimers.push(late);
    });
    this.startupTimer = setTimeout(() => {
      if (this.current.kind !== "starting") return;
      this.timedOut = true;
      void this.stop();
    }, this.options.startupTimeoutMs);
  }

  /** Ends the process cleanly (interrupt, then terminate, then kill); resolves once it is gone. */
  stop(): Promise<void> {
    const state = this.current;
    if (state.kind === "idle") {
      this.end("stopped", null, null);
      return Promise.resolve();
    }
    if (state.kind === "ended") return Promise.resolve();
    const ended = new Promise<void>((resolve) => this.endedWaiters.push(resolve));
    if (state.kind === "stopping") return ended;
    this.stopRequested = true;
    const dashboard = state.kind === "running" ? state.dashboard : null;
    this.setState({ kind: "stopping", pid: state.pid, dashboard });
    const grace = this.options.graceMs;
    this.signal("SIGINT");
    this.killTimers.push(setTimeout(() => this.signal("SIGTERM"), grace));
    this.killTimers.push(setTimeout(() => this.signal("SIGKILL"), grace * 2));
    return ended;
  }

  private signal(name: NodeJS.Signals): void {
    const child = this.child;
    if (child?.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
    try {
      if (process.platform !== "win32") process.kill(-child.pid, name); // the whole group
      else child.kill(name);
    } catch {
      child.kill(name); // the group is gone already: the process itself
    }
  }

  private read(child: ChildProcess, stream: "stdout" | "stderr"): void {
    const source = child[stream];
    if (source === null) return;
    const lines = new LineSplitter();
    source.setEncoding("utf8");
    source.on("data", (chunk: string) => lines.push(chunk).forEach((line) => this.line(line, stream)));
    source.on("end", () => lines.flush().forEach((line) => this.line(line, stream)));
  }

  private line(line: string, stream: "stdout" | "stderr"): void {
    const state = this.current;
    if (state.kind === "starting") {
      const dashboard = this.options.findDashboard(line, state.pid);
      if (dashboard !== null) {
        clearTimeout(this.startupTimer);
        this.options.onOutput?.(`On The Fly dashboard at ${dashboard.root} (process ${dashboard.pid})`, stream);
        this.setState({ kind: "running", pid: state.pid, dashboard });
        return;
      }
    }
    const shown = redactTokens(line);
    this.tail.push(shown);
    this.options.onOutput?.(shown, stream);
  }

  private exited(code: number | null, signal: NodeJS.Signals | null): void {
    if (this.current.kind === "ended") return; // it never started ("error" said so)
    const hadDashboard = this.current.kind === "running"
      || (this.current.kind === "stopping" && this.current.dashboard !== null);
    let reason: EndReason;
    if (this.timedOut) reason = "timeout";
    else if (this.stopRequested) reason = "stopped";
    else if (code === 0) reason = hadDashboard ? "finished" : "no-dashboard";
    else reason = "crashed";
    this.end(reason, code, signal);
  }

  private end(reason: EndReason, code: number | null, signal: string | null, error?: string): void {
    clearTimeout(this.startupTimer);
    this.killTimers.forEach(clearTimeout);
    this.killTimers = [];
    const state: BackendState = { kind: "ended", reason, code, signal, lastLines: this.tail.value };
    if (error !== undefined) state.error = error;
    this.setState(state);
    this.endedWaiters.splice(0).forEach((resolve) => resolve());
  }

  private setState(state: BackendState): void {
    this.current = state;
    this.options.onState?.(state);
  }
}

/** One line for the panel's header: what the backend is doing (`session`: an exported session
 *  served by `onthefly open`, with no training process). */
export function describeState(state: BackendState, what: string, mode: "script" | "session" = "script"): string {
  switch (state.kind) {
    case "idle":
      return mode === "script" ? `Ready to run ${what}` : `Ready to open ${what}`;
    case "starting":
      return mode === "script" ? `Starting ${what}…` : `Opening ${what}…`;
    case "running":
      return mode === "script" ? `Running ${what}` : `Showing ${what} (no training process)`;
    case "stopping":
      return `Stopping ${what}…`;
    case "ended":
      return endedText(state, what);
  }
}

function endedText(state: Extract<BackendState, { kind: "ended" }>, what: string): string {
  const exit = state.signal !== null ? `killed by ${state.signal}` : `exit code ${state.code ?? "?"}`;
  switch (state.reason) {
    case "stopped":
      return `${what} stopped`;
    case "finished":
      return `${what} finished`;
    case "crashed":
      return `${what} crashed (${exit})`;
    case "no-dashboard":
      return `${what} ended without starting a dashboard: does it call onthefly.quickstart (or start_run)?`;
    case "timeout":
      return `${what} did not start its dashboard in time, and was stopped`;
    case "failed-to-start":
      return `${what} could not be started: ${state.error ?? "unknown error"}`;
  }
}
