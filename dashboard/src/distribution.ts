// The per-sample loss distribution of one epoch: a histogram the server computes from the store,
// vertical markers at p50/p90/p95/p99, and an epoch picker. It follows the newest epoch until the
// user picks an older one; an epoch in progress is shown live (re-read every few seconds) and, past
// 16k samples, approximately. Dragging across the histogram selects a loss range (snapped to the
// bins' edges), which the page offers to save as a slice.

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
  /** "live · approximate", "live · exact" or "exact". */
  mode: HTMLElement;
}

/** A loss range dragged on the histogram, and the histogram it now lies on. */
export interface LossSelection {
  low: number;
  high: number;
  /** The epoch shown. */
  epoch: number | null;
  /** The epoch is in progress: its losses will change, so a slice should not pin it. */
  live: boolean;
  /** Samples in the shown histogram's bins whose centre lies in the range (scaled, when the
   *  histogram is approximate). */
  count: number;
}

export interface DistributionListeners {
  /** Which epoch is shown, whether it is the one in progress, and whether the view follows the
   *  newest epoch (or shows one the user picked). */
  onEpoch: (epoch: number | null, live: boolean, following: boolean) => void;
  /** A range was dragged, or the histogram under it changed (null: the selection was cleared). */
  onSelect: (selection: LossSelection | null) => void;
}

const QUANTILE_COLORS = { p50: "#2f6fdf", p90: "#e08a00", p95: "#c2410c", p99: "#d03b3b" } as const;
type QuantileName = keyof typeof QUANTILE_COLORS;
/** How often the epoch in progress is re-read while it is shown. */
const LIVE_REFRESH_MS = 2000;
/** The stream can announce an epoch's end before the store has recorded it: the view re-reads
 *  this often, this many times at most, until the store has it. */
const STORE_LAG_MS = 300;
const STORE_LAG_TRIES = 10;
const SELECTION_FILL = "rgba(26, 127, 55, 0.14)";
const SELECTION_EDGE = "rgba(26, 127, 55, 0.8)";

export class DistributionView {
  private readonly api: ApiClient;
  private readonly elements: DistributionElements;
  private readonly listeners: DistributionListeners;
  private plot: uPlot;
  private runId: number | null = null;
  private current: Distribution | null = null;
  /** True while the view shows the newest epoch and should move on when a new one ends. */
  private follow = true;
  private generation = 0;
  private loading = false;
  private refreshAgain = false;
  /** A planned re-read: of the epoch in progress, or of one whose end the store lags behind. */
  private timer: number | undefined;
  /** The newest epoch the stream said has ended, and how often the store was found behind it. */
  private newestEnded = -1;
  private lagTries = 0;
  private selection: LossSelection | null = null;

  constructor(api: ApiClient, elements: DistributionElements, listeners: DistributionListeners) {
    this.api = api;
    this.elements = elements;
    this.listeners = listeners;
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
      this.clearSelection(); // a range belongs to the epoch it was dragged on
      void this.load(epoch);
    });
  }

  setRun(runId: number): void {
    this.runId = runId;
    this.follow = true;
    this.newestEnded = -1;
    this.clearSelection();
    void this.load(null);
  }

  clearSelection(): void {
    if (this.selection === null) return;
    this.selection = null;
    this.plot.redraw(false, false);
    this.listeners.onSelect(null);
  }

  /** Called when an epoch ends (`ended`: which one, when known): show the new one if following,
   *  else refresh the epoch list. Epochs can end faster than the server computes a histogram:
   *  calls made while one is being read collapse into one more read after it. */
  refresh(ended?: number): void {
    if (ended !== undefined && ended > this.newestEnded) {
      this.newestEnded = ended;
      this.lagTries = 0;
    }
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
    window.clearTimeout(this.timer);
    try {
      const distribution = await this.api.distribution(this.runId, epoch, 50);
      if (generation === this.generation) {
        this.current = distribution;
        this.render(distribution);
        this.listeners.onEpoch(distribution.epoch, distribution.live, this.follow);
        this.planNextRead(distribution);
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

  private planNextRead(distribution: Distribution): void {
    if (!this.follow) return;
    if (distribution.live) {
      this.timer = window.setTimeout(() => this.refresh(), LIVE_REFRESH_MS);
    } else if ((distribution.epoch ?? -1) < this.newestEnded && this.lagTries < STORE_LAG_TRIES) {
      this.lagTries++;
      this.timer = window.setTimeout(() => this.refresh(), STORE_LAG_MS);
    }
  }

  private render(distribution: Distribution): void {
    this.fillEpochs(distribution);
    const { edges, counts } = distribution;
    const centers = new Float64Array(counts.length);
    for (let i = 0; i < counts.length; i++) centers[i] = ((edges[i] ?? 0) + (edges[i + 1] ?? 0)) / 2;
    // A log scale has no zero: empty bins become gaps.
    const heights = this.elements.logScale.checked ? counts.map((c) => (c > 0 ? c : null)) : Float64Array.from(counts);
    if (this.selection !== null) {
      // The range stays; what it holds is told again for the histogram now shown.
      this.selection = selectionOn(distribution, this.selection.low, this.selection.high);
      this.listeners.onSelect(this.selection);
    }
    this.plot.setData([centers, heights], true);
    this.elements.quantiles.replaceChildren(...this.describe(distribution));
    const mode = distribution.count === 0 ? "" : distribution.live ? `live · ${distribution.exact ? "exact" : "approximate"}` : "exact";
    setText(this.elements.mode, mode);
    this.elements.mode.dataset["mode"] = distribution.live ? "live" : "exact";
    this.elements.mode.title = distribution.live
      ? distribution.exact
        ? "The epoch in progress: every loss recorded so far"
        : "The epoch in progress: counts scaled and quantiles estimated from a uniform sample of its losses so far"
      : "A finished epoch: computed from every per-sample loss";
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
    const robust = element("span", "robust", `median ${formatValue(distribution.median)} · MAD ${formatValue(distribution.mad)} · mean ${formatValue(distribution.mean)}`);
    robust.title = "MAD: the median absolute deviation from the median, a spread that outliers do not inflate";
    parts.push(robust, element("span", "muted", `${formatCount(distribution.count)} samples`));
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
      // Dragging selects a loss range; it never zooms (the bins are the server's).
      cursor: { drag: { x: true, y: false, setScale: false } },
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
      hooks: {
        draw: [(u: uPlot) => this.drawSelection(u), (u: uPlot) => this.drawQuantiles(u)],
        setSelect: [(u: uPlot) => this.select(u)],
      },
    };
  }

  /** A drag ended: keep the range in loss values (uPlot's box is in pixels, and the axis moves
   *  with every new epoch), snapped outwards to the edges of the bins it touches. */
  private select(u: uPlot): void {
    const { left, width } = u.select;
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    const distribution = this.current;
    if (width < 2 || distribution === null || distribution.count === 0) return;
    const { edges, counts } = distribution;
    const from = u.posToVal(left, "x");
    const to = u.posToVal(left + width, "x");
    // Bins [first, last] are those the range overlaps.
    let first = 0;
    while (first < counts.length - 1 && (edges[first + 1] ?? Infinity) <= from) first++;
    let last = counts.length - 1;
    while (last > first && (edges[last] ?? -Infinity) >= to) last--;
    this.selection = selectionOn(distribution, edges[first] ?? from, edges[last + 1] ?? to);
    u.redraw(false, false);
    this.listeners.onSelect(this.selection);
  }

  /** The selected loss range, shaded behind the bars' outlines. */
  private drawSelection(u: uPlot): void {
    const selection = this.selection;
    if (selection === null) return;
    const { ctx } = u;
    const { left, top, width, height } = u.bbox;
    const x0 = Math.max(left, u.valToPos(selection.low, "x", true));
    const x1 = Math.min(left + width, u.valToPos(selection.high, "x", true));
    if (!(x1 > x0)) return;
    ctx.save();
    ctx.fillStyle = SELECTION_FILL;
    ctx.fillRect(x0, top, x1 - x0, height);
    ctx.strokeStyle = SELECTION_EDGE;
    ctx.lineWidth = uPlot.pxRatio;
    ctx.strokeRect(x0, top, x1 - x0, height);
    ctx.restore();
  }

  /** Vertical lines at p50/p90/p95/p99, labelled, drawn over the bars. */
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

/** The range [low, high] on a histogram: its epoch, and the samples of the bins it holds. */
export function selectionOn(distribution: Distribution, low: number, high: number): LossSelection {
  const { edges, counts } = distribution;
  let count = 0;
  counts.forEach((n, i) => {
    const centre = ((edges[i] ?? NaN) + (edges[i + 1] ?? NaN)) / 2;
    if (centre >= low && centre <= high) count += n;
  });
  return { low, high, epoch: distribution.epoch, live: distribution.live, count };
}
