// The dashboard: reads the session's state from the REST API, then keeps it current from the event
// stream. Each event goes to the views that show it; a status or command event re-reads the run
// (and so which commands are possible); the end of an epoch refreshes the distribution (and with it
// the per-sample table); a command's outcome reaches whoever waits for it; plan and run events
// (from any run) refresh the plan cards and the lineage; health check-ups (of any run: the panel
// shows the page's run's) go to the health panel, from the log and from the stream.

import type { ApiClient, RunInfo } from "./api";
import type { StepChart, StepRange } from "./charts";
import type { ClusterView } from "./clusters";
import { columnsOf, type Columns } from "./columns";
import type { CompareView } from "./compare";
import type { DistributionView } from "./distribution";
import { checkupOf, type Checkup } from "./health";
import type { HealthPanel } from "./health-panel";
import { kindName, parseEvents, type ProgressEvent } from "./event-types";
import { STATE_CHANGING, logEntry, testResult } from "./events";
import type { LineageView } from "./lineage";
import { CommandOutcomes } from "./outcomes";
import type { PlanPanel } from "./plans";
import type { SliceList } from "./slices";
import { EventStream, type Delivery } from "./socket";
import type { LogEntry, Store, TestResult } from "./state";

/** Points asked of the server for one curve: enough for any screen, small enough to stay smooth. */
export const CHART_POINTS = 2000;
/** Events per read of the event log while the stream polls (as many as one socket message). */
const STREAM_POLL_LIMIT = 2000;
/** Events per page, and pages at most, read at start to fill the log and the test results. The
 *  server's recent feed holds `progress` events too (up to 100k), which the log skips. */
const EVENT_PAGE = 10_000;
const MAX_EVENT_PAGES = 50;
/** Events about the session's plan cards and its runs, whichever run sends them (the page shows
 *  one run, but a fork's parent publishes its card's progress, and its children their status). */
const PLAN_EVENTS: ReadonlySet<string> = new Set(["plan_proposed", "plan_discarded", "plan_started", "plan_finished", "plan_previewed", "autofork_suggested"]);
const LINEAGE_EVENTS: ReadonlySet<string> = new Set(["run_created", "status", "run_finished", "plan_finished"]);

export interface Charts {
  trainLoss: StepChart;
  val: StepChart;
  lr: StepChart;
  throughput: StepChart;
}

/** The views the stream feeds directly; the rest follow the store. */
export interface Views {
  charts: Charts;
  distribution: DistributionView;
  clusters: ClusterView;
  slices: SliceList;
  plans: PlanPanel;
  lineage: LineageView;
  compare: CompareView;
  health: HealthPanel;
}

export class Dashboard {
  private readonly api: ApiClient;
  private readonly store: Store;
  /** Outcomes of the commands views sent and wait for (a clustering's id, a rejection). */
  readonly outcomes = new CommandOutcomes();
  private views: Views | null = null;
  private stream: EventStream | null = null;
  private runId: number | null = null;
  private runRead: Promise<void> | null = null;
  private runReadAgain = false;
  private switchingTo: number | null = null;

  constructor(api: ApiClient, store: Store) {
    this.api = api;
    this.store = store;
  }

  /** The chart loaders read from whichever run is shown, so the charts can be built first.
   *  With `envelope`, one metric's columns are its bucket means, minima and maxima. */
  metricLoader(names: readonly string[], envelope = false): (range: StepRange | null) => Promise<Columns> {
    return async (range) => {
      if (this.runId === null) return columnsOf({ series: {} }, names, envelope);
      const response = await this.api.metrics(this.runId, {
        names,
        startStep: range?.start,
        endStep: range?.end,
        points: CHART_POINTS,
      });
      return columnsOf(response, names, envelope);
    };
  }

  async start(views: Views): Promise<void> {
    this.views = views;
    const session = await this.api.session();
    this.store.setSession(session);
    const run = session.runs[session.runs.length - 1];
    if (run !== undefined) {
      this.runId = run.id;
      this.store.setRun(run);
    }
    // Read the log up to now first: the curves are read after it and the stream resumes right
    // after it, so no point and no event falls between them.
    const afterSeq = await this.readEventLog(0);
    if (run !== undefined) this.show(run);
    void views.slices.refresh();
    void views.plans.refresh();
    void views.lineage.refresh();
    void views.compare.start();
    this.stream = new EventStream(
      {
        url: (seq) => this.api.streamUrl(seq),
        // Where a proxy carries no WebSockets, the same events are read over HTTP.
        poll: (seq) => this.api.events(seq, STREAM_POLL_LIMIT),
        onDelivery: (delivery) => this.receive(delivery),
        onState: (state) => this.store.setConnection(state),
      },
      afterSeq,
    );
    this.stream.start();
  }

  /** Re-read the run (status, step, possible commands). Calls made while a read is in flight
   *  collapse into one more read after it. */
  refreshRun(): void {
    if (this.runId === null) return;
    if (this.runRead !== null) {
      this.runReadAgain = true;
      return;
    }
    const runId = this.runId;
    this.runRead = this.api
      .run(runId)
      .then((run) => {
        if (run.id === this.runId) this.store.setRun(run);
      })
      .catch((error: unknown) => this.store.showMessage(`Could not read the run: ${String(error)}`))
      .finally(() => {
        this.runRead = null;
        if (this.runReadAgain) {
          this.runReadAgain = false;
          this.refreshRun();
        }
      });
  }

  /** Make run `runId` the page's run (a click in the lineage). The page still follows a newer run
   *  that starts sending events, as it does from the start. */
  selectRun(runId: number): void {
    if (runId === this.runId || runId === this.switchingTo) return;
    this.switchingTo = runId;
    void this.switchTo(runId);
  }

  /** Show a run: its state, its curves, its per-sample views. */
  private show(run: RunInfo): void {
    const views = this.requireViews();
    const switching = this.runId !== null && this.runId !== run.id;
    this.runId = run.id;
    this.store.setRun(run);
    if (switching) this.store.clearRun();
    for (const chart of Object.values(views.charts)) void chart.reload();
    views.distribution.setRun(run.id);
    void views.clusters.setRun(run.id);
  }

  private async switchTo(runId: number): Promise<void> {
    try {
      this.show(await this.api.run(runId));
    } catch (error) {
      this.store.showMessage(`Could not read run ${runId}: ${String(error)}`);
    } finally {
      this.switchingTo = null;
    }
  }

  /** Read persisted events after `afterSeq` into the log and the test results; returns the
   *  sequence number to resume the stream from. */
  private async readEventLog(afterSeq: number): Promise<number> {
    const limit = EVENT_PAGE;
    let after = afterSeq;
    const entries: LogEntry[] = [];
    const tests: TestResult[] = [];
    const checkups: Checkup[] = [];
    for (let page = 0; page < MAX_EVENT_PAGES; page++) {
      const { events: raw, last_seq } = await this.api.events(after, limit);
      for (const event of parseEvents(raw)) {
        const entry = logEntry(event);
        if (entry !== null) entries.push(entry);
        this.outcomes.receive(event); // after a gap in the stream, an outcome may be here only
        const result = this.runId === null || event.run_id === this.runId ? testResult(event) : null;
        if (result !== null) tests.push(result);
        const checkup = event.kind === "health" ? checkupOf(event) : null;
        if (checkup !== null) checkups.push(checkup);
      }
      const newest = raw.length > 0 ? raw[raw.length - 1]!.seq : after;
      if (raw.length < limit) {
        after = Math.max(newest, last_seq);
        break;
      }
      after = newest; // a full page: there may be more after its last event
    }
    this.store.addLog(entries);
    this.store.addTests(tests);
    this.views?.health.add(checkups);
    return after;
  }

  private receive(delivery: Delivery): void {
    if (delivery.gapAfter !== null) {
      // The queue overflowed (a background tab): what was dropped is re-read from the server.
      void this.resync(delivery.gapAfter);
    }
    const views = this.requireViews();
    const entries: LogEntry[] = [];
    const tests: TestResult[] = [];
    let readRun = false;
    let endedEpoch: number | null = null;
    let plansChanged = false;
    let lineageChanged = false;
    const comparisons: number[] = [];
    const checkups: Checkup[] = [];
    for (const event of delivery.events) {
      const entry = logEntry(event);
      if (entry !== null) entries.push(entry);
      this.outcomes.receive(event);
      const checkup = event.kind === "health" ? checkupOf(event) : null;
      if (checkup !== null) checkups.push(checkup);
      if (PLAN_EVENTS.has(kindName(event))) plansChanged = true;
      if (LINEAGE_EVENTS.has(kindName(event))) lineageChanged = true;
      if (event.kind === "comparison" && event.payload.comparison_id !== null) comparisons.push(event.payload.comparison_id);
      if (event.run_id !== null && event.run_id !== this.runId) {
        // The page follows the newest run of the session.
        if (event.run_id > (this.runId ?? 0) && event.run_id !== this.switchingTo) {
          this.switchingTo = event.run_id;
          void this.switchTo(event.run_id);
        }
        continue;
      }
      if (STATE_CHANGING.has(event.kind)) readRun = true;
      switch (event.kind) {
        case "progress":
          this.onProgress(event, views.charts);
          break;
        case "status": {
          const status = event.payload.status;
          if (status !== null) this.store.patchRun({ status });
          break;
        }
        case "epoch_started":
          if (event.epoch !== null) this.store.patchRun({ epoch: event.epoch });
          break;
        case "epoch_summary":
          if (event.payload.split === "train") endedEpoch = Math.max(endedEpoch ?? -1, event.epoch ?? -1);
          break;
        case "command_rejected":
          this.store.showMessage(`${event.payload.command ?? "command"} rejected: ${event.payload.reason ?? "not possible now"}`);
          break;
        case "eval": {
          const result = testResult(event);
          if (result !== null) tests.push(result);
          else if (event.payload.split === "val" && event.step !== null) {
            views.charts.val.append(event.step, [event.payload.loss ?? NaN, event.payload.accuracy ?? NaN]);
          }
          break;
        }
      }
    }
    this.store.addLog(entries);
    this.store.addTests(tests);
    if (readRun) this.refreshRun();
    if (endedEpoch !== null) views.distribution.refresh(endedEpoch >= 0 ? endedEpoch : undefined);
    if (plansChanged) void views.plans.refresh();
    if (lineageChanged) void views.lineage.refresh();
    for (const id of comparisons) views.compare.onComparison(id);
    views.health.add(checkups);
  }

  private onProgress(event: ProgressEvent, charts: Charts): void {
    const step = event.payload.step ?? event.step;
    if (step === null) return;
    const { loss, lr, samples_per_second: speed } = event.payload;
    if (loss !== null) charts.trainLoss.append(step, [loss, loss, loss]); // one step: min = max = value
    if (lr !== null) charts.lr.append(step, [lr]);
    if (speed !== null) charts.throughput.append(step, [speed]);
    const patch: Partial<RunInfo> = { step };
    if (loss !== null) patch.loss = loss;
    if (lr !== null) patch.lr = lr;
    if (speed !== null) patch.samples_per_second = speed;
    if (event.epoch !== null) patch.epoch = event.epoch;
    this.store.patchRun(patch);
  }

  /** Re-read everything the stream may have carried: the run, the curves, the log after `afterSeq`. */
  private async resync(afterSeq: number): Promise<void> {
    const views = this.requireViews();
    this.refreshRun();
    for (const chart of Object.values(views.charts)) void chart.reload();
    views.distribution.refresh();
    try {
      await this.readEventLog(afterSeq);
    } catch (error) {
      this.store.showMessage(`Could not read the event log: ${String(error)}`);
    }
  }

  private requireViews(): Views {
    if (this.views === null) throw new Error("Dashboard.start() has not been called");
    return this.views;
  }
}
