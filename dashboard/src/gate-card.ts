// The gate card's form, as data, and what a done gate card's result says. A gate card trains a
// light gating network that routes each sample among frozen experts (the generalist first, then
// specialists) and makes the mixture a new run with a standalone artifact. No DOM here
// (gate-form.ts builds the inputs, mixture-view.ts shows the result), so all of it is tested on
// its own.
//
// As for the fork and merge cards, everything about a field but its place and its label comes
// from the server's GateCard and Expert schemas (generated/schemas.ts). `LAYOUT` names every
// field of the generated type, so a field added on the server fails `tsc` here until the form
// has a place for it.

import type { components } from "./generated/api-types";
import { boundsText } from "./card-form";
import { ExpertSchema, GateCardSchema, type JsonSchema } from "./generated/schemas";
import { formatCount, formatDuration, formatFlops, formatValue } from "./format";
import { draftName, readWorse, sameJson, type Worse } from "./merge-card";

export type GateCard = components["schemas"]["GateCard"];
export type Expert = components["schemas"]["Expert"];
/** The fields with one input each (the experts and the sets have their own lists). */
export type GateField = Exclude<keyof GateCard, "kind" | "experts" | "sets">;

export type GateInput = "text" | "number" | "select";
/** A field whose choices are the session's: its runs, or 'val' and the saved slices. */
export type GateChoices = "runs" | "data";

export interface GateFieldSpec {
  name: GateField;
  label: string;
  group: string;
  input: GateInput;
  /** For a select: the schema's choices (empty for `choices` fields, filled in by the form). */
  options: readonly string[];
  choices: GateChoices | null;
  help: string;
  bounds: string;
  numeric: boolean;
  integer: boolean;
  min: number | null;
  max: number | null;
  /** The schema's default (null for a field without one). */
  initial: unknown;
}

interface Place {
  label: string;
  group: string;
  choices?: GateChoices;
}

// Labels scoped to the gate form (the fork form's "lr", "Seed" and "Batch size" are in another
// form; the gate's own settings say they are the gate's).
const LAYOUT: Readonly<Record<GateField, Place>> = {
  name: { label: "Name", group: "Mixture" },
  run_id: { label: "Carried out by", group: "Mixture", choices: "runs" },
  routing: { label: "Routing", group: "Gate" },
  gate_input: { label: "Gate input", group: "Gate" },
  hidden: { label: "Hidden width", group: "Gate" },
  data: { label: "Held-out data", group: "Training", choices: "data" },
  steps: { label: "Gate steps", group: "Training" },
  batch_size: { label: "Gate batch size", group: "Training" },
  lr: { label: "Gate lr", group: "Training" },
  balance: { label: "Balance", group: "Training" },
  seed: { label: "Gate seed", group: "Training" },
  min_share: { label: "Min share", group: "Judging" },
};

/** The card's own description (what a gate does), for the form's head. */
export const GATE_DESCRIPTION: string = GateCardSchema.description ?? "";
export const GATE_FIELDS: readonly GateFieldSpec[] = gateFieldsOf(GateCardSchema);
/** What the mixture is compared with every expert on when the card does not say. */
export const GATE_SETS: readonly string[] = strings(GateCardSchema.properties?.["sets"]?.default, ["test"]);
export const SETS_HELP: string = GateCardSchema.properties?.["sets"]?.description ?? "";
export const EXPERTS_HELP: string = GateCardSchema.properties?.["experts"]?.description ?? "";
export const CHECKPOINT_HELP: string = ExpertSchema.properties?.["checkpoint_id"]?.description ?? "";

export function gateFieldsOf(schema: JsonSchema): GateFieldSpec[] {
  const properties = schema.properties ?? {};
  return (Object.keys(LAYOUT) as GateField[]).map((name) => {
    const property = properties[name];
    if (property === undefined) throw new Error(`the GateCard schema has no field '${name}'`);
    const place = LAYOUT[name];
    const value = (property.anyOf ?? [property]).find((v) => v.type !== "null") ?? property;
    const enumerated = (value.enum ?? []).map(String);
    const numeric = value.type === "integer" || value.type === "number";
    return {
      name,
      label: place.label,
      group: place.group,
      input: place.choices !== undefined || enumerated.length > 0 ? "select" : numeric ? "number" : "text",
      options: enumerated,
      choices: place.choices ?? null,
      help: property.description ?? "",
      bounds: boundsText(value),
      numeric,
      integer: value.type === "integer",
      min: value.minimum ?? value.exclusiveMinimum ?? null,
      max: value.maximum ?? value.exclusiveMaximum ?? null,
      initial: property.default ?? null,
    };
  });
}

// ---- values <-> card -----------------------------------------------------------------------------

/** One expert as its row holds it: the run (fixed), its checkpoint as typed ("" for the default). */
export interface ExpertValues {
  run_id: number;
  checkpoint_id: string;
}

/** What the inputs hold: text (numbers as typed), the experts' rows in order, the sets ticked. */
export interface GateValues {
  fields: Record<GateField, string>;
  experts: ExpertValues[];
  sets: string[];
}

/** What a new card's form starts with: the schema's defaults, then `prefill`. */
export function initialGateValues(prefill: Partial<GateCard>, fields: readonly GateFieldSpec[] = GATE_FIELDS): GateValues {
  const values = {} as Record<GateField, string>;
  for (const field of fields) {
    const given = prefill[field.name];
    const value = given !== undefined ? given : field.initial;
    values[field.name] = value === null || value === undefined ? "" : String(value);
  }
  const experts = (prefill.experts ?? []).map((e) => ({ run_id: e.run_id, checkpoint_id: e.checkpoint_id == null ? "" : String(e.checkpoint_id) }));
  return { fields: values, experts, sets: [...(prefill.sets ?? GATE_SETS)] };
}

/** A stored card's values as the inputs hold them. */
export function gateValuesOf(card: GateCard, fields: readonly GateFieldSpec[] = GATE_FIELDS): GateValues {
  return initialGateValues(card, fields);
}

/** The card the inputs describe. Numbers are read as typed; nothing else is checked here: the
 *  server checks the card, and a refusal names the field. */
export function gateCardOf(values: GateValues, fields: readonly GateFieldSpec[] = GATE_FIELDS): GateCard {
  const card: Record<string, unknown> = { kind: "gate" };
  for (const field of fields) {
    const text = values.fields[field.name].trim();
    card[field.name] = field.numeric ? number(text) : text;
  }
  card["experts"] = values.experts.map((e) => ({ run_id: e.run_id, checkpoint_id: number(e.checkpoint_id) }));
  card["sets"] = [...values.sets];
  // The shape is the server's to check: the type says what a valid card holds.
  return card as GateCard;
}

/** A number as typed; "" is null, and text that is not a number stays text (the server names it). */
function number(text: string): number | string | null {
  const trimmed = text.trim();
  if (trimmed === "") return null;
  const value = Number(trimmed);
  return Number.isFinite(value) ? value : trimmed;
}

/** The fields of `after` that differ from `before` (the experts and sets as wholes): what an
 *  edit sends. */
export function changedGateFields(before: GateCard, after: GateCard): Partial<GateCard> {
  const changes: Record<string, unknown> = {};
  for (const name of Object.keys(after) as (keyof GateCard)[]) {
    if (!sameJson(before[name], after[name])) changes[name] = after[name];
  }
  return changes as Partial<GateCard>;
}

// ---- a new card ----------------------------------------------------------------------------------

/** The ticked runs with the generalist first: the run with the fewest ancestors in the lineage
 *  (a root before its forks), ties by id. */
export function generalistFirst<R extends { id: number }>(picked: readonly R[], edges: readonly { parent: number; child: number }[]): R[] {
  const depth = new Map<number, number>();
  const walking = new Set<number>();
  const depthOf = (id: number): number => {
    const known = depth.get(id);
    if (known !== undefined) return known;
    if (walking.has(id)) return 0; // a loop (a lineage has none) counts as a root
    walking.add(id);
    const parents = edges.filter((e) => e.child === id && e.parent !== id).map((e) => e.parent);
    const value = parents.length === 0 ? 0 : 1 + Math.max(...parents.map(depthOf));
    walking.delete(id);
    depth.set(id, value);
    return value;
  };
  return [...picked].sort((a, b) => depthOf(a.id) - depthOf(b.id) || a.id - b.id);
}

/** A new card for the picked runs (the generalist first: see `generalistFirst`), each an expert
 *  at its newest checkpoint (the live run's current weights), carried out by `runId`. */
export function gateDraft(experts: readonly { id: number; name: string }[], runId: number, taken: Iterable<string> = []): Partial<GateCard> {
  return {
    kind: "gate",
    name: draftName("mixture of", experts.map((r) => r.name), taken),
    run_id: runId,
    experts: experts.map((r) => ({ run_id: r.id, checkpoint_id: null })),
  };
}

/** What the card will do: "top1 gate over baseline (1) + tail specialist (2) · on val · 300 steps
 *  · by baseline (1)", with an expert's checkpoint when named and a hidden layer when there is one. */
export function gatePlanText(card: Pick<GateCard, "routing" | "experts" | "data" | "steps" | "run_id" | "hidden" | "gate_input">, runName: (id: number) => string): string {
  const experts = card.experts.map((e) => `${runName(e.run_id)}${e.checkpoint_id == null ? "" : ` @ checkpoint ${e.checkpoint_id}`}`);
  const shape = [card.hidden ? `hidden ${formatCount(card.hidden)}` : "", card.gate_input === "embedding" ? "on embeddings" : ""].filter((s) => s !== "");
  const gate = `${card.routing} gate${shape.length ? ` (${shape.join(", ")})` : ""}`;
  return `${gate} over ${experts.join(" + ")} · on ${card.data} · ${formatCount(card.steps)} steps · by ${runName(card.run_id)}`;
}

/** "not worse than its best expert on test": what the mixture is judged by (validation when it
 *  is among the sets, else the first), and the share under which an expert is said unused. */
export function gateCriterionText(card: Pick<GateCard, "sets" | "min_share">): string {
  const sets = card.sets ?? GATE_SETS;
  const judged = sets.includes("val") ? "val" : (sets[0] ?? "val");
  return `not worse than its best expert on ${judged} · warns under ${formatShare(card.min_share)} of samples`;
}

/** The card's fields a refusal names: a 422's list, or a message that starts with a field's name
 *  ("steps: Input should be …", "experts: run 9 is not a run"). An expert's own checkpoint marks
 *  the experts. */
export function gateFieldsNamed(error: { message: string; fields?: readonly string[] }): (GateField | "experts" | "sets")[] {
  const names = new Set<string>([...GATE_FIELDS.map((f) => f.name), "experts", "sets"]);
  const given = error.fields?.length ? [...error.fields] : [/^(\w+)[\s:]/.exec(error.message)?.[1] ?? ""];
  const named = given.map((name) => (name === "checkpoint_id" ? "experts" : name));
  return [...new Set(named)].filter((name): name is GateField | "experts" | "sets" => names.has(name));
}

// ---- what a done gate card's result says ---------------------------------------------------------

export interface SetShares {
  /** The set's key in the result ("held-out", "test", "slice:tail"). */
  name: string;
  count: number | null;
  /** The share of samples whose top choice is each expert, in the experts' order. */
  shares: (number | null)[];
  meanProbability: (number | null)[];
}

export interface GateWarning {
  runId: number | null;
  share: number | null;
  text: string;
}

export interface Utilisation {
  /** The experts' run ids, in the card's order (the generalist first). */
  experts: number[];
  sets: SetShares[];
  warnings: GateWarning[];
}

export interface GateVerdict {
  met: boolean | null;
  worse: Worse | null;
  /** Experts the gate (almost) stopped using. */
  dead: number[];
}

export interface GateArtifact {
  written: boolean;
  error: string | null;
  onnx: { written: boolean; error: string | null; maxAbsDiff: number | null } | null;
  files: string[];
  flopsPerSample: number | null;
}

// TODO(generated): the server's PlanOut declares `result` as a plain object (its shape is
// actions/mixture.py's `execute`); once it declares the models, the schema types them and these go.
export function readUtilisation(result: Record<string, unknown> | null | undefined): Utilisation | null {
  const raw = result?.["utilisation"];
  if (!isRecord(raw)) return null;
  const experts = numbers(raw["experts"]);
  const sets = isRecord(raw["sets"]) ? raw["sets"] : {};
  return {
    experts,
    sets: Object.entries(sets).filter((e): e is [string, Record<string, unknown>] => isRecord(e[1])).map(([name, set]) => ({
      name,
      count: finite(set["count"]),
      shares: experts.map((_, i) => (Array.isArray(set["shares"]) ? finite(set["shares"][i]) : null)),
      meanProbability: experts.map((_, i) => (Array.isArray(set["mean_probability"]) ? finite(set["mean_probability"][i]) : null)),
    })),
    warnings: (Array.isArray(raw["warnings"]) ? raw["warnings"] : [])
      .filter((w): w is Record<string, unknown> => isRecord(w) && typeof w["text"] === "string")
      .map((w) => ({ runId: finite(w["run_id"]), share: finite(w["share"]), text: String(w["text"]) })),
  };
}

export function readGateVerdict(result: Record<string, unknown> | null | undefined): GateVerdict | null {
  const verdict = result?.["verdict"];
  if (!isRecord(verdict)) return null;
  return { met: typeof verdict["met"] === "boolean" ? verdict["met"] : null, worse: readWorse(verdict["worse"]), dead: numbers(verdict["dead"]) };
}

export function readArtifact(result: Record<string, unknown> | null | undefined): GateArtifact | null {
  const raw = result?.["artifact"];
  if (!isRecord(raw)) return null;
  const onnx = isRecord(raw["onnx"]) ? raw["onnx"] : null;
  return {
    written: raw["written"] === true,
    error: typeof raw["error"] === "string" ? raw["error"] : null,
    onnx: onnx === null ? null : { written: onnx["written"] === true, error: typeof onnx["error"] === "string" ? onnx["error"] : null, maxAbsDiff: finite(onnx["max_abs_diff"]) },
    files: Array.isArray(raw["files"]) ? raw["files"].filter((f): f is string => typeof f === "string") : [],
    flopsPerSample: finite(raw["flops_per_sample"]),
  };
}

/** A share as a percentage with one decimal: 0.6321 -> "63.2%". */
export function formatShare(share: number | null | undefined): string {
  return share == null || !Number.isFinite(share) ? "—" : `${(share * 100).toFixed(1)}%`;
}

/** A set's column head: "held-out" is the gate's own training data, "slice:x" a saved slice. */
export function setLabel(name: string, heldOut: string): string {
  if (name === "held-out") return `held-out (${heldOut})`;
  if (name.startsWith("slice:")) return `${name.slice("slice:".length)} (slice)`;
  return name;
}

/** The utilisation's sets in reading order: the held-out data, the card's sets as the card lists
 *  them, then the other saved slices. */
export function orderedSets(utilisation: Utilisation, cardSets: readonly string[]): SetShares[] {
  const rank = (name: string) => (name === "held-out" ? -1 : cardSets.includes(name) ? cardSets.indexOf(name) : cardSets.length);
  return [...utilisation.sets].sort((a, b) => rank(a.name) - rank(b.name));
}

/** A done gate's outcome: "not worse than any expert" or why it is, and the experts left unused. */
export function gateOutcomeText(verdict: GateVerdict): string {
  const head = verdict.worse === null ? "not worse than any expert" : verdict.worse.text;
  const dead = verdict.dead.length === 0 ? "" : ` · unused: ${verdict.dead.map((id) => `run ${id}`).join(", ")}`;
  return `${head}${dead}`;
}

/** The artifact in words: its files and inference cost, or why there is none; ONNX's parity. */
export function artifactText(artifact: GateArtifact): string {
  if (!artifact.written) return `No artifact: ${artifact.error ?? "the server gave no reason"}`;
  const flops = artifact.flopsPerSample === null ? "" : ` · ${formatFlops(artifact.flopsPerSample)} per sample`;
  return `Artifact: ${artifact.files.join(", ") || "no files listed"}${flops}`;
}

export function onnxText(artifact: GateArtifact): string {
  const onnx = artifact.onnx;
  if (!artifact.written || onnx === null) return "ONNX: not exported";
  if (!onnx.written) return `ONNX: not written (${onnx.error ?? "no reason given"})`;
  const diff = onnx.maxAbsDiff === null ? "" : ` · onnxruntime matches torch within ${formatValue(onnx.maxAbsDiff)}`;
  return `ONNX: written${diff}`;
}

/** How the gate trained: "gate trained in 1 s · loss 0.693 → 0.214 · top1, inputs, linear";
 *  null when the result does not say. */
export function gateTrainingText(result: Record<string, unknown> | null | undefined): string | null {
  const gate = result?.["gate"];
  if (!isRecord(gate)) return null;
  const losses = numbers(gate["gate_loss"]);
  const seconds = finite(gate["seconds"]);
  const loss = losses.length > 0 ? ` · loss ${formatValue(losses[0])} → ${formatValue(losses[losses.length - 1])}` : "";
  const hidden = finite(gate["hidden"]);
  const shape = [String(gate["routing"] ?? ""), String(gate["gate_input"] ?? ""), hidden ? `hidden ${formatCount(hidden)}` : "linear"];
  return `gate trained${seconds === null ? "" : ` in ${formatDuration(seconds)}`}${loss} · ${shape.filter((s) => s !== "").join(", ")}`;
}

function strings(value: unknown, fallback: readonly string[]): string[] {
  return Array.isArray(value) ? value.filter((v): v is string => typeof v === "string") : [...fallback];
}

function numbers(value: unknown): number[] {
  return Array.isArray(value) ? value.filter((v): v is number => typeof v === "number" && Number.isFinite(v)) : [];
}

function finite(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
