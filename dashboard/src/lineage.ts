// The lineage: the session's runs as a tree, drawn as inline SVG, layered by parent from left to
// right (a run's children in the column after it), each edge labelled with its kind (fork,
// control, resume) and the parent's step, each run coloured by its status. A click on a run makes
// it the page's run (its curves, distribution, samples); shift-click, or the ticks under the
// graph, pick runs to compare. Read from GET /api/lineage, again when runs appear or change.

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
  /** Depth from its root: 0 for a run without a parent. */
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
 *  parent that is not in the list (or a loop, which a lineage never has) makes a run a root. */
export function layoutLineage(nodes: readonly Pick<LineageNode, "id" | "parent_id">[], options: LayoutOptions = DEFAULT_LAYOUT): LineageLayout {
  const ids = new Set(nodes.map((n) => n.id));
  const children = new Map<number, number[]>();
  const roots: number[] = [];
  for (const node of [...nodes].sort((a, b) => a.id - b.id)) {
    const parent = node.parent_id;
    if (parent !== null && parent !== node.id && ids.has(parent)) children.set(parent, [...(children.get(parent) ?? []), node.id]);
    else roots.push(node.id);
  }
  const positions = new Map<number, NodePosition>();
  let rows = 0;
  let layers = 0;
  const place = (id: number, layer: number): number => {
    const kids = (children.get(id) ?? []).filter((kid) => !positions.has(kid));
    positions.set(id, { id, layer, row: 0, x: 0, y: 0 }); // marked before the children: a loop stops here
    const kidRows = kids.map((kid) => place(kid, layer + 1));
    const row = kidRows.length === 0 ? rows++ : (kidRows[0]! + kidRows[kidRows.length - 1]!) / 2;
    layers = Math.max(layers, layer + 1);
    positions.set(id, { id, layer, row, x: options.margin + layer * options.columnWidth, y: options.margin + row * options.rowHeight });
    return row;
  };
  for (const root of roots) place(root, 0);
  // Runs caught in a loop were never reached from a root: each starts its own tree.
  for (const node of nodes) if (!positions.has(node.id)) place(node.id, 0);
  return {
    positions,
    width: layers === 0 ? 0 : 2 * options.margin + (layers - 1) * options.columnWidth + options.nodeWidth,
    height: rows === 0 ? 0 : 2 * options.margin + (rows - 1) * options.rowHeight + options.nodeHeight,
  };
}

/** An edge's label: "fork · step 1,200", "control · step 1,200", "resume". */
export function edgeLabel(edge: Pick<LineageEdge, "kind" | "step">): string {
  return edge.step === null ? edge.kind : `${edge.kind} · step ${formatCount(edge.step)}`;
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

  constructor(api: ApiClient, store: Store, elements: LineageElements, options: LineageOptions) {
    this.api = api;
    this.store = store;
    this.elements = elements;
    this.options = options;
    this.render();
  }

  get nodes(): readonly LineageNode[] {
    return this.lineage.nodes;
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

  private toggle(id: number, on = !this.picked.has(id)): void {
    if (on) this.picked.add(id);
    else this.picked.delete(id);
    this.render();
    this.options.onPick(this.pickedRuns());
  }

  private select(node: LineageNode): void {
    const edge = this.edgeOf(node.id);
    const from = edge === undefined ? "no parent" : `${edgeLabel(edge)} of ${this.nameOf(edge.parent)}${edge.checkpoint_id === null ? "" : ` (checkpoint ${edge.checkpoint_id})`}${edge.plan_id === null ? "" : ` · card ${edge.plan_id}`}`;
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
    if (nodes.length === 0) {
      graph.replaceChildren(element("p", "muted", "No runs yet."));
      this.elements.picks.replaceChildren();
      return;
    }
    const layout = layoutLineage(nodes);
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
    graph.replaceChildren(svg);
    this.renderPicks(nodes);
  }

  private edge(edge: LineageEdge, parent: NodePosition, child: NodePosition): SVGGElement {
    const { nodeWidth, nodeHeight } = DEFAULT_LAYOUT;
    const x1 = parent.x + nodeWidth;
    const y1 = parent.y + nodeHeight / 2;
    const x2 = child.x;
    const y2 = child.y + nodeHeight / 2;
    const bend = (x2 - x1) / 2;
    const group = svgElement("g", { class: "lineage-edge" });
    group.dataset["kind"] = edge.kind;
    group.dataset["child"] = String(edge.child);
    group.dataset["parent"] = String(edge.parent);
    group.append(svgElement("path", { d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}` }));
    // The label sits over the flat end of the curve, by its child, where labels of siblings do not meet.
    const label = svgElement("text", { x: x2 - 8, y: y2 - 6, "text-anchor": "end" });
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

function svgElement<K extends keyof SVGElementTagNameMap>(tag: K, attributes: Record<string, string | number>): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}
