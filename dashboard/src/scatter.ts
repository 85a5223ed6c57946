// A 2-D scatter on a plain <canvas>, coloured by group: a few thousand points drawn as small
// squares, one fill colour set per group (not per point), at most one redraw per animation frame.

import { element } from "./dom";

/** Columns of equal length: x, y and the group (cluster) of each point. */
export interface ScatterData {
  x: Float64Array;
  y: Float64Array;
  group: Int32Array;
}

export interface ScatterOptions {
  height?: number;
  /** Side of a point's square, in CSS pixels. */
  pointSize?: number;
  /** Written in the middle while there are no points. */
  emptyText?: string;
}

const DEFAULTS = { height: 260, pointSize: 3, emptyText: "No points" };
const PADDING = 10;
/** Tableau 10: distinct to most eyes; further groups get golden-angle hues. */
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

export function groupColor(group: number): string {
  return PALETTE[group] ?? `hsl(${Math.round((group * 137.508) % 360)}, 55%, 48%)`;
}

export class ScatterPlot {
  private readonly options: typeof DEFAULTS;
  private readonly container: HTMLElement;
  private readonly canvas: HTMLCanvasElement;
  private data: ScatterData = { x: new Float64Array(0), y: new Float64Array(0), group: new Int32Array(0) };
  /** Point indices sorted by group, so each group is one fill colour and one run of rects. */
  private order = new Uint32Array(0);
  private highlight: number | null = null;
  private frame = 0;

  constructor(container: HTMLElement, options: ScatterOptions = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.container = container;
    this.canvas = element("canvas", "scatter-canvas");
    this.canvas.style.height = `${this.options.height}px`;
    container.append(this.canvas);
    container.dataset["points"] = "0";
    new ResizeObserver(() => this.scheduleDraw()).observe(container);
  }

  setData(data: ScatterData): void {
    this.data = data;
    this.order = Uint32Array.from({ length: data.x.length }, (_, i) => i).sort((a, b) => data.group[a]! - data.group[b]!);
    this.highlight = null;
    this.scheduleDraw();
  }

  /** Draw one group on top and fade the others (null: all alike). */
  setHighlight(group: number | null): void {
    if (group === this.highlight) return;
    this.highlight = group;
    this.scheduleDraw();
  }

  private scheduleDraw(): void {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  private draw(): void {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, Math.floor(this.container.clientWidth));
    const height = this.options.height;
    if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(height * ratio)) {
      this.canvas.width = Math.round(width * ratio);
      this.canvas.height = Math.round(height * ratio);
    }
    const ctx = this.canvas.getContext("2d");
    if (ctx === null) return;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.strokeStyle = "#e1e4e8";
    ctx.strokeRect(0.5, 0.5, width - 1, height - 1);

    const { x, y, group } = this.data;
    const order = this.order;
    const n = x.length;
    this.container.dataset["points"] = String(n);
    if (n === 0) {
      ctx.fillStyle = "#656d76";
      ctx.font = "13px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(this.options.emptyText, width / 2, height / 2);
      return;
    }
    const [xMin, xMax] = extent(x);
    const [yMin, yMax] = extent(y);
    // The same scale on both axes would squash one; each fills the box (PCA axes are unitless).
    const sx = (width - 2 * PADDING) / (xMax - xMin || 1);
    const sy = (height - 2 * PADDING) / (yMax - yMin || 1);
    const size = this.options.pointSize;
    const half = size / 2;

    const drawGroup = (from: number, to: number, g: number) => {
      ctx.globalAlpha = this.highlight === null ? 0.7 : g === this.highlight ? 0.95 : 0.12;
      ctx.fillStyle = groupColor(g);
      for (let k = from; k < to; k++) {
        const i = order[k]!;
        ctx.fillRect(PADDING + (x[i]! - xMin) * sx - half, height - PADDING - (y[i]! - yMin) * sy - half, size, size);
      }
    };
    let start = 0;
    let highlighted: [number, number] | null = null;
    for (let k = 1; k <= n; k++) {
      const g = group[order[start]!]!;
      if (k < n && group[order[k]!] === g) continue;
      if (g === this.highlight) highlighted = [start, k];
      else drawGroup(start, k, g);
      start = k;
    }
    if (highlighted !== null) drawGroup(highlighted[0], highlighted[1], this.highlight!);
    ctx.globalAlpha = 1;
  }
}

function extent(values: Float64Array): [number, number] {
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  return Number.isFinite(min) ? [min, max] : [0, 1];
}
