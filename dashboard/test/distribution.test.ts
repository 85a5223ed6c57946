import { describe, expect, it } from "vitest";

import type { Distribution } from "../src/api";
import { selectionOn } from "../src/distribution";

const histogram: Distribution = {
  epoch: 4, epochs: [0, 1, 2, 3, 4], live: false, exact: true, count: 100,
  edges: [0, 1, 2, 3, 4], counts: [50, 30, 15, 5],
  quantiles: { p50: 1, p90: 2.5, p95: 3, p99: 3.8 }, mean: 1.2, median: 1, mad: 0.6,
};

describe("selectionOn", () => {
  it("counts the samples of the bins whose centre lies in the range", () => {
    expect(selectionOn(histogram, 0, 2)).toEqual({ low: 0, high: 2, epoch: 4, live: false, count: 80 });
    expect(selectionOn(histogram, 1.6, 4).count).toBe(20);
    expect(selectionOn(histogram, 1.6, 2.4).count).toBe(0);
  });

  it("says when the histogram is of the epoch in progress", () => {
    expect(selectionOn({ ...histogram, live: true, epoch: 5 }, 0, 4)).toMatchObject({ live: true, epoch: 5, count: 100 });
  });
});
