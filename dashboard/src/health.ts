// Health check-ups in words (pure: no DOM). A check-up is a `health` event of a run: the cards it
// found (worst first), the areas it looked at, how long it took. A card: which check, its area,
// its severity, a title, the evidence (numbers, layers, sample ids) and the fix. This module reads
// the events' cards (once, for event-types.ts), keeps each run's check-ups in order, groups a
// check-up's cards by severity, counts them, writes their evidence as short "key: value" lines,
// and reads the determinism card's environment contract and advice. The panel is health-panel.ts.

import type { HealthEvent } from "./event-types";
import { formatCount, formatValue } from "./format";
import { HealthCheckArgsSchema } from "./generated/schemas";

/** Worst first, as the server sorts a check-up's cards. */
export const SEVERITIES = ["error", "warning", "info"] as const;
export type Severity = (typeof SEVERITIES)[number];

export interface HealthCard {
  check: string;
  area: string;
  severity: Severity;
  title: string;
  fix: string;
  evidence: Record<string, unknown>;
}

export interface Checkup {
  seq: number;
  runId: number;
  step: number | null;
  epoch: number | null;
  /** Seconds since the Unix epoch. */
  time: number;
  /** How long the check-up took. */
  seconds: number | null;
  areas: string[];
  cards: HealthCard[];
}

export type SeverityCounts = Record<Severity, number>;

/** The area checked only on request (it trains a copy twice). */
export const DETERMINISM = "determinism";
/** Check-ups kept per run (the oldest go first); the rest are in the session's event log. */
export const KEPT_CHECKUPS = 200;

/** The areas a check-up can look at, as the server's HealthCheckArgs lists them. */
export const ALL_AREAS: readonly string[] = (() => {
  const listed = HealthCheckArgsSchema.properties?.["areas"]?.anyOf?.[0]?.items?.enum;
  return Array.isArray(listed) ? listed.filter((a): a is string => typeof a === "string") : [];
})();
/** A check-up's areas when none are named: every one but determinism. */
export const DEFAULT_AREAS: readonly string[] = ALL_AREAS.filter((area) => area !== DETERMINISM);

// ---- reading events -----------------------------------------------------------------------------

/** A check-up's cards from the event's JSON; an entry without a title is no card, an unknown
 *  severity reads as "info", and they come back worst first (stable within a severity). */
export function readCards(raw: unknown): HealthCard[] {
  if (!Array.isArray(raw)) return [];
  const cards: HealthCard[] = [];
  for (const item of raw) {
    if (!isRecord(item) || typeof item["title"] !== "string") continue;
    const severity = SEVERITIES.find((s) => s === item["severity"]) ?? "info";
    cards.push({
      check: text(item["check"]) ?? "?",
      area: text(item["area"]) ?? "?",
      severity,
      title: item["title"],
      fix: text(item["fix"]) ?? "",
      evidence: isRecord(item["evidence"]) ? item["evidence"] : {},
    });
  }
  return cards.sort((a, b) => SEVERITIES.indexOf(a.severity) - SEVERITIES.indexOf(b.severity));
}

/** The check-up a `health` event records; null for one that names no run. */
export function checkupOf(event: HealthEvent): Checkup | null {
  if (event.run_id === null) return null;
  return {
    seq: event.seq,
    runId: event.run_id,
    step: event.step,
    epoch: event.epoch,
    time: event.time,
    seconds: event.payload.seconds,
    areas: event.payload.areas,
    cards: event.payload.cards,
  };
}

/** Each run's check-ups, oldest first, each once (the log and the stream may both bring one). */
export class CheckupHistory {
  private readonly runs = new Map<number, Checkup[]>();
  private readonly seen = new Set<number>();

  /** Keep a check-up; false when it was already kept. */
  add(checkup: Checkup): boolean {
    if (this.seen.has(checkup.seq)) return false;
    this.seen.add(checkup.seq);
    const list = this.runs.get(checkup.runId) ?? [];
    list.push(checkup);
    list.sort((a, b) => a.seq - b.seq);
    while (list.length > KEPT_CHECKUPS) this.seen.delete(list.shift()!.seq);
    this.runs.set(checkup.runId, list);
    return true;
  }

  /** Run `runId`'s check-ups, oldest first. */
  of(runId: number | null): readonly Checkup[] {
    return runId === null ? [] : (this.runs.get(runId) ?? []);
  }
}

// ---- grouping and counting ------------------------------------------------------------------------

/** The cards by severity, worst first, only the severities that have cards. */
export function bySeverity(cards: readonly HealthCard[]): { severity: Severity; cards: HealthCard[] }[] {
  return SEVERITIES.map((severity) => ({ severity, cards: cards.filter((c) => c.severity === severity) })).filter(
    (group) => group.cards.length > 0,
  );
}

export function severityCounts(cards: readonly HealthCard[]): SeverityCounts {
  const counts: SeverityCounts = { error: 0, warning: 0, info: 0 };
  for (const card of cards) counts[card.severity] += 1;
  return counts;
}

/** The worst severity among the cards; null for none. */
export function worstSeverity(cards: readonly HealthCard[]): Severity | null {
  return SEVERITIES.find((s) => cards.some((c) => c.severity === s)) ?? null;
}

const NAMES: Record<Severity, [one: string, many: string]> = {
  error: ["error", "errors"],
  warning: ["warning", "warnings"],
  info: ["info", "info"],
};

/** "1 error", "3 warnings": a severity's count in words. */
export function severityText(severity: Severity, count: number): string {
  return `${formatCount(count)} ${NAMES[severity][count === 1 ? 0 : 1]}`;
}

/** "1 error · 2 warnings · 3 info" (the severities that have cards); "no findings" for none. */
export function countsText(counts: SeverityCounts): string {
  const parts = SEVERITIES.filter((s) => counts[s] > 0).map((s) => severityText(s, counts[s]));
  return parts.length > 0 ? parts.join(" · ") : "no findings";
}

/** What a check-up looked at: "every area", "determinism", "every area + determinism",
 *  "gradients, data". */
export function areasText(areas: readonly string[]): string {
  const all = DEFAULT_AREAS.length > 0 && DEFAULT_AREAS.every((a) => areas.includes(a));
  if (!all) return areas.length > 0 ? areas.join(", ") : "—";
  const extra = areas.filter((a) => !DEFAULT_AREAS.includes(a));
  return ["every area", ...extra].join(" + ");
}

/** A check-up in one line: "step 1,200 · epoch 2 · every area · 0.42 s · 1 warning · 3 info". */
export function checkupSummary(checkup: Checkup): string {
  const parts: string[] = [];
  if (checkup.step !== null) parts.push(`step ${formatCount(checkup.step)}`);
  if (checkup.epoch !== null) parts.push(`epoch ${formatCount(checkup.epoch)}`);
  parts.push(areasText(checkup.areas));
  if (checkup.seconds !== null) parts.push(`${formatValue(checkup.seconds)} s`);
  parts.push(countsText(severityCounts(checkup.cards)));
  return parts.join(" · ");
}

// ---- evidence ---------------------------------------------------------------------------------------

export interface EvidenceOptions {
  /** Keys left out (shown elsewhere: the determinism card's contract and advice). */
  omit?: readonly string[];
  /** Items of a list (or entries of an object) shown before "+N more". */
  items?: number;
  /** Characters of a text shown before "…". */
  chars?: number;
}

const ITEMS = 4;
const CHARS = 120;
/** Lists and objects nested deeper than this are a placeholder. */
const MAX_DEPTH = 2;

/** A card's evidence as [key, value in words] lines, in the server's order. */
export function evidenceEntries(evidence: Record<string, unknown>, options: EvidenceOptions = {}): [string, string][] {
  const omit = options.omit ?? [];
  return Object.entries(evidence)
    .filter(([key]) => !omit.includes(key))
    .map(([key, value]) => [key, formatEvidence(value, options)]);
}

/** One evidence value, short: a number in the page's format, a long text cut with "…", a list's
 *  first items and how many more ("a, b, c, d … +16 more"), an object as "key: value" pairs. */
export function formatEvidence(value: unknown, options: EvidenceOptions = {}, depth = 0): string {
  const items = options.items ?? ITEMS;
  const chars = options.chars ?? CHARS;
  if (value === null || value === undefined) return "—";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number") return Number.isInteger(value) ? formatCount(value) : formatValue(value);
  if (typeof value === "string") return value.length > chars ? `${value.slice(0, chars - 1)}…` : value;
  if (Array.isArray(value)) {
    if (value.length === 0) return "none";
    if (depth >= MAX_DEPTH) return `[${formatCount(value.length)} items]`;
    const shown = value.slice(0, items).map((v) => nested(v, options, depth));
    return shown.join(", ") + more(value.length - shown.length);
  }
  if (isRecord(value)) {
    const entries = Object.entries(value);
    if (entries.length === 0) return "none";
    if (depth >= MAX_DEPTH) return "{…}";
    const shown = entries.slice(0, items).map(([k, v]) => `${k}: ${nested(v, options, depth)}`);
    return shown.join(", ") + more(entries.length - shown.length);
  }
  return String(value);
}

/** A value inside a list or an object: a compound one written out in parentheses, so its commas
 *  stay its own (one too deep is a placeholder already: "[3 items]", "{…}"). */
function nested(value: unknown, options: EvidenceOptions, depth: number): string {
  const written = formatEvidence(value, options, depth + 1);
  const compound = Array.isArray(value) ? value.length > 0 : isRecord(value) && Object.keys(value).length > 0;
  return compound && depth + 1 < MAX_DEPTH ? `(${written})` : written;
}

function more(count: number): string {
  return count > 0 ? ` … +${formatCount(count)} more` : "";
}

// ---- the determinism check --------------------------------------------------------------------------

export interface DeterminismResult {
  checkup: Checkup;
  card: HealthCard;
  /** The batch loads the same and a replayed step gives the same weights, bit for bit. */
  identical: boolean;
  /** What bit-identity depends on (torch, CUDA, the flags, the loader's seeding), in words. */
  contract: [string, string][];
  advice: string[];
  /** Where it differs (differs, first_op, module, op_index, ops, parameters), or the counts of an
   *  identical replay; in words. */
  details: [string, string][];
  /** The replay of the steps since the last checkpoint (its own "replay" card), when one came. */
  replay: { card: HealthCard; details: [string, string][] } | null;
}

/** The check of the K-step replay from the last checkpoint (a card beside the determinism card). */
export const REPLAY = "replay";

/** Keys of the determinism card shown as its own table and list, not among its evidence. */
export const DETERMINISM_OWN_KEYS = ["contract", "advice"] as const;

/** The determinism card of a check-up, read; null when the check-up did not check it. */
export function determinismOf(checkup: Checkup): DeterminismResult | null {
  const card = checkup.cards.find((c) => c.check === DETERMINISM);
  if (card === undefined) return null;
  const contract = isRecord(card.evidence["contract"]) ? card.evidence["contract"] : {};
  const advice = card.evidence["advice"];
  const replayed = checkup.cards.find((c) => c.check === REPLAY);
  const replay = replayed === undefined ? null : { card: replayed, details: evidenceEntries(replayed.evidence) };
  return {
    checkup,
    card,
    replay,
    identical: card.evidence["differs"] === undefined && card.severity !== "error" && replayed?.severity !== "error",
    // Versions and flags are short; a value is never cut here (the table is the point).
    contract: Object.entries(contract).map(([key, value]) => [key, formatEvidence(value, { chars: 400 })]),
    advice: Array.isArray(advice) ? advice.filter((a): a is string => typeof a === "string") : [],
    details: evidenceEntries(card.evidence, { omit: DETERMINISM_OWN_KEYS }),
  };
}

/** The newest determinism result among check-ups (oldest first), up to the one with seq `upTo`. */
export function latestDeterminism(checkups: readonly Checkup[], upTo?: number): DeterminismResult | null {
  for (let i = checkups.length - 1; i >= 0; i--) {
    const checkup = checkups[i]!;
    if (upTo !== undefined && checkup.seq > upTo) continue;
    const result = determinismOf(checkup);
    if (result !== null) return result;
  }
  return null;
}

function text(value: unknown): string | null {
  return typeof value === "string" ? value : null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
