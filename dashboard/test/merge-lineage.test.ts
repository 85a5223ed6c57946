import { describe, expect, it } from "vitest";

import type { LineageEdge } from "../src/api";
import { EDGE_KINDS, layoutLineage, manyToOne, originText, type LayoutOptions } from "../src/lineage";

const OPTIONS: LayoutOptions = { nodeWidth: 100, nodeHeight: 30, columnWidth: 200, rowHeight: 50, margin: 10 };
const node = (id: number, parent_id: number | null = null) => ({ id, parent_id });
const edge = (parent: number, child: number, kind = "merge", step: number | null = 120): LineageEdge =>
  ({ parent, child, kind, step, checkpoint_id: null, plan_id: 3 });

/** [layer, row] of every run, by id. */
function grid(nodes: { id: number; parent_id: number | null }[], edges: LineageEdge[]) {
  const { positions } = layoutLineage(nodes, OPTIONS, edges);
  return Object.fromEntries([...positions.values()].map((p) => [p.id, [p.layer, p.row]]));
}

describe("the lineage layout with merges", () => {
  it("puts a merge of a fork and its control in the column after them, by the later of the two", () => {
    // 1 -> 2 (fork), 1 -> 3 (control); 4 merges 2 and 3 (its parent_id is the first parent).
    const nodes = [node(1), node(2, 1), node(3, 1), node(4, 2)];
    const edges = [edge(1, 2, "fork"), edge(1, 3, "control"), edge(2, 4), edge(3, 4)];
    expect(grid(nodes, edges)).toEqual({ 1: [0, 0.5], 2: [1, 0], 3: [1, 1], 4: [2, 1] });
    const layout = layoutLineage(nodes, OPTIONS, edges);
    expect(layout.positions.get(4)).toMatchObject({ x: 10 + 2 * 200, y: 10 + 50 });
    expect([layout.width, layout.height]).toEqual([10 + 2 * 200 + 100 + 10, 10 + 50 + 30 + 10]);
  });

  it("places a merged run one column after its deepest parent, however shallow the others", () => {
    // 1 -> 2 -> 3; 4 merges the root 1 and the grandchild 3.
    const nodes = [node(1), node(2, 1), node(3, 2), node(4, 1)];
    const edges = [edge(1, 2, "fork"), edge(2, 3, "fork"), edge(1, 4), edge(3, 4)];
    expect(grid(nodes, edges)).toEqual({ 1: [0, 0], 2: [1, 0], 3: [2, 0], 4: [3, 0] });
  });

  it("gives every run its own place when merges and forks mix", () => {
    // Two roots; 3 merges them; 4 forks from the merge.
    const nodes = [node(1), node(2), node(3, 1), node(4, 3)];
    const edges = [edge(1, 3), edge(2, 3), edge(3, 4, "fork")];
    const layout = layoutLineage(nodes, OPTIONS, edges);
    const places = [...layout.positions.values()].map((p) => `${p.x},${p.y}`);
    expect(new Set(places).size).toBe(4);
    expect(grid(nodes, edges)).toMatchObject({ 3: [1, 1], 4: [2, 1] });
  });

  it("is the tree layout without edges, and survives a loop through merge edges", () => {
    expect(grid([node(1), node(2, 1), node(3, 1)], [])).toEqual({ 1: [0, 0.5], 2: [1, 0], 3: [1, 1] });
    const looped = grid([node(1), node(2, 1), node(3, 2)], [edge(3, 2), edge(1, 2), edge(2, 3, "fork")]);
    expect(Object.keys(looped).sort()).toEqual(["1", "2", "3"]);
  });

  it("ignores edges to or from runs that are not in the list", () => {
    expect(grid([node(1), node(2)], [edge(9, 2), edge(1, 8)])).toEqual({ 1: [0, 0], 2: [0, 1] });
  });

  it("says how a run came to be: a fork's edge, or every parent of a merge", () => {
    const names = (id: number) => `run${id} (${id})`;
    expect(originText([], names)).toBe("no parent");
    expect(originText([{ ...edge(1, 2, "fork", 1200), checkpoint_id: 5 }], names)).toBe("fork · step 1,200 of run1 (1) (checkpoint 5) · card 3");
    expect(originText([edge(2, 4), edge(3, 4)], names)).toBe("merge of run2 (2), run3 (3) · card 3");
  });

  it("lays a mixture out after its experts, with an edge from each, like a merge", () => {
    // 1 -> 2 (fork); 4 is the mixture of 1 and 2 (its parent_id the generalist); 5 the benchmark's monolith of 1.
    const nodes = [node(1), node(2, 1), node(4, 1), node(5, 1)];
    const edges = [edge(1, 2, "fork"), edge(1, 4, "gate"), edge(2, 4, "gate"), edge(1, 5, "benchmark")];
    expect(grid(nodes, edges)).toMatchObject({ 1: [0, 0.5], 2: [1, 0], 4: [2, 0], 5: [1, 1] });
  });

  it("says how a mixture and a monolith came to be, and names their edges in the legend", () => {
    const names = (id: number) => `run${id} (${id})`;
    expect(originText([edge(1, 4, "gate"), edge(2, 4, "gate")], names)).toBe("mixture of run1 (1), run2 (2) · card 3");
    expect(originText([edge(1, 5, "benchmark", 900)], names)).toBe("benchmark · step 900 of run1 (1) · card 3");
    expect([manyToOne("gate"), manyToOne("merge"), manyToOne("benchmark"), manyToOne("fork")]).toEqual([true, true, false, false]);
    expect(EDGE_KINDS.map((k) => k.kind)).toEqual(["fork", "control", "merge", "gate", "benchmark"]);
  });
});
