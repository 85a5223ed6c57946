// The fork card's form, as data: which input each field gets, its help text, default and bounds,
// and the conversions between the card (JSON) and what the inputs hold (text and ticks). No DOM
// here (plan-form.ts builds the inputs), so the conversions are tested on their own.
//
// Everything about a field except its place and its label comes from the card's schema, the
// server's ForkCard in the OpenAPI document (generated/schemas.ts): its description is the help
// text, its default the initial value, its bounds the input's min and max, its enum the choices.
// `LAYOUT` has to name every field of the generated ForkCard type, so a field added on the server
// fails `tsc` here until the form has a place for it.

import type { ForkCard, ForkCardField } from "./api";
import { ForkCardSchema, type JsonSchema } from "./generated/schemas";

/** What the inputs hold: text (numbers too, as typed; "" for none) or a tick. */
export type FormValues = Record<ForkCardField, string | boolean>;

export type FieldInput = "text" | "number" | "select" | "checkbox" | "hidden";

/** A field whose choices are the session's, not the schema's: filled in by the panel. */
export type FieldChoices = "runs" | "slices";

export interface CardField {
  name: ForkCardField;
  label: string;
  group: string;
  input: FieldInput;
  /** For a select: the schema's choices (empty for `choices` fields, filled in by the panel). */
  options: readonly string[];
  choices: FieldChoices | null;
  /** The schema's description, and its bounds in words ("≥ 1, ≤ 1,000,000"). */
  help: string;
  bounds: string;
  /** The value is a number (whatever the input: the parent run is a select), and a whole one. */
  numeric: boolean;
  integer: boolean;
  /** Empty means "the default the description names" (the schema allows null). */
  nullable: boolean;
  required: boolean;
  min: number | null;
  max: number | null;
  /** Only meaningful when another field has a value (ratio with mix "oversample"). */
  when: { field: ForkCardField; value: string } | null;
}

interface Place {
  label: string;
  group: string;
  choices?: FieldChoices;
  when?: { field: ForkCardField; value: string };
}

// The page's part: labels and order. (Labels avoid the words of the controls' own labels -
// "Learning rate", "Epochs" - so each label names one input on the page.)
const LAYOUT: Readonly<Record<ForkCardField, Place>> = {
  kind: { label: "Kind", group: "" },
  name: { label: "Name", group: "Fork" },
  run_id: { label: "Parent run", group: "Fork", choices: "runs" },
  slice: { label: "Slice", group: "Fork", choices: "slices" },
  checkpoint_id: { label: "Checkpoint", group: "Fork" },
  mix: { label: "Mix", group: "Data" },
  ratio: { label: "Slice share", group: "Data", when: { field: "mix", value: "oversample" } },
  budget: { label: "Budget", group: "Budget" },
  budget_unit: { label: "Unit", group: "Budget" },
  lr: { label: "lr", group: "Optimiser" },
  weight_decay: { label: "Weight decay", group: "Optimiser" },
  batch_size: { label: "Batch size", group: "Optimiser" },
  trains: { label: "Trains", group: "Optimiser" },
  rank: { label: "Adapter rank", group: "Optimiser", when: { field: "trains", value: "adapters" } },
  seed: { label: "Seed", group: "Optimiser" },
  control: { label: "Matched control", group: "Control" },
  min_slice_gain_pt: { label: "Min slice gain (pt)", group: "Success criterion" },
  max_other_drop_pt: { label: "Max other drop (pt)", group: "Success criterion" },
};

const count = new Intl.NumberFormat("en-US", { maximumFractionDigits: 6 });

/** The card's own description (what a fork does), for the form's head. */
export const CARD_DESCRIPTION: string = ForkCardSchema.description ?? "";

/** Every field of the card, in the form's order. */
export const CARD_FIELDS: readonly CardField[] = fieldsOf(ForkCardSchema);

/** The form's groups, in order, each with its fields (the hidden `kind` in none). */
export function fieldGroups(fields: readonly CardField[] = CARD_FIELDS): [string, CardField[]][] {
  const groups = new Map<string, CardField[]>();
  for (const field of fields) {
    if (field.input === "hidden") continue;
    groups.set(field.group, [...(groups.get(field.group) ?? []), field]);
  }
  return [...groups];
}

export function fieldsOf(schema: JsonSchema): CardField[] {
  const properties = schema.properties ?? {};
  const required = new Set(schema.required ?? []);
  return (Object.keys(LAYOUT) as ForkCardField[]).map((name) => {
    const property = properties[name];
    if (property === undefined) throw new Error(`the ForkCard schema has no field '${name}'`);
    return fieldOf(name, property, required.has(name), LAYOUT[name]);
  });
}

function fieldOf(name: ForkCardField, property: JsonSchema, required: boolean, place: Place): CardField {
  const variants = property.anyOf ?? [property];
  const value = variants.find((v) => v.type !== "null") ?? property;
  const nullable = variants.some((v) => v.type === "null");
  const enumerated = (value.enum ?? []).map(String);
  const input: FieldInput =
    value.const !== undefined ? "hidden"
    : place.choices !== undefined || enumerated.length > 0 ? "select"
    : value.type === "boolean" ? "checkbox"
    : value.type === "integer" || value.type === "number" ? "number"
    : "text";
  return {
    name,
    label: place.label,
    group: place.group,
    input,
    options: enumerated,
    choices: place.choices ?? null,
    help: property.description ?? value.description ?? "",
    bounds: boundsText(value),
    numeric: value.type === "integer" || value.type === "number",
    integer: value.type === "integer",
    nullable,
    required,
    min: value.minimum ?? value.exclusiveMinimum ?? null,
    max: value.maximum ?? value.exclusiveMaximum ?? null,
    when: place.when ?? null,
  };
}

/** A number's bounds in words: "> 0, ≤ 10", "≥ 1, ≤ 1,000,000"; "" for none. Run ids and
 *  seeds (up to 2^31) are left unbounded in words: nobody types near that. */
export function boundsText(schema: JsonSchema): string {
  const parts: string[] = [];
  const big = (v: number) => v >= 2 ** 31;
  if (schema.exclusiveMinimum !== undefined) parts.push(`> ${count.format(schema.exclusiveMinimum)}`);
  else if (schema.minimum !== undefined) parts.push(`≥ ${count.format(schema.minimum)}`);
  if (schema.exclusiveMaximum !== undefined) parts.push(`< ${count.format(schema.exclusiveMaximum)}`);
  else if (schema.maximum !== undefined && !big(schema.maximum)) parts.push(`≤ ${count.format(schema.maximum)}`);
  return parts.join(", ");
}

/** What a new card's form starts with: the schema's defaults, then `prefill`. */
export function initialValues(prefill: Partial<ForkCard>, fields: readonly CardField[] = CARD_FIELDS): FormValues {
  const properties = ForkCardSchema.properties ?? {};
  const values = {} as FormValues;
  for (const field of fields) {
    const property = properties[field.name];
    const given = prefill[field.name];
    const fallback = property?.const ?? property?.default ?? null;
    values[field.name] = shown(field, given !== undefined ? given : fallback);
  }
  return values;
}

/** A card's values as the inputs hold them (null as ""). */
export function valuesOf(card: ForkCard, fields: readonly CardField[] = CARD_FIELDS): FormValues {
  const values = {} as FormValues;
  for (const field of fields) values[field.name] = shown(field, card[field.name]);
  return values;
}

function shown(field: CardField, value: unknown): string | boolean {
  if (field.input === "checkbox") return value === true;
  return value === null || value === undefined ? "" : String(value);
}

/** The card the inputs describe. Numbers are read as typed; an empty one is null (for a nullable
 *  field: the default its description names). Nothing is checked here: the server checks the
 *  whole card and a wrong value comes back as a refusal naming the field, in its words. */
export function cardOf(values: FormValues, fields: readonly CardField[] = CARD_FIELDS): ForkCard {
  const card: Record<string, unknown> = {};
  for (const field of fields) {
    const value = values[field.name];
    if (field.input === "checkbox") {
      card[field.name] = value === true;
    } else if (field.numeric) {
      const text = String(value).trim();
      const number = Number(text);
      card[field.name] = text === "" ? null : Number.isFinite(number) ? number : text;
    } else {
      card[field.name] = typeof value === "string" ? value.trim() : value;
    }
  }
  // The shape is the server's to check (see above): the type says what a valid card holds.
  return card as ForkCard;
}

/** The fields of `after` that differ from `before`: what an edit sends. */
export function changedFields(before: ForkCard, after: ForkCard): Partial<ForkCard> {
  const changes: Record<string, unknown> = {};
  for (const name of Object.keys(after) as ForkCardField[]) {
    if (before[name] !== after[name]) changes[name] = after[name];
  }
  return changes as Partial<ForkCard>;
}

/** Whether a field means anything with the other values (ratio only with mix "oversample"). */
export function fieldApplies(field: CardField, values: FormValues): boolean {
  return field.when === null || values[field.when.field] === field.when.value;
}
