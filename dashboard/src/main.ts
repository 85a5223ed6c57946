// Entry point: find the page's elements, build the views, connect them to the store, start.

import "./style.css";

import { ApiClient } from "./api";
import { Dashboard, type Charts } from "./app";
import { StepChart } from "./charts";
import { ClusterView } from "./clusters";
import { CompareView } from "./compare";
import { Controls, type ButtonName } from "./controls";
import { DistributionView } from "./distribution";
import { byId, byTestId, setText } from "./dom";
import { formatCompact, formatCount, formatPercent, formatRate } from "./format";
import { Header } from "./header";
import { HealthPanel } from "./health-panel";
import { SampleHistoryView } from "./history";
import { LineageView } from "./lineage";
import { PlanPanel } from "./plans";
import { SamplesTable } from "./samples";
import { VerifySuspects } from "./verify";
import { SessionFiles } from "./session";
import { SliceForm, SliceList } from "./slices";
import { Store } from "./state";
import { renderEventLog, renderTestResults } from "./tables";
import { browserTokenPlace, takeToken } from "./token";

const COLORS = { loss: "#2f6fdf", val: "#d0603b", accuracy: "#2e9e5b", lr: "#8a4fd0", speed: "#0f8a8a" };

function main(): void {
  // First: the token leaves the address bar before anything else can read or record the URL.
  const token = takeToken(browserTokenPlace());
  const api = new ApiClient(new URL(window.location.href), token);
  const store = new Store();
  const dashboard = new Dashboard(api, store);
  const chartError = (error: unknown) => store.showMessage(`Could not read a curve: ${String(error)}`);

  const charts: Charts = {
    trainLoss: new StepChart(byTestId("chart-train-loss"), {
      lines: [
        { label: "train loss", stroke: COLORS.loss },
        { label: "min", stroke: "rgba(47, 111, 223, 0.35)", width: 0.5 },
        { label: "max", stroke: "rgba(47, 111, 223, 0.35)", width: 0.5 },
      ],
      band: { lower: 1, upper: 2, fill: "rgba(47, 111, 223, 0.12)" },
      load: dashboard.metricLoader(["train_loss"], true),
      onError: chartError,
    }),
    val: new StepChart(byTestId("chart-val"), {
      lines: [
        { label: "val loss", stroke: COLORS.val },
        { label: "val accuracy", stroke: COLORS.accuracy, scale: "y2", format: formatPercent },
      ],
      load: dashboard.metricLoader(["val_loss", "val_accuracy"]),
      y2Range: [0, 1],
      y2Ticks: (v) => `${Math.round(v * 100)}%`,
      markers: true,
      onError: chartError,
    }),
    lr: new StepChart(byTestId("chart-lr"), {
      lines: [{ label: "lr", stroke: COLORS.lr, format: formatRate }],
      load: dashboard.metricLoader(["lr"]),
      onError: chartError,
    }),
    throughput: new StepChart(byTestId("chart-throughput"), {
      lines: [{ label: "samples/s", stroke: COLORS.speed, format: formatCount }],
      yTicks: formatCompact,
      load: dashboard.metricLoader(["throughput"]),
      onError: chartError,
    }),
  };

  const buttons: Record<ButtonName, HTMLButtonElement> = {
    run: byId("button-run"),
    pause: byId("button-pause"),
    resume: byId("button-resume"),
    stop: byId("button-stop"),
    test: byId("button-test"),
    train_more: byId("button-train-more"),
    set_lr: byId("button-set-lr"),
  };
  const controls = new Controls(
    api,
    store,
    { buttons, epochs: byId("input-epochs"), lr: byId("input-lr") },
    () => dashboard.refreshRun(),
  );
  // Not part of Controls: the session's files do not depend on the run (nor on a training process).
  new SessionFiles(api, store, { exportSession: byId("button-export-session"), report: byId("button-report") });

  const history = new SampleHistoryView(api, byTestId("sample-history"));
  const samples = new SamplesTable(
    api,
    {
      table: byTestId<HTMLTableElement>("hard-samples"),
      caption: byTestId("samples-caption"),
      show: byId("select-sample-flag"),
      label: byId("input-sample-label"),
      previous: byId("button-samples-previous"),
      next: byId("button-samples-next"),
      range: byId("samples-range"),
    },
    {
      onPick: (runId, row) => void history.show(runId, row),
      onLoaded: (table) => verify.setSuspects(table.flags.mislabelled ?? 0, table.epoch),
    },
  );
  // The slice list, plan cards, lineage and comparison refer to each other through callbacks
  // (called only after all four exist).
  const slices = new SliceList(api, store, byId<HTMLTableElement>("slices-table"), {
    onFork: (slice) => plans.openDraft(slice),
    onChange: () => {
      plans.slicesChanged();
      compare.slicesChanged();
    },
  });
  const plans = new PlanPanel(
    api,
    store,
    {
      form: byId<HTMLFormElement>("plan-form"),
      title: byId("plan-form-title"),
      description: byId("plan-form-description"),
      fields: byId("plan-fields"),
      errors: byTestId("plan-errors"),
      propose: byId("button-propose"),
      save: byId("button-plan-save"),
      approve: byId("button-plan-approve"),
      discard: byId("button-plan-discard"),
      close: byId("button-plan-close"),
      list: byTestId<HTMLTableElement>("plan-cards"),
    },
    {
      runs: () => (lineage.nodes.length > 0 ? lineage.nodes : (store.session?.runs ?? [])),
      edges: () => lineage.edges,
      slices: () => slices.slices,
      run: () => store.run,
      onFinished: () => void lineage.refresh(),
      showComparison: (id) => compare.showComparison(id),
      waitOutcome: (runId, commandId, timeoutMs) => dashboard.outcomes.wait(runId, commandId, timeoutMs),
    },
  );
  const lineage = new LineageView(
    api,
    store,
    { graph: byTestId("lineage"), detail: byTestId("lineage-detail"), picks: byTestId("lineage-picks") },
    {
      onSelect: (runId) => dashboard.selectRun(runId),
      onPick: (runs) => compare.setPicked(runs),
      onMerge: (runs) => void plans.openMergeDraft(runs),
      onGate: (runs) => void plans.openGateDraft(runs),
      onNodes: () => plans.runsChanged(),
    },
  );
  const compare = new CompareView(
    api,
    dashboard.outcomes,
    {
      runs: byTestId("compare-runs"),
      reference: byId("select-compare-reference"),
      sets: byTestId("compare-sets"),
      button: byId("button-compare"),
      caption: byTestId("compare-caption"),
      table: byTestId<HTMLTableElement>("comparison-table"),
    },
    () => slices.slices,
  );
  const distribution = new DistributionView(
    api,
    {
      select: byId("select-epoch"),
      logScale: byId("input-log-counts"),
      plot: byTestId("distribution"),
      quantiles: byTestId("quantiles"),
      mode: byTestId("distribution-mode"),
    },
    {
      // The table shows the same epoch; following the newest, the newest complete one (an epoch
      // in progress has no dynamics yet).
      onEpoch: (epoch, live, following) => {
        const newestComplete = epoch === null ? null : live ? epoch - 1 : epoch;
        if (store.run !== null) samples.show(store.run.id, following || live ? null : epoch, newestComplete);
      },
      onSelect: (selection) => sliceForm.show(selection), // only after a drag: sliceForm exists
    },
  );
  const sliceForm = new SliceForm(
    {
      form: byTestId("slice-form"),
      range: byTestId("selection"),
      name: byId("input-slice-name"),
      save: byId("button-save-slice"),
      clear: byId("button-clear-selection"),
      hint: byId("selection-hint"),
    },
    slices,
    () => store.run?.id ?? null,
    () => distribution.clearSelection(),
  );
  const clusters = new ClusterView(api, store, dashboard.outcomes, slices, {
    features: byId("select-cluster-features"),
    subset: byId("select-cluster-subset"),
    k: byId("input-cluster-k"),
    button: byId("button-cluster"),
    plot: byTestId("clusters"),
    caption: byTestId("clusters-caption"),
    table: byTestId<HTMLTableElement>("cluster-table"),
  });

  const verify = new VerifySuspects(api, store, dashboard.outcomes,
    { button: byId("button-verify-suspects"), status: byTestId("verify-status") },
    () => void slices.refresh());
  const health = new HealthPanel(api, store, dashboard.outcomes, {
    check: byId("button-health-check"),
    determinism: byId("button-determinism"),
    caption: byTestId("health-caption"),
    cards: byTestId("health-cards"),
    history: byTestId<HTMLTableElement>("health-history"),
    determinismView: byTestId("determinism"),
  });

  const header = new Header();
  const message = byTestId("message");
  const testResults = byTestId<HTMLTableElement>("test-results");
  const eventLog = byTestId("event-log");
  renderTestResults(testResults, []);
  renderEventLog(eventLog, []);

  const INFO_SECONDS = 6;
  let messageTimer: number | undefined;
  store.subscribe((changed) => {
    if (changed.has("session") || changed.has("run")) header.render(store);
    if (changed.has("run")) {
      controls.update(store.run);
      clusters.update(store.run);
      health.update(store.run);
      verify.update(store.run);
      lineage.setCurrent(store.run?.id ?? null);
    }
    if (changed.has("connection")) header.renderConnection(store.connection);
    if (changed.has("tests")) renderTestResults(testResults, store.tests);
    if (changed.has("log")) renderEventLog(eventLog, store.log);
    if (changed.has("message")) {
      setText(message, store.message?.text ?? "");
      message.hidden = store.message === null;
      message.dataset["tone"] = store.message?.tone ?? "";
      // Confirmations fade after a while; errors stay until the next message.
      window.clearTimeout(messageTimer);
      const shown = store.message;
      if (shown?.tone === "info") {
        messageTimer = window.setTimeout(() => store.message === shown && store.clearMessage(), INFO_SECONDS * 1000);
      }
    }
  });

  dashboard.start({ charts, distribution, clusters, slices, plans, lineage, compare, health }).catch((error: unknown) => {
    store.setConnection("stopped");
    const reason = error instanceof Error ? error.message : String(error);
    store.showMessage(
      token === ""
        ? "This page needs its token: open the dashboard URL that onthefly printed (it ends in ?token=…)."
        : `Could not reach the On The Fly server: ${reason}`,
    );
  });
}

main();
