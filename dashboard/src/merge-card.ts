// The merge card's form, as data: which input each field gets, its help text, default and bounds,
// which fields mean something with which method, and the conversions between the card (JSON)
// and what the inputs hold. Also what a merge card's result says: its preview (a comparison and,
// when the candidate lost to a parent, why) and, once done, its verdict. No DOM here
// (merge-form.ts builds the inputs), so all of it is tested on its own.
//
// As for the fork card (card-form.ts), everything about a field but its place, its label and the
// methods it belongs to comes from the server's MergeCard and MergeParent schemas (the OpenAPI
// document, generated/schemas.ts). `LAYOUT` names every field of the generated type, so a field
// added on the server fails `tsc` here until the form has a place for it.

import type { components } from "./generated/api-types";
import { boundsText } from "./card-form";
import { MergeCardSchema, MergeParentSchema, type JsonSchema } from "./generated/schemas";
import { formatValue } from "./format";

export type MergeCard = components["schemas"]["MergeCard"];
export type MergeParent = components["schemas"]["MergeParent"];
export type MergeMethod = MergeCard["method"];
/** The fields with one input each (the parents and the sets have their own lists). */
export type MergeField = Exclude<keyof MergeCard, "kind" | "parents" | "sets">;

export type MergeInput = "text" | "number" | "select" | "checkbox";
/** A field whose choices are the session's: its runs, the card's parents, 'train' and the slices. */
export type MergeChoices = "runs" | "parents" | "data";

export interface MergeFieldSpec {
  name: MergeField;
  label: string;
  group: string;
  input: MergeInput;
  /** For a select: the schema's choices (empty for `choices` fields, filled in by the form). */
  options: readonly string[];
  choices: MergeChoices | null;
  help: string;
  bounds: string;
  numeric: boolean;
  integer: boolean;
  /** Empty means "the default the description names" (the schema allows null). */
  nullable: boolean;
  min: number | null;
  max: number | null;
  /** The schema's default (null for a nullable field without one). */
  initial: unknown;
  /** The methods that read it; null: every method. */
  methods: readonly MergeMethod[] | null;
}

export const TASK_VECTOR_METHODS: readonly MergeMethod[] = ["task_arithmetic", "ties", "dare_linear", "dare_ties"];
const DENSITY_METHODS: readonly MergeMethod[] = ["ties", "dare_linear", "dare_ties"];
const SIGN_METHODS: readonly MergeMethod[] = ["ties", "dare_ties"];
/** Methods that make weights and so may recompute BatchNorm statistics (distill trains a student). */
const WEIGHT_SPACE: readonly MergeMethod[] = ["linear", "greedy_soup", ...TASK_VECTOR_METHODS, "fisher", "adapter_fusion"];
/** Methods whose recipe weighs each parent (a greedy soup picks uniform ingredients; distill
 *  averages its teachers). */
const WEIGHTED: readonly MergeMethod[] = ["linear", ...TASK_VECTOR_METHODS, "fisher", "adapter_fusion"];

interface Place {
  label: string;
  group: string;
  choices?: MergeChoices;
  methods?: readonly MergeMethod[];
}

// Labels differ from the fork form's and the controls' ("Name" aside, each form scopes its own),
// and the method's own parameters keep mergekit's names.
const LAYOUT: Readonly<Record<MergeField, Place>> = {
  name: { label: "Name", group: "Merge" },
  run_id: { label: "Carried out by", group: "Merge", choices: "runs" },
  method: { label: "Method", group: "Merge" },
  normalize: { label: "Normalize", group: "Method", methods: ["linear", "task_arithmetic"] },
  lambda: { label: "Lambda", group: "Method", methods: TASK_VECTOR_METHODS },
  density: { label: "Density", group: "Method", methods: DENSITY_METHODS },
  majority_sign: { label: "Majority sign", group: "Method", methods: SIGN_METHODS },
  base_checkpoint_id: { label: "Base checkpoint", group: "Method", methods: TASK_VECTOR_METHODS },
  rank: { label: "Fused rank", group: "Method", methods: ["adapter_fusion"] },
  fisher_samples: { label: "Fisher samples", group: "Method", methods: ["fisher"] },
  fisher_estimator: { label: "Fisher estimator", group: "Method", methods: ["fisher"] },
  temperature: { label: "Temperature", group: "Method", methods: ["distill"] },
  alpha: { label: "Alpha", group: "Method", methods: ["distill"] },
  budget: { label: "Student steps", group: "Method", methods: ["distill"] },
  lr: { label: "Student lr", group: "Method", methods: ["distill"] },
  student: { label: "Student", group: "Method", choices: "parents", methods: ["distill"] },
  data: { label: "Data", group: "Data", choices: "data" },
  update_bn: { label: "Update BatchNorm", group: "Data", methods: WEIGHT_SPACE },
  seed: { label: "Merge seed", group: "Judging" },
  override: { label: "Override: keep it even if worse", group: "Judging" },
};

/** The card's own description (what a merge does), for the form's head. */
export const MERGE_DESCRIPTION: string = MergeCardSchema.description ?? "";
/** What the candidate is compared on when the card does not say (the server's default_factory,
 *  which the schema does not carry). */
export const DEFAULT_SETS: readonly string[] = ["val"];
export const MERGE_FIELDS: readonly MergeFieldSpec[] = mergeFieldsOf(MergeCardSchema);
/** The parents' per-row inputs: their help and bounds. */
export const PARENT_FIELDS = {
  checkpoint_id: parentField("checkpoint_id"),
  weight: parentField("weight"),
} as const;
export const SETS_HELP: string = MergeCardSchema.properties?.["sets"]?.description ?? "";
export const PARENTS_HELP: string = MergeCardSchema.properties?.["parents"]?.description ?? "";

export function mergeFieldsOf(schema: JsonSchema): MergeFieldSpec[] {
  const properties = schema.properties ?? {};
  return (Object.keys(LAYOUT) as MergeField[]).map((name) => {
    const property = properties[name];
    if (property === undefined) throw new Error(`the MergeCard schema has no field '${name}'`);
    const place = LAYOUT[name];
    const variants = property.anyOf ?? [property];
    const value = variants.find((v) => v.type !== "null") ?? property;
    const enumerated = (value.enum ?? []).map(String);
    const numeric = value.type === "integer" || value.type === "number";
    return {
      name,
      label: place.label,
      group: place.group,
      input: place.choices !== undefined || enumerated.length > 0 ? "select" : value.type === "boolean" ? "checkbox" : numeric ? "number" : "text",
      options: enumerated,
      choices: place.choices ?? null,
      help: property.description ?? "",
      bounds: boundsText(value),
      numeric,
      integer: value.type === "integer",
      nullable: variants.some((v) => v.type === "null"),
      min: value.minimum ?? value.exclusiveMinimum ?? null,
      max: value.maximum ?? value.exclusiveMaximum ?? null,
      initial: property.default ?? null,
      methods: place.methods ?? null,
    };
  });
}

function parentField(name: "checkpoint_id" | "weight"): { help: string; bounds: string; initial: unknown } {
  const property = MergeParentSchema.properties?.[name];
  if (property === undefined) throw new Error(`the MergeParent schema has no field '${name}'`);
  const value = (property.anyOf ?? [property]).find((v) => v.type !== "null") ?? property;
  return { help: property.description ?? "", bounds: boundsText(value), initial: property.default ?? null };
}

/** The methods, in the schema's order. */
export const MERGE_METHODS: readonly MergeMethod[] = (MERGE_FIELDS.find((f) => f.name === "method")?.options ?? []) as MergeMethod[];

/** Whether a field means anything with a method (density only for ties and DARE, …). */
export function fieldAppliesTo(field: Pick<MergeFieldSpec, "methods">, method: string): boolean {
  return field.methods === null || field.methods.includes(method as MergeMethod);
}

/** The fields the form shows for a method, in order. */
export function fieldsFor(method: string, fields: readonly MergeFieldSpec[] = MERGE_FIELDS): MergeField[] {
  return fields.filter((f) => fieldAppliesTo(f, method)).map((f) => f.name);
}

/** Whether the method weighs each parent (a greedy soup and a distillation do not). */
export function weightsApply(method: string): boolean {
  return WEIGHTED.includes(method as MergeMethod);
}

// ---- values <-> card -----------------------------------------------------------------------------

/** One parent as its row holds it: the run (fixed), its checkpoint and weight as typed. */
export interface ParentValues {
  run_id: number;
  checkpoint_id: string;
  weight: string;
}

/** What the inputs hold: text (numbers as typed; "" for none) or a tick, the parents' rows, and
 *  the sets ticked. */
export interface MergeValues {
  fields: Record<MergeField, string | boolean>;
  parents: ParentValues[];
  sets: string[];
}

/** What a new card's form starts with: the schema's defaults, then `prefill`. */
export function initialMergeValues(prefill: Partial<MergeCard>, fields: readonly MergeFieldSpec[] = MERGE_FIELDS): MergeValues {
  const values = {} as Record<MergeField, string | boolean>;
  for (const field of fields) {
    const given = prefill[field.name];
    values[field.name] = shown(field, given !== undefined ? given : field.initial);
  }
  return { fields: values, parents: (prefill.parents ?? []).map(parentValues), sets: [...(prefill.sets ?? DEFAULT_SETS)] };
}

/** A card's values as the inputs hold them (null as ""). */
export function mergeValuesOf(card: MergeCard, fields: readonly MergeFieldSpec[] = MERGE_FIELDS): MergeValues {
  return initialMergeValues(card, fields);
}

function parentValues(parent: MergeParent): ParentValues {
  const weight = parent.weight ?? PARENT_FIELDS.weight.initial;
  return { run_id: parent.run_id, checkpoint_id: parent.checkpoint_id == null ? "" : String(parent.checkpoint_id), weight: String(weight) };
}

function shown(field: MergeFieldSpec, value: unknown): string | boolean {
  if (field.input === "checkbox") return value === true;
  return value === null || value === undefined ? "" : String(value);
}

/** The card the inputs describe. A field the method does not read is sent as the schema's
 *  default, so a value left in a hidden input can neither be refused nor change the recipe.
 *  Numbers are read as typed (an empty one is null: the default its description names); nothing
 *  else is checked here: the server checks the card, and a refusal names the field. */
export function mergeCardOf(values: MergeValues, fields: readonly MergeFieldSpec[] = MERGE_FIELDS): MergeCard {
  const method = String(values.fields.method);
  const card: Record<string, unknown> = { kind: "merge" };
  for (const field of fields) {
    card[field.name] = fieldAppliesTo(field, method) ? read(field, values.fields[field.name]) : field.initial;
  }
  const weighted = weightsApply(method);
  card["parents"] = values.parents.map((p) => ({
    run_id: p.run_id,
    checkpoint_id: number(p.checkpoint_id),
    weight: weighted ? number(p.weight) ?? PARENT_FIELDS.weight.initial : PARENT_FIELDS.weight.initial,
  }));
  card["sets"] = [...values.sets];
  // The shape is the server's to check (see above): the type says what a valid card holds.
  return card as MergeCard;
}

function read(field: MergeFieldSpec, value: string | boolean): unknown {
  if (field.input === "checkbox") return value === true;
  const text = String(value).trim();
  if (!field.numeric) return text === "" && field.nullable ? null : text;
  return number(text);
}

/** A number as typed; "" is null, and text that is not a number stays text (the server names it). */
function number(text: string): number | string | null {
  const trimmed = text.trim();
  if (trimmed === "") return null;
  const value = Number(trimmed);
  return Number.isFinite(value) ? value : trimmed;
}

/** The fields of `after` that differ from `before` (the parents and sets as wholes): what an
 *  edit sends. */
export function changedMergeFields(before: MergeCard, after: MergeCard): Partial<MergeCard> {
  const changes: Record<string, unknown> = {};
  for (const name of Object.keys(after) as (keyof MergeCard)[]) {
    if (!sameJson(before[name], after[name])) changes[name] = after[name];
  }
  return changes as Partial<MergeCard>;
}

// ---- a new card ----------------------------------------------------------------------------------

const NAME_LENGTH = 64;

/** "merge of tail specialist and tail specialist control": the runs' names, in the characters a
 *  run's name may hold, at most 64 of them, and not a name the session already has (" 2", " 3",
 *  … after it). */
export function mergeName(names: readonly string[], taken: Iterable<string> = []): string {
  return draftName("merge of", names, taken);
}

/** "PREFIX a and b": a new run's name from the runs' names (a merge's, a mixture's), as
 *  `mergeName` says. */
export function draftName(prefix: string, names: readonly string[], taken: Iterable<string> = []): string {
  const clean = names.map((n) => n.replace(/[^A-Za-z0-9 _.-]+/g, " ").replace(/\s+/g, " ").trim()).filter((n) => n !== "");
  const base = `${prefix} ${clean.join(" and ")}`.slice(0, NAME_LENGTH).trim();
  const used = new Set(taken);
  if (!used.has(base)) return base;
  for (let i = 2; ; i++) {
    const suffix = ` ${i}`;
    const name = base.slice(0, NAME_LENGTH - suffix.length).trim() + suffix;
    if (!used.has(name)) return name;
  }
}

/** The run that carries a merge out: a live run that takes the card (among the picked runs if
 *  one is, else the first of the session's); null when there is none. */
export function carrierOf(runs: readonly { id: number; live: boolean; commands: readonly string[] }[], picked: readonly number[]): number | null {
  const able = runs.filter((r) => r.live && r.commands.includes("execute_plan"));
  return (able.find((r) => picked.includes(r.id)) ?? able[0])?.id ?? null;
}

/** A new card for the picked runs: each a parent with weight 1 (its newest checkpoint), the
 *  method linear (a uniform soup), carried out by `runId`. */
export function mergeDraft(picked: readonly { id: number; name: string }[], runId: number, taken: Iterable<string> = []): Partial<MergeCard> {
  return {
    kind: "merge",
    name: mergeName(picked.map((r) => r.name), taken),
    run_id: runId,
    method: "linear",
    parents: picked.map((r) => ({ run_id: r.id, checkpoint_id: null, weight: 1 })),
  };
}

/** What the card will do: "linear of tail specialist (2) + control (3) · by baseline (1)", with
 *  a parent's weight when the method weighs them and it is not 1, its checkpoint when named. */
export function mergePlanText(card: Pick<MergeCard, "method" | "parents" | "run_id" | "override">, runName: (id: number) => string): string {
  const weighted = weightsApply(card.method);
  const parents = card.parents.map((p) => {
    const checkpoint = p.checkpoint_id == null ? "" : ` @ checkpoint ${p.checkpoint_id}`;
    const weight = weighted && p.weight !== undefined && p.weight !== 1 ? ` ×${formatValue(p.weight)}` : "";
    return `${runName(p.run_id)}${checkpoint}${weight}`;
  });
  return `${card.method} of ${parents.join(" + ")} · by ${runName(card.run_id)}${card.override ? " · override" : ""}`;
}

/** "not worse than its best parent on val": the greedy-soup rule the merge is kept by (judged on
 *  validation, else the first of its sets), and whether the card overrides it. */
export function mergeCriterionText(card: Pick<MergeCard, "sets" | "override">): string {
  const sets = card.sets ?? DEFAULT_SETS;
  const judged = sets.includes("val") ? "val" : (sets[0] ?? "val");
  return `not worse than its best parent on ${judged}${card.override ? " (override: kept anyway)" : ""}`;
}

/** The card's fields a refusal names: a 422's list, or a message that starts with a field's name
 *  ("density: Input should be greater than 0", "parents: run 7 is not a run"). A parent's own
 *  field ("weight", "checkpoint_id" of a 422 on one parent) marks the parents. */
export function mergeFieldsNamed(error: { message: string; fields?: readonly string[] }): (MergeField | "parents" | "sets")[] {
  const names = new Set<string>([...MERGE_FIELDS.map((f) => f.name), "parents", "sets"]);
  const given = error.fields?.length ? [...error.fields] : [/^(\w+)[\s:]/.exec(error.message)?.[1] ?? ""];
  const named = given.map((name) => (name === "weight" || name === "checkpoint_id" ? "parents" : name));
  return [...new Set(named)].filter((name): name is MergeField | "parents" | "sets" => names.has(name));
}

// ---- what a merge card's result says ------------------------------------------------------------

/** Why a candidate is worse than a parent: the best parent on the judged set, by how much. */
export interface Worse {
  run: string;
  set: string;
  metric: string;
  gap: number | null;
  text: string;
}

export interface MergePreview {
  /** The card as the preview saw it (without name and override), as the server wrote it. */
  card: string | null;
  comparisonId: number | null;
  worse: Worse | null;
}

// TODO(generated): the server's PlanOut declares `result` as a plain object; once it declares the
// preview's and the verdict's models, the schema types them and this reading goes.
export function readPreview(result: Record<string, unknown> | null | undefined): MergePreview | null {
  const preview = result?.["preview"];
  if (!isRecord(preview)) return null;
  return {
    card: typeof preview["card"] === "string" ? preview["card"] : null,
    comparisonId: finite(preview["comparison_id"]),
    worse: readWorse(preview["worse"]),
  };
}

/** A done merge's verdict: met (not worse than its best parent) or not (kept by override). */
export function readMergeVerdict(result: Record<string, unknown> | null | undefined): { met: boolean | null; worse: Worse | null } | null {
  const verdict = result?.["verdict"];
  if (!isRecord(verdict)) return null;
  return { met: typeof verdict["met"] === "boolean" ? verdict["met"] : null, worse: readWorse(verdict["worse"]) };
}

/** Why a candidate (a merge, a mixture) is worse than the best of the runs it was made of. */
export function readWorse(value: unknown): Worse | null {
  if (!isRecord(value) || typeof value["text"] !== "string") return null;
  return {
    run: String(value["run"] ?? ""),
    set: String(value["set"] ?? ""),
    metric: String(value["metric"] ?? ""),
    gap: finite(value["gap"]),
    text: value["text"],
  };
}

/** Whether a preview is of the card as it is now (a changed method, parent or parameter needs a
 *  new one; the name and override do not change the candidate). */
export function previewIsCurrent(preview: MergePreview, card: MergeCard): boolean {
  if (preview.card === null) return false;
  let seen: unknown;
  try {
    seen = JSON.parse(preview.card);
  } catch {
    return false;
  }
  const { name: _name, override: _override, ...now } = card;
  return sameJson(seen, now);
}

/** What a preview says, in words: "not worse than any parent on val" or the server's reason,
 *  with what approving then needs. */
export function previewText(preview: MergePreview, override: boolean): string {
  if (preview.worse === null) return "The candidate is not worse than any parent: it can be approved.";
  const need = override ? "override is ticked, so approving keeps it anyway." : "approving it needs “override” ticked (and saved).";
  return `Warning: ${preview.worse.text}; ${need}`;
}

/** A done merge's outcome: "kept · not worse than any parent", or "kept by override · …". */
export function mergeOutcomeText(verdict: { met: boolean | null; worse: Worse | null }): string {
  if (verdict.met === true || verdict.worse === null) return "kept · not worse than any parent";
  return `kept by override · ${verdict.worse.text}`;
}

/** Equal as JSON: objects by their keys in any order, 1 and 1.0 alike. */
export function sameJson(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (Array.isArray(a) || Array.isArray(b)) {
    return Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((v, i) => sameJson(v, b[i]));
  }
  if (isRecord(a) && isRecord(b)) {
    const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
    return [...keys].every((k) => sameJson(a[k] ?? null, b[k] ?? null));
  }
  return false;
}

function finite(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
