// The typed HTTP client for the On The Fly server. Every request carries the session token in an
// `Authorization: Bearer` header; every URL is relative to the page's own location, so the page
// works wherever it is served from: its own port, a forwarded one, or behind a path-prefixed
// proxy such as code-server's `/proxy/PORT/` (where a leading-slash URL would miss the server).
//
// The types are not written here: they are generated from the server's OpenAPI document
// (scripts/openapi.mjs -> src/generated/api-types.ts, at every build), and each method names the
// endpoint its answer comes from. A model or a path changed on the server fails `tsc` here, or
// where the page uses it, instead of a user's click.

import type { components, paths } from "./generated/api-types";

type Schemas = components["schemas"];
type HttpMethod = "get" | "post" | "patch" | "delete";
type Operation<P extends keyof paths, M extends HttpMethod> = NonNullable<paths[P][M]>;
type Json<R> = R extends { content: { "application/json": infer T } } ? T : never;
type Responses<P extends keyof paths, M extends HttpMethod> = Operation<P, M>["responses"];
/** The JSON body a successful call of `M P` answers with. */
type Answer<P extends keyof paths, M extends HttpMethod = "get"> = Json<
  Responses<P, M>[Extract<keyof Responses<P, M>, 200 | 201 | 202>]
>;
/** The JSON body `M P` takes. */
type Body<P extends keyof paths, M extends HttpMethod> =
  Operation<P, M> extends { requestBody: { content: { "application/json": infer B } } } ? B : never;
/** The query parameters of `GET P`. */
type Query<P extends keyof paths> = NonNullable<Operation<P, "get">["parameters"]["query"]>;

// Readable names for the shapes the page uses.
export type SessionInfo = Schemas["SessionOut"];
export type RunInfo = Schemas["RunInfo"];
export type ApiEvent = Schemas["EventOut"];
export type EventPage = Schemas["EventPage"];
export type MetricsResponse = Schemas["MetricsOut"];
export type MetricSeries = Schemas["Series"];
export type Distribution = Schemas["Distribution"];
export type Quantiles = Schemas["Quantiles"];
export type SampleRow = Schemas["SampleRow"];
export type SampleHistory = Schemas["SampleHistory"];
export type SampleHistoryRow = Schemas["HistoryRow"];
export type Clustering = Schemas["ClusteringOut"];
export type ClusterSummary = Schemas["ClusterSummary"];
export type ClusterRequest = Body<"/api/runs/{run_id}/clusters", "post">;
export type CommandRequest = Body<"/api/runs/{run_id}/commands", "post">;
export type CommandAccepted = Schemas["CommandAccepted"];
export type SliceCreate = Schemas["SliceCreate"];
export type SliceDefinition = SliceCreate["definition"];
export type FilterCondition = Schemas["Condition"];
export type SliceInfo = Schemas["SliceOut"];

/** A page of one epoch's samples, and the epoch the run is training now (`live_epoch`, whose
 *  table fills when it ends; null when no epoch is in progress). */
export type SampleTable = Answer<"/api/runs/{run_id}/samples">;

type SampleParams = Query<"/api/runs/{run_id}/samples">;
/** Columns the per-sample table can be sorted by. */
export type SampleSort = NonNullable<SampleParams["sort"]>;
export type SampleFlag = NonNullable<SampleParams["flag"]>;

/** What the per-sample table asks for (every parameter the page sets, none left to defaults). */
export interface SampleQuery {
  /** null: the latest complete epoch. */
  epoch: number | null;
  sort: SampleSort;
  order: NonNullable<SampleParams["order"]>;
  flag: SampleFlag | null;
  label: number | null;
  limit: number;
  offset: number;
}

export interface MetricsQuery {
  names: readonly string[];
  startStep?: number;
  endStep?: number;
  points?: number;
}

export type ExportCreate = Body<"/api/slices/{name}/exports", "post">;
export type ExportFormat = ExportCreate["format"];
/** An export of a slice's rows, written by the server (with sample data: by the training process
 *  at its next step boundary): pending, then ready (`rows`, maybe a `note`) or failed (`error`). */
export type ExportOut = Answer<"/api/exports/{export_id}">;
/** An archive (.otf) of the whole session, written by the server once the training process has
 *  saved its current weights: pending, then ready (`bytes`, its `final_checkpoint`, maybe a
 *  `note`) or failed (`error`). */
export type ArchiveOut = Answer<"/api/session/archives/{archive_id}">;
export type ArchivedCheckpoint = Schemas["ArchivedCheckpoint"];

/** A fork card: what a fork will do, on which data, from where, with which hyperparameters,
 *  budget, seed and success criterion (every field, defaults filled, as the server keeps it). */
export type ForkCard = Schemas["ForkCard"];
export type ForkCardField = keyof ForkCard;
/** Any card the server takes (a fork, a curation, …). */
export type PlanCard = Body<"/api/plans", "post">;
/** A plan card as the session keeps it: its card, status, result (a done card's verdict) and runs. */
export type PlanOut = Answer<"/api/plans/{plan_id}">;
export type PlanStatus = PlanOut["status"];
export type PlanApproved = Answer<"/api/plans/{plan_id}/approve", "post">;
export type Lineage = Answer<"/api/lineage">;
export type LineageNode = Schemas["LineageNode"];
export type LineageEdge = Schemas["LineageEdge"];
export type CompareArgs = Body<"/api/runs/{run_id}/comparisons", "post">;
export type ComparisonOut = Answer<"/api/comparisons/{comparison_id}">;
export type HealthCheckArgs = Body<"/api/runs/{run_id}/health", "post">;
export type VerifyArgs = Body<"/api/runs/{run_id}/verify", "post">;
/** An area a health check-up can look at. */
export type HealthArea = NonNullable<HealthCheckArgs["areas"]>[number];

/** Query parameters; undefined ones are left out (the server's default applies). */
type Params = Record<string, string | number | boolean | undefined>;
type Method = "GET" | "POST" | "PATCH" | "DELETE";

/** A request the server answered with an error status, carrying its `detail` as readable text,
 *  and the fields a validation error (422) names, so a form can mark them. */
export class ApiError extends Error {
  readonly status: number;
  readonly fields: readonly string[];

  constructor(status: number, message: string, fields: readonly string[] = []) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.fields = fields;
  }
}

export class ApiClient {
  private readonly base: URL;
  private readonly token: string;

  /** `base` is the page's URL; API paths are resolved against its folder. */
  constructor(base: URL, token: string) {
    this.base = base;
    this.token = token;
  }

  session(): Promise<Answer<"/api/session">> {
    return this.get("/api/session");
  }

  run(runId: number): Promise<Answer<"/api/runs/{run_id}">> {
    return this.get(`/api/runs/${runId}`);
  }

  metrics(runId: number, query: MetricsQuery): Promise<Answer<"/api/runs/{run_id}/metrics">> {
    const params = {
      names: query.names.join(","),
      start_step: query.startStep,
      end_step: query.endStep,
      points: query.points,
    } satisfies Query<"/api/runs/{run_id}/metrics">;
    return this.get(`/api/runs/${runId}/metrics`, params);
  }

  events(afterSeq: number, limit = 500): Promise<Answer<"/api/events">> {
    return this.get("/api/events", { after_seq: afterSeq, limit } satisfies Query<"/api/events">);
  }

  distribution(runId: number, epoch: number | null, bins = 50): Promise<Answer<"/api/runs/{run_id}/distribution">> {
    const params = { epoch: epoch ?? undefined, bins } satisfies Query<"/api/runs/{run_id}/distribution">;
    return this.get(`/api/runs/${runId}/distribution`, params);
  }

  command(runId: number, command: CommandRequest): Promise<Answer<"/api/runs/{run_id}/commands", "post">> {
    return this.request("POST", `/api/runs/${runId}/commands`, undefined, command);
  }

  samples(runId: number, query: SampleQuery): Promise<SampleTable> {
    const params = {
      epoch: query.epoch ?? undefined,
      sort: query.sort,
      order: query.order,
      flag: query.flag ?? undefined,
      label: query.label ?? undefined,
      limit: query.limit,
      offset: query.offset,
    } satisfies SampleParams;
    return this.get(`/api/runs/${runId}/samples`, params);
  }

  sampleHistory(runId: number, index: number): Promise<Answer<"/api/runs/{run_id}/samples/{index}/history">> {
    return this.get(`/api/runs/${runId}/samples/${index}/history`);
  }

  /** Ask the run to cluster its samples: a command, applied at the next step boundary, whose
   *  result (the clustering's id) comes as a `command_applied` event. */
  cluster(runId: number, request: ClusterRequest): Promise<Answer<"/api/runs/{run_id}/clusters", "post">> {
    return this.request("POST", `/api/runs/${runId}/clusters`, undefined, request);
  }

  /** The run's clusterings, oldest first, without their points. */
  clusterings(runId: number): Promise<Answer<"/api/runs/{run_id}/clusters">> {
    return this.get(`/api/runs/${runId}/clusters`);
  }

  clustering(id: number): Promise<Answer<"/api/clusterings/{clustering_id}">> {
    return this.get(`/api/clusterings/${id}`);
  }

  slices(): Promise<Answer<"/api/slices">> {
    return this.get("/api/slices");
  }

  createSlice(slice: Body<"/api/slices", "post">): Promise<Answer<"/api/slices", "post">> {
    return this.request("POST", "/api/slices", undefined, slice);
  }

  async deleteSlice(name: string): Promise<void> {
    await this.send("DELETE", `/api/slices/${encodeURIComponent(name)}`);
  }

  /** Ask for an export of a slice's rows; the answer says whether it is ready (or pending). */
  createExport(name: string, request: ExportCreate): Promise<Answer<"/api/slices/{name}/exports", "post">> {
    return this.request("POST", `/api/slices/${encodeURIComponent(name)}/exports`, undefined, request);
  }

  exportStatus(id: string): Promise<Answer<"/api/exports/{export_id}">> {
    return this.get(`/api/exports/${encodeURIComponent(id)}`);
  }

  /** Where a ready export's file downloads from. The URL carries no token: the browser sends the
   *  HttpOnly cookie the page was served with (which the server accepts for this download only)
   *  and streams the file to disk, so an export of millions of rows never sits in page memory. */
  exportFileUrl(id: string): string {
    return this.resolve(`/api/exports/${encodeURIComponent(id)}/file`).toString();
  }

  /** Ask for an archive of the whole session; the answer is pending (poll `archiveStatus`). */
  createArchive(): Promise<Answer<"/api/session/archives", "post">> {
    return this.request("POST", "/api/session/archives");
  }

  archiveStatus(id: string): Promise<Answer<"/api/session/archives/{archive_id}">> {
    return this.get(`/api/session/archives/${encodeURIComponent(id)}`);
  }

  // ---- plan cards, lineage, comparisons ------------------------------------------------------

  /** The session's plan cards, oldest first. */
  plans(): Promise<Answer<"/api/plans">> {
    return this.get("/api/plans");
  }

  plan(id: number): Promise<PlanOut> {
    return this.get(`/api/plans/${id}`);
  }

  /** Propose a card: checked against the session (a refusal names the field); nothing happens
   *  until it is approved. */
  proposePlan(card: PlanCard): Promise<Answer<"/api/plans", "post">> {
    return this.request("POST", "/api/plans", undefined, card);
  }

  /** Change fields of a proposed card (the whole card is checked again). */
  editPlan(id: number, changes: Body<"/api/plans/{plan_id}", "patch">): Promise<Answer<"/api/plans/{plan_id}", "patch">> {
    return this.request("PATCH", `/api/plans/${id}`, undefined, changes);
  }

  discardPlan(id: number): Promise<Answer<"/api/plans/{plan_id}/discard", "post">> {
    return this.request("POST", `/api/plans/${id}/discard`);
  }

  /** Approve a proposed card: its run carries it out at its next step boundary (the card then
   *  goes approved -> running -> done or failed). */
  approvePlan(id: number): Promise<PlanApproved> {
    return this.request("POST", `/api/plans/${id}/approve`);
  }

  /** Ask a proposed merge card's run to make the candidate and compare it with every parent: a
   *  command, whose result (the comparison's id, and whether the merge lost) comes as a
   *  `command_applied` event; the card's `result.preview` holds it then. */
  previewPlan(id: number): Promise<Answer<"/api/plans/{plan_id}/preview", "post">> {
    return this.request("POST", `/api/plans/${id}/preview`);
  }

  lineage(): Promise<Lineage> {
    return this.get("/api/lineage");
  }

  /** Ask run `runId`'s training process to compare runs: a command, whose result (the
   *  comparison's id) comes as a `command_applied` event (and a `comparison` event). */
  compare(runId: number, args: CompareArgs): Promise<Answer<"/api/runs/{run_id}/comparisons", "post">> {
    return this.request("POST", `/api/runs/${runId}/comparisons`, undefined, args);
  }

  /** Ask run `runId` for a health check-up (of `areas`; null: every area but determinism): a
   *  command, carried out at its next step boundary; its cards come as a `health` event. */
  healthCheck(runId: number, areas: HealthArea[] | null): Promise<Answer<"/api/runs/{run_id}/health", "post">> {
    const body: HealthCheckArgs = areas === null ? { kind: "health_check" } : { kind: "health_check", areas };
    return this.request("POST", `/api/runs/${runId}/health`, undefined, body);
  }

  /** Ask run `runId` to verify its likely-mislabelled samples of `epoch` (null: the newest complete
   *  one) out of fold (5 folds x 5 epochs): a
   *  command carried out at its next step boundary; its result (how many confirmed, the slice
   *  they were saved as) comes in its `command_applied` event. */
  verifySuspects(runId: number, epoch: number | null): Promise<Answer<"/api/runs/{run_id}/verify", "post">> {
    const body: VerifyArgs = { kind: "verify_suspects", epoch, folds: 5, epochs: 5, slice: "verified mislabelled" };
    return this.request("POST", `/api/runs/${runId}/verify`, undefined, body);
  }

  comparisons(): Promise<Answer<"/api/comparisons">> {
    return this.get("/api/comparisons");
  }

  comparison(id: number): Promise<ComparisonOut> {
    return this.get(`/api/comparisons/${id}`);
  }

  /** Where mixture run `runId`'s inference artifact (a tar) is. */
  mixtureUrl(runId: number): string {
    return this.resolve(mixturePath(runId)).toString();
  }

  /** Mixture run `runId`'s artifact, fetched with the token's header: the server takes the
   *  page's cookie only for the page, its assets and the session's own downloads, not for this
   *  one. The file is held in memory (a mixture of small experts is a few MiB); a refusal (409:
   *  not a mixture, or no artifact) is an ApiError in the server's words. The file's name is the
   *  server's (its Content-Disposition), else `fallback`. */
  async mixtureFile(runId: number, fallback = `mixture-run-${runId}.tar`): Promise<{ blob: Blob; filename: string }> {
    const response = await this.send("GET", mixturePath(runId));
    return { blob: await response.blob(), filename: attachmentName(response.headers.get("content-disposition"), fallback) };
  }

  /** Where a ready archive downloads from: like `exportFileUrl`, no token, the page's cookie. */
  archiveFileUrl(id: string): string {
    return this.resolve(`/api/session/archives/${encodeURIComponent(id)}/file`).toString();
  }

  /** Where the session's report (one self-contained HTML file, written when asked for)
   *  downloads from: no token, the page's cookie. */
  reportUrl(): string {
    return this.resolve("/api/session/report" satisfies keyof paths).toString();
  }

  /** The WebSocket URL of the event stream, resuming after `afterSeq`. A browser cannot set
   *  headers on a WebSocket, so the token goes in this URL's query (never in the address bar). */
  streamUrl(afterSeq: number): string {
    const url = this.resolve("/api/stream");
    url.protocol = this.base.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ token: this.token, after_seq: String(afterSeq) }).toString();
    url.hash = "";
    return url.toString();
  }

  /** A server path (as the OpenAPI document names it, `/api/...`) made relative to the page:
   *  under `http://host/proxy/8123/` it is `http://host/proxy/8123/api/...`. */
  private resolve(path: string): URL {
    return new URL(`./${path.replace(/^\/+/, "")}`, this.base);
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
    const url = this.resolve(path);
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
      // The header authorises; the page's cookie is for the page, its assets and downloads only.
      credentials: "omit",
    });
    if (!response.ok) {
      const problem = await readProblem(response);
      throw new ApiError(response.status, problem.message, problem.fields);
    }
    return response;
  }
}

function mixturePath(runId: number): string {
  return ("/api/runs/{run_id}/mixture" satisfies keyof paths).replace("{run_id}", String(runId));
}

/** The file name a Content-Disposition header gives (`filename*=UTF-8''…` first, then
 *  `filename="…"`), without any folder; `fallback` when it gives none. */
export function attachmentName(header: string | null, fallback: string): string {
  if (header === null) return fallback;
  const encoded = /filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)/.exec(header)?.[1];
  let name: string | undefined;
  if (encoded !== undefined) {
    try {
      name = decodeURIComponent(encoded.trim());
    } catch {
      name = undefined;
    }
  }
  name ??= /filename\s*=\s*"([^"]*)"/.exec(header)?.[1] ?? /filename\s*=\s*([^;\s]+)/.exec(header)?.[1];
  const base = name?.split(/[\\/]/).pop()?.trim();
  return base ? base : fallback;
}

/** The server's `detail` as one line: a string as is, a pydantic error list as "field: message; ...". */
export async function errorMessage(response: Response): Promise<string> {
  return (await readProblem(response)).message;
}

/** The server's `detail` as one line, and the fields a pydantic error list names. */
async function readProblem(response: Response): Promise<{ message: string; fields: string[] }> {
  const fallback = { message: `${response.status} ${response.statusText || "error"}`, fields: [] };
  let body: unknown;
  try {
    body = await response.json();
  } catch {
    return fallback;
  }
  const detail = isRecord(body) ? body["detail"] : undefined;
  if (typeof detail === "string") return { message: detail, fields: [] };
  if (Array.isArray(detail)) {
    const fields: string[] = [];
    const parts = detail.map((item: unknown) => {
      if (!isRecord(item)) return String(item);
      // The field is the last part of loc: ["body", "set_lr", "lr"] -> "lr".
      const loc = Array.isArray(item["loc"]) && item["loc"].length > 1 ? String(item["loc"][item["loc"].length - 1]) : "";
      const msg = typeof item["msg"] === "string" ? item["msg"] : JSON.stringify(item);
      if (loc) fields.push(loc);
      return loc ? `${loc}: ${msg}` : msg;
    });
    if (parts.length > 0) return { message: parts.join("; "), fields };
  }
  return fallback;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
