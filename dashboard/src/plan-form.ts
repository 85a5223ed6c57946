// The fork card's form in the page: one input per field of the card (card-form.ts says which,
// with its help text and bounds, from the server's schema), grouped, with the buttons for a new
// card (Propose) or a proposed one (Save changes, Approve, Discard) and the server's refusal next
// to it, the fields it names marked. The requests themselves are the panel's (plans.ts).

import { ApiError, type ForkCard, type ForkCardField, type SliceInfo } from "./api";
import {
  CARD_DESCRIPTION,
  CARD_FIELDS,
  cardOf,
  changedFields,
  fieldApplies,
  fieldGroups,
  initialValues,
  type CardField,
  type FormValues,
} from "./card-form";
import { element, setText } from "./dom";
import { formatCount } from "./format";
import { fieldsNamed } from "./plan-text";

export interface CardFormElements {
  form: HTMLFormElement;
  title: HTMLElement;
  description: HTMLElement;
  fields: HTMLElement;
  errors: HTMLElement;
  propose: HTMLButtonElement;
  save: HTMLButtonElement;
  approve: HTMLButtonElement;
  discard: HTMLButtonElement;
  close: HTMLButtonElement;
}

/** What the buttons do (Enter in a field: Propose for a new card, Save changes for a proposed one). */
export interface CardFormActions {
  propose: () => void;
  save: () => void;
  approve: () => void;
  discard: () => void;
}

/** The choices of the fields whose choices are the session's. */
export interface CardChoices {
  runs: readonly { id: number; name: string }[];
  slices: readonly SliceInfo[];
}

/** A proposed card, as last saved. */
export interface EditedCard {
  id: number;
  card: ForkCard;
}

type Input = HTMLInputElement | HTMLSelectElement;

export class CardForm {
  private readonly elements: CardFormElements;
  private readonly choices: () => CardChoices;
  private readonly inputs = new Map<ForkCardField, Input>();
  /** The values the form was opened with (a field without an input, the hidden `kind`, keeps its). */
  private opened: FormValues = initialValues({});
  private busy = false;
  /** The proposed card the form edits (null: a new card, not saved yet). */
  editing: EditedCard | null = null;

  constructor(elements: CardFormElements, choices: () => CardChoices, actions: CardFormActions) {
    this.elements = elements;
    this.choices = choices;
    setText(elements.description, CARD_DESCRIPTION.replace(/``([^`]+)``/g, "$1")); // the docstring's literals
    this.buildFields();
    elements.form.noValidate = true; // the server checks the card and says what is wrong
    elements.form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (this.editing === null) actions.propose();
      else actions.save();
    });
    elements.form.addEventListener("input", () => this.update());
    elements.propose.addEventListener("click", () => actions.propose());
    elements.save.addEventListener("click", () => actions.save());
    elements.approve.addEventListener("click", () => actions.approve());
    elements.discard.addEventListener("click", () => actions.discard());
    elements.close.addEventListener("click", () => this.close());
    this.close();
  }

  get hidden(): boolean {
    return this.elements.form.hidden;
  }

  open(values: FormValues, title: string, editing: EditedCard | null): void {
    this.editing = editing;
    this.fillChoices(values);
    this.write(values);
    setText(this.elements.title, title);
    this.showError(null);
    this.elements.form.hidden = false;
    this.update();
    this.elements.form.scrollIntoView({ block: "nearest" });
    this.inputs.get("name")?.focus();
  }

  close(): void {
    this.editing = null;
    this.elements.form.hidden = true;
    this.showError(null);
  }

  /** The card the inputs describe. */
  card(): ForkCard {
    return cardOf(this.read());
  }

  /** What an edit would send: the fields changed since the card was last saved (null: none). */
  changes(): Partial<ForkCard> | null {
    if (this.editing === null) return null;
    const changes = changedFields(this.editing.card, this.card());
    return Object.keys(changes).length > 0 ? changes : null;
  }

  setBusy(busy: boolean): void {
    this.busy = busy;
    this.update();
  }

  /** A refusal next to the form, in the server's words, the fields it names marked; null clears it. */
  showError(error: unknown): void {
    const named = error instanceof ApiError ? fieldsNamed(error) : [];
    for (const [name, input] of this.inputs) {
      if (named.includes(name)) input.setAttribute("aria-invalid", "true");
      else input.removeAttribute("aria-invalid");
    }
    setText(this.elements.errors, error === null ? "" : describeError(error));
    this.elements.errors.hidden = error === null;
  }

  private buildFields(): void {
    const groups = fieldGroups().map(([group, fields]) => {
      const set = element("fieldset", "plan-group");
      set.append(element("legend", "", group));
      for (const field of fields) set.append(this.fieldRow(field));
      return set;
    });
    this.elements.fields.replaceChildren(...groups);
  }

  private fieldRow(field: CardField): HTMLElement {
    const row = element("div", `plan-field plan-field-${field.input}`);
    const id = `plan-${field.name.replaceAll("_", "-")}`;
    const input = this.inputFor(field);
    input.id = id;
    input.name = field.name;
    const label = element("label", "", field.label);
    label.htmlFor = id;
    // A choice of the session's needs no bounds in words (a run id is ≥ 1).
    const bounds = field.bounds && field.choices === null ? ` (${field.bounds})` : "";
    const help = element("small", "help muted", field.help + bounds);
    help.id = `${id}-help`;
    input.setAttribute("aria-describedby", help.id);
    if (field.input === "checkbox") row.append(input, label, help);
    else row.append(label, input, help);
    this.inputs.set(field.name, input);
    return row;
  }

  private inputFor(field: CardField): Input {
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
      // Empty is the default the description names ("default: the parent's current step").
      if (field.nullable) input.placeholder = "default";
    } else {
      input.type = "text";
      input.spellcheck = false;
    }
    return input;
  }

  /** The parent's and the slice's choices, keeping what is chosen (even if no longer listed). */
  fillChoices(values: FormValues = this.read()): void {
    const { runs, slices } = this.choices();
    for (const field of CARD_FIELDS) {
      if (field.choices === null) continue;
      const select = this.inputs.get(field.name);
      if (!(select instanceof HTMLSelectElement)) continue;
      const chosen = String(values[field.name]);
      const choices: [string, string][] =
        field.choices === "runs"
          ? runs.map((r) => [String(r.id), `${r.name} (${r.id})`])
          : slices.map((s) => [s.name, `${s.name} (${formatCount(s.count)})`]);
      if (chosen !== "" && !choices.some(([value]) => value === chosen)) choices.unshift([chosen, chosen]);
      select.replaceChildren(...choices.map(([value, text]) => new Option(text, value, false, value === chosen)));
    }
  }

  /** The inputs' values; a field without an input (the hidden `kind`) keeps the opened card's. */
  private read(): FormValues {
    const values = { ...this.opened };
    for (const [name, input] of this.inputs) {
      values[name] = input instanceof HTMLInputElement && input.type === "checkbox" ? input.checked : input.value;
    }
    return values;
  }

  private write(values: FormValues): void {
    this.opened = values;
    for (const [name, input] of this.inputs) {
      const value = values[name];
      if (input instanceof HTMLInputElement && input.type === "checkbox") input.checked = value === true;
      else input.value = String(value);
    }
  }

  /** Buttons for the form's state; fields that mean nothing with the others (ratio without
   *  oversampling) disabled, their values kept. */
  private update(): void {
    const values = this.read();
    for (const field of CARD_FIELDS) {
      const input = this.inputs.get(field.name);
      if (input !== undefined) input.disabled = this.busy || !fieldApplies(field, values);
    }
    const draft = this.editing === null;
    const { propose, save, approve, discard } = this.elements;
    propose.hidden = !draft;
    save.hidden = approve.hidden = discard.hidden = draft;
    propose.disabled = approve.disabled = discard.disabled = this.busy;
    save.disabled = this.busy || this.changes() === null;
    this.elements.form.setAttribute("aria-busy", String(this.busy));
  }
}

export function describeError(error: unknown): string {
  return error instanceof ApiError ? error.message : `Could not reach the server: ${String(error)}`;
}
