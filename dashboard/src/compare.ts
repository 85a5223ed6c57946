// Compare runs: the runs picked in the lineage, evaluated paired on saved slices, validation and
// test against a reference run. "Compare" posts the command to a live training process (it
// needs the models); its outcome (`command_applied` with the comparison's id, or a rejection)
// says when the table is stored, and GET /api/comparisons/{id} gives it. The table: one row per
// run, one column per set; a cell gives n, accuracy and loss, and for a run other than the
// reference the accuracy difference in points with its paired-bootstrap interval, McNemar's p and
// the samples fixed and broken, or the note saying why there is no interval. On load, and when a
// comparison arrives that this page did not ask for, the newest one is shown.

import { ApiError, type ApiClient, type CompareArgs, type ComparisonOut, type SliceInfo } from "./api";
import { element, setText } from "./dom";
import { formatCount, formatPercent, formatSigned, formatValue } from "./format";
import { CompareArgsSchema } from "./generated/schemas";
import type { PickedRun } from "./lineage";
import type { CommandOutcomes } from "./outcomes";
import { showEmpty } from "./tables";

/** Evaluating several models on large sets takes a while. */
const OUTCOME_TIMEOUT_MS = 10 * 60_000;
/** The sets besides the saved slices. */
const SPLITS = ["val", "test"] as const;

// ---- a comparison's table, read and written in words (pure) ---------------------------------

export interface Difference {
  value: number;
  low: number | null;
  high: number | null;
}

export interface Cell {
  run: string;
  set: string;
  n: number | null;
  accuracy: number | null;
  loss: number | null;
  /** Against the reference (null in the reference's own row). */
  diff: { accuracy: Difference | null; loss: Difference | null; note: string | null } | null;
  mcnemarP: number | null;
  fixed: number | null;
  broken: number | null;
}

export interface ComparisonTable {
  reference: string;
  runs: string[];
  sets: string[];
  confidence: number | null;
  nBoot: number | null;
  names: Record<string, string>;
  cells: Map<string, Cell>;
}

export const cellKey = (run: string, set: string): string => `${run}\u0000${set}`;

// TODO(generated): the server's ComparisonOut declares `result` as a plain object (its shape is
// documented in actions/compare.py); once it declares the model, the schema types it and this goes.
export function readComparison(result: ComparisonOut["result"]): ComparisonTable | null {
  const reference = result["reference"];
  if (typeof reference !== "string" || !Array.isArray(result["cells"])) return null;
  const cells = new Map<string, Cell>();
  for (const raw of result["cells"]) {
    if (!isRecord(raw) || typeof raw["run"] !== "string" || typeof raw["set"] !== "string") continue;
    const diff = isRecord(raw["diff"]) ? raw["diff"] : null;
    const mcnemar = isRecord(raw["mcnemar"]) ? raw["mcnemar"] : null;
    cells.set(cellKey(raw["run"], raw["set"]), {
      run: raw["run"],
      set: raw["set"],
      n: finite(raw["n"]),
      accuracy: finite(raw["accuracy"]),
      loss: finite(raw["loss"]),
      diff: diff === null ? null : { accuracy: difference(diff["accuracy"]), loss: difference(diff["loss"]), note: typeof diff["interval_note"] === "string" ? diff["interval_note"] : null },
      mcnemarP: mcnemar === null ? null : finite(mcnemar["p"]),
      fixed: Array.isArray(raw["fixed"]) ? raw["fixed"].length : null,
      broken: Array.isArray(raw["broken"]) ? raw["broken"].length : null,
    });
  }
  const names = isRecord(result["names"]) ? result["names"] : {};
  return {
    reference,
    runs: strings(result["runs"]),
    sets: strings(result["sets"]),
    confidence: finite(result["confidence"]),
    nBoot: finite(result["n_boot"]),
    names: Object.fromEntries(Object.entries(names).filter((e): e is [string, string] => typeof e[1] === "string")),
    cells,
  };
}

/** An accuracy difference in points with its interval: "+3.1 pt [+0.4, +5.9]"; without an
 *  interval, the value alone: "+3.1 pt". */
export function formatAccuracyDiff(diff: Difference): string {
  const points = (v: number) => formatSigned(v * 100);
  const interval = diff.low !== null && diff.high !== null ? ` [${points(diff.low)}, ${points(diff.high)}]` : "";
  return `${points(diff.value)} pt${interval}`;
}

/** A loss difference with its interval: "-0.012 [-0.02, -0.004]". */
export function formatLossDiff(diff: Difference): string {
  const interval = diff.low !== null && diff.high !== null ? ` [${signedValue(diff.low)}, ${signedValue(diff.high)}]` : "";
  return `${signedValue(diff.value)}${interval}`;
}

/** McNemar's p: "p < 0.001", "p = 0.031", "p = 1". */
export function formatP(p: number | null): string {
  if (p === null) return "p —";
  return p < 0.001 ? "p < 0.001" : `p = ${Number(p.toPrecision(2))}`;
}

/** A cell's lines, each tagged with what it shows (tests and tools find them by it). */
export function cellLines(cell: Cell): [field: string, text: string][] {
  const lines: [string, string][] = [["summary", `n ${formatCount(cell.n)} · acc ${formatPercent(cell.accuracy)} · loss ${formatValue(cell.loss)}`]];
  const diff = cell.diff;
  if (diff === null) return lines;
  if (diff.accuracy !== null) lines.push(["diff", formatAccuracyDiff(diff.accuracy)]);
  if (diff.loss !== null) lines.push(["loss-diff", `loss ${formatLossDiff(diff.loss)}`]);
  if (diff.note !== null) lines.push(["note", diff.note]);
  if (cell.mcnemarP !== null || cell.fixed !== null) {
    lines.push(["mcnemar", `McNemar ${formatP(cell.mcnemarP)} · fixed ${formatCount(cell.fixed)} · broken ${formatCount(cell.broken)}`]);
  }
  return lines;
}

function signedValue(value: number): string {
  return value > 0 ? `+${formatValue(value)}` : formatValue(value);
}

function difference(value: unknown): Difference | null {
  if (!isRecord(value)) return null;
  const v = finite(value["value"]);
  return v === null ? null : { value: v, low: finite(value["low"]), high: finite(value["high"]) };
}

// ---- the panel -----------------------------------------------------------------------------------

export interface CompareElements {
  runs: HTMLElement;
  reference: HTMLSelectElement;
  sets: HTMLElement;
  button: HTMLButtonElement;
  caption: HTMLElement;
  table: HTMLTableElement;
}

export class CompareView {
  private readonly api: ApiClient;
  private readonly outcomes: CommandOutcomes;
  private readonly elements: CompareElements;
  private readonly slices: () => readonly SliceInfo[];
  private picked: PickedRun[] = [];
  private readonly chosenSets = new Set<string>(["val"]);
  private waiting = false;
  private generation = 0;
  /** The reference was chosen by hand: kept while it is picked. */
  private referenceChosen = false;

  constructor(api: ApiClient, outcomes: CommandOutcomes, elements: CompareElements, slices: () => readonly SliceInfo[]) {
    this.api = api;
    this.outcomes = outcomes;
    this.elements = elements;
    this.slices = slices;
    elements.button.addEventListener("click", () => void this.compare());
    elements.reference.addEventListener("change", () => (this.referenceChosen = true));
    this.setPicked([]);
    this.slicesChanged();
    this.renderTable(null, "No comparison yet.");
  }

  /** Show the session's newest comparison, if it has one. */
  async start(): Promise<void> {
    try {
      const all = await this.api.comparisons();
      const newest = all[all.length - 1];
      if (newest !== undefined && !this.waiting) this.show(newest);
    } catch (error) {
      setText(this.elements.caption, `Could not read the comparisons: ${String(error)}`);
    }
  }

  /** A comparison was stored: show it, unless this page is waiting for its own. */
  onComparison(id: number): void {
    if (!this.waiting) void this.load(id);
  }

  /** Show a stored comparison (a fork card's own judging, from its row), and bring it into view. */
  async showComparison(id: number): Promise<void> {
    await this.load(id);
    this.elements.table.scrollIntoView({ block: "nearest" });
  }

  setPicked(runs: PickedRun[]): void {
    this.picked = runs;
    const previous = this.elements.reference.value;
    // The default reference: a matched control when one is picked (what a specialist is judged
    // against), else the first run picked.
    const preferred = runs.find((r) => r.kind === "control") ?? runs[0];
    const keep = this.referenceChosen && runs.some((r) => String(r.id) === previous);
    this.referenceChosen = keep;
    this.elements.reference.replaceChildren(...runs.map((r) => new Option(`${r.name} (${r.id})`, String(r.id))));
    this.elements.reference.value = keep ? previous : String(preferred?.id ?? "");
    setText(this.elements.runs, runs.length === 0 ? "Tick two or more runs in the lineage to compare them." : runs.map((r) => `${r.name} (${r.id})`).join(" · "));
    this.elements.runs.dataset["count"] = String(runs.length);
    this.update();
  }

  /** The sets to choose from: the saved slices, validation, test; ticks kept. */
  slicesChanged(): void {
    const names = [...this.slices().map((s) => s.name), ...SPLITS];
    for (const chosen of [...this.chosenSets]) if (!names.includes(chosen)) this.chosenSets.delete(chosen);
    this.elements.sets.replaceChildren(
      ...names.map((name, i) => {
        const box = element("input");
        box.type = "checkbox";
        box.id = `compare-set-${i}`;
        box.value = name;
        box.checked = this.chosenSets.has(name);
        box.addEventListener("change", () => {
          if (box.checked) this.chosenSets.add(name);
          else this.chosenSets.delete(name);
          this.update();
        });
        const label = element("label", "", name);
        label.htmlFor = box.id;
        const item = element("span", "compare-set");
        item.append(box, label);
        return item;
      }),
    );
    this.update();
  }

  private update(): void {
    this.elements.button.disabled = this.waiting || this.picked.length < 2 || this.chosenSets.size === 0;
    this.elements.button.textContent = this.waiting ? "Comparing…" : "Compare";
  }

  private async compare(): Promise<void> {
    this.waiting = true;
    this.update();
    try {
      const args: CompareArgs = {
        runs: this.picked.map((r) => r.id),
        reference: Number(this.elements.reference.value),
        sets: [...this.slices().map((s) => s.name), ...SPLITS].filter((name) => this.chosenSets.has(name)),
        n_boot: defaultOf("n_boot"),
        seed: defaultOf("seed"),
      };
      const carrier = await this.carrier(args.runs);
      if (carrier === null) {
        setText(this.elements.caption, "No training process can compare runs now: a comparison needs a live run (training, paused or idle) to evaluate the models.");
        return;
      }
      setText(this.elements.caption, `Comparing… (run ${carrier} evaluates the models at its next step boundary)`);
      const accepted = await this.api.compare(carrier, args);
      const outcome = await this.outcomes.wait(carrier, accepted.id, OUTCOME_TIMEOUT_MS);
      if (!outcome.applied) {
        setText(this.elements.caption, `Comparison rejected: ${outcome.reason}`);
        return;
      }
      const id = outcome.result["comparison"];
      if (typeof id !== "number") {
        setText(this.elements.caption, "The run compared, but did not say which comparison it saved.");
        return;
      }
      await this.load(id);
    } catch (error) {
      setText(this.elements.caption, error instanceof ApiError ? error.message : `Could not compare: ${String(error)}`);
    } finally {
      this.waiting = false;
      this.update();
    }
  }

  /** The run whose training process carries the comparison out: a live one that takes the
   *  command, among the picked runs if one is, else any (a fork's parent evaluates its children). */
  private async carrier(picked: readonly number[]): Promise<number | null> {
    const session = await this.api.session();
    const able = session.runs.filter((r) => r.live && r.commands.includes("compare"));
    return (able.find((r) => picked.includes(r.id)) ?? able[0])?.id ?? null;
  }

  private async load(id: number): Promise<void> {
    const generation = ++this.generation;
    try {
      const comparison = await this.api.comparison(id);
      if (generation === this.generation) this.show(comparison);
    } catch (error) {
      if (generation === this.generation) setText(this.elements.caption, `Could not read comparison ${id}: ${String(error)}`);
    }
  }

  private show(comparison: ComparisonOut): void {
    const table = readComparison(comparison.result);
    if (table === null) {
      this.renderTable(null, `Comparison ${comparison.id} has no table this page can read.`);
      return;
    }
    this.elements.table.dataset["comparison"] = String(comparison.id);
    setText(this.elements.caption, comparisonCaption(comparison.id, table));
    this.renderTable(table, "");
  }

  private renderTable(table: ComparisonTable | null, empty: string): void {
    renderComparison(this.elements.table, table, empty);
  }
}

/** What a comparison's table shows, in words: its id, reference, and how differences read. */
export function comparisonCaption(id: number, table: ComparisonTable): string {
  const confidence = table.confidence === null ? "" : `${Math.round(table.confidence * 100)}% `;
  const resamples = table.nBoot === null ? "" : `, ${formatCount(table.nBoot)} resamples`;
  return `comparison ${id} · reference ${nameOf(table, table.reference)} · differences are run − reference, accuracy in points, with ${confidence}paired-bootstrap intervals${resamples}`;
}

/** A comparison as a table: one row per run (the reference tagged), one column per set; `empty`
 *  in its place when there is none. The compare panel and a merge card's preview both show one. */
export function renderComparison(t: HTMLTableElement, table: ComparisonTable | null, empty: string): void {
  t.tHead?.remove();
  const body = t.tBodies[0] ?? t.createTBody();
  if (table === null) {
    delete t.dataset["comparison"];
    showEmpty(body, empty, 1);
    return;
  }
  const head = t.createTHead().insertRow();
  head.append(headCell("run"), ...table.sets.map((set) => headCell(set)));
  body.replaceChildren(
    ...table.runs.map((run) => {
      const tr = element("tr");
      tr.dataset["run"] = run;
      const name = element("th", "compare-run", nameOf(table, run));
      name.scope = "row";
      if (run === table.reference) name.append(element("span", "tag", "reference"));
      tr.append(name);
      for (const set of table.sets) tr.append(comparisonCell(table.cells.get(cellKey(run, set)), run, set));
      return tr;
    }),
  );
}

function comparisonCell(cell: Cell | undefined, run: string, set: string): HTMLTableCellElement {
  const td = element("td", "compare-cell");
  td.dataset["testid"] = "comparison-cell";
  td.dataset["run"] = run;
  td.dataset["set"] = set;
  if (cell === undefined) {
    td.textContent = "—";
    return td;
  }
  for (const [field, text] of cellLines(cell)) {
    const line = element("div", `line line-${field}`, text);
    line.dataset["field"] = field;
    if (field === "diff" && cell.diff?.accuracy) line.dataset["tone"] = tone(cell.diff.accuracy);
    td.append(line);
  }
  return td;
}

/** An interval above zero is a gain, below zero a loss; one across zero says nothing either way. */
function tone(diff: Difference): string {
  if (diff.low === null || diff.high === null) return "unsure";
  return diff.low > 0 ? "good" : diff.high < 0 ? "bad" : "unsure";
}

/** "baseline (1)"; a run without a name as "run 4"; a label as is (a fork's own judging compares
 *  "parent", "specialist" and "control"). */
function nameOf(table: ComparisonTable, run: string): string {
  const name = table.names[run];
  if (name !== undefined) return `${name} (${run})`;
  return /^\d+$/.test(run) ? `run ${run}` : run;
}

function headCell(text: string): HTMLTableCellElement {
  const th = element("th", "", text);
  th.scope = "col";
  return th;
}

/** A default of the command's own schema (the server's CompareArgs). */
function defaultOf(field: "n_boot" | "seed"): number {
  const value = CompareArgsSchema.properties?.[field]?.default;
  if (typeof value !== "number") throw new Error(`the server's CompareArgs gives no default for ${field}`);
  return value;
}

function strings(value: unknown): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === "string") : [];
}

function finite(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
