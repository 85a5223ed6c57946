// The lineage: the session's runs as a graph, drawn as inline SVG, layered by parent from left to
// right (a run's children in the column after it; a merged run, which has an edge from each of
// its parents, in the column after its deepest parent; a mixture likewise, with an edge from each
// expert), each edge labelled with its kind (fork, control, resume, merge, gate, benchmark) and
// the parent's step, each run coloured by its status. A click on a run makes it the page's run
// (its curves, distribution, samples); shift-click, or the ticks beside the graph, pick runs to
// compare, to merge ("Merge…") or to route among ("Gate…"). Read from GET /api/lineage, again
// when runs appear or change.

import type { ApiClient, Lineage, LineageEdge, LineageNode } from "./api";
import { element, setText } from "./dom";
import { formatClock, formatCount } from "./format";
import type { Store } from "./state";

export interface LayoutOptions {
  nodeWidth: number;
  nodeHeight: number;
  /** From one layer's left edge to the next one's: the node and room for the edges' labels. */
  columnWidth: number;
  rowHeight: number;
  margin: number;
}

export const DEFAULT_LAYOUT: LayoutOptions = { nodeWidth: 176, nodeHeight: 40, columnWidth: 320, rowHeight: 58, margin: 8 };

export interface NodePosition {
  id: number;
  /** One more than its deepest parent's: 0 for a run without a parent. */
  layer: number;
  /** Leaves take rows 0, 1, 2, … in order; a parent sits midway between its first and last child. */
  row: number;
  /** Top-left corner, in pixels. */
  x: number;
  y: number;
}

export interface LineageLayout {
  positions: Map<number, NodePosition>;
  width: number;
  height: number;
}

/** Where each run goes: layered by parent (roots, then their children, …), children in id order
 *  under their parent, so that a fork and its control sit side by side next to their parent. A
 *  run with several parents (a merge: an edge from each) goes one column after the deepest of
 *  them and sits in the rows of the last of those (the others' edges reach it across). A parent
 *  that is not in the list (or a loop, which a lineage never has) makes a run a root. */
export function layoutLineage(
  nodes: readonly Pick<LineageNode, "id" | "parent_id">[],
  options: LayoutOptions = DEFAULT_LAYOUT,
  edges: readonly Pick<LineageEdge, "parent" | "child">[] = [],
): LineageLayout {
  const parents = parentsOf(nodes, edges);
  const layers = layersOf(parents);
  const children = new Map<number, number[]>();
  const roots: number[] = [];
  for (const node of [...nodes].sort((a, b) => a.id - b.id)) {
    const tree = treeParent(node.id, parents, layers);
    if (tree === null) roots.push(node.id);
    else children.set(tree, [...(children.get(tree) ?? []), node.id]);
  }
  const positions = new Map<number, NodePosition>();
  let rows = 0;
  let columns = 0;
  const place = (id: number, layer: number): number => {
    const kids = (children.get(id) ?? []).filter((kid) => !positions.has(kid));
    positions.set(id, { id, layer, row: 0, x: 0, y: 0 }); // marked before the children: a loop stops here
    const kidRows = kids.map((kid) => place(kid, layer + 1));
    const row = kidRows.length === 0 ? rows++ : (kidRows[0]! + kidRows[kidRows.length - 1]!) / 2;
    columns = Math.max(columns, layer + 1);
    positions.set(id, { id, layer, row, x: options.margin + layer * options.columnWidth, y: options.margin + row * options.rowHeight });
    return row;
  };
  for (const root of roots) place(root, 0);
  // Runs caught in a loop were never reached from a root: each starts its own tree.
  for (const node of nodes) if (!positions.has(node.id)) place(node.id, 0);
  return {
    positions,
    width: columns === 0 ? 0 : 2 * options.margin + (columns - 1) * options.columnWidth + options.nodeWidth,
    height: rows === 0 ? 0 : 2 * options.margin + (rows - 1) * options.rowHeight + options.nodeHeight,
  };
}

/** Every run's parents in the list: its `parent_id` and the parent of every edge into it. */
function parentsOf(nodes: readonly Pick<LineageNode, "id" | "parent_id">[], edges: readonly Pick<LineageEdge, "parent" | "child">[]): Map<number, number[]> {
  const ids = new Set(nodes.map((n) => n.id));
  const parents = new Map<number, number[]>(nodes.map((n) => [n.id, []]));
  const add = (child: number, parent: number | null) => {
    const list = parents.get(child);
    if (list !== undefined && parent !== null && parent !== child && ids.has(parent) && !list.includes(parent)) list.push(parent);
  };
  for (const node of nodes) add(node.id, node.parent_id);
  for (const edge of edges) add(edge.child, edge.parent);
  return parents;
}

/** Each run's layer: one after its deepest parent (the longest path from a root). A loop is cut
 *  where it closes (the parent still being walked counts as none). */
function layersOf(parents: ReadonlyMap<number, readonly number[]>): Map<number, number> {
  const layers = new Map<number, number>();
  const walking = new Set<number>();
  const layerOf = (id: number): number => {
    const known = layers.get(id);
    if (known !== undefined) return known;
    if (walking.has(id)) return -1;
    walking.add(id);
    const layer = 1 + Math.max(-1, ...(parents.get(id) ?? []).map(layerOf));
    walking.delete(id);
    layers.set(id, layer);
    return layer;
  };
  for (const id of parents.keys()) layerOf(id);
  return layers;
}

/** The parent a run is drawn next to: of those in the layer before it, the latest (a merge of a
 *  fork and its control sits by the control); null for a root. */
function treeParent(id: number, parents: ReadonlyMap<number, readonly number[]>, layers: ReadonlyMap<number, number>): number | null {
  const layer = layers.get(id) ?? 0;
  const before = (parents.get(id) ?? []).filter((p) => layers.get(p) === layer - 1);
  return before.length === 0 ? null : Math.max(...before);
}

/** An edge's label: "fork · step 1,200", "control · step 1,200", "resume", "merge · step 900". */
export function edgeLabel(edge: Pick<LineageEdge, "kind" | "step">): string {
  return edge.step === null ? edge.kind : `${edge.kind} · step ${formatCount(edge.step)}`;
}

/** How a run came to be, in words: "fork · step 1,200 of baseline (1) (checkpoint 3) · card 1",
 *  for a merge "merge of a (2), b (3) · card 4", for a mixture "mixture of a (1), b (2) · card 5";
 *  "no parent" for a root. */
export function originText(edges: readonly LineageEdge[], nameOf: (id: number) => string): string {
  if (edges.length === 0) return "no parent";
  const card = (e: LineageEdge) => (e.plan_id === null ? "" : ` · card ${e.plan_id}`);
  if (edges.length > 1 || manyToOne(edges[0]!.kind)) {
    const what = edges.every((e) => e.kind === "gate") ? "mixture" : "merge";
    return `${what} of ${edges.map((e) => nameOf(e.parent)).join(", ")}${card(edges[0]!)}`;
  }
  const edge = edges[0]!;
  return `${edgeLabel(edge)} of ${nameOf(edge.parent)}${edge.checkpoint_id === null ? "" : ` (checkpoint ${edge.checkpoint_id})`}${card(edge)}`;
}

/** The edge kinds the legend names, and how each is drawn. */
export const EDGE_KINDS: readonly { kind: string; text: string }[] = [
  { kind: "fork", text: "fork / resume" },
  { kind: "control", text: "matched control" },
  { kind: "merge", text: "merge (one edge from each parent)" },
  { kind: "gate", text: "gate (one edge from each expert into the mixture)" },
  { kind: "benchmark", text: "benchmark (the generalist trained on at the mixture's compute)" },
];

/** Kinds whose edges come several into one run (a merge's parents, a mixture's experts): their
 *  labels sit by each parent, where they do not meet. */
export function manyToOne(kind: string): boolean {
  return kind === "merge" || kind === "gate";
}

/** A run picked for comparison, with how it came to be (its edge's kind; null for a root). */
export interface PickedRun {
  id: number;
  name: string;
  kind: string | null;
}

export interface LineageElements {
  graph: HTMLElement;
  detail: HTMLElement;
  picks: HTMLElement;
}

export interface LineageOptions {
  /** Make this run the page's run. */
  onSelect: (runId: number) => void;
  onPick: (runs: PickedRun[]) => void;
  /** "Merge…": a merge card for the picked runs (two or more). */
  onMerge: (runs: PickedRun[]) => void;
  /** "Gate…": a gate card routing among the picked runs (two or more). */
  onGate: (runs: PickedRun[]) => void;
  /** The runs were read again (names and statuses for the other panels). */
  onNodes: (nodes: readonly LineageNode[]) => void;
}

const SVG = "http://www.w3.org/2000/svg";
const NAME_CHARS = 24;

export class LineageView {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly elements: LineageElements;
  private readonly options: LineageOptions;
  private lineage: Lineage = { nodes: [], edges: [] };
  private readonly picked = new Set<number>();
  private current: number | null = null;
  private reading: Promise<void> | null = null;
  private readAgain = false;
  private readonly mergeButton: HTMLButtonElement;
  private readonly gateButton: HTMLButtonElement;

  constructor(api: ApiClient, store: Store, elements: LineageElements, options: LineageOptions) {
    this.api = api;
    this.store = store;
    this.elements = elements;
    this.options = options;
    this.mergeButton = element("button", "small lineage-merge", "Merge…");
    this.mergeButton.type = "button";
    this.mergeButton.title = "Merge the ticked runs into one: opens a merge card (nothing happens until it is approved)";
    this.mergeButton.addEventListener("click", () => this.options.onMerge(this.pickedRuns()));
    this.gateButton = element("button", "small lineage-merge", "Gate…");
    this.gateButton.type = "button";
    this.gateButton.title = "Route among the ticked runs (the generalist and its specialists) with a trained gate: opens a gate card (nothing happens until it is approved)";
    this.gateButton.addEventListener("click", () => this.options.onGate(this.pickedRuns()));
    elements.picks.after(this.mergeButton, " ", this.gateButton);
    this.render();
  }

  get nodes(): readonly LineageNode[] {
    return this.lineage.nodes;
  }

  get edges(): readonly LineageEdge[] {
    return this.lineage.edges;
  }

  /** Read the lineage again; calls while a read is in flight collapse into one more read. */
  refresh(): Promise<void> {
    if (this.reading !== null) {
      this.readAgain = true;
      return this.reading;
    }
    this.reading = this.api
      .lineage()
      .then((lineage) => {
        this.lineage = lineage;
        for (const id of this.picked) if (!lineage.nodes.some((n) => n.id === id)) this.picked.delete(id);
        this.render();
        this.options.onNodes(lineage.nodes);
        this.options.onPick(this.pickedRuns());
      })
      .catch((error: unknown) => this.store.showMessage(`Could not read the lineage: ${String(error)}`))
      .finally(() => {
        this.reading = null;
        if (this.readAgain) {
          this.readAgain = false;
          void this.refresh();
        }
      });
    return this.reading;
  }

  /** Mark the page's run. */
  setCurrent(runId: number | null): void {
    if (runId === this.current) return;
    this.current = runId;
    this.render();
  }

  private pickedRuns(): PickedRun[] {
    return this.lineage.nodes
      .filter((n) => this.picked.has(n.id))
      .map((n) => ({ id: n.id, name: n.name, kind: this.edgeOf(n.id)?.kind ?? null }));
  }

  private edgeOf(child: number): LineageEdge | undefined {
    return this.lineage.edges.find((e) => e.child === child);
  }

  private edgesInto(child: number): LineageEdge[] {
    return this.lineage.edges.filter((e) => e.child === child);
  }

  private toggle(id: number, on = !this.picked.has(id)): void {
    if (on) this.picked.add(id);
    else this.picked.delete(id);
    this.render();
    this.options.onPick(this.pickedRuns());
  }

  private select(node: LineageNode): void {
    const from = originText(this.edgesInto(node.id), (id) => this.nameOf(id));
    setText(this.elements.detail, `${node.name} (run ${node.id}) · ${node.status} · created ${formatClock(node.created)} · ${from}`);
    this.options.onSelect(node.id);
  }

  private nameOf(id: number): string {
    const node = this.lineage.nodes.find((n) => n.id === id);
    return node === undefined ? `run ${id}` : `${node.name} (${id})`;
  }

  private render(): void {
    const { nodes, edges } = this.lineage;
    const graph = this.elements.graph;
    graph.dataset["nodes"] = String(nodes.length);
    graph.dataset["edges"] = String(edges.length);
    this.mergeButton.disabled = this.gateButton.disabled = this.picked.size < 2;
    if (nodes.length === 0) {
      graph.replaceChildren(element("p", "muted", "No runs yet."));
      this.elements.picks.replaceChildren();
      return;
    }
    const layout = layoutLineage(nodes, DEFAULT_LAYOUT, edges);
    const svg = svgElement("svg", { width: layout.width, height: layout.height, viewBox: `0 0 ${layout.width} ${layout.height}`, role: "img" });
    svg.setAttribute("aria-label", `lineage of ${nodes.length} runs`);
    for (const edge of edges) {
      const parent = layout.positions.get(edge.parent);
      const child = layout.positions.get(edge.child);
      if (parent !== undefined && child !== undefined) svg.append(this.edge(edge, parent, child));
    }
    for (const node of nodes) {
      const at = layout.positions.get(node.id);
      if (at !== undefined) svg.append(this.node(node, at));
    }
    graph.replaceChildren(svg, legend(edges));
    this.renderPicks(nodes);
  }

  private edge(edge: LineageEdge, parent: NodePosition, child: NodePosition): SVGGElement {
    const { nodeWidth, nodeHeight } = DEFAULT_LAYOUT;
    const x1 = parent.x + nodeWidth;
    const y1 = parent.y + nodeHeight / 2;
    const x2 = child.x;
    const y2 = child.y + nodeHeight / 2;
    const bend = (x2 - x1) / 2;
    const merge = manyToOne(edge.kind);
    const group = svgElement("g", { class: "lineage-edge" });
    group.dataset["testid"] = "lineage-edge";
    group.dataset["kind"] = edge.kind;
    group.dataset["child"] = String(edge.child);
    group.dataset["parent"] = String(edge.parent);
    const title = svgElement("title", {});
    title.textContent = `${edgeLabel(edge)}: ${this.nameOf(edge.parent)} → ${this.nameOf(edge.child)}${edge.plan_id === null ? "" : ` (card ${edge.plan_id})`}`;
    group.setAttribute("aria-label", title.textContent);
    group.append(title, svgElement("path", { d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}` }));
    // A label sits over the flat end of its curve by the child, where siblings' labels do not
    // meet; a merge's or a mixture's, by each parent instead (its edges all end at the one run).
    const label = merge
      ? svgElement("text", { x: x1 + 8, y: y1 - 6, "text-anchor": "start" })
      : svgElement("text", { x: x2 - 8, y: y2 - 6, "text-anchor": "end" });
    label.textContent = edgeLabel(edge);
    group.append(label);
    return group;
  }

  private node(node: LineageNode, at: NodePosition): SVGGElement {
    const { nodeWidth, nodeHeight } = DEFAULT_LAYOUT;
    const group = svgElement("g", { class: "lineage-node", transform: `translate(${at.x} ${at.y})`, tabindex: 0 });
    group.dataset["testid"] = "lineage-node";
    group.dataset["runId"] = String(node.id);
    group.dataset["status"] = node.status;
    if (node.id === this.current) group.classList.add("current");
    if (this.picked.has(node.id)) group.classList.add("picked");
    const title = svgElement("title", {});
    title.textContent = `${node.name} (run ${node.id}) · ${node.status} — click to show it, shift-click to pick it for comparison`;
    const name = svgElement("text", { x: 10, y: 17, class: "name" });
    name.textContent = node.name.length > NAME_CHARS ? `${node.name.slice(0, NAME_CHARS - 1)}…` : node.name;
    const status = svgElement("text", { x: 10, y: 32, class: "sub" });
    status.textContent = `run ${node.id} · ${node.status}`;
    group.append(title, svgElement("rect", { width: nodeWidth, height: nodeHeight, rx: 6 }), name, status);
    if (this.picked.has(node.id)) {
      const tick = svgElement("text", { x: nodeWidth - 10, y: 17, class: "tick", "text-anchor": "end" });
      tick.textContent = "✓";
      group.append(tick);
    }
    group.addEventListener("click", (event) => (event.shiftKey ? this.toggle(node.id) : this.select(node)));
    group.addEventListener("keydown", (event) => {
      if (event.key === "Enter") this.select(node);
      else if (event.key === " ") {
        event.preventDefault();
        this.toggle(node.id);
      }
    });
    return group;
  }

  /** One tick per run: which to compare. */
  private renderPicks(nodes: readonly LineageNode[]): void {
    this.elements.picks.replaceChildren(
      ...nodes.map((node) => {
        const item = element("li");
        const box = element("input");
        box.type = "checkbox";
        box.id = `pick-run-${node.id}`;
        box.checked = this.picked.has(node.id);
        box.dataset["runId"] = String(node.id);
        box.addEventListener("change", () => this.toggle(node.id, box.checked));
        const label = element("label", "", node.name);
        label.htmlFor = box.id;
        item.append(box, label, element("span", "muted", ` #${node.id}`));
        return item;
      }),
    );
  }
}

/** Which line is which kind of edge: a short sample of each, drawn as the graph draws it. */
function legend(edges: readonly LineageEdge[]): HTMLElement {
  const list = element("ul", "lineage-legend");
  list.dataset["testid"] = "lineage-legend";
  list.setAttribute("aria-label", "edge kinds");
  const present = new Set(edges.map((e) => (e.kind === "resume" ? "fork" : e.kind)));
  for (const { kind, text } of EDGE_KINDS) {
    if (!present.has(kind) && kind !== "fork") continue;
    const item = element("li");
    item.dataset["kind"] = kind;
    const sample = svgElement("svg", { width: 28, height: 10, "aria-hidden": "true" });
    const line = svgElement("g", { class: "lineage-sample" });
    line.dataset["kind"] = kind;
    line.append(svgElement("path", { d: "M 1 5 L 27 5" }));
    sample.append(line);
    item.append(sample, document.createTextNode(text));
    list.append(item);
  }
  return list;
}

function svgElement<K extends keyof SVGElementTagNameMap>(tag: K, attributes: Record<string, string | number>): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}
