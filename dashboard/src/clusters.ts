// Clusters: ask the run to cluster its samples (on their signals, or on the model's embeddings),
// wait for the engine to carry the command out at a step boundary, then draw the clustering's 2-D
// projection coloured by cluster, with a table of the clusters (size, mean loss, top labels) from
// which one can be saved as a slice. On load the run's latest clustering is shown.

import { ApiError, type ApiClient, type Clustering, type ClusterRequest, type RunInfo } from "./api";
import { element, setText } from "./dom";
import { formatCount, formatValue } from "./format";
import type { CommandOutcomes } from "./outcomes";
import { ScatterPlot, groupColor } from "./scatter";
import type { SliceList } from "./slices";
import type { Store } from "./state";
import { showEmpty } from "./tables";

export interface ClusterElements {
  features: HTMLSelectElement;
  subset: HTMLSelectElement;
  k: HTMLInputElement;
  button: HTMLButtonElement;
  /** The scatter's container (it gets data-points). */
  plot: HTMLElement;
  caption: HTMLElement;
  table: HTMLTableElement;
}

/** Clustering embeddings runs the model over the data: give it time. */
const OUTCOME_TIMEOUT_MS = 10 * 60_000;
/** Labels listed per cluster. */
const TOP_LABELS = 3;

export class ClusterView {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly outcomes: CommandOutcomes;
  private readonly slices: SliceList;
  private readonly elements: ClusterElements;
  private readonly scatter: ScatterPlot;
  private runId: number | null = null;
  private possible = false;
  private busy = false;
  private generation = 0;

  constructor(api: ApiClient, store: Store, outcomes: CommandOutcomes, slices: SliceList, elements: ClusterElements) {
    this.api = api;
    this.store = store;
    this.outcomes = outcomes;
    this.slices = slices;
    this.elements = elements;
    this.scatter = new ScatterPlot(elements.plot, { emptyText: "No clustering yet" });
    elements.button.addEventListener("click", () => void this.cluster());
    const head = elements.table.createTHead().insertRow();
    for (const [title, numeric] of [["cluster", false], ["size", true], ["mean loss", true], ["top labels", false], ["", false]] as const) {
      const th = element("th", numeric ? "num" : "", title);
      th.scope = "col";
      head.append(th);
    }
    this.renderTable(null);
    this.update(null);
  }

  /** Show a run's latest clustering, if it has one. */
  async setRun(runId: number): Promise<void> {
    this.runId = runId;
    const generation = ++this.generation;
    try {
      const clusterings = await this.api.clusterings(runId);
      const latest = clusterings[clusterings.length - 1];
      if (generation !== this.generation) return;
      if (latest === undefined) {
        this.scatter.setData({ x: new Float64Array(0), y: new Float64Array(0), group: new Int32Array(0) });
        this.renderTable(null);
        setText(this.elements.caption, "No clustering yet: press Cluster.");
      } else {
        await this.show(latest.id, generation);
      }
    } catch (error) {
      if (generation === this.generation) setText(this.elements.caption, `Could not read the clusterings: ${String(error)}`);
    }
  }

  /** Enable "Cluster" only when the run takes the command now. */
  update(run: RunInfo | null): void {
    this.possible = run?.commands.includes("cluster") ?? false;
    this.elements.button.disabled = this.busy || !this.possible;
  }

  private request(): ClusterRequest | string {
    const features = this.elements.features.value === "embeddings" ? "embeddings" : "signals";
    const subset = this.elements.subset.value === "hard" ? "hard" : "all";
    const text = this.elements.k.value.trim();
    if (text === "") return { features, subset, k: null };
    const k = Number(text);
    return Number.isInteger(k) && k >= 2 && k <= 50 ? { features, subset, k } : "k is a whole number from 2 to 50 (or empty: chosen by silhouette).";
  }

  private async cluster(): Promise<void> {
    const runId = this.runId;
    const request = this.request();
    if (runId === null) return;
    if (typeof request === "string") {
      this.store.showMessage(request);
      return;
    }
    this.setBusy(true);
    setText(this.elements.caption, "Clustering… (the run does it at its next step boundary)");
    try {
      const accepted = await this.api.cluster(runId, request);
      const outcome = await this.outcomes.wait(runId, accepted.id, OUTCOME_TIMEOUT_MS);
      if (!outcome.applied) {
        setText(this.elements.caption, `Clustering rejected: ${outcome.reason}`);
        return;
      }
      const id = outcome.result["clustering"];
      if (typeof id !== "number") {
        setText(this.elements.caption, "The run clustered, but did not say which clustering it saved.");
        return;
      }
      await this.show(id, ++this.generation);
    } catch (error) {
      const text = error instanceof ApiError ? error.message : `Could not cluster: ${String(error)}`;
      setText(this.elements.caption, text);
      this.store.showMessage(text);
    } finally {
      this.setBusy(false);
    }
  }

  private setBusy(busy: boolean): void {
    this.busy = busy;
    this.elements.button.disabled = busy || !this.possible;
    this.elements.button.textContent = busy ? "Clustering…" : "Cluster";
  }

  private async show(id: number, generation: number): Promise<void> {
    const clustering = await this.api.clustering(id);
    if (generation !== this.generation) return;
    const points = clustering.points;
    this.scatter.setData({
      x: Float64Array.from(points?.x ?? []),
      y: Float64Array.from(points?.y ?? []),
      group: Int32Array.from(points?.cluster ?? []),
    });
    this.elements.plot.dataset["clustering"] = String(clustering.id);
    this.renderTable(clustering);
    setText(this.elements.caption, caption(clustering));
  }

  private renderTable(clustering: Clustering | null): void {
    const body = this.elements.table.tBodies[0] ?? this.elements.table.createTBody();
    if (clustering === null || clustering.clusters.length === 0) {
      showEmpty(body, "No clusters yet.", 5);
      return;
    }
    body.replaceChildren(
      ...clustering.clusters.map((summary) => {
        const tr = element("tr");
        tr.dataset["cluster"] = String(summary.cluster);
        const name = element("td", "cluster-name");
        const swatch = element("span", "swatch");
        swatch.style.background = groupColor(summary.cluster);
        name.append(swatch, ` ${summary.cluster}`);
        const labels = Object.entries(summary.labels)
          .sort((a, b) => b[1] - a[1])
          .slice(0, TOP_LABELS)
          .map(([label, count]) => `${label}: ${formatCount(count)}`)
          .join(", ");
        const save = element("button", "small", "Save as slice");
        save.type = "button";
        save.setAttribute("aria-label", `Save cluster ${summary.cluster} as slice`);
        save.addEventListener("click", () => {
          save.disabled = true;
          void this.slices
            .save({
              name: `clustering ${clustering.id} cluster ${summary.cluster}`,
              run_id: clustering.run_id,
              definition: { kind: "cluster", clustering: clustering.id, cluster: summary.cluster },
            })
            .finally(() => (save.disabled = false));
        });
        const action = element("td", "actions");
        action.append(save);
        tr.append(name, element("td", "num", formatCount(summary.size)), element("td", "num", formatValue(summary.mean_loss)), element("td", "", labels || "—"), action);
        // Pointing at a cluster's row brings its points forward in the scatter.
        tr.addEventListener("mouseenter", () => this.scatter.setHighlight(summary.cluster));
        tr.addEventListener("mouseleave", () => this.scatter.setHighlight(null));
        return tr;
      }),
    );
  }
}

/** "clustering 3 · epoch 12 · signals · k 4 (silhouette) · silhouette 0.41 · 5,000 of 8,000 points". */
function caption(clustering: Clustering): string {
  const parts = [`clustering ${clustering.id}`];
  if (clustering.epoch !== null) parts.push(`epoch ${clustering.epoch}`);
  parts.push(clustering.layer ? `${clustering.features} (${clustering.layer})` : clustering.features);
  if (clustering.subset === "hard") parts.push("hard samples");
  parts.push(`k ${clustering.k}${clustering.chosen_by ? ` (${clustering.chosen_by})` : ""}`);
  if (clustering.silhouette !== null) parts.push(`silhouette ${formatValue(clustering.silhouette)}`);
  const total = clustering.clusters.reduce((sum, c) => sum + c.size, 0);
  const shown = clustering.points?.index.length ?? 0;
  parts.push(shown < total ? `${formatCount(shown)} of ${formatCount(total)} points shown` : `${formatCount(shown)} points`);
  return parts.join(" · ");
}
