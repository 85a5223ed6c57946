// The per-sample loss distribution of one epoch: a histogram the server computes from the store,
// vertical markers at p50/p90/p99, and an epoch picker. It follows the newest epoch until the user
// picks an older one.

import uPlot from "uplot";

import type { ApiClient, Distribution } from "./api";
import { element, setText } from "./dom";
import { formatCompact, formatCount, formatValue } from "./format";

export interface DistributionElements {
  select: HTMLSelectElement;
  /** Checked: counts on a log scale, so the tail (the hard samples) stays visible. */
  logScale: HTMLInputElement;
  plot: HTMLElement;
  quantiles: HTMLElement;
}

const QUANTILE_COLORS = { p50: "#2f6fdf", p90: "#e08a00", p99: "#d03b3b" } as const;
type QuantileName = keyof typeof QUANTILE_COLORS;

export class DistributionView {
  private readonly api: ApiClient;
  private readonly elements: DistributionElements;
  private readonly onEpoch: (epoch: number | null) => void;
  private plot: uPlot;
  private runId: number | null = null;
  private current: Distribution | null = null;
  /** True while the view shows the newest epoch and should move on when a new one ends. */
  private follow = true;
  private generation = 0;
  private loading = false;
  private refreshAgain = false;

  /** `onEpoch` hears which epoch is shown, so the hard-sample table can show the same one. */
  constructor(api: ApiClient, elements: DistributionElements, onEpoch: (epoch: number | null) => void) {
    this.api = api;
    this.elements = elements;
    this.onEpoch = onEpoch;
    this.plot = this.createPlot();
    new ResizeObserver(() => this.fit()).observe(elements.plot);
    elements.logScale.addEventListener("change", () => {
      // A scale's distribution is fixed when a uPlot is made: make a new one.
      this.plot.destroy();
      this.plot = this.createPlot();
      if (this.current !== null) this.render(this.current);
    });
    elements.select.addEventListener("change", () => {
      const epochs = this.current?.epochs ?? [];
      const epoch = Number(elements.select.value);
      this.follow = epochs.length === 0 || epoch === epochs[epochs.length - 1];
      void this.load(epoch);
    });
  }

  setRun(runId: number): void {
    this.runId = runId;
    this.follow = true;
    void this.load(null);
  }

  /** Called when an epoch ends: show the new one if following, else refresh the epoch list.
   *  Epochs can end faster than the server computes a histogram: calls made while one is being
   *  read collapse into one more read after it. */
  refresh(): void {
    if (this.loading) {
      this.refreshAgain = true;
      return;
    }
    void this.load(this.follow ? null : (this.current?.epoch ?? null));
  }

  private async load(epoch: number | null): Promise<void> {
    if (this.runId === null) return;
    const generation = ++this.generation;
    this.loading = true;
    try {
      const distribution = await this.api.distribution(this.runId, epoch, 50);
      if (generation === this.generation) {
        this.current = distribution;
        this.render(distribution);
        this.onEpoch(distribution.epoch);
      }
    } catch (error) {
      if (generation === this.generation) setText(this.elements.quantiles, `Could not load the distribution: ${String(error)}`);
    } finally {
      if (generation === this.generation) {
        this.loading = false;
        if (this.refreshAgain) {
          this.refreshAgain = false;
          this.refresh();
        }
      }
    }
  }

  private render(distribution: Distribution): void {
    this.fillEpochs(distribution);
    const { edges, counts } = distribution;
    const centers = new Float64Array(counts.length);
    for (let i = 0; i < counts.length; i++) centers[i] = ((edges[i] ?? 0) + (edges[i + 1] ?? 0)) / 2;
    // A log scale has no zero: empty bins become gaps.
    const heights = this.elements.logScale.checked ? counts.map((c) => (c > 0 ? c : null)) : Float64Array.from(counts);
    this.plot.setData([centers, heights], true);
    this.elements.quantiles.replaceChildren(...this.describe(distribution));
  }

  private fillEpochs(distribution: Distribution): void {
    const select = this.elements.select;
    const options = distribution.epochs.map((epoch) => {
      const option = element("option", "", `Epoch ${epoch}`);
      option.value = String(epoch);
      return option;
    });
    if (options.length === 0) options.push(element("option", "", "No epochs yet"));
    select.replaceChildren(...options);
    select.disabled = distribution.epochs.length === 0;
    if (distribution.epoch !== null) select.value = String(distribution.epoch);
  }

  private describe(distribution: Distribution): Node[] {
    const q = distribution.quantiles;
    if (distribution.count === 0 || q === null) return [document.createTextNode("No per-sample losses recorded yet.")];
    const parts: Node[] = [];
    for (const name of Object.keys(QUANTILE_COLORS) as QuantileName[]) {
      const item = element("span", "quantile");
      item.dataset["quantile"] = name;
      const swatch = element("span", "swatch");
      swatch.style.background = QUANTILE_COLORS[name];
      item.append(swatch, `${name} ${formatValue(q[name])}`);
      parts.push(item);
    }
    parts.push(element("span", "muted", `${formatCount(distribution.count)} samples`));
    return parts;
  }

  private fit(): void {
    const width = Math.max(200, Math.floor(this.elements.plot.clientWidth));
    if (width !== this.plot.width) this.plot.setSize({ width, height: this.plot.height });
  }

  private createPlot(): uPlot {
    return new uPlot(this.plotOptions(), [new Float64Array(0), new Float64Array(0)], this.elements.plot);
  }

  private plotOptions(): uPlot.Options {
    const bars = uPlot.paths.bars?.({ size: [1, Infinity], gap: 1, align: 0 });
    const log = this.elements.logScale.checked;
    const y: uPlot.Scale = log
      ? { distr: 3, log: 10, range: (_u, _min, max) => [0.5, Math.max(10, max) * 2] } // 0.5: a bin of 1 shows
      : { range: (_u, _min, max) => [0, Math.max(1, max) * 1.05] };
    return {
      width: Math.max(200, Math.floor(this.elements.plot.clientWidth)),
      height: 220,
      legend: { show: false },
      cursor: { drag: { x: false, y: false, setScale: false } },
      scales: {
        x: {
          time: false,
          // The bins' outer edges, so the first and last bars are whole.
          range: (_u, min, max) => {
            const edges = this.current?.edges ?? [];
            return edges.length > 1 ? [edges[0]!, edges[edges.length - 1]!] : [min, max];
          },
        },
        y,
      },
      axes: [
        { label: "per-sample loss", values: (_u, splits) => splits.map((v) => formatValue(v)), stroke: "#555", grid: { stroke: "#eee" } },
        { label: log ? "samples (log)" : "samples", values: (_u, splits) => splits.map((v) => (v < 1 ? "" : formatCompact(v))), stroke: "#555", grid: { stroke: "#eee" }, size: 60 },
      ],
      series: [
        {},
        { label: "samples", fill: "rgba(47, 111, 223, 0.35)", stroke: "rgba(47, 111, 223, 0.9)", width: 1, ...(bars ? { paths: bars } : {}), points: { show: false } },
      ],
      hooks: { draw: [(u: uPlot) => this.drawQuantiles(u)] },
    };
  }

  /** Vertical lines at p50/p90/p99, labelled, drawn over the bars. */
  private drawQuantiles(u: uPlot): void {
    const q = this.current?.quantiles;
    if (!q || (this.current?.count ?? 0) === 0) return;
    const { ctx } = u;
    const { top, height } = u.bbox;
    const ratio = uPlot.pxRatio;
    ctx.save();
    ctx.lineWidth = 2 * ratio;
    ctx.font = `${11 * ratio}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    (Object.keys(QUANTILE_COLORS) as QuantileName[]).forEach((name, i) => {
      const x = Math.round(u.valToPos(q[name], "x", true));
      ctx.strokeStyle = QUANTILE_COLORS[name];
      ctx.fillStyle = QUANTILE_COLORS[name];
      ctx.setLineDash([4 * ratio, 3 * ratio]);
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      ctx.fillText(name, x + 3 * ratio, top + (2 + i * 13) * ratio);
    });
    ctx.restore();
  }
}
