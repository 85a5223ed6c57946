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
  | "set_weight_decay"
  | "cluster";

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
  p95: number;
  p99: number;
}

export interface Distribution {
  epoch: number | null;
  epochs: number[];
  /** The epoch in progress (counts scaled from a uniform sample of its losses so far). */
  live: boolean;
  /** False: the counts and quantiles are estimated from that sample. */
  exact: boolean;
  count: number;
  edges: number[];
  counts: number[];
  quantiles: Quantiles | null;
  mean: number | null;
  median: number | null;
  /** Median absolute deviation from the median. */
  mad: number | null;
}

/** Columns the per-sample table can be sorted by. */
export type SampleSort =
  | "index"
  | "label"
  | "pred"
  | "loss"
  | "margin"
  | "confidence"
  | "grad_norm"
  | "epochs"
  | "aum"
  | "forgetting"
  | "confidence_mean"
  | "variability";

export type SampleFlag = "hard" | "mislabelled";

/** One sample at one epoch, with its training dynamics over the epochs so far. */
export interface SampleRow {
  index: number;
  label: number | null;
  pred: number | null;
  correct: boolean | null;
  loss: number | null;
  margin: number | null;
  /** Probability given to the labelled class. */
  confidence: number | null;
  grad_norm: number | null;
  epochs: number;
  /** Area under the margin: the mean margin over epochs. */
  aum: number | null;
  forgetting: number;
  confidence_mean: number | null;
  variability: number | null;
  hard: boolean;
  mislabelled: boolean;
}

export interface SampleQuery {
  /** null: the latest complete epoch. */
  epoch: number | null;
  sort: SampleSort;
  order: "desc" | "asc";
  flag: SampleFlag | null;
  label: number | null;
  limit: number;
  offset: number;
}

export interface SampleTable {
  epoch: number | null;
  epochs: number[];
  /** Rows that pass the filters. */
  total: number;
  offset: number;
  rows: SampleRow[];
  /** How many samples carry each flag at this epoch. */
  flags: Partial<Record<SampleFlag, number>>;
  /** How each flag is decided, in words. */
  rule: Partial<Record<SampleFlag, string>>;
  grad_norm_method: string | null;
  /** "index" (the dataset's) or "position" (an IterableDataset's order within the epoch). */
  sample_ids?: string | null;
}

export interface SampleHistoryRow {
  epoch: number;
  step: number;
  loss: number | null;
  margin: number | null;
  pred: number | null;
  label: number | null;
  correct: boolean | null;
  confidence: number | null;
  grad_norm: number | null;
}

export interface SampleHistory {
  index: number;
  rows: SampleHistoryRow[];
}

export interface ClusterRequest {
  features: "signals" | "embeddings";
  /** null: chosen by silhouette. */
  k: number | null;
  subset: "all" | "hard";
}

export interface ClusterSummary {
  cluster: number;
  size: number;
  mean_loss: number | null;
  /** Label -> how many of the cluster's samples carry it, most frequent first. */
  labels: Record<string, number>;
}

/** The 2-D projection of (at most 5,000 of) a clustering's samples, as columns. */
export interface ClusterPoints {
  index: number[];
  cluster: number[];
  x: number[];
  y: number[];
}

export interface Clustering {
  id: number;
  run_id: number;
  epoch: number | null;
  features: string;
  k: number;
  silhouette: number | null;
  layer: string | null;
  subset: string | null;
  chosen_by: string | null;
  method: string | null;
  clusters: ClusterSummary[];
  created: number;
  /** Null in the run's list of clusterings; set when one clustering is read. */
  points: ClusterPoints | null;
}

export interface FilterCondition {
  signal: string;
  op: ">" | ">=" | "<" | "<=" | "==" | "!=";
  /** A number, or that quantile of the signal at the epoch. */
  value: number | "p50" | "p90" | "p95" | "p99";
}

export type SliceDefinition =
  | { kind: "loss_band"; low: number | null; high: number | null }
  | { kind: "quantile_band"; low: number; high: number }
  | { kind: "cluster"; clustering: number; cluster: number }
  | { kind: "label"; label: number }
  | { kind: "indices"; indices: number[] }
  | { kind: "flag"; flag: SampleFlag }
  | { kind: "filter"; where: FilterCondition[] };

export interface SliceCreate {
  name: string;
  run_id: number;
  /** Left out: the latest complete epoch (the answer says which). */
  epoch?: number;
  definition: SliceDefinition;
}

export interface SliceInfo {
  id: number;
  name: string;
  run_id: number;
  epoch: number | null;
  split: string;
  definition: SliceDefinition;
  count: number;
  created: number;
}

export type ExportFormat = "csv" | "parquet" | "json";

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

type Params = Record<string, string | number | undefined>;
type Method = "GET" | "POST" | "DELETE";

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
    const params: Params = {
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

  command(runId: number, command: CommandRequest): Promise<CommandAccepted> {
    return this.request<CommandAccepted>("POST", `/api/runs/${runId}/commands`, undefined, command);
  }

  samples(runId: number, query: SampleQuery): Promise<SampleTable> {
    return this.get<SampleTable>(`/api/runs/${runId}/samples`, {
      epoch: query.epoch ?? undefined,
      sort: query.sort,
      order: query.order,
      flag: query.flag ?? undefined,
      label: query.label ?? undefined,
      limit: query.limit,
      offset: query.offset,
    });
  }

  sampleHistory(runId: number, index: number): Promise<SampleHistory> {
    return this.get<SampleHistory>(`/api/runs/${runId}/samples/${index}/history`);
  }

  /** Ask the run to cluster its samples: a command, applied at the next step boundary, whose
   *  result (the clustering's id) comes as a `command_applied` event. */
  cluster(runId: number, request: ClusterRequest): Promise<CommandAccepted> {
    return this.request<CommandAccepted>("POST", `/api/runs/${runId}/clusters`, undefined, request);
  }

  /** The run's clusterings, oldest first, without their points. */
  clusterings(runId: number): Promise<Clustering[]> {
    return this.get<Clustering[]>(`/api/runs/${runId}/clusters`);
  }

  clustering(id: number): Promise<Clustering> {
    return this.get<Clustering>(`/api/clusterings/${id}`);
  }

  slices(): Promise<SliceInfo[]> {
    return this.get<SliceInfo[]>("/api/slices");
  }

  createSlice(slice: SliceCreate): Promise<SliceInfo> {
    return this.request<SliceInfo>("POST", "/api/slices", undefined, slice);
  }

  async deleteSlice(name: string): Promise<void> {
    await this.send("DELETE", `/api/slices/${encodeURIComponent(name)}`);
  }

  /** Where a slice's rows (with the samples' data) download from. The URL carries no token: the
   *  browser sends the HttpOnly cookie the page was served with, and saves the streamed file to
   *  disk itself, so an export of millions of rows never sits in the page's memory. */
  exportUrl(name: string, format: ExportFormat): string {
    const url = new URL(`/api/slices/${encodeURIComponent(name)}/export`, this.base);
    url.search = new URLSearchParams({ format, data: "true" }).toString();
    return url.toString();
  }

  /** The WebSocket URL of the event stream, resuming after `afterSeq`. */
  streamUrl(afterSeq: number): string {
    const url = new URL("/api/stream", this.base);
    url.protocol = this.base.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ token: this.token, after_seq: String(afterSeq) }).toString();
    return url.toString();
  }

  private get<T>(path: string, params?: Params): Promise<T> {
    return this.request<T>("GET", path, params);
  }

  private async request<T>(method: Method, path: string, params?: Params, body?: unknown): Promise<T> {
    const response = await this.send(method, path, params, body);
    return (await response.json()) as T;
  }

  /** One authorised request; an error status becomes an ApiError carrying the server's `detail`. */
  private async send(method: Method, path: string, params?: Params, body?: unknown): Promise<Response> {
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
    return response;
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
