import { describe, expect, it } from "vitest";

import { DEFAULT_LAYOUT, edgeLabel, layoutLineage, type LayoutOptions } from "../src/lineage";

const OPTIONS: LayoutOptions = { nodeWidth: 100, nodeHeight: 30, columnWidth: 200, rowHeight: 50, margin: 10 };
const node = (id: number, parent_id: number | null = null) => ({ id, parent_id });

/** [layer, row] of every run, by id. */
function grid(nodes: { id: number; parent_id: number | null }[]) {
  const { positions } = layoutLineage(nodes, OPTIONS);
  return Object.fromEntries([...positions.values()].map((p) => [p.id, [p.layer, p.row]]));
}

describe("the lineage layout", () => {
  it("puts a fork and its control in the column after their parent, the parent between them", () => {
    const layout = layoutLineage([node(1), node(2, 1), node(3, 1)], OPTIONS);
    expect(grid([node(1), node(2, 1), node(3, 1)])).toEqual({ 1: [0, 0.5], 2: [1, 0], 3: [1, 1] });
    expect(layout.positions.get(1)).toMatchObject({ x: 10, y: 35 });
    expect(layout.positions.get(3)).toMatchObject({ x: 210, y: 60 });
    expect([layout.width, layout.height]).toEqual([10 + 200 + 100 + 10, 10 + 50 + 30 + 10]);
  });

  it("layers a deeper tree by parent, keeping each run's children together", () => {
    // 1 -> 2 -> 4, 1 -> 3, and a second root 5 -> 6
    const nodes = [node(1), node(2, 1), node(3, 1), node(4, 2), node(5), node(6, 5)];
    expect(grid(nodes)).toEqual({ 1: [0, 0.5], 2: [1, 0], 4: [2, 0], 3: [1, 1], 5: [0, 2], 6: [1, 2] });
    expect(layoutLineage(nodes, OPTIONS).width).toBe(10 + 2 * 200 + 100 + 10);
  });

  it("places children in id order whatever the order of the list", () => {
    expect(grid([node(3, 1), node(2, 1), node(1)])).toEqual({ 1: [0, 0.5], 2: [1, 0], 3: [1, 1] });
  });

  it("makes a run whose parent is not in the list a root, and survives a loop", () => {
    expect(grid([node(2, 9)])).toEqual({ 2: [0, 0] });
    const looped = grid([node(1, 2), node(2, 1)]);
    expect(Object.keys(looped).sort()).toEqual(["1", "2"]);
  });

  it("is empty for no runs", () => {
    expect(layoutLineage([], DEFAULT_LAYOUT)).toMatchObject({ width: 0, height: 0 });
  });

  it("labels an edge with its kind and step", () => {
    expect(edgeLabel({ kind: "fork", step: 1200 })).toBe("fork · step 1,200");
    expect(edgeLabel({ kind: "resume", step: null })).toBe("resume");
  });
});
