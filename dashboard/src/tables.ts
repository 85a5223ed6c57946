// The page's simple tables and lists: test results, the event log. Each renders from data it is
// given and fetches nothing (the per-sample table, with its sorting and paging, is samples.ts).

import { element } from "./dom";
import { formatClock, formatCount, formatPercent, formatValue } from "./format";
import type { LogEntry, TestResult } from "./state";

export interface Column<Row> {
  title: string;
  cell: (row: Row) => string;
  numeric?: boolean;
}

/** Replace a table's body with one row per item; an empty list shows `empty` across the table. */
/** One muted row across `columns` columns saying there is nothing to show. */
export function showEmpty(body: HTMLTableSectionElement, text: string, columns: number): void {
  const cell = element("td", "muted", text);
  cell.colSpan = columns;
  const tr = element("tr", "empty"); // tests can tell "no rows yet" from a row: tr:not(.empty)
  tr.append(cell);
  body.replaceChildren(tr);
}

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
    showEmpty(body, empty, columns.length);
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
