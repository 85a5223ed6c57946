// The command lines the extension runs: a training script through `onthefly run`, an exported
// session through `onthefly open`, both with the handshake on, and the environment they get.

import { createServer } from "node:net";

/** `python -c` of the package's own CLI: works for any interpreter that imports onthefly, with no
 *  need for its `onthefly` script to be on PATH (conda, a venv not activated). */
const CLI = "import sys; from onthefly.cli import main; sys.exit(main())";

export function runArguments(script: string, scriptArguments: readonly string[] = []): string[] {
  // --no-browser before the script: everything after the script is the script's own.
  return ["-c", CLI, "run", "--no-browser", script, ...scriptArguments];
}

export function openArguments(sessionFile: string, port?: number): string[] {
  return ["-c", CLI, "open", "--no-browser", ...(port === undefined ? [] : ["--port", String(port)]), sessionFile];
}

export interface BackendEnvironment {
  /** The dashboard's port, chosen by the extension so that its public address is known first. */
  port?: number;
  /** Host names a proxy in front of the dashboard sends (code-server on another machine). */
  allowedHosts?: readonly string[];
}

export function backendEnvironment(base: NodeJS.ProcessEnv, extra: BackendEnvironment = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {
    ...base,
    ONTHEFLY_HANDSHAKE: "json", // one JSON line on stdout says where the dashboard is
    PYTHONUNBUFFERED: "1", // output reaches the panel as it is printed, and a crash's last lines too
    PYTHONIOENCODING: "utf-8",
    COLUMNS: "4000", // rich would fold a long URL at 80 columns
  };
  delete env["ONTHEFLY_OPEN_BROWSER"];
  if (extra.port !== undefined && !base["ONTHEFLY_PORT"]) env["ONTHEFLY_PORT"] = String(extra.port);
  if (extra.allowedHosts !== undefined && extra.allowedHosts.length > 0) {
    const given = (base["ONTHEFLY_ALLOWED_HOSTS"] ?? "").split(",").map((h) => h.trim()).filter(Boolean);
    env["ONTHEFLY_ALLOWED_HOSTS"] = [...new Set([...given, ...extra.allowedHosts])].join(",");
  }
  return env;
}

/** A port free on 127.0.0.1 now (the backend binds it a moment later). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => (port > 0 ? resolve(port) : reject(new Error("no free port"))));
    });
  });
}

const LOOPBACK = new Set(["localhost", "127.0.0.1", "[::1]", "::1"]);

export function isLoopback(hostname: string): boolean {
  return LOOPBACK.has(hostname.toLowerCase());
}
