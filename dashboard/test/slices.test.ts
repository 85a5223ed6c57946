import { describe, expect, it } from "vitest";

import type { SliceDefinition } from "../src/api";
import { bandText, definitionOf, describeDefinition } from "../src/slices";

describe("slice definitions in words", () => {
  it.each<[SliceDefinition, string]>([
    [{ kind: "loss_band", low: 0.52, high: 1.3 }, "loss 0.52 – 1.3"],
    [{ kind: "loss_band", low: 0.52 }, "loss ≥ 0.52"],
    [{ kind: "quantile_band", low: 0.9, high: 1 }, "loss quantiles 0.9 – 1"],
    [{ kind: "cluster", clustering: 3, cluster: 1 }, "cluster 1 of clustering 3"],
    [{ kind: "label", label: 7 }, "label 7"],
    [{ kind: "indices", indices: [1, 2, 3] }, "3 listed samples"],
    [{ kind: "flag", flag: "mislabelled" }, "likely mislabelled samples"],
    [{ kind: "filter", where: [{ signal: "aum", op: "<", value: 0 }, { signal: "loss", op: ">=", value: "p90" }] }, "aum < 0 and loss >= p90"],
  ])("%j reads '%s'", (definition, text) => {
    expect(describeDefinition(definition)).toBe(text);
  });

  it("writes open bands", () => {
    expect([bandText(null, 2), bandText(null, null)]).toEqual(["≤ 2", "any"]);
  });

  it("reads a saved slice's definition only when its kind is known", () => {
    expect(definitionOf({ definition: { kind: "label", label: 2 } })).toEqual({ kind: "label", label: 2 });
    expect(definitionOf({ definition: { kind: "telepathy" } })).toBeNull();
    expect(definitionOf({ definition: { kind: "constructor" } })).toBeNull();
    expect(definitionOf({ definition: {} })).toBeNull();
  });
});
