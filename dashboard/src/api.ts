// The typed HTTP client for the On The Fly server. Every request carries the session token; every
// URL is built from the page's own location, so the page works on whatever port it is served from.

export type CommandKind =
  | "run"
  | "pause"
  | "resume"
  | "stop"
  | "test"
  | "train_more"
  | "set_lr"
  | "set_weight_decay";

export interface RunInfo {
  id: number;
  name: string;
  status: string;
  live: boolean;
  step: number;
  epoch: number;
  target_epochs: number;
  batches_per_epoch: number | null;
  samples_per_second: number | null;
  loss: number | null;
  lr: number | null;
  commands: string[];
}

export interface SessionInfo {
  id: string;
  project: string;
  dir: string;
  pid: number;
  version: string;
  runs: RunInfo[];
}

export interface ApiEvent {
  seq: number;
  kind: string;
  run_id: number | null;
  step: number | null;
  epoch: number | null;
  time: number;
  payload: Record<string, unknown>;
}

export interface EventPage {
  events: ApiEvent[];
  last_seq: number;
}

/** One metric as the server sends it: columns of equal length, downsampled to at most `points`. */
export interface MetricSeries {
  step: number[];
  value: (number | null)[];
  min: (number | null)[];
  max: (number | null)[];
  /** Raw points in the requested range before downsampling. */
  total: number;
}

export interface MetricsResponse {
  series: Record<string, MetricSeries | undefined>;
}

export interface MetricsQuery {
  names: readonly string[];
  startStep?: number;
  endStep?: number;
  points?: number;
}

export interface Quantiles {
  p50: number;
  p90: number;
  p99: number;
}

export interface Distribution {
  epoch: number | null;
  epochs: number[];
  count: number;
  edges: number[];
  counts: number[];
  quantiles: Quantiles | null;
}

export interface HardSample {
  index: number;
  loss: number | null;
  label: number | null;
  pred: number | null;
  margin: number | null;
  correct: boolean | null;
}

export interface HardSamples {
  epoch: number | null;
  rows: HardSample[];
}

export interface CommandAccepted {
  id: number;
  kind: string;
  args: Record<string, unknown>;
}

export type CommandRequest =
  | { kind: "run" | "pause" | "resume" | "stop" | "test" }
  | { kind: "train_more"; epochs: number }
  | { kind: "set_lr"; lr: number }
  | { kind: "set_weight_decay"; weight_decay: number };

/** A request the server answered with an error status, carrying its `detail` as readable text. */
export class ApiError extends Error {
  readonly status: number;

  constructor(status: number, message: string) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

/** The token the page was opened with (`?token=...`), or "" when there is none. */
export function tokenFromLocation(location: Location): string {
  return new URLSearchParams(location.search).get("token") ?? "";
}

export class ApiClient {
  private readonly base: URL;
  private readonly token: string;

  /** `base` is the page's URL; API paths are resolved against its origin. */
  constructor(base: URL, token: string) {
    this.base = base;
    this.token = token;
  }

  session(): Promise<SessionInfo> {
    return this.get<SessionInfo>("/api/session");
  }

  run(runId: number): Promise<RunInfo> {
    return this.get<RunInfo>(`/api/runs/${runId}`);
  }

  metrics(runId: number, query: MetricsQuery): Promise<MetricsResponse> {
    const params: Record<string, string | number | undefined> = {
      names: query.names.join(","),
      start_step: query.startStep,
      end_step: query.endStep,
      points: query.points,
    };
    return this.get<MetricsResponse>(`/api/runs/${runId}/metrics`, params);
  }

  events(afterSeq: number, limit = 500): Promise<EventPage> {
    return this.get<EventPage>("/api/events", { after_seq: afterSeq, limit });
  }

  distribution(runId: number, epoch: number | null, bins = 50): Promise<Distribution> {
    return this.get<Distribution>(`/api/runs/${runId}/distribution`, { epoch: epoch ?? undefined, bins });
  }

  hardSamples(runId: number, epoch: number | null, k = 20): Promise<HardSamples> {
    return this.get<HardSamples>(`/api/runs/${runId}/hard-samples`, { epoch: epoch ?? undefined, k });
  }

  command(runId: number, command: CommandRequest): Promise<CommandAccepted> {
    return this.request<CommandAccepted>("POST", `/api/runs/${runId}/commands`, undefined, command);
  }

  /** The WebSocket URL of the event stream, resuming after `afterSeq`. */
  streamUrl(afterSeq: number): string {
    const url = new URL("/api/stream", this.base);
    url.protocol = this.base.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ token: this.token, after_seq: String(afterSeq) }).toString();
    return url.toString();
  }

  private get<T>(path: string, params?: Record<string, string | number | undefined>): Promise<T> {
    return this.request<T>("GET", path, params);
  }

  private async request<T>(
    method: "GET" | "POST",
    path: string,
    params?: Record<string, string | number | undefined>,
    body?: unknown,
  ): Promise<T> {
    const url = new URL(path, this.base);
    for (const [name, value] of Object.entries(params ?? {})) {
      if (value !== undefined) url.searchParams.set(name, String(value));
    }
    const headers: Record<string, string> = { Authorization: `Bearer ${this.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    if (!response.ok) {
      throw new ApiError(response.status, await errorMessage(response));
    }
    return (await response.json()) as T;
  }
}

/** The server's `detail` as one line: a string as is, a pydantic error list as "field: message; ...". */
async function errorMessage(response: Response): Promise<string> {
  const fallback = `${response.status} ${response.statusText || "error"}`;
  let body: unknown;
  try {
    body = await response.json();
  } catch {
    return fallback;
  }
  const detail = isRecord(body) ? body["detail"] : undefined;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    const parts = detail.map((item: unknown) => {
      if (!isRecord(item)) return String(item);
      // The field is the last part of loc: ["body", "set_lr", "lr"] -> "lr".
      const loc = Array.isArray(item["loc"]) && item["loc"].length > 1 ? String(item["loc"][item["loc"].length - 1]) : "";
      const msg = typeof item["msg"] === "string" ? item["msg"] : JSON.stringify(item);
      return loc ? `${loc}: ${msg}` : msg;
    });
    if (parts.length > 0) return parts.join("; ");
  }
  return fallback;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
