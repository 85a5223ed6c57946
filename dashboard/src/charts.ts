// Step charts: uPlot over columnar Float64Arrays. History is read from the server already
// downsampled; live points are appended; at most one redraw happens per animation frame however
// many points arrive. Dragging across a chart zooms to that step range and re-reads it from the
// server, so detail the downsampled view hid appears; a double-click or "Reset zoom" goes back.

import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

import { ColumnBuffer, type Columns } from "./columns";
import { element } from "./dom";
import { formatCompact, formatCount, formatValue } from "./format";

export interface StepRange {
  start: number;
  end: number;
}

/** Reads the chart's columns for a step range (null: the whole run). */
export type ColumnsLoader = (range: StepRange | null) => Promise<Columns>;

export interface LineSpec {
  label: string;
  stroke: string;
  /** "y2" lines use their own scale, drawn on the right. */
  scale?: "y" | "y2";
  format?: (value: number) => string;
  /** Stroke width in CSS pixels (default 1.5). */
  width?: number;
}

export interface StepChartOptions {
  lines: LineSpec[];
  load: ColumnsLoader;
  height?: number;
  /** Above this many points held, the history is re-read downsampled instead of growing. */
  maxPoints?: number;
  /** Tick labels of the left axis (default: 4 significant digits) and of the right one. */
  yTicks?: (value: number) => string;
  y2Ticks?: (value: number) => string;
  /** Fixed range of the "y2" scale (e.g. [0, 1] for an accuracy). */
  y2Range?: [number, number];
  /** Draw a marker at every point (for sparse series such as per-epoch validation). */
  markers?: boolean;
  /** Fill between two lines (indices into `lines`): the min/max envelope of downsampled buckets,
   *  so a spike the mean hides stays visible. */
  band?: { lower: number; upper: number; fill: string };
  onError?: (error: unknown) => void;
}

const DEFAULTS = { height: 220, maxPoints: 4000, markers: false };
/** After a failed read, how long before growing past `maxPoints` triggers another one. */
const RETRY_MS = 5000;

export class StepChart {
  private readonly options: StepChartOptions & typeof DEFAULTS;
  private readonly plot: uPlot;
  private readonly buffer: ColumnBuffer;
  private readonly container: HTMLElement;
  private readonly caption: HTMLElement;
  private readonly resetButton: HTMLButtonElement;
  private zoom: StepRange | null = null;
  private total: number | undefined;
  /** Live points that arrived while a history read was in flight. */
  private pending: [number, number[]][] = [];
  private loading = false;
  private generation = 0;
  private frame = 0;
  private retryAt = 0;

  constructor(container: HTMLElement, options: StepChartOptions) {
    this.options = { ...DEFAULTS, ...options };
    this.container = container;
    container.dataset["points"] = "0";
    this.buffer = new ColumnBuffer(options.lines.length);

    const toolbar = element("div", "chart-toolbar");
    this.caption = element("span", "chart-caption");
    this.resetButton = element("button", "link-button");
    this.resetButton.type = "button";
    this.resetButton.textContent = "Reset zoom";
    this.resetButton.hidden = true;
    this.resetButton.addEventListener("click", () => this.resetZoom());
    toolbar.append(this.caption, this.resetButton);
    const target = element("div", "chart-plot");
    container.append(target, toolbar);

    this.plot = new uPlot(this.plotOptions(container), this.buffer.aligned(), target);
    new ResizeObserver(() => this.fit(container)).observe(container);
  }

  /** Read the history again (the whole run, or the zoomed range). */
  reload(): Promise<void> {
    return this.load();
  }

  /** Append a live point. Points at or before the last step held are already there: skipped. */
  append(step: number, values: number[]): void {
    if (this.zoom !== null) return; // a zoomed view is a fixed range; un-zooming re-reads the run
    if (this.loading) {
      this.pending.push([step, values]);
      if (this.pending.length > this.options.maxPoints) this.pending.shift();
      return;
    }
    if (step <= this.buffer.lastX) return;
    this.buffer.push(step, values);
    if (this.buffer.length > this.options.maxPoints && performance.now() >= this.retryAt) {
      void this.load(); // back to a downsampled history rather than growing without bound
      return;
    }
    this.scheduleRedraw();
  }

  resetZoom(): void {
    if (this.zoom === null) return;
    this.zoom = null;
    void this.load();
  }

  private zoomTo(range: StepRange): void {
    if (!(range.end > range.start)) return;
    this.zoom = range;
    this.plot.setScale("x", { min: range.start, max: range.end }); // instant, on the points held
    void this.load();
  }

  private async load(): Promise<void> {
    const generation = ++this.generation;
    const zoom = this.zoom;
    this.loading = true;
    this.caption.textContent = this.describe();
    this.resetButton.hidden = zoom === null;
    try {
      const columns = await this.options.load(zoom);
      if (generation !== this.generation) return; // a newer read (another zoom) superseded this one
      this.buffer.replace(columns);
      this.total = columns.total;
    } catch (error) {
      if (generation !== this.generation) return;
      this.retryAt = performance.now() + RETRY_MS;
      this.options.onError?.(error);
    }
    this.loading = false;
    if (zoom === null) {
      for (const [step, values] of this.pending) {
        if (step > this.buffer.lastX) this.buffer.push(step, values);
      }
    }
    this.pending = [];
    this.scheduleRedraw();
  }

  private scheduleRedraw(): void {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.redraw();
    });
  }

  private redraw(): void {
    const zoom = this.zoom;
    this.plot.batch(() => {
      this.plot.setData(this.buffer.aligned(), zoom === null);
      if (zoom !== null) this.plot.setScale("x", { min: zoom.start, max: zoom.end });
    });
    // A cursor resting on the chart would otherwise keep showing the old data's values.
    const { left, top } = this.plot.cursor;
    if (left !== undefined && top !== undefined && left >= 0) this.plot.setCursor({ left, top });
    this.resetButton.hidden = zoom === null;
    this.caption.textContent = this.describe();
    // What the chart holds, readable by tools and tests without parsing a canvas.
    this.container.dataset["points"] = String(this.buffer.length);
    const last = this.buffer.last(0);
    this.container.dataset["last"] = Number.isNaN(last) ? "" : String(last);
  }

  private describeData(): string {
    const shown = this.buffer.length;
    const range = this.zoom === null ? "" : `steps ${formatCount(this.zoom.start)}–${formatCount(this.zoom.end)} · `;
    if (shown === 0) return `${range}no data yet`;
    if (this.total !== undefined && this.total > shown) {
      return `${range}${formatCount(shown)} of ${formatCount(this.total)} points (downsampled) · drag to zoom`;
    }
    return `${range}${formatCount(shown)} points · drag to zoom`;
  }

  private describe(): string {
    return this.loading ? `${this.describeData()} · loading…` : this.describeData();
  }

  private fit(container: HTMLElement): void {
    const width = Math.max(200, Math.floor(container.clientWidth));
    if (width !== this.plot.width) this.plot.setSize({ width, height: this.options.height });
  }

  private plotOptions(container: HTMLElement): uPlot.Options {
    const { lines, y2Range, markers, band, yTicks = formatValue, y2Ticks = formatValue } = this.options;
    const hasY2 = lines.some((line) => line.scale === "y2");
    const axisFormat = (format: (value: number) => string) => (_u: uPlot, splits: number[]) =>
      splits.map((value) => (value == null ? "" : format(value)));
    const axes: uPlot.Axis[] = [
      { values: axisFormat(formatCompact), stroke: "#555", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" } },
      { scale: "y", values: axisFormat(yTicks), stroke: "#555", grid: { stroke: "#eee" }, ticks: { stroke: "#ddd" }, size: 60 },
    ];
    if (hasY2) {
      axes.push({ scale: "y2", side: 1, values: axisFormat(y2Ticks), stroke: "#555", grid: { show: false }, size: 50 });
    }
    const scales: uPlot.Scales = { x: { time: false } };
    if (hasY2 && y2Range) scales["y2"] = { range: () => y2Range };
    return {
      width: Math.max(200, Math.floor(container.clientWidth)),
      height: this.options.height,
      scales,
      axes,
      legend: { live: true },
      bands: band ? [{ series: [band.upper + 1, band.lower + 1], fill: band.fill }] : [],
      cursor: {
        drag: { x: true, y: false, setScale: false },
        bind: { dblclick: () => () => (this.resetZoom(), null) },
      },
      series: [
        { label: "step", value: (_u, value) => (value == null ? "—" : formatCount(value)) },
        ...lines.map(
          (line): uPlot.Series => ({
            label: line.label,
            stroke: line.stroke,
            width: line.width ?? 1.5,
            scale: line.scale ?? "y",
            spanGaps: true,
            // Markers where there is room for them (uPlot's own density rule), else lines only.
            points: markers ? { size: 5 } : { show: false },
            value: (_u, value) => (value == null ? "—" : (line.format ?? formatValue)(value)),
          }),
        ),
      ],
      hooks: {
        setSelect: [
          (u: uPlot) => {
            const { left, width } = u.select;
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
            if (width < 2) return;
            const start = Math.floor(u.posToVal(left, "x"));
            const end = Math.ceil(u.posToVal(left + width, "x"));
            this.zoomTo({ start: Math.max(0, start), end });
          },
        ],
      },
    };
  }
}
