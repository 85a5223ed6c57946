// The merge card's form in the page: the card's fields (merge-card.ts says which, with their help
// text and bounds, from the server's schema), the parents one row each (checkpoint, weight), the
// sets to judge on, and only the parameters the chosen method reads. Under the fields: the
// server's refusal (the fields it names marked) and the preview: the candidate's comparison with
// every parent and, when it lost to one, a warning saying that approving needs "override". The
// form builds its own elements (the plan cards panel places it); the requests are the panel's
// (plans.ts).

import { ApiError, type SliceInfo } from "./api";
import { renderComparison, type ComparisonTable } from "./compare";
import { element, setText } from "./dom";
import { formatCount } from "./format";
import {
  MERGE_DESCRIPTION,
  MERGE_FIELDS,
  PARENTS_HELP,
  PARENT_FIELDS,
  SETS_HELP,
  changedMergeFields,
  fieldAppliesTo,
  mergeCardOf,
  mergeFieldsNamed,
  previewText,
  weightsApply,
  type MergeCard,
  type MergeField,
  type MergeFieldSpec,
  type MergePreview,
  type MergeValues,
  type ParentValues,
} from "./merge-card";
import { describeError } from "./plan-form";

/** What the buttons do (Enter in a field: Propose for a new card, Save changes for a proposed one). */
export interface MergeFormActions {
  propose: () => void;
  save: () => void;
  preview: () => void;
  approve: () => void;
  discard: () => void;
}

/** The session's choices: runs (to carry the merge out, and the parents' names) and slices (data, sets). */
export interface MergeFormChoices {
  runs: () => readonly { id: number; name: string }[];
  slices: () => readonly SliceInfo[];
}

/** A proposed card, as last saved. */
export interface EditedMerge {
  id: number;
  card: MergeCard;
}

/** What the preview part of the form shows. */
export type PreviewState =
  | { state: "none" }
  | { state: "waiting"; text: string }
  | { state: "failed"; text: string }
  | { state: "shown"; id: number; table: ComparisonTable | null; preview: MergePreview; current: boolean };

/** The sets besides the saved slices. */
const SPLITS = ["val", "test"] as const;

type Input = HTMLInputElement | HTMLSelectElement;

interface ParentRow {
  run_id: number;
  name: HTMLElement;
  checkpoint: HTMLInputElement;
  weight: HTMLInputElement;
}

export class MergeForm {
  /** The form element: the panel puts it in the page. */
  readonly form: HTMLFormElement;
  private readonly title: HTMLElement;
  private readonly errors: HTMLElement;
  private readonly parentsBody: HTMLTableSectionElement;
  private readonly setsBox: HTMLElement;
  private readonly warning: HTMLElement;
  private readonly previewCaption: HTMLElement;
  private readonly previewTable: HTMLTableElement;
  private readonly buttons: Record<"propose" | "save" | "preview" | "approve" | "discard" | "close", HTMLButtonElement>;
  private readonly choices: MergeFormChoices;
  private readonly inputs = new Map<MergeField, Input>();
  private readonly rows = new Map<MergeField, HTMLElement>();
  private readonly groups = new Map<string, HTMLFieldSetElement>();
  private parents: ParentRow[] = [];
  private sets = new Set<string>();
  private busy = false;
  private preview: PreviewState = { state: "none" };
  /** The proposed card the form edits (null: a new card, not saved yet). */
  editing: EditedMerge | null = null;

  constructor(choices: MergeFormChoices, actions: MergeFormActions) {
    this.choices = choices;
    this.form = element("form", "plan-form merge-form");
    this.form.dataset["testid"] = "merge-form";
    this.form.setAttribute("aria-labelledby", "merge-form-title");
    this.form.noValidate = true; // the server checks the card and says what is wrong

    const head = element("div", "plan-form-head");
    this.title = element("h3", "", "New merge card");
    this.title.id = "merge-form-title";
    head.append(this.title, element("p", "muted", MERGE_DESCRIPTION.replace(/``([^`]+)``/g, "$1")));

    const fields = element("div", "plan-fields");
    this.parentsBody = element("tbody");
    this.setsBox = element("div", "merge-sets");
    this.setsBox.setAttribute("role", "group");
    this.setsBox.setAttribute("aria-label", "Compared on");
    fields.append(...this.buildGroups());

    this.errors = element("div", "plan-errors");
    this.errors.dataset["testid"] = "merge-errors";
    this.errors.setAttribute("role", "alert");

    const preview = element("div", "merge-preview");
    preview.dataset["testid"] = "merge-preview";
    this.warning = element("p", "merge-warning");
    this.warning.dataset["testid"] = "merge-warning";
    this.warning.setAttribute("role", "alert");
    this.previewCaption = element("div", "compare-caption muted");
    this.previewCaption.dataset["testid"] = "merge-preview-caption";
    this.previewTable = element("table");
    this.previewTable.dataset["testid"] = "merge-preview-table";
    this.previewTable.setAttribute("aria-label", "the candidate against its parents");
    const scroll = element("div", "table-scroll short");
    scroll.append(this.previewTable);
    preview.append(this.warning, this.previewCaption, scroll);

    const bar = element("div", "plan-buttons");
    this.buttons = {
      propose: button("Propose", "primary"),
      save: button("Save changes"),
      preview: button("Preview"),
      approve: button("Approve", "primary"),
      discard: button("Discard", "danger"),
      close: button("Close", "link-button"),
    };
    bar.append(...Object.values(this.buttons));
    this.form.append(head, fields, this.errors, preview, bar);

    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (this.editing === null) actions.propose();
      else actions.save();
    });
    this.form.addEventListener("input", () => this.update());
    this.form.addEventListener("change", () => this.update());
    this.buttons.propose.addEventListener("click", () => actions.propose());
    this.buttons.save.addEventListener("click", () => actions.save());
    this.buttons.preview.addEventListener("click", () => actions.preview());
    this.buttons.approve.addEventListener("click", () => actions.approve());
    this.buttons.discard.addEventListener("click", () => actions.discard());
    this.buttons.close.addEventListener("click", () => this.close());
    this.close();
  }

  get hidden(): boolean {
    return this.form.hidden;
  }

  open(values: MergeValues, title: string, editing: EditedMerge | null): void {
    this.editing = editing;
    this.write(values);
    setText(this.title, title);
    this.showError(null);
    this.showPreview({ state: "none" });
    this.form.hidden = false;
    this.update();
    this.form.scrollIntoView({ block: "nearest" });
    this.inputs.get("name")?.focus();
  }

  close(): void {
    this.editing = null;
    this.form.hidden = true;
    this.showError(null);
  }

  /** The card the inputs describe. */
  card(): MergeCard {
    return mergeCardOf(this.read());
  }

  /** What an edit would send: the fields changed since the card was last saved (null: none). */
  changes(): Partial<MergeCard> | null {
    if (this.editing === null) return null;
    const changes = changedMergeFields(this.editing.card, this.card());
    return Object.keys(changes).length > 0 ? changes : null;
  }

  setBusy(busy: boolean): void {
    this.busy = busy;
    this.update();
  }

  /** A refusal next to the form, in the server's words, the fields it names marked; null clears it. */
  showError(error: unknown): void {
    const named = error instanceof ApiError ? mergeFieldsNamed(error) : [];
    for (const [name, input] of this.inputs) mark(input, named.includes(name));
    for (const row of this.parents) {
      mark(row.checkpoint, named.includes("parents"));
      mark(row.weight, named.includes("parents"));
    }
    this.setsBox.toggleAttribute("data-invalid", named.includes("sets"));
    setText(this.errors, error === null ? "" : describeError(error));
    this.errors.hidden = error === null;
  }

  /** The preview: waiting for it, why it failed, or the comparison with its warning. */
  showPreview(state: PreviewState): void {
    this.preview = state;
    const preview = this.warning.parentElement;
    if (preview !== null) preview.hidden = state.state === "none";
    if (state.state === "shown") {
      const stale = state.current ? "" : " (of the card as it was then: the card changed since, preview it again)";
      setText(this.previewCaption, `Preview: comparison ${state.id} · the merge is the reference: a parent's difference above 0 is a parent better than the merge${stale}`);
      this.previewTable.dataset["comparison"] = String(state.id);
      renderComparison(this.previewTable, state.table, `Comparison ${state.id} has no table this page can read.`);
    } else {
      setText(this.previewCaption, state.state === "none" ? "" : state.text);
      renderComparison(this.previewTable, null, state.state === "waiting" ? "…" : "No preview yet.");
    }
    this.previewCaption.classList.toggle("bad", state.state === "failed");
    this.update();
  }

  /** The choices of the runs, the data and the student, keeping what is chosen; the sets' ticks. */
  fillChoices(values: MergeValues = this.read()): void {
    const runs = this.choices.runs();
    const slices = this.choices.slices();
    for (const field of MERGE_FIELDS) {
      const select = this.inputs.get(field.name);
      if (field.choices === null || !(select instanceof HTMLSelectElement)) continue;
      const chosen = String(values.fields[field.name]);
      const options: [string, string][] =
        field.choices === "runs" ? runs.map((r) => [String(r.id), `${runName(runs, r.id)}`])
        : field.choices === "data" ? [["train", "train (all of it)"], ...slices.map((s): [string, string] => [s.name, `${s.name} (${formatCount(s.count)})`])]
        : [["", "default (the first parent)"], ...values.parents.map((p): [string, string] => [String(p.run_id), runName(runs, p.run_id)])];
      if (chosen !== "" && !options.some(([value]) => value === chosen)) options.unshift([chosen, chosen]);
      select.replaceChildren(...options.map(([value, text]) => new Option(text, value, false, value === chosen)));
    }
    for (const row of this.parents) setText(row.name, runName(runs, row.run_id));
    const names = [...slices.map((s) => s.name), ...SPLITS];
    for (const chosen of values.sets) if (!names.includes(chosen)) names.push(chosen);
    this.sets = new Set(values.sets);
    this.setsBox.replaceChildren(
      ...names.map((name, i) => {
        const box = element("input");
        box.type = "checkbox";
        box.id = `merge-set-${i}`;
        box.value = name;
        box.checked = this.sets.has(name);
        box.addEventListener("change", () => {
          if (box.checked) this.sets.add(name);
          else this.sets.delete(name);
        });
        const label = element("label", "", name);
        label.htmlFor = box.id;
        const item = element("span", "compare-set");
        item.append(box, label);
        return item;
      }),
    );
  }

  // ---- building -----------------------------------------------------------------------------------

  private buildGroups(): HTMLElement[] {
    const group = (name: string) => {
      let set = this.groups.get(name);
      if (set === undefined) {
        set = element("fieldset", "plan-group");
        set.append(element("legend", "", name));
        this.groups.set(name, set);
      }
      return set;
    };
    for (const field of MERGE_FIELDS) {
      const set = group(field.group);
      if (field.name === "seed") set.append(this.setsRow()); // what the candidate is judged on, then how
      set.append(this.fieldRow(field));
      if (field.name === "method") group("Parents").append(this.parentsTable());
    }
    return [...this.groups.values()];
  }

  private setsRow(): HTMLElement {
    const row = element("div", "plan-field merge-sets-field");
    const help = element("small", "help muted", SETS_HELP);
    help.id = "merge-sets-help";
    this.setsBox.setAttribute("aria-describedby", help.id);
    row.append(element("span", "merge-sets-label", "Compared on"), this.setsBox, help);
    return row;
  }

  private fieldRow(field: MergeFieldSpec): HTMLElement {
    const row = element("div", `plan-field plan-field-${field.input}`);
    const id = `merge-${field.name.replaceAll("_", "-")}`;
    const input = inputFor(field);
    input.id = id;
    input.name = field.name;
    const label = element("label", "", field.label);
    label.htmlFor = id;
    const bounds = field.bounds && field.choices === null ? ` (${field.bounds})` : "";
    const help = element("small", "help muted", field.help + bounds); // the description names its methods
    help.id = `${id}-help`;
    input.setAttribute("aria-describedby", help.id);
    if (field.input === "checkbox") row.append(input, label, help);
    else row.append(label, input, help);
    this.inputs.set(field.name, input);
    this.rows.set(field.name, row);
    return row;
  }

  private parentsTable(): HTMLElement {
    const wrap = element("div", "merge-parents");
    const table = element("table", "merge-parents-table");
    table.dataset["testid"] = "merge-parents";
    table.setAttribute("aria-label", "Parents");
    const head = table.createTHead().insertRow();
    for (const text of ["parent", "checkpoint", "weight"]) {
      const th = element("th", "", text);
      th.scope = "col";
      head.append(th);
    }
    table.append(this.parentsBody);
    const help = element(
      "small",
      "help muted",
      `${PARENTS_HELP}. Checkpoint: ${PARENT_FIELDS.checkpoint_id.help} (empty: the run's newest; the live run's current weights). ` +
        `Weight: ${PARENT_FIELDS.weight.help} (${PARENT_FIELDS.weight.bounds}).`,
    );
    help.id = "merge-parents-help";
    table.setAttribute("aria-describedby", help.id);
    wrap.append(table, help);
    return wrap;
  }

  private parentRow(values: ParentValues): HTMLTableRowElement {
    const runs = this.choices.runs();
    const tr = element("tr");
    tr.dataset["runId"] = String(values.run_id);
    const name = element("th", "", runName(runs, values.run_id));
    name.scope = "row";
    const checkpoint = numberInput(values.checkpoint_id, true);
    checkpoint.setAttribute("aria-label", `Checkpoint of run ${values.run_id}`);
    checkpoint.placeholder = "newest";
    const weight = numberInput(values.weight, false);
    weight.setAttribute("aria-label", `Weight of run ${values.run_id}`);
    const cell = (input: HTMLInputElement) => {
      const td = element("td");
      td.append(input);
      return td;
    };
    tr.append(name, cell(checkpoint), cell(weight));
    this.parents.push({ run_id: values.run_id, name, checkpoint, weight });
    return tr;
  }

  // ---- values ---------------------------------------------------------------------------------------

  private read(): MergeValues {
    const fields = {} as MergeValues["fields"];
    for (const [name, input] of this.inputs) {
      fields[name] = input instanceof HTMLInputElement && input.type === "checkbox" ? input.checked : input.value;
    }
    const parents = this.parents.map((p) => ({ run_id: p.run_id, checkpoint_id: p.checkpoint.value, weight: p.weight.value }));
    const names = [...this.setsBox.querySelectorAll<HTMLInputElement>("input[type=checkbox]")].map((b) => b.value);
    return { fields, parents, sets: names.filter((n) => this.sets.has(n)) };
  }

  private write(values: MergeValues): void {
    this.parents = [];
    this.parentsBody.replaceChildren(...values.parents.map((p) => this.parentRow(p)));
    this.fillChoices(values);
    for (const [name, input] of this.inputs) {
      const value = values.fields[name];
      if (input instanceof HTMLInputElement && input.type === "checkbox") input.checked = value === true;
      else input.value = String(value);
    }
  }

  /** Only the method's fields shown; buttons for the form's state; the warning in words. */
  private update(): void {
    const values = this.read();
    const method = String(values.fields.method);
    for (const field of MERGE_FIELDS) {
      const row = this.rows.get(field.name);
      if (row !== undefined) row.hidden = !fieldAppliesTo(field, method);
      const input = this.inputs.get(field.name);
      if (input !== undefined) input.disabled = this.busy;
    }
    // A group of the method's parameters with none for this method (a greedy soup) goes too.
    for (const [name, set] of this.groups) {
      const fields = MERGE_FIELDS.filter((f) => f.group === name);
      const own = name === "Parents" || fields.some((f) => f.name === "seed"); // rows of their own
      set.hidden = !own && fields.every((f) => this.rows.get(f.name)?.hidden === true);
    }
    const weighted = weightsApply(method);
    for (const row of this.parents) {
      row.checkpoint.disabled = this.busy;
      row.weight.disabled = this.busy || !weighted; // a greedy soup and a distillation weigh nothing
    }
    const draft = this.editing === null;
    const waiting = this.preview.state === "waiting";
    const { propose, save, preview, approve, discard } = this.buttons;
    propose.hidden = !draft;
    save.hidden = preview.hidden = approve.hidden = discard.hidden = draft;
    propose.disabled = discard.disabled = this.busy;
    approve.disabled = this.busy || waiting;
    preview.disabled = this.busy || waiting || method === "distill"; // a distillation has no preview
    preview.textContent = waiting ? "Previewing…" : "Preview";
    preview.title = method === "distill" ? "a distillation trains its student: its comparison is on the card once approved" : "";
    save.disabled = this.busy || this.changes() === null;
    const shown = this.preview.state === "shown" ? this.preview.preview : null;
    this.warning.hidden = shown === null || shown.worse === null;
    if (shown !== null) setText(this.warning, previewText(shown, values.fields.override === true));
    this.form.setAttribute("aria-busy", String(this.busy));
  }
}

function inputFor(field: MergeFieldSpec): Input {
  if (field.input === "select") {
    const select = element("select");
    for (const option of field.options) select.append(new Option(option, option));
    return select;
  }
  const input = element("input");
  input.autocomplete = "off";
  if (field.input === "checkbox") {
    input.type = "checkbox";
  } else if (field.input === "number") {
    input.type = "number";
    input.step = field.integer ? "1" : "any";
    input.inputMode = field.integer ? "numeric" : "decimal";
    if (field.min !== null) input.min = String(field.min);
    if (field.max !== null) input.max = String(field.max);
    if (field.nullable) input.placeholder = "default";
  } else {
    input.type = "text";
    input.spellcheck = false;
  }
  return input;
}

function numberInput(value: string, integer: boolean): HTMLInputElement {
  const input = element("input");
  input.type = "number";
  input.autocomplete = "off";
  input.step = integer ? "1" : "any";
  input.inputMode = integer ? "numeric" : "decimal";
  input.value = value;
  return input;
}

function button(text: string, tone = ""): HTMLButtonElement {
  const b = element("button", tone, text);
  b.type = "button";
  return b;
}

function mark(input: HTMLElement, invalid: boolean): void {
  if (invalid) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

function runName(runs: readonly { id: number; name: string }[], id: number): string {
  const run = runs.find((r) => r.id === id);
  return run === undefined ? `run ${id}` : `${run.name} (${id})`;
}
