// The backend's state machine against real processes (python3 scripts standing in for a
// training script): handshake, Stop (interrupt, then terminate, for the whole process group),
// crash with its last lines, no dashboard, start-up timeout, an interpreter that does not exist.

import { execFileSync } from "node:child_process";

import { describe, expect, it } from "vitest";

import { Backend, describeState, type BackendState } from "../src/backend";
import { parseHandshake } from "../src/handshake";

const TOKEN = "c2VjcmV0LXRva2VuLWZvci10ZXN0cy0xMjM0NTY3ODkw";
const HANDSHAKE = `print(json.dumps({"onthefly": {"url": "http://127.0.0.1:8123/?token=${TOKEN}", "token": "${TOKEN}", "pid": os.getpid()}}), flush=True)`;

function hasPython(): boolean {
  try {
    execFileSync("python3", ["-c", "pass"]);
    return true;
  } catch {
    return false;
  }
}

interface Started {
  backend: Backend;
  states: BackendState[];
  output: string[];
  /** Resolves with the first state of this kind. */
  reached: (kind: BackendState["kind"]) => Promise<BackendState>;
}

function start(code: string, options: { graceMs?: number; startupTimeoutMs?: number; command?: string } = {}): Started {
  const states: BackendState[] = [];
  const output: string[] = [];
  const waiting: { kind: string; resolve: (state: BackendState) => void }[] = [];
  const backend = new Backend({
    command: options.command ?? "python3",
    args: ["-u", "-c", `import json, os, sys, time, signal, subprocess\n${code}`],
    cwd: process.cwd(),
    env: process.env,
    findDashboard: parseHandshake,
    onOutput: (line) => output.push(line),
    onState: (state) => {
      states.push(state);
      for (const w of waiting.filter((w) => w.kind === state.kind)) {
        waiting.splice(waiting.indexOf(w), 1);
        w.resolve(state);
      }
    },
    ...(options.graceMs === undefined ? {} : { graceMs: options.graceMs }),
    ...(options.startupTimeoutMs === undefined ? {} : { startupTimeoutMs: options.startupTimeoutMs }),
  });
  const reached = (kind: BackendState["kind"]) => {
    const seen = states.find((s) => s.kind === kind);
    return seen ? Promise.resolve(seen) : new Promise<BackendState>((resolve) => waiting.push({ kind, resolve }));
  };
  backend.start();
  return { backend, states, output, reached };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe.runIf(hasPython())("Backend", () => {
  it("reads the handshake, then Stop ends the process and its children", async () => {
    const run = start(`
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid)
print("loading data")
${HANDSHAKE}
print("On The Fly dashboard: http://127.0.0.1:8123/?token=${TOKEN}", file=sys.stderr)
while True:
    time.sleep(0.05)
`);
    const running = await run.reached("running");
    expect(running).toMatchObject({ kind: "running", dashboard: { root: "http://127.0.0.1:8123/", token: TOKEN } });
    expect(run.states.map((s) => s.kind)).toEqual(["starting", "running"]);
    const childPid = Number(run.output.find((line) => line.startsWith("child "))!.split(" ")[1]);
    expect(alive(childPid)).toBe(true);
    const stopped = run.backend.stop();
    expect(run.backend.state.kind).toBe("stopping");
    await stopped;
    expect(run.backend.state).toMatchObject({ kind: "ended", reason: "stopped" });
    expect(run.states.map((s) => s.kind)).toEqual(["starting", "running", "stopping", "ended"]);
    // The whole group had the interrupt: the script's own child is gone too.
    for (let i = 0; i < 100 && alive(childPid); i++) await new Promise((r) => setTimeout(r, 50));
    expect(alive(childPid)).toBe(false);
    // The token never reaches the output channel; the handshake line is said in words.
    expect(run.output.join("\n")).not.toContain(TOKEN);
    expect(run.output).toContain(`On The Fly dashboard at http://127.0.0.1:8123/ (process ${running.kind === "running" ? running.dashboard.pid : 0})`);
  });

  it("shows a crash with the script's last lines", async () => {
    const run = start(`
${HANDSHAKE}
for epoch in range(3):
    print(f"epoch {epoch} loss {1 / (epoch + 1):.3f}")
raise RuntimeError("CUDA out of memory (a stand-in)")
`);
    const ended = await run.reached("ended");
    expect(ended).toMatchObject({ kind: "ended", reason: "crashed", code: 1 });
    if (ended.kind !== "ended") throw new Error("unreachable");
    expect(ended.lastLines).toContain("epoch 2 loss 0.333");
    expect(ended.lastLines.at(-1)).toBe("RuntimeError: CUDA out of memory (a stand-in)");
    expect(ended.lastLines.some((line) => line.startsWith("Traceback"))).toBe(true);
    expect(describeState(ended, "train.py")).toBe("train.py crashed (exit code 1)");
  });

  it("keeps only the last lines of a long crash", async () => {
    const run = start(`for i in range(500): print("line", i)\nsys.exit(3)`);
    const ended = await run.reached("ended");
    if (ended.kind !== "ended") throw new Error("unreachable");
    expect(ended).toMatchObject({ reason: "crashed", code: 3 });
    expect(ended.lastLines).toHaveLength(40);
    expect(ended.lastLines.at(-1)).toBe("line 499");
  });

  it("says when a script ends without starting a dashboard", async () => {
    const run = start(`print("trained without On The Fly")`);
    const ended = await run.reached("ended");
    expect(ended).toMatchObject({ reason: "no-dashboard", code: 0, lastLines: ["trained without On The Fly"] });
    expect(describeState(ended, "x.py")).toContain("does it call onthefly.quickstart");
  });

  it("says when a script finished after its dashboard was up", async () => {
    const run = start(`${HANDSHAKE}\nprint("done")`);
    expect(await run.reached("ended")).toMatchObject({ reason: "finished", code: 0 });
  });

  it("stops a script that starts no dashboard in time", async () => {
    const run = start(`time.sleep(600)`, { startupTimeoutMs: 300 });
    expect(await run.reached("ended")).toMatchObject({ reason: "timeout" });
  });

  it("terminates a script that ignores the interrupt", async () => {
    const run = start(`
signal.signal(signal.SIGINT, signal.SIG_IGN)
${HANDSHAKE}
time.sleep(600)
`, { graceMs: 300 });
    await run.reached("running");
    await run.backend.stop();
    expect(run.backend.state).toMatchObject({ kind: "ended", reason: "stopped", signal: "SIGTERM" });
  });

  it("says when the interpreter cannot be started", async () => {
    const run = start("pass", { command: "/nonexistent/python3" });
    const ended = await run.reached("ended");
    expect(ended).toMatchObject({ kind: "ended", reason: "failed-to-start" });
    expect(describeState(ended, "train.py")).toMatch(/could not be started: .*ENOENT/);
  });

  it("starts once only, and a Stop after the end does nothing", async () => {
    const run = start(`pass`);
    await run.reached("ended");
    expect(() => run.backend.start()).toThrow(/already started/);
    await run.backend.stop();
    expect(run.states.filter((s) => s.kind === "ended")).toHaveLength(1);
  });
});
