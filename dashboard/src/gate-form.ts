// The gate card's form in the page: the card's fields (gate-card.ts says which, with their help
// text and bounds, from the server's schema), the experts one row each (the generalist first; a
// checkpoint each; another expert can be made the generalist), and the sets the mixture is
// judged on. Under the fields: the server's refusal, the fields it names marked. The form builds
// its own elements (the plan cards panel places it); the requests are the panel's (plans.ts).

import { ApiError, type SliceInfo } from "./api";
import { element, setText } from "./dom";
import { formatCount } from "./format";
import {
  CHECKPOINT_HELP,
  EXPERTS_HELP,
  GATE_DESCRIPTION,
  GATE_FIELDS,
  SETS_HELP,
  changedGateFields,
  gateCardOf,
  gateFieldsNamed,
  type ExpertValues,
  type GateCard,
  type GateField,
  type GateFieldSpec,
  type GateValues,
} from "./gate-card";
import { describeError } from "./plan-form";

/** What the buttons do (Enter in a field: Propose for a new card, Save changes for a proposed one). */
export interface GateFormActions {
  propose: () => void;
  save: () => void;
  approve: () => void;
  discard: () => void;
}

/** The session's choices: runs (to carry the gate out, and the experts' names) and slices. */
export interface GateFormChoices {
  runs: () => readonly { id: number; name: string }[];
  slices: () => readonly SliceInfo[];
}

/** A proposed card, as last saved. */
export interface EditedGate {
  id: number;
  card: GateCard;
}

/** The sets besides the saved slices. */
const SPLITS = ["val", "test"] as const;

type Input = HTMLInputElement | HTMLSelectElement;

export class GateForm {
  /** The form element: the panel puts it in the page. */
  readonly form: HTMLFormElement;
  private readonly title: HTMLElement;
  private readonly errors: HTMLElement;
  private readonly expertsBody: HTMLTableSectionElement;
  private readonly expertsTable: HTMLTableElement;
  private readonly setsBox: HTMLElement;
  private readonly buttons: Record<"propose" | "save" | "approve" | "discard" | "close", HTMLButtonElement>;
  private readonly choices: GateFormChoices;
  private readonly inputs = new Map<GateField, Input>();
  private experts: ExpertValues[] = [];
  private sets = new Set<string>();
  private busy = false;
  /** The proposed card the form edits (null: a new card, not saved yet). */
  editing: EditedGate | null = null;

  constructor(choices: GateFormChoices, actions: GateFormActions) {
    this.choices = choices;
    this.form = element("form", "plan-form gate-form");
    this.form.dataset["testid"] = "gate-form";
    this.form.setAttribute("aria-labelledby", "gate-form-title");
    this.form.noValidate = true; // the server checks the card and says what is wrong

    const head = element("div", "plan-form-head");
    this.title = element("h3", "", "New gate card");
    this.title.id = "gate-form-title";
    head.append(this.title, element("p", "muted", GATE_DESCRIPTION.replace(/``([^`]+)``/g, "$1")));

    this.expertsBody = element("tbody");
    this.expertsTable = element("table", "merge-parents-table gate-experts-table");
    this.setsBox = element("div", "merge-sets");
    this.setsBox.setAttribute("role", "group");
    this.setsBox.setAttribute("aria-label", "Compared on");
    const fields = element("div", "plan-fields");
    fields.append(...this.buildGroups());

    this.errors = element("div", "plan-errors");
    this.errors.dataset["testid"] = "gate-errors";
    this.errors.setAttribute("role", "alert");

    const bar = element("div", "plan-buttons");
    this.buttons = {
      propose: button("Propose", "primary"),
      save: button("Save changes"),
      approve: button("Approve", "primary"),
      discard: button("Discard", "danger"),
      close: button("Close", "link-button"),
    };
    bar.append(...Object.values(this.buttons));
    this.form.append(head, fields, this.errors, bar);

    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (this.editing === null) actions.propose();
      else actions.save();
    });
    this.form.addEventListener("input", () => this.update());
    this.form.addEventListener("change", () => this.update());
    this.buttons.propose.addEventListener("click", () => actions.propose());
    this.buttons.save.addEventListener("click", () => actions.save());
    this.buttons.approve.addEventListener("click", () => actions.approve());
    this.buttons.discard.addEventListener("click", () => actions.discard());
    this.buttons.close.addEventListener("click", () => this.close());
    this.close();
  }

  get hidden(): boolean {
    return this.form.hidden;
  }

  open(values: GateValues, title: string, editing: EditedGate | null): void {
    this.editing = editing;
    this.write(values);
    setText(this.title, title);
    this.showError(null);
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
  card(): GateCard {
    return gateCardOf(this.read());
  }

  /** What an edit would send: the fields changed since the card was last saved (null: none). */
  changes(): Partial<GateCard> | null {
    if (this.editing === null) return null;
    const changes = changedGateFields(this.editing.card, this.card());
    return Object.keys(changes).length > 0 ? changes : null;
  }

  setBusy(busy: boolean): void {
    this.busy = busy;
    this.update();
  }

  /** A refusal next to the form, in the server's words, the fields it names marked; null clears it. */
  showError(error: unknown): void {
    const named = error instanceof ApiError ? gateFieldsNamed(error) : [];
    for (const [name, input] of this.inputs) mark(input, named.includes(name));
    mark(this.expertsTable, named.includes("experts"));
    this.setsBox.toggleAttribute("data-invalid", named.includes("sets"));
    setText(this.errors, error === null ? "" : describeError(error));
    this.errors.hidden = error === null;
  }

  /** The choices of the runs and the held-out data, keeping what is chosen; the experts' names; the sets' ticks. */
  fillChoices(values: GateValues = this.read()): void {
    const runs = this.choices.runs();
    const slices = this.choices.slices();
    for (const field of GATE_FIELDS) {
      const select = this.inputs.get(field.name);
      if (field.choices === null || !(select instanceof HTMLSelectElement)) continue;
      const chosen = values.fields[field.name];
      const options: [string, string][] =
        field.choices === "runs" ? runs.map((r) => [String(r.id), runName(runs, r.id)])
        : [["val", "val (the validation set)"], ...slices.map((s): [string, string] => [s.name, `${s.name} (${formatCount(s.count)})`])];
      if (chosen !== "" && !options.some(([value]) => value === chosen)) options.unshift([chosen, chosen]);
      select.replaceChildren(...options.map(([value, text]) => new Option(text, value, false, value === chosen)));
    }
    this.renderExperts();
    const names = [...slices.map((s) => s.name), ...SPLITS];
    for (const chosen of values.sets) if (!names.includes(chosen)) names.push(chosen);
    this.sets = new Set(values.sets);
    this.setsBox.replaceChildren(
      ...names.map((name, i) => {
        const box = element("input");
        box.type = "checkbox";
        box.id = `gate-set-${i}`;
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
    const groups = new Map<string, HTMLFieldSetElement>();
    const group = (name: string) => {
      let set = groups.get(name);
      if (set === undefined) {
        set = element("fieldset", "plan-group");
        set.append(element("legend", "", name));
        groups.set(name, set);
      }
      return set;
    };
    for (const field of GATE_FIELDS) {
      const set = group(field.group);
      if (field.name === "min_share") set.append(this.setsRow()); // what the mixture is judged on, then the warning's share
      set.append(this.fieldRow(field));
      if (field.name === "run_id") group("Experts").append(this.expertsPart());
    }
    return [...groups.values()];
  }

  private setsRow(): HTMLElement {
    const row = element("div", "plan-field merge-sets-field");
    const help = element("small", "help muted", SETS_HELP);
    help.id = "gate-sets-help";
    this.setsBox.setAttribute("aria-describedby", help.id);
    row.append(element("span", "merge-sets-label", "Compared on"), this.setsBox, help);
    return row;
  }

  private fieldRow(field: GateFieldSpec): HTMLElement {
    const row = element("div", `plan-field plan-field-${field.input}`);
    const id = `gate-${field.name.replaceAll("_", "-")}`;
    const input = inputFor(field);
    input.id = id;
    // No `name` attribute: a control named "hidden" (the gate's hidden width) would shadow the
    // form's own `hidden` property (a form's named controls override its properties).
    const label = element("label", "", field.label);
    label.htmlFor = id;
    const bounds = field.bounds && field.choices === null ? ` (${field.bounds})` : "";
    const help = element("small", "help muted", field.help + bounds);
    help.id = `${id}-help`;
    input.setAttribute("aria-describedby", help.id);
    row.append(label, input, help);
    this.inputs.set(field.name, input);
    return row;
  }

  private expertsPart(): HTMLElement {
    const wrap = element("div", "merge-parents");
    this.expertsTable.dataset["testid"] = "gate-experts";
    this.expertsTable.setAttribute("aria-label", "Experts");
    const head = this.expertsTable.createTHead().insertRow();
    for (const text of ["expert", "role", "checkpoint", ""]) {
      const th = element("th", "", text);
      th.scope = "col";
      head.append(th);
    }
    this.expertsTable.append(this.expertsBody);
    const help = element("small", "help muted", `${EXPERTS_HELP}. Checkpoint: ${CHECKPOINT_HELP} (empty: the run's newest; the live run's current weights).`);
    help.id = "gate-experts-help";
    this.expertsTable.setAttribute("aria-describedby", help.id);
    wrap.append(this.expertsTable, help);
    return wrap;
  }

  /** One row per expert, the generalist first; the others can take its place. */
  private renderExperts(): void {
    const runs = this.choices.runs();
    this.expertsBody.replaceChildren(
      ...this.experts.map((expert, i) => {
        const tr = element("tr");
        tr.dataset["runId"] = String(expert.run_id);
        const name = element("th", "", runName(runs, expert.run_id));
        name.scope = "row";
        const checkpoint = element("input");
        checkpoint.type = "number";
        checkpoint.autocomplete = "off";
        checkpoint.step = "1";
        checkpoint.inputMode = "numeric";
        checkpoint.placeholder = "newest";
        checkpoint.value = expert.checkpoint_id;
        checkpoint.disabled = this.busy;
        checkpoint.setAttribute("aria-label", `Checkpoint of run ${expert.run_id}`);
        checkpoint.addEventListener("input", () => (expert.checkpoint_id = checkpoint.value));
        const cell = (child: HTMLElement | string) => {
          const td = element("td");
          td.append(child);
          return td;
        };
        const promote = button("Make generalist", "small link-button");
        promote.setAttribute("aria-label", `Make run ${expert.run_id} the generalist`);
        promote.hidden = i === 0;
        promote.disabled = this.busy;
        promote.addEventListener("click", () => {
          this.experts = [expert, ...this.experts.filter((e) => e !== expert)];
          this.renderExperts();
          this.update();
        });
        tr.append(name, cell(i === 0 ? "generalist" : "specialist"), cell(checkpoint), cell(promote));
        return tr;
      }),
    );
  }

  // ---- values ---------------------------------------------------------------------------------------

  private read(): GateValues {
    const fields = {} as GateValues["fields"];
    for (const [name, input] of this.inputs) fields[name] = input.value;
    const names = [...this.setsBox.querySelectorAll<HTMLInputElement>("input[type=checkbox]")].map((b) => b.value);
    return { fields, experts: this.experts.map((e) => ({ ...e })), sets: names.filter((n) => this.sets.has(n)) };
  }

  private write(values: GateValues): void {
    this.experts = values.experts.map((e) => ({ ...e }));
    this.fillChoices(values);
    for (const [name, input] of this.inputs) input.value = values.fields[name];
  }

  /** Buttons for the form's state; inputs disabled while a request is out. */
  private update(): void {
    for (const input of this.inputs.values()) input.disabled = this.busy;
    for (const control of this.expertsBody.querySelectorAll<HTMLInputElement | HTMLButtonElement>("input, button")) control.disabled = this.busy;
    const draft = this.editing === null;
    const { propose, save, approve, discard } = this.buttons;
    propose.hidden = !draft;
    save.hidden = approve.hidden = discard.hidden = draft;
    propose.disabled = approve.disabled = discard.disabled = this.busy;
    save.disabled = this.busy || this.changes() === null;
    this.form.setAttribute("aria-busy", String(this.busy));
  }
}

function inputFor(field: GateFieldSpec): Input {
  if (field.input === "select") {
    const select = element("select");
    for (const option of field.options) select.append(new Option(option, option));
    return select;
  }
  const input = element("input");
  input.autocomplete = "off";
  if (field.input === "number") {
    input.type = "number";
    input.step = field.integer ? "1" : "any";
    input.inputMode = field.integer ? "numeric" : "decimal";
    if (field.min !== null) input.min = String(field.min);
    if (field.max !== null) input.max = String(field.max);
  } else {
    input.type = "text";
    input.spellcheck = false;
  }
  return input;
}

function button(text: string, tone = ""): HTMLButtonElement {
  const b = element("button", tone, text);
  b.type = "button";
  return b;
}

function mark(node: HTMLElement, invalid: boolean): void {
  if (invalid) node.setAttribute("aria-invalid", "true");
  else node.removeAttribute("aria-invalid");
}

function runName(runs: readonly { id: number; name: string }[], id: number): string {
  const run = runs.find((r) => r.id === id);
  return run === undefined ? `run ${id}` : `${run.name} (${id})`;
}
