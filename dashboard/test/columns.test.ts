import { describe, expect, it } from "vitest";

import type { MetricsResponse, MetricSeries } from "../src/api";
import { ColumnBuffer, columnsOf, withGaps } from "../src/columns";

const f64 = (values: number[]) => Float64Array.from(values);

describe("ColumnBuffer", () => {
  it("appends points and grows past its capacity, keeping what it held", () => {
    const buffer = new ColumnBuffer(2, 2);
    for (let step = 1; step <= 5; step++) buffer.push(step, [step * 10, -step]);
    expect(buffer.length).toBe(5);
    expect(buffer.lastX).toBe(5);
    expect(buffer.last(0)).toBe(50);
    expect(buffer.last(1)).toBe(-5);
    const [x, a, b] = buffer.aligned();
    expect(Array.from(x!)).toEqual([1, 2, 3, 4, 5]);
    expect(Array.from(a as Float64Array)).toEqual([10, 20, 30, 40, 50]);
    expect(Array.from(b as Float64Array)).toEqual([-1, -2, -3, -4, -5]);
  });

  it("is empty at first: no last step, NaN values", () => {
    const buffer = new ColumnBuffer(1);
    expect(buffer.lastX).toBe(-Infinity);
    expect(buffer.last(0)).toBeNaN();
    expect(buffer.aligned().map((column) => column.length)).toEqual([0, 0]);
  });

  it("fills a value missing from a push with NaN, which uPlot then gets as a gap", () => {
    const buffer = new ColumnBuffer(2);
    buffer.push(1, [1]);
    buffer.push(2, [2, 3]);
    const [, a, b] = buffer.aligned();
    expect(a).toBeInstanceOf(Float64Array); // no gaps: a view, not a copy
    expect(b).toEqual([null, 3]);
  });

  it("replaces its data with a history read (growing as needed), and appends after it", () => {
    const buffer = new ColumnBuffer(1, 1);
    buffer.push(100, [1]);
    buffer.replace({ x: f64([1, 2, 3]), ys: [f64([4, 5, 6])] });
    buffer.push(4, [7]);
    const [x, y] = buffer.aligned();
    expect(Array.from(x!)).toEqual([1, 2, 3, 4]);
    expect(Array.from(y as Float64Array)).toEqual([4, 5, 6, 7]);
  });

  it("fills a column the history lacks with gaps", () => {
    const buffer = new ColumnBuffer(2);
    buffer.replace({ x: f64([1, 2]), ys: [f64([1, 2])] });
    expect(buffer.aligned()[2]).toEqual([null, null]);
  });

  it("hands out views of its storage, not copies", () => {
    const buffer = new ColumnBuffer(1, 8);
    buffer.push(1, [1]);
    const [x] = buffer.aligned();
    expect((x as Float64Array).buffer.byteLength).toBe(8 * 8);
  });
});

describe("withGaps", () => {
  it("turns NaN into null only when there is one", () => {
    const clean = f64([1, 2]);
    expect(withGaps(clean)).toBe(clean);
    expect(withGaps(f64([1, NaN, 3]))).toEqual([1, null, 3]);
  });
});

function series(step: number[], value: (number | null)[], total = step.length): MetricSeries {
  return { step, value, min: value.map((v) => (v === null ? null : v - 1)), max: value.map((v) => (v === null ? null : v + 1)), total };
}

describe("columnsOf", () => {
  it("copies one downsampled curve into typed columns, with its envelope when asked", () => {
    const response: MetricsResponse = { series: { train_loss: series([0, 10, 20], [3, null, 1], 3000) } };
    const columns = columnsOf(response, ["train_loss"], true);
    expect(Array.from(columns.x)).toEqual([0, 10, 20]);
    expect(columns.ys.map((y) => Array.from(y))).toEqual([
      [3, NaN, 1],
      [2, NaN, 0],
      [4, NaN, 2],
    ]);
    expect(columns.total).toBe(3000);
  });

  it("aligns several curves on the union of their steps", () => {
    const response: MetricsResponse = {
      series: { val_loss: series([10, 30], [0.5, 0.4]), val_accuracy: series([20, 30], [0.8, 0.9], 7) },
    };
    const columns = columnsOf(response, ["val_loss", "val_accuracy"]);
    expect(Array.from(columns.x)).toEqual([10, 20, 30]);
    expect(columns.ys.map((y) => Array.from(y))).toEqual([
      [0.5, NaN, 0.4],
      [NaN, 0.8, 0.9],
    ]);
    expect(columns.total).toBe(7);
  });

  it("gives empty columns for curves the server does not have", () => {
    const one = columnsOf({ series: {} }, ["lr"]);
    expect([one.x.length, one.ys.length, one.ys[0]!.length, one.total]).toEqual([0, 1, 0, 0]);
    const two = columnsOf({ series: { a: series([1], [1]) } }, ["a", "b"]);
    expect(two.ys.map((y) => Array.from(y))).toEqual([[1], [NaN]]);
  });
});
