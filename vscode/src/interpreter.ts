// Which Python runs the training script, and whether it can: the choice (the Python extension's
// active interpreter, else the setting, else the one picked before in this workspace, else ask),
// the interpreters found on this machine to ask among, and the check that the chosen one has
// the `onthefly` package at a version this extension works with.
//
// No VS Code here: extension.ts passes in what it read from VS Code.

import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import * as path from "node:path";

/** The oldest `onthefly` this extension talks to (the handshake and `onthefly open` it reads). */
export const MIN_ONTHEFLY_VERSION = "0.1.0";
/** The distribution's name on PyPI (the import name is `onthefly`). */
export const DISTRIBUTION = "onthefly-ai";

export type InterpreterSource = "python-extension" | "setting" | "remembered";

export interface InterpreterChoice {
  path: string;
  source: InterpreterSource;
}

/** The interpreter to use without asking, in order of precedence; null: ask (and remember). */
export function preferredInterpreter(known: {
  pythonExtension?: string | undefined;
  setting?: string | undefined;
  remembered?: string | undefined;
}): InterpreterChoice | null {
  const order: [InterpreterSource, string | undefined][] = [
    ["python-extension", known.pythonExtension],
    ["setting", known.setting],
    ["remembered", known.remembered],
  ];
  for (const [source, value] of order) {
    const trimmed = value?.trim();
    if (trimmed) return { path: trimmed, source };
  }
  return null;
}

/** Interpreters found on this machine, most likely first: the workspace's virtual environments,
 *  the active virtual or conda environment, then `python3`/`python` on PATH (in PATH's order).
 *  Paths are kept as found (a venv's `python` is a link to the base interpreter: resolving it
 *  would lose the venv). */
export function findInterpreters(
  env: NodeJS.ProcessEnv,
  workspaceFolders: readonly string[],
  exists: (file: string) => boolean = existsSync,
  platform: NodeJS.Platform = process.platform,
): string[] {
  const windows = platform === "win32";
  const inEnv = (root: string) => (windows ? path.win32.join(root, "Scripts", "python.exe") : path.posix.join(root, "bin", "python"));
  const candidates: string[] = [];
  for (const folder of workspaceFolders) {
    for (const name of [".venv", "venv", "env"]) candidates.push(inEnv(path.join(folder, name)));
  }
  if (env["VIRTUAL_ENV"]) candidates.push(inEnv(env["VIRTUAL_ENV"]));
  if (env["CONDA_PREFIX"]) candidates.push(windows ? path.win32.join(env["CONDA_PREFIX"], "python.exe") : inEnv(env["CONDA_PREFIX"]));
  const separator = windows ? ";" : ":";
  const names = windows ? ["python.exe", "python3.exe"] : ["python3", "python"];
  for (const dir of (env["PATH"] ?? env["Path"] ?? "").split(separator)) {
    if (dir === "") continue;
    for (const name of names) candidates.push(windows ? path.win32.join(dir, name) : path.posix.join(dir, name));
  }
  return [...new Set(candidates)].filter((file) => exists(file));
}

/** What the check found in an interpreter. */
export type InterpreterCheck =
  | { ok: true; python: string; version: string }
  | { ok: false; problem: "not-runnable" | "missing" | "too-old"; message: string; fix: string | null };

// Prints one JSON line: the Python version and onthefly's (null when it is not installed). The
// version comes from the distribution's metadata (fast: torch is not imported), else the module.
const PROBE = `
import json, sys, importlib.util
version = None
if importlib.util.find_spec("onthefly") is not None:
    try:
        from importlib.metadata import version as v
        version = v("${DISTRIBUTION}")
    except ImportError:  # PackageNotFoundError: installed without metadata (a source tree on the path)
        import onthefly
        version = getattr(onthefly, "__version__", "0")
print(json.dumps({"python": sys.version.split()[0], "onthefly": version}))
`;

/** Runs the interpreter once to see whether it can run training scripts through On The Fly. */
export function checkInterpreter(
  python: string,
  options: { env?: NodeJS.ProcessEnv; cwd?: string; minVersion?: string; timeoutMs?: number } = {},
): Promise<InterpreterCheck> {
  const minVersion = options.minVersion ?? MIN_ONTHEFLY_VERSION;
  return new Promise((resolve) => {
    execFile(
      python,
      ["-c", PROBE],
      { env: options.env ?? process.env, cwd: options.cwd, timeout: options.timeoutMs ?? 60_000, encoding: "utf8" },
      (error, stdout, stderr) => {
        const line = stdout.trim().split(/\r?\n/).pop() ?? "";
        let found: { python?: unknown; onthefly?: unknown } | null = null;
        try {
          found = JSON.parse(line) as { python?: unknown; onthefly?: unknown };
        } catch {
          found = null;
        }
        if (error !== null || found === null || typeof found.python !== "string") {
          const why = (stderr.trim().split(/\r?\n/).pop() ?? "") || (error?.message ?? "it printed nothing");
          resolve({
            ok: false,
            problem: "not-runnable",
            message: `Could not run the Python interpreter ${python}: ${why}. Choose another one with "On the Fly: Select Python Interpreter".`,
            fix: null,
          });
          return;
        }
        resolve(judge(python, found.python, typeof found.onthefly === "string" ? found.onthefly : null, minVersion));
      },
    );
  });
}

/** The verdict on what an interpreter has, with the exact command that fixes it. */
export function judge(python: string, pythonVersion: string, onthefly: string | null, minVersion = MIN_ONTHEFLY_VERSION): InterpreterCheck {
  const pip = `${quoteArgument(python)} -m pip install`;
  if (onthefly === null) {
    const fix = `${pip} ${DISTRIBUTION}`;
    return {
      ok: false,
      problem: "missing",
      message: `The Python interpreter ${python} (Python ${pythonVersion}) does not have the onthefly package. Install it with: pip install ${DISTRIBUTION} (for this interpreter: ${fix}), or choose another interpreter.`,
      fix,
    };
  }
  if (compareVersions(onthefly, minVersion) < 0) {
    const fix = `${pip} --upgrade ${DISTRIBUTION}`;
    return {
      ok: false,
      problem: "too-old",
      message: `The Python interpreter ${python} has onthefly ${onthefly}, older than this extension needs (${minVersion} or newer). Upgrade it with: pip install --upgrade ${DISTRIBUTION} (for this interpreter: ${fix}).`,
      fix,
    };
  }
  return { ok: true, python: pythonVersion, version: onthefly };
}

/** Compares release numbers (`0.10.1` > `0.9`); a pre-release or local suffix counts as its release. */
export function compareVersions(a: string, b: string): number {
  const parts = (v: string) => (/^\d+(\.\d+)*/.exec(v.trim())?.[0] ?? "0").split(".").map(Number);
  const [x, y] = [parts(a), parts(b)];
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}

/** A path as a shell line needs it (quoted when it holds spaces or quotes). */
export function quoteArgument(value: string): string {
  return /^[\w@%+=:,./\\-]+$/.test(value) ? value : `"${value.replace(/(["\\$`])/g, "\\$1")}"`;
}
