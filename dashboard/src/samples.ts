// The per-sample table: one page of one epoch's samples with their signals (loss, margin,
// confidence, gradient norm) and training dynamics (AUM, forgetting events, cartography), sorted by
// any column and filtered by flag or label, each row flagged "hard" or "mislabelled" by the
// server's rule. Clicking a row shows that sample's history.
//
// The table follows the epoch the distribution shows. An epoch's table is written when the epoch
// ends, so while one is in progress (the server's `live_epoch`) the caption says so, marked live,
// and an empty table says when it will fill, instead of looking empty or current.
//
// Reading it costs the server a pass over every epoch's values, so while it follows the newest
// epoch it re-reads at most every few seconds; what the user asks for (a sort, a filter, a page,
// an older epoch) is read at once.

import type { ApiClient, SampleQuery, SampleRow, SampleSort, SampleTable } from "./api";
import { element, setText } from "./dom";
import { formatCount, formatValue } from "./format";
import { showEmpty } from "./tables";

export interface SampleTableElements {
  table: HTMLTableElement;
  caption: HTMLElement;
  /** "all", "hard" or "mislabelled". */
  show: HTMLSelectElement;
  label: HTMLInputElement;
  previous: HTMLButtonElement;
  next: HTMLButtonElement;
  range: HTMLElement;
}

export interface SampleTableOptions {
  /** Rows per page. */
  pageSize?: number;
  /** Least time between two reads made while following the newest epoch. */
  followIntervalMs?: number;
  /** Called when a row is chosen (click or Enter). */
  onPick?: (runId: number, row: SampleRow) => void;
  /** Called with every table read (its flag counts, say). */
  onLoaded?: (table: SampleTable) => void;
}

interface SampleColumn {
  title: string;
  /** What the header's tooltip says. */
  hint?: string;
  sort: SampleSort | null;
  cell: (row: SampleRow) => string;
  numeric: boolean;
}

const optional = (value: number | null): string => (value === null || value < 0 ? "—" : String(value));

const COLUMNS: SampleColumn[] = [
  { title: "index", sort: "index", cell: (row) => String(row.index), numeric: true },
  { title: "label", sort: "label", cell: (row) => optional(row.label), numeric: true },
  { title: "prediction", sort: "pred", cell: (row) => optional(row.pred), numeric: true },
  { title: "loss", sort: "loss", cell: (row) => formatValue(row.loss), numeric: true },
  { title: "margin", sort: "margin", cell: (row) => formatValue(row.margin), numeric: true, hint: "labelled class's logit minus the largest other" },
  { title: "confidence", sort: "confidence", cell: (row) => formatValue(row.confidence), numeric: true, hint: "probability given to the labelled class at this epoch" },
  { title: "AUM", sort: "aum", cell: (row) => formatValue(row.aum), numeric: true, hint: "area under the margin: the mean margin over epochs (low: likely mislabelled)" },
  { title: "forgetting", sort: "forgetting", cell: (row) => String(row.forgetting), numeric: true, hint: "forgetting events: right at one epoch, wrong at the next" },
  { title: "mean confidence", sort: "confidence_mean", cell: (row) => formatValue(row.confidence_mean), numeric: true, hint: "dataset cartography: mean confidence over epochs" },
  { title: "variability", sort: "variability", cell: (row) => formatValue(row.variability), numeric: true, hint: "dataset cartography: standard deviation of the confidence over epochs" },
  { title: "grad norm", sort: "grad_norm", cell: (row) => formatValue(row.grad_norm), numeric: true, hint: "per-sample gradient norm" },
];

const DEFAULTS = { pageSize: 50, followIntervalMs: 5000 };

export class SamplesTable {
  private readonly api: ApiClient;
  private readonly elements: SampleTableElements;
  private readonly options: Required<Omit<SampleTableOptions, "onPick" | "onLoaded">> &
    Pick<SampleTableOptions, "onPick" | "onLoaded">;
  private readonly headers = new Map<SampleSort, HTMLTableCellElement>();
  private runId: number | null = null;
  /** The newest complete epoch when the table was last asked for: while following, a read is
   *  needed only when it moves. */
  private newestComplete: number | null = null;
  private query: SampleQuery;
  private shown: SampleTable | null = null;
  private generation = 0;
  private loading = false;
  private loadAgain = false;
  private lastRead = 0;
  private followTimer: number | undefined;
  private labelTimer: number | undefined;

  constructor(api: ApiClient, elements: SampleTableElements, options: SampleTableOptions = {}) {
    this.api = api;
    this.elements = elements;
    this.options = { ...DEFAULTS, ...options };
    this.query = { epoch: null, sort: "loss", order: "desc", flag: null, label: null, limit: this.options.pageSize, offset: 0 };
    this.buildHead();
    this.renderBody([], NOTHING_YET);
    elements.show.addEventListener("change", () => {
      const value = elements.show.value;
      this.change({ flag: value === "hard" || value === "mislabelled" ? value : null });
    });
    elements.label.addEventListener("input", () => {
      // Typing "12" should read once, not for "1" and then "12".
      window.clearTimeout(this.labelTimer);
      this.labelTimer = window.setTimeout(() => this.change({ label: this.labelFilter() }), 300);
    });
    elements.previous.addEventListener("click", () => this.page(-1));
    elements.next.addEventListener("click", () => this.page(1));
    this.renderPager();
  }

  /** Show a run's samples at `epoch` (null: the newest complete epoch, re-read as epochs end);
   *  `newestComplete` is that epoch as the caller knows it. */
  show(runId: number, epoch: number | null, newestComplete: number | null): void {
    const switching = runId !== this.runId;
    const moved = epoch !== this.query.epoch;
    if (!switching && !moved && newestComplete === this.newestComplete) return; // nothing new
    this.newestComplete = newestComplete;
    this.runId = runId;
    this.query = { ...this.query, epoch, offset: switching || moved ? 0 : this.query.offset };
    if (switching || moved) this.loadNow();
    else this.loadSoon();
  }

  private change(patch: Partial<SampleQuery>): void {
    this.query = { ...this.query, ...patch, offset: 0 };
    this.loadNow();
  }

  private page(direction: -1 | 1): void {
    const offset = this.query.offset + direction * this.query.limit;
    if (offset < 0 || (this.shown !== null && offset >= this.shown.total)) return;
    this.query = { ...this.query, offset };
    this.loadNow();
  }

  private sortBy(sort: SampleSort): void {
    // The same column again turns the order round; a new one starts with its largest values.
    const order = sort === this.query.sort ? (this.query.order === "desc" ? "asc" : "desc") : "desc";
    this.query = { ...this.query, sort, order, offset: 0 };
    this.renderHead();
    this.loadNow();
  }

  private labelFilter(): number | null {
    const value = this.elements.label.valueAsNumber;
    return this.elements.label.value.trim() === "" || !Number.isInteger(value) ? null : value;
  }

  private loadNow(): void {
    window.clearTimeout(this.followTimer);
    this.followTimer = undefined;
    void this.load();
  }

  /** A read while following the newest epoch: at most one per `followIntervalMs`. */
  private loadSoon(): void {
    if (this.followTimer !== undefined) return;
    const wait = Math.max(0, this.lastRead + this.options.followIntervalMs - performance.now());
    this.followTimer = window.setTimeout(() => {
      this.followTimer = undefined;
      void this.load();
    }, wait);
  }

  /** One read at a time: a request made during one becomes one more read, of the latest query. */
  private async load(): Promise<void> {
    if (this.runId === null) return;
    if (this.loading) {
      this.loadAgain = true;
      return;
    }
    const runId = this.runId;
    const query = this.query;
    const generation = ++this.generation;
    this.loading = true;
    this.lastRead = performance.now();
    this.elements.table.setAttribute("aria-busy", "true");
    try {
      const result = await this.api.samples(runId, query);
      // A query changed meanwhile has its own read coming: this answer is stale. Compared by
      // value: while following the newest epoch, new epochs re-issue the same query, and on a busy
      // machine every answer would otherwise be dropped for the next one, and nothing shown.
      if (runId === this.runId && sameQuery(query, this.query)) this.render(runId, result);
    } catch (error) {
      if (generation === this.generation) setText(this.elements.caption, `Could not load the samples: ${String(error)}`);
    } finally {
      this.loading = false;
      this.elements.table.removeAttribute("aria-busy");
      if (this.loadAgain) {
        this.loadAgain = false;
        void this.load();
      }
    }
  }

  private render(runId: number, result: SampleTable): void {
    this.shown = result;
    const filtered = this.query.flag !== null || this.query.label !== null;
    this.renderBody(result.rows, emptyText(result, filtered), runId);
    this.elements.table.dataset["epoch"] = result.epoch === null ? "" : String(result.epoch);
    this.elements.table.dataset["total"] = String(result.total);
    this.elements.table.dataset["liveEpoch"] = String(liveEpochOf(result) ?? "");
    this.elements.caption.replaceChildren(...describe(result));
    this.options.onLoaded?.(result);
    this.renderPager();
  }

  private buildHead(): void {
    const head = this.elements.table.createTHead().insertRow();
    for (const column of COLUMNS) {
      const th = element("th", column.numeric ? "num" : "");
      th.scope = "col";
      if (column.hint) th.title = column.hint;
      if (column.sort === null) {
        th.textContent = column.title;
      } else {
        const sort = column.sort;
        const button = element("button", "sort", column.title);
        button.type = "button";
        button.addEventListener("click", () => this.sortBy(sort));
        th.append(button);
        this.headers.set(sort, th);
      }
      head.append(th);
    }
    const flags = element("th", "", "flags");
    flags.scope = "col";
    flags.title = "hard: high loss at this epoch; mislabelled: likely mislabelled (see the rules above)";
    head.append(flags);
    this.renderHead();
  }

  /** aria-sort on the sorted column's header says which way; the others say "none". */
  private renderHead(): void {
    for (const [sort, th] of this.headers) {
      const sorted = sort === this.query.sort;
      th.setAttribute("aria-sort", sorted ? (this.query.order === "desc" ? "descending" : "ascending") : "none");
      th.classList.toggle("sorted", sorted);
    }
  }

  private renderBody(rows: readonly SampleRow[], empty: string, runId: number | null = null): void {
    const body = this.elements.table.tBodies[0] ?? this.elements.table.createTBody();
    if (rows.length === 0) {
      showEmpty(body, empty, COLUMNS.length + 1);
      return;
    }
    body.replaceChildren(...rows.map((row) => this.rowElement(row, runId)));
  }

  private rowElement(row: SampleRow, runId: number | null): HTMLTableRowElement {
    const tr = element("tr");
    tr.dataset["index"] = String(row.index);
    for (const column of COLUMNS) {
      const td = element("td", column.numeric ? "num" : "", column.cell(row));
      if (column.sort === "pred" && row.correct === false) td.classList.add("wrong");
      tr.append(td);
    }
    const flags = element("td", "flags");
    if (row.mislabelled) flags.append(element("span", "flag flag-mislabelled", "mislabelled"));
    if (row.hard) flags.append(element("span", "flag flag-hard", "hard"));
    // A curation card dropped or reweighted it (its loss weighs `weight` in training now).
    if (row.weight === 0) flags.append(element("span", "flag flag-dropped", "dropped"));
    else if (row.weight != null && row.weight !== 1) flags.append(element("span", "flag flag-reweighted", `×${row.weight}`));
    tr.append(flags);
    const pick = this.options.onPick;
    if (pick !== undefined && runId !== null) {
      tr.tabIndex = 0;
      tr.classList.add("pickable");
      tr.title = `Show sample ${row.index}'s history`;
      tr.addEventListener("click", () => pick(runId, row));
      tr.addEventListener("keydown", (event) => {
        if (event.key === "Enter") pick(runId, row);
      });
    }
    return tr;
  }

  private renderPager(): void {
    const total = this.shown?.total ?? 0;
    const { offset, limit } = this.query;
    const last = Math.min(total, offset + limit);
    setText(this.elements.range, total === 0 ? "" : `${formatCount(offset + 1)}–${formatCount(last)} of ${formatCount(total)}`);
    this.elements.previous.disabled = offset === 0;
    this.elements.next.disabled = last >= total;
  }
}

const NOTHING_YET = "No per-sample losses recorded yet.";

function liveEpochOf(result: SampleTable): number | null {
  return result.live_epoch ?? null;
}

/** What the table says about the epoch in progress, when it shows an older one (or none yet). */
export function liveNotice(result: SampleTable): string | null {
  const live = liveEpochOf(result);
  if (live === null || (result.epoch !== null && result.epoch >= live)) return null;
  return `Epoch ${live} is in progress: its per-sample table fills when the epoch ends.`;
}

/** The row an empty table shows: when its table will fill, or that the filters match nothing. */
export function emptyText(result: SampleTable, filtered: boolean): string {
  if (result.epoch === null) {
    const live = liveEpochOf(result);
    return live === null
      ? `${NOTHING_YET} The table fills when the first epoch ends.`
      : `No epoch has ended yet: the table fills when epoch ${live} ends.`;
  }
  return filtered ? "No sample matches these filters." : NOTHING_YET;
}

/** The caption: which epoch, how many flagged, by what rule, and how gradient norms were
 *  measured; and, marked live, the epoch in progress when it is not the one shown. */
function describe(result: SampleTable): Node[] {
  const notice = liveNotice(result);
  const live: Node[] = [];
  if (notice !== null) {
    const line = element("span", "caption-live");
    const badge = element("span", "mode", "live");
    badge.dataset["mode"] = "live";
    line.append(badge, ` ${notice}`);
    live.push(line);
  }
  if (result.epoch === null) return live;
  const counts = element(
    "span",
    "caption-counts",
    `epoch ${result.epoch} · ${formatCount(result.flags.hard ?? 0)} hard · ${formatCount(result.flags.mislabelled ?? 0)} likely mislabelled · ` +
      (result.grad_norm_method === null ? "grad norm: off" : `grad norm: ${result.grad_norm_method}`),
  );
  const rules = element("span", "caption-rules muted");
  if (result.rule.hard !== undefined) rules.append(ruleText("hard", result.rule.hard));
  if (result.rule.mislabelled !== undefined) rules.append(ruleText("mislabelled", result.rule.mislabelled));
  if (result.sample_ids === "position") {
    rules.append(
      element(
        "span",
        "rule",
        "index = position in the epoch (IterableDataset): AUM and forgetting assume the order is the same every epoch",
      ),
    );
  }
  return [counts, ...live, rules];
}

function ruleText(flag: string, rule: string): HTMLElement {
  const item = element("span", "rule");
  item.append(element("strong", "", `${flag}:`), ` ${rule}`);
  return item;
}

function sameQuery(a: SampleQuery, b: SampleQuery): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}
