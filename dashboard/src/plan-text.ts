// What a plan card says, in words: its plan and criterion, a done fork's verdict, and which of
// its fields a refusal names. Pure (no DOM): plans.ts shows these, the tests check them.

import type { CardField } from "./card-form";
import { CARD_FIELDS } from "./card-form";
import type { ForkCard, ForkCardField, PlanCard, PlanOut } from "./api";
import { formatCount, formatPoints, formatRate, formatValue } from "./format";
import { benchmarkPlanText } from "./benchmark-card";
import { gatePlanText } from "./gate-card";
import { mergePlanText } from "./merge-card";

/** The run every difference of a fork's verdict is taken against. */
export function referenceOf(card: Pick<ForkCard, "control">): string {
  return card.control ? "the control" : "the parent at the fork";
}

/** "slice ≥ +0.0 pt, held-out ≥ -1.0 pt vs the control": the fork's criterion, stated before it
 *  runs. Everything but the slice is judged on validation (the rest of the training data when
 *  the run has no validation set). */
export function criterionText(card: Pick<ForkCard, "control" | "min_slice_gain_pt" | "max_other_drop_pt">): string {
  return `slice ≥ ${formatPoints(card.min_slice_gain_pt)}, held-out ≥ ${formatPoints(-card.max_other_drop_pt)} vs ${referenceOf(card)}`;
}

/** What a card will do: "tail · from baseline (1) · 2 epochs · lr 0.05 · with control", for a
 *  curation "reweight tail ×2 · on baseline (1)", for a merge "linear of a (2) + b (3) · by
 *  baseline (1)", for a gate "top1 gate over a (1) + b (2) · on val · 300 steps · by a (1)", for a
 *  benchmark "m (4) vs monolith, merge (linear, ties), generalist · on test · by a (1)".
 *  `runName` names a run. */
export function planText(card: PlanCard, runName: (id: number) => string): string {
  switch (card.kind) {
    case "fork":
      return `${card.slice} · from ${runName(card.run_id)} · ${formatCount(card.budget)} ${card.budget_unit} · lr ${formatRate(card.lr)}${card.control ? " · with control" : ""}`;
    case "curate": {
      const weight = card.action === "reweight" ? ` ×${formatValue(card.weight)}` : "";
      const from = card.from_step == null ? "" : ` · from step ${formatCount(card.from_step)}`;
      return `${card.action} ${card.slice}${weight} · on ${runName(card.run_id)}${from}`;
    }
    case "merge":
      return mergePlanText(card, runName);
    case "gate":
      return gatePlanText(card, runName);
    case "benchmark":
      return benchmarkPlanText(card, runName);
  }
}

/** A card's own name: a fork's specialist, a merge's merged run, a gate's mixture, else what it does. */
export function cardTitle(card: PlanCard): string {
  if (card.kind === "curate") return `${card.kind} ${card.slice}`;
  if (card.kind === "benchmark") return `benchmark of run ${card.mixture}`;
  return card.name;
}

/** A done fork's verdict, read from its result. */
export interface Verdict {
  /** null: it could not be decided (a difference could not be measured). */
  met: boolean | null;
  slicePt: number | null;
  /** The other sets ("val", "rest" of the training data), their change in points, and whether
   *  the criterion judged them. */
  others: { set: string; pt: number | null; judged: boolean }[];
}

// TODO(generated): the server's PlanOut declares `result` as a plain object; once it declares the
// verdict's model, the schema types it and this reading goes.
export function verdictOf(result: PlanOut["result"]): Verdict | null {
  const verdict = result?.["verdict"];
  if (!isRecord(verdict)) return null;
  const met = verdict["met"];
  const others = isRecord(verdict["other_change_pt"]) ? verdict["other_change_pt"] : {};
  const judgedOn = verdict["others_judged_on"];
  const judged = Array.isArray(judgedOn) ? new Set(judgedOn.filter((s): s is string => typeof s === "string")) : null;
  return {
    met: typeof met === "boolean" ? met : null,
    slicePt: finite(verdict["slice_gain_pt"]),
    others: Object.entries(others).map(([set, pt]) => ({ set, pt: finite(pt), judged: judged === null || judged.has(set) })),
  };
}

/** "met · slice +3.1 pt · val +0.4 pt · rest -0.2 pt (not judged)". */
export function verdictText(verdict: Verdict): string {
  const head = verdict.met === null ? "no verdict" : verdict.met ? "met" : "not met";
  const parts = [head, `slice ${formatPoints(verdict.slicePt)}`];
  for (const { set, pt, judged } of verdict.others) parts.push(`${set} ${formatPoints(pt)}${judged ? "" : " (not judged)"}`);
  return parts.join(" · ");
}

/** The card's fields a refusal names: a 422's list, or a message that starts with a field's name
 *  ("slice: no slice named 'x'", "name 'r' is taken", "run_id 7 is not a run"). */
export function fieldsNamed(error: { message: string; fields?: readonly string[] }, fields: readonly CardField[] = CARD_FIELDS): ForkCardField[] {
  const names = new Set<string>(fields.map((f) => f.name));
  const given = error.fields?.length ? [...error.fields] : [/^(\w+)[\s:]/.exec(error.message)?.[1] ?? ""];
  return given.filter((name): name is ForkCardField => names.has(name));
}

function finite(value: unknown): number | null {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
