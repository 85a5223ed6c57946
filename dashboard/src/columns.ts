// The columns behind a step chart, as uPlot takes them (its AlignedData): equal-length
// Float64Arrays, steps first. The server sends each curve already downsampled (bucket mean, min
// and max); `columnsOf` aligns several curves on the union of their steps, `ColumnBuffer` holds
// them and grows as live points arrive. Pure: no DOM, no drawing.

import type uPlot from "uplot";

import type { MetricsResponse } from "./api";

/** Equal-length columns: steps, then one column per line. NaN marks a missing value. */
export interface Columns {
  x: Float64Array;
  ys: Float64Array[];
  /** Raw points the server holds for this range (before downsampling), when known. */
  total?: number;
}

/** Growable columns of Float64Array: appending is amortised O(1) and allocates only on doubling. */
export class ColumnBuffer {
  private xs: Float64Array;
  private ys: Float64Array[];
  length = 0;

  constructor(width: number, capacity = 1024) {
    this.xs = new Float64Array(capacity);
    this.ys = Array.from({ length: width }, () => new Float64Array(capacity));
  }

  get lastX(): number {
    return this.length === 0 ? -Infinity : this.xs[this.length - 1]!;
  }

  /** The newest value of one column (NaN when empty). */
  last(column: number): number {
    return this.length === 0 ? NaN : (this.ys[column]?.[this.length - 1] ?? NaN);
  }

  replace(columns: Columns): void {
    this.length = 0;
    this.reserve(columns.x.length);
    this.xs.set(columns.x);
    this.ys.forEach((column, i) => column.set(columns.ys[i] ?? new Float64Array(columns.x.length).fill(NaN)));
    this.length = columns.x.length;
  }

  push(x: number, values: readonly number[]): void {
    this.reserve(this.length + 1);
    this.xs[this.length] = x;
    this.ys.forEach((column, i) => (column[this.length] = values[i] ?? NaN));
    this.length += 1;
  }

  /** The data as uPlot takes it: views (no copies) unless a column has gaps, which become nulls. */
  aligned(): uPlot.AlignedData {
    const n = this.length;
    return [this.xs.subarray(0, n), ...this.ys.map((column) => withGaps(column.subarray(0, n)))];
  }

  private reserve(size: number): void {
    if (size <= this.xs.length) return;
    const capacity = Math.max(size, this.xs.length * 2);
    this.xs = grow(this.xs, capacity, this.length);
    this.ys = this.ys.map((column) => grow(column, capacity, this.length));
  }
}

function grow(column: Float64Array, capacity: number, used: number): Float64Array {
  const next = new Float64Array(capacity);
  next.set(column.subarray(0, used));
  return next;
}

/** uPlot reads null as a gap but NaN as a number; only columns that have gaps pay for a copy. */
export function withGaps(column: Float64Array): Float64Array | (number | null)[] {
  if (!column.some(Number.isNaN)) return column;
  return Array.from(column, (value) => (Number.isNaN(value) ? null : value));
}

/** The server's metric columns as chart columns, aligned on the union of their steps. With
 *  `envelope` (one metric), the columns are value, min, max. */
export function columnsOf(response: MetricsResponse, names: readonly string[], envelope = false): Columns {
  const series = names.map((name) => response.series[name]);
  const total = Math.max(0, ...series.map((s) => s?.total ?? 0));
  const only = series[0];
  if (series.length === 1) {
    // The common case: one curve, copied straight into typed arrays.
    const n = only?.step.length ?? 0;
    const column = (values: (number | null)[] | undefined) => Float64Array.from({ length: n }, (_, i) => values?.[i] ?? NaN);
    return {
      x: Float64Array.from(only?.step ?? []),
      ys: envelope ? [column(only?.value), column(only?.min), column(only?.max)] : [column(only?.value)],
      total,
    };
  }
  const rows = new Map<number, Float64Array>();
  series.forEach((s, column) => {
    s?.step.forEach((step, i) => {
      let row = rows.get(step);
      if (row === undefined) {
        row = new Float64Array(names.length).fill(NaN);
        rows.set(step, row);
      }
      row[column] = s.value[i] ?? NaN;
    });
  });
  const steps = [...rows.keys()].sort((a, b) => a - b);
  return {
    x: Float64Array.from(steps),
    ys: names.map((_, column) => Float64Array.from(steps, (step) => rows.get(step)![column]!)),
    total,
  };
}
