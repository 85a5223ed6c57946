// Slices: named sets of samples saved in the session. The list shows every saved slice with its
// definition in words, drafts a fork card for it ("Fork…", plans.ts), exports it (CSV, Parquet
// or JSON, with the samples' data) or deletes it. The form under the distribution saves a dragged loss range as a slice.
//
// An export is asked for with the token in the header and waited for (exports.ts); once it is
// ready its file is a native browser download, authorised by the page's HttpOnly cookie: no token
// in the URL, and no file held in the page's memory.

import { ApiError, type ApiClient, type ExportFormat, type SliceCreate, type SliceDefinition, type SliceInfo } from "./api";
import type { LossSelection } from "./distribution";
import { download, element, setText } from "./dom";
import { FORMAT_TITLES, describeOutcome, runExport } from "./exports";
import { formatCount, formatValue } from "./format";
import type { Store } from "./state";
import { showEmpty } from "./tables";

/** The server's rule for names, checked here too so a typo gets a plain answer at once. */
const SLICE_NAME = /^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$/;
const EXPORTS: readonly ExportFormat[] = ["csv", "parquet", "json"];

/** Every kind of definition, so a kind added or removed on the server fails `tsc` here. */
const DEFINITION_KINDS: Readonly<Record<SliceDefinition["kind"], true>> = {
  loss_band: true,
  quantile_band: true,
  cluster: true,
  label: true,
  indices: true,
  flag: true,
  filter: true,
};

/** A saved slice's definition, as the server sent it back. */
// TODO(generated): the server's SliceOut declares `definition` as a plain object; once it declares
// the SliceDefinition union (as SliceCreate does), the schema types it and this check goes.
export function definitionOf(slice: Pick<SliceInfo, "definition">): SliceDefinition | null {
  const kind = slice.definition["kind"];
  return typeof kind === "string" && Object.hasOwn(DEFINITION_KINDS, kind) ? (slice.definition as SliceDefinition) : null;
}

/** A definition in words: "loss 0.52 – 1.3", "cluster 1 of clustering 3", "label 7". */
export function describeDefinition(definition: SliceDefinition): string {
  switch (definition.kind) {
    case "loss_band":
      return `loss ${bandText(definition.low ?? null, definition.high ?? null)}`;
    case "quantile_band":
      return `loss quantiles ${formatValue(definition.low)} – ${formatValue(definition.high)}`;
    case "cluster":
      return `cluster ${definition.cluster} of clustering ${definition.clustering}`;
    case "label":
      return `label ${definition.label}`;
    case "indices":
      return `${formatCount(definition.indices.length)} listed samples`;
    case "flag":
      return definition.flag === "hard" ? "hard samples" : "likely mislabelled samples";
    case "filter":
      return definition.where.map((c) => `${c.signal} ${c.op} ${typeof c.value === "number" ? formatValue(c.value) : c.value}`).join(" and ");
  }
}

/** "0.52 – 1.3", "≥ 0.52", "≤ 1.3" or "any". */
export function bandText(low: number | null, high: number | null): string {
  if (low !== null && high !== null) return `${formatValue(low)} – ${formatValue(high)}`;
  if (low !== null) return `≥ ${formatValue(low)}`;
  if (high !== null) return `≤ ${formatValue(high)}`;
  return "any";
}

export interface SliceListOptions {
  /** "Fork…" on a slice's row: draft a fork card for it. */
  onFork?: (slice: SliceInfo) => void;
  /** The list was read again. */
  onChange?: (slices: readonly SliceInfo[]) => void;
}

/** The session's slices: the list in the "Slices" card, and saving from any view. */
export class SliceList {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly table: HTMLTableElement;
  private readonly options: SliceListOptions;
  private generation = 0;
  /** The slices as last read. */
  slices: readonly SliceInfo[] = [];

  constructor(api: ApiClient, store: Store, table: HTMLTableElement, options: SliceListOptions = {}) {
    this.api = api;
    this.store = store;
    this.table = table;
    this.options = options;
    const head = table.createTHead().insertRow();
    for (const [title, numeric] of [["name", false], ["run", false], ["epoch", true], ["samples", true], ["definition", false], ["", false]] as const) {
      const th = element("th", numeric ? "num" : "", title);
      th.scope = "col";
      head.append(th);
    }
    this.render([]);
  }

  async refresh(): Promise<void> {
    const generation = ++this.generation;
    try {
      const slices = await this.api.slices();
      if (generation !== this.generation) return;
      this.slices = slices;
      this.render(slices);
      this.options.onChange?.(slices);
    } catch (error) {
      if (generation === this.generation) this.store.showMessage(`Could not read the slices: ${String(error)}`);
    }
  }

  /** Save a slice; says how it went in the page's message area. Returns it, or null on refusal. */
  async save(request: SliceCreate): Promise<SliceInfo | null> {
    if (!SLICE_NAME.test(request.name)) {
      this.store.showMessage(
        request.name === ""
          ? "Enter a name for the slice."
          : "A slice name is 1-64 letters, digits, spaces, '_', '-' or '.', starting with a letter or digit.",
      );
      return null;
    }
    try {
      const slice = await this.api.createSlice(request);
      const at = slice.epoch === null ? "" : ` at epoch ${slice.epoch}`;
      this.store.showMessage(`Saved slice '${slice.name}': ${formatCount(slice.count)} samples${at}`, "info");
      return slice;
    } catch (error) {
      this.store.showMessage(error instanceof ApiError ? error.message : `Could not save the slice: ${String(error)}`);
      return null;
    } finally {
      void this.refresh();
    }
  }

  private render(slices: readonly SliceInfo[]): void {
    const body = this.table.tBodies[0] ?? this.table.createTBody();
    this.table.dataset["count"] = String(slices.length);
    if (slices.length === 0) {
      showEmpty(body, "No slices yet: drag a loss range on the distribution, or save a cluster.", 6);
      return;
    }
    body.replaceChildren(...slices.map((slice) => this.row(slice)));
  }

  private row(slice: SliceInfo): HTMLTableRowElement {
    const tr = element("tr");
    tr.dataset["name"] = slice.name;
    const runName = this.store.session?.runs.find((run) => run.id === slice.run_id)?.name;
    tr.append(
      element("td", "slice-name", slice.name),
      element("td", "", runName === undefined ? `run ${slice.run_id}` : `${runName} (${slice.run_id})`),
      element("td", "num", slice.epoch === null ? "—" : String(slice.epoch)),
      element("td", "num", formatCount(slice.count)),
      element("td", "", describeSaved(slice)),
    );
    const actions = element("td", "actions");
    const onFork = this.options.onFork;
    if (onFork !== undefined) actions.append(this.button("Fork…", `Fork ${slice.name}`, async () => onFork(slice)));
    for (const format of EXPORTS) {
      const title = FORMAT_TITLES[format];
      actions.append(this.button(title, `Export ${slice.name} as ${title}`, () => this.export(slice, format)));
    }
    const remove = this.button("Delete", `Delete ${slice.name}`, () => this.remove(slice));
    remove.classList.add("danger");
    actions.append(remove);
    tr.append(actions);
    return tr;
  }

  private button(text: string, label: string, action: (button: HTMLButtonElement) => Promise<void>): HTMLButtonElement {
    const button = element("button", "small", text);
    button.type = "button";
    button.setAttribute("aria-label", label);
    button.title = label;
    button.addEventListener("click", () => {
      button.disabled = true;
      void action(button).finally(() => (button.disabled = false));
    });
    return button;
  }

  /** Export with the samples' data; the page says what came of it, and downloads a ready file. */
  private async export(slice: SliceInfo, format: ExportFormat): Promise<void> {
    this.store.showMessage(`Exporting '${slice.name}' as ${FORMAT_TITLES[format]}…`, "info");
    const outcome = await runExport(this.api, slice.name, { format, data: true });
    this.store.showMessage(describeOutcome(slice.name, format, outcome), outcome.ok ? "info" : "error");
    if (outcome.ok) download(this.api.exportFileUrl(outcome.job.id), outcome.job.filename);
  }

  private async remove(slice: SliceInfo): Promise<void> {
    try {
      await this.api.deleteSlice(slice.name);
      this.store.showMessage(`Deleted slice '${slice.name}'.`, "info");
    } catch (error) {
      this.store.showMessage(error instanceof ApiError ? error.message : `Could not delete '${slice.name}': ${String(error)}`);
    }
    await this.refresh();
  }
}

/** A saved slice's definition in words (or as the server sent it, for a kind this page does not know). */
function describeSaved(slice: SliceInfo): string {
  const definition = definitionOf(slice);
  return definition === null ? JSON.stringify(slice.definition) : describeDefinition(definition);
}

export interface SliceFormElements {
  form: HTMLElement;
  range: HTMLElement;
  name: HTMLInputElement;
  save: HTMLButtonElement;
  clear: HTMLButtonElement;
  /** Shown while nothing is selected: how to select. */
  hint: HTMLElement;
}

/** The row under the distribution: the dragged range, a name, "Save slice". */
export class SliceForm {
  private readonly elements: SliceFormElements;
  private readonly slices: SliceList;
  private readonly runId: () => number | null;
  private selection: LossSelection | null = null;

  /** `onClear` forgets the selection in the distribution view. */
  constructor(elements: SliceFormElements, slices: SliceList, runId: () => number | null, onClear: () => void) {
    this.elements = elements;
    this.slices = slices;
    this.runId = runId;
    elements.save.addEventListener("click", () => void this.save());
    elements.name.addEventListener("keydown", (event) => {
      if (event.key === "Enter") void this.save();
    });
    elements.clear.addEventListener("click", onClear);
    this.show(null);
  }

  show(selection: LossSelection | null): void {
    this.selection = selection;
    this.elements.form.hidden = selection === null;
    this.elements.hint.hidden = selection !== null;
    if (selection === null) return;
    const epoch = selection.epoch === null ? "" : selection.live ? ` · epoch ${selection.epoch} (in progress)` : ` · epoch ${selection.epoch}`;
    setText(this.elements.range, `loss ${bandText(selection.low, selection.high)} · ≈${formatCount(selection.count)} samples${epoch}`);
    this.elements.range.dataset["low"] = String(selection.low);
    this.elements.range.dataset["high"] = String(selection.high);
  }

  private async save(): Promise<void> {
    const selection = this.selection;
    const runId = this.runId();
    if (selection === null || runId === null || this.elements.save.disabled) return;
    const request: SliceCreate = {
      name: this.elements.name.value.trim(),
      run_id: runId,
      definition: { kind: "loss_band", low: selection.low, high: selection.high },
    };
    // An epoch in progress is left to the server, which uses the latest complete one.
    if (!selection.live && selection.epoch !== null) request.epoch = selection.epoch;
    this.elements.save.disabled = true;
    try {
      const saved = await this.slices.save(request);
      if (saved !== null) this.elements.name.value = "";
    } finally {
      this.elements.save.disabled = false;
    }
  }
}
