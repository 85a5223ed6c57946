// The page's tables and lists: hard samples, test results, the event log. Each renders from data
// it is given; none fetches on its own except the hard-sample table, which reads one epoch's rows.

import type { ApiClient, HardSample } from "./api";
import { element, setText } from "./dom";
import { formatClock, formatCount, formatPercent, formatValue } from "./format";
import type { LogEntry, TestResult } from "./state";

export interface Column<Row> {
  title: string;
  cell: (row: Row) => string;
  numeric?: boolean;
}

/** Replace a table's body with one row per item; an empty list shows `empty` across the table. */
export function renderRows<Row>(table: HTMLTableElement, columns: Column<Row>[], rows: readonly Row[], empty: string): void {
  if (table.tHead === null) {
    const head = table.createTHead().insertRow();
    for (const column of columns) {
      const th = element("th", column.numeric ? "num" : "", column.title);
      th.scope = "col";
      head.append(th);
    }
  }
  const body = table.tBodies[0] ?? table.createTBody();
  if (rows.length === 0) {
    const cell = element("td", "muted", empty);
    cell.colSpan = columns.length;
    const tr = element("tr", "empty"); // tests can tell "no rows yet" from a row: tr:not(.empty)
    tr.append(cell);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(
    ...rows.map((row) => {
      const tr = element("tr");
      for (const column of columns) tr.append(element("td", column.numeric ? "num" : "", column.cell(row)));
      return tr;
    }),
  );
}

const optional = (value: number | null): string => (value === null ? "—" : String(value));

const HARD_SAMPLE_COLUMNS: Column<HardSample>[] = [
  { title: "index", cell: (row) => String(row.index), numeric: true },
  { title: "label", cell: (row) => optional(row.label), numeric: true },
  { title: "prediction", cell: (row) => optional(row.pred), numeric: true },
  { title: "margin", cell: (row) => formatValue(row.margin), numeric: true },
  { title: "loss", cell: (row) => formatValue(row.loss), numeric: true },
];

/** The k samples with the highest loss in one epoch. */
export class HardSamplesTable {
  private readonly api: ApiClient;
  private readonly table: HTMLTableElement;
  private readonly caption: HTMLElement;
  private readonly k: number;
  private generation = 0;

  constructor(api: ApiClient, table: HTMLTableElement, caption: HTMLElement, k = 20) {
    this.api = api;
    this.table = table;
    this.caption = caption;
    this.k = k;
    renderRows(table, HARD_SAMPLE_COLUMNS, [], "No per-sample losses recorded yet.");
  }

  async show(runId: number, epoch: number | null): Promise<void> {
    const generation = ++this.generation;
    try {
      const result = await this.api.hardSamples(runId, epoch, this.k);
      if (generation !== this.generation) return;
      renderRows(this.table, HARD_SAMPLE_COLUMNS, result.rows, "No per-sample losses recorded yet.");
      setText(this.caption, result.epoch === null ? "" : `epoch ${result.epoch} · top ${this.k} by loss`);
      this.table.querySelectorAll("tbody tr").forEach((tr, i) => {
        const row = result.rows[i];
        if (row?.correct === false) tr.classList.add("wrong");
      });
    } catch (error) {
      if (generation === this.generation) setText(this.caption, `Could not load hard samples: ${String(error)}`);
    }
  }
}

const TEST_COLUMNS: Column<TestResult>[] = [
  { title: "step", cell: (row) => formatCount(row.step), numeric: true },
  { title: "loss", cell: (row) => formatValue(row.loss), numeric: true },
  { title: "accuracy", cell: (row) => formatPercent(row.accuracy), numeric: true },
  { title: "samples", cell: (row) => formatCount(row.samples), numeric: true },
  { title: "time", cell: (row) => formatClock(row.time) },
];

export function renderTestResults(table: HTMLTableElement, results: readonly TestResult[]): void {
  renderRows(table, TEST_COLUMNS, results, "No test yet: press “Test now”, or wait for the end of training.");
}

/** The event log, newest first. Each line: time, then "step N · what happened". */
export function renderEventLog(list: HTMLElement, entries: readonly LogEntry[]): void {
  if (entries.length === 0) {
    list.replaceChildren(element("li", "muted empty", "No events yet."));
    return;
  }
  list.replaceChildren(
    ...entries.map((entry) => {
      const item = element("li", `log-${entry.tone}`);
      item.dataset["kind"] = entry.kind;
      item.dataset["seq"] = String(entry.seq);
      item.append(element("time", "muted", formatClock(entry.time)), element("span", "log-text", entry.text));
      return item;
    }),
  );
}
