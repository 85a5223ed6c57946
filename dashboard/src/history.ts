// One sample's history: its loss (log scale) and margin at every epoch it was seen, with the epochs
// at which it was predicted wrongly marked, so a forgetting event or a late-learned sample shows.

import uPlot from "uplot";

import type { ApiClient, SampleHistory, SampleRow } from "./api";
import { element, setText } from "./dom";
import { formatCount, formatValue } from "./format";

const COLORS = { loss: "#2f6fdf", margin: "#8a4fd0", wrong: "#cf222e" };

export class SampleHistoryView {
  private readonly api: ApiClient;
  private readonly container: HTMLElement;
  private readonly title: HTMLElement;
  private readonly summary: HTMLElement;
  private readonly target: HTMLElement;
  private plot: uPlot | null = null;
  private generation = 0;

  /** `container` is filled by the view and hidden until a sample is shown. */
  constructor(api: ApiClient, container: HTMLElement) {
    this.api = api;
    this.container = container;
    this.title = element("h3", "", "Sample");
    const close = element("button", "link-button", "Close");
    close.type = "button";
    close.addEventListener("click", () => this.hide());
    const head = element("div", "card-head");
    head.append(this.title, close);
    this.summary = element("div", "history-summary muted");
    this.target = element("div", "history-plot");
    container.append(head, this.summary, this.target);
    container.hidden = true;
    new ResizeObserver(() => this.fit()).observe(container);
  }

  async show(runId: number, row: SampleRow): Promise<void> {
    const generation = ++this.generation;
    this.container.hidden = false;
    this.container.dataset["index"] = String(row.index);
    setText(this.title, `Sample ${row.index}`);
    setText(this.summary, "loading…");
    try {
      const history = await this.api.sampleHistory(runId, row.index);
      if (generation !== this.generation) return;
      this.render(history, row);
    } catch (error) {
      if (generation === this.generation) setText(this.summary, `Could not load the history: ${String(error)}`);
    }
  }

  hide(): void {
    this.generation++;
    this.container.hidden = true;
  }

  private render(history: SampleHistory, row: SampleRow): void {
    const rows = history.rows;
    const wrong = rows.filter((r) => r.correct === false).length;
    const label = row.label === null || row.label < 0 ? "" : `label ${row.label} · `;
    setText(
      this.summary,
      `${label}seen in ${formatCount(rows.length)} epochs · predicted wrongly in ${formatCount(wrong)} · ` +
        `AUM ${formatValue(row.aum)} · ${formatCount(row.forgetting)} forgetting events`,
    );
    const data: uPlot.AlignedData = [
      Float64Array.from(rows, (r) => r.epoch),
      rows.map((r) => (r.loss !== null && r.loss > 0 ? r.loss : null)), // a log scale has no zero
      rows.map((r) => r.margin),
      rows.map((r) => (r.correct === false && r.loss !== null && r.loss > 0 ? r.loss : null)),
    ];
    this.plot?.destroy();
    this.plot = new uPlot(this.options(), data, this.target);
    this.container.dataset["points"] = String(rows.length);
  }

  private fit(): void {
    if (this.plot === null) return;
    const width = Math.max(200, Math.floor(this.target.clientWidth));
    if (width !== this.plot.width) this.plot.setSize({ width, height: this.plot.height });
  }

  private options(): uPlot.Options {
    const ticks = (_u: uPlot, splits: number[]) => splits.map((v) => (v == null ? "" : formatValue(v)));
    return {
      width: Math.max(200, Math.floor(this.target.clientWidth)),
      height: 170,
      scales: { x: { time: false }, loss: { distr: 3, log: 10 }, margin: {} },
      axes: [
        { label: "epoch", values: (_u, splits) => splits.map((v) => (Number.isInteger(v) ? String(v) : "")), stroke: "#555", grid: { stroke: "#eee" } },
        { scale: "loss", values: ticks, stroke: COLORS.loss, grid: { stroke: "#eee" }, size: 60 },
        { scale: "margin", side: 1, values: ticks, stroke: COLORS.margin, grid: { show: false }, size: 50 },
      ],
      series: [
        { label: "epoch" },
        { label: "loss", scale: "loss", stroke: COLORS.loss, width: 1.5, spanGaps: true, value: (_u, v) => formatValue(v) },
        { label: "margin", scale: "margin", stroke: COLORS.margin, width: 1.5, spanGaps: true, value: (_u, v) => formatValue(v) },
        {
          label: "wrong",
          scale: "loss",
          stroke: COLORS.wrong,
          width: 0,
          paths: () => null,
          points: { show: true, size: 6, fill: COLORS.wrong, stroke: COLORS.wrong },
          value: (_u, v) => (v == null ? "" : "✗"),
        },
      ],
    };
  }
}
