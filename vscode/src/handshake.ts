// What the backend says on its output: the handshake line of a training process started with
// ONTHEFLY_HANDSHAKE=json (`{"onthefly": {"url": ..., "token": ..., "pid": ...}}`), or, from
// `onthefly open`, the line that prints the dashboard's URL. Pure functions: no VS Code here.

/** Where a backend's dashboard is, and the token it wants. */
export interface Dashboard {
  /** The server's root, e.g. `http://127.0.0.1:8123/` (no token, no query). */
  root: string;
  token: string;
  /** The process that printed it (the training process; for `onthefly open`, the server). */
  pid: number;
}

/** The handshake line, or null when `line` is anything else (the script's own output). */
export function parseHandshake(line: string): Dashboard | null {
  const text = line.trim();
  if (!text.startsWith("{") || !text.includes('"onthefly"')) return null;
  let message: unknown;
  try {
    message = JSON.parse(text);
  } catch {
    return null;
  }
  const fields = (message as { onthefly?: unknown } | null)?.onthefly;
  if (typeof fields !== "object" || fields === null) return null;
  const { url, token, pid } = fields as { url?: unknown; token?: unknown; pid?: unknown };
  if (typeof url !== "string" || typeof token !== "string" || token === "") return null;
  if (typeof pid !== "number" || !Number.isInteger(pid) || pid <= 0) return null;
  const root = serverRoot(url);
  return root === null ? null : { root, token, pid };
}

const PRINTED_URL = /(https?:\/\/[^\s?#]+\/?)\?token=([A-Za-z0-9_-]+)/;

/** The dashboard URL a line printed by `onthefly open` names (`...: http://127.0.0.1:PORT/?token=T`);
 *  `pid` is the process that printed it. */
export function parsePrintedUrl(line: string, pid: number): Dashboard | null {
  const match = PRINTED_URL.exec(line);
  if (match === null) return null;
  const root = serverRoot(match[1]!);
  return root === null ? null : { root, token: match[2]!, pid };
}

/** `http://127.0.0.1:8123/?token=x` -> `http://127.0.0.1:8123/`; null for anything not http(s). */
export function serverRoot(url: string): string | null {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return null;
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") return null;
  return `${parsed.protocol}//${parsed.host}/`;
}

/** Tokens never reach the output channel (it may be shared on screen or pasted in an issue). */
export function redactTokens(text: string): string {
  return text.replace(/([?&]token=|"token":\s*")[A-Za-z0-9_-]{8,}/g, "$1…");
}

/** Splits a stream's chunks into whole lines (a chunk may end mid-line, or hold many). */
export class LineSplitter {
  private rest = "";

  /** The lines this chunk completes, without their line ends. */
  push(chunk: string): string[] {
    const text = this.rest + chunk;
    const lines = text.split(/\r?\n/);
    this.rest = lines.pop() ?? "";
    return lines;
  }

  /** What is left after the stream ended (a last line without a line end), once. */
  flush(): string[] {
    const rest = this.rest;
    this.rest = "";
    return rest === "" ? [] : [rest];
  }
}

/** The last `capacity` lines of a process's output, for a crash report. */
export class Tail {
  private readonly lines: string[] = [];

  constructor(private readonly capacity: number) {}

  push(line: string): void {
    this.lines.push(line);
    if (this.lines.length > this.capacity) this.lines.splice(0, this.lines.length - this.capacity);
  }

  get value(): string[] {
    return [...this.lines];
  }
}
