// The "Health" panel: the shown run's health check-ups. "Run check-up" asks the run for one
// (every area but determinism), "Check determinism" for the determinism check alone; both are
// commands a live run carries out at its next step boundary (enabled only when RunInfo.commands
// has "health_check"), and the check-up arrives as a `health` event, from the stream or the event
// log. The panel shows the newest check-up's cards grouped by severity (error, warning, info),
// each with its title, fix and evidence; the history of check-ups (a click shows that one's
// cards; the newest follows new ones again); and the newest determinism result up to the shown
// check-up, with its environment contract as a table and the advice. Pure parts: health.ts.

import { ApiError, type ApiClient, type HealthArea, type RunInfo } from "./api";
import { element, setText } from "./dom";
import { formatClock, formatCount, formatValue } from "./format";
import {
  CheckupHistory,
  DETERMINISM,
  DETERMINISM_OWN_KEYS,
  SEVERITIES,
  areasText,
  bySeverity,
  checkupSummary,
  evidenceEntries,
  latestDeterminism,
  severityCounts,
  severityText,
  type Checkup,
  type DeterminismResult,
  type HealthCard,
  type Severity,
} from "./health";
import type { CommandOutcomes } from "./outcomes";
import type { Store } from "./state";
import { showEmpty } from "./tables";

/** The determinism check trains a copy twice, and a check-up waits for a step boundary. */
const OUTCOME_TIMEOUT_MS = 5 * 60_000;

const GROUP_TITLES: Record<Severity, string> = { error: "Errors", warning: "Warnings", info: "Info" };
const HISTORY_COLUMNS: [title: string, numeric: boolean][] = [
  ["step", true],
  ["time", false],
  ["areas", false],
  ...SEVERITIES.map((s): [string, boolean] => [GROUP_TITLES[s].toLowerCase(), true]),
  ["took", true],
];

export interface HealthElements {
  /** "Run check-up". */
  check: HTMLButtonElement;
  /** "Check determinism". */
  determinism: HTMLButtonElement;
  caption: HTMLElement;
  cards: HTMLElement;
  history: HTMLTableElement;
  /** The determinism result (contract, advice). */
  determinismView: HTMLElement;
}

type Request = "check" | "determinism";

export class HealthPanel {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly outcomes: CommandOutcomes;
  private readonly elements: HealthElements;
  private readonly checkups = new CheckupHistory();
  private runId: number | null = null;
  private possible = false;
  /** A check-up asked for and not carried out yet: both buttons wait for it. */
  private pending: Request | null = null;
  /** The check-up picked in the history (its seq); null: the newest. */
  private picked: number | null = null;
  /** What became of the last request, when it did not bring a check-up (a refusal). */
  private note: string | null = null;

  constructor(api: ApiClient, store: Store, outcomes: CommandOutcomes, elements: HealthElements) {
    this.api = api;
    this.store = store;
    this.outcomes = outcomes;
    this.elements = elements;
    elements.check.addEventListener("click", () => void this.request("check"));
    elements.determinism.addEventListener("click", () => void this.request("determinism"));
    const head = elements.history.createTHead().insertRow();
    for (const [title, numeric] of HISTORY_COLUMNS) {
      const th = element("th", numeric ? "num" : "", title);
      th.scope = "col";
      head.append(th);
    }
    this.update(null);
    this.render();
  }

  /** Check-ups read from the event log or the stream (any run's; each kept once). */
  add(checkups: readonly Checkup[]): void {
    let shownRun = false;
    for (const checkup of checkups) {
      if (this.checkups.add(checkup) && checkup.runId === this.runId) shownRun = true;
    }
    if (shownRun) {
      this.note = null;
      this.render();
    }
  }

  /** The page's run: whose check-ups are shown, and whether it takes the command now. */
  update(run: RunInfo | null): void {
    const runId = run?.id ?? null;
    this.possible = run?.commands.includes("health_check") ?? false;
    this.updateButtons();
    if (runId !== this.runId) {
      this.runId = runId;
      this.picked = null;
      this.note = null;
      this.render();
    }
  }

  private updateButtons(): void {
    const { check, determinism } = this.elements;
    check.disabled = determinism.disabled = this.pending !== null || !this.possible;
    setText(check, this.pending === "check" ? "Checking…" : "Run check-up");
    setText(determinism, this.pending === "determinism" ? "Checking determinism…" : "Check determinism");
    const why = this.possible ? "" : "Needs a live run (training, paused or idle) to carry it out.";
    // Called at every progress event (the run's step changes): the DOM is touched only on a change.
    const checkTitle = why || "Gradients, activations, numerics, data, configuration and throughput, on a copy of the model: training is untouched.";
    const determinismTitle = why || "Loads the last batch twice and replays one training step twice on a copy: are they bit-identical?";
    if (check.title !== checkTitle) check.title = checkTitle;
    if (determinism.title !== determinismTitle) determinism.title = determinismTitle;
  }

  private async request(which: Request): Promise<void> {
    const runId = this.runId;
    if (runId === null || this.pending !== null) return;
    const areas: HealthArea[] | null = which === "determinism" ? [DETERMINISM] : null;
    this.pending = which;
    this.picked = null; // the check-up asked for is shown when it comes
    this.note = null;
    this.updateButtons();
    this.render();
    try {
      const accepted = await this.api.healthCheck(runId, areas);
      this.store.showMessage(`${accepted.kind} sent; it takes effect at the next step boundary.`, "info");
      const outcome = await this.outcomes.wait(runId, accepted.id, OUTCOME_TIMEOUT_MS);
      if (!outcome.applied) this.note = `Check-up rejected: ${outcome.reason}`;
    } catch (error) {
      const text = error instanceof ApiError ? error.message : `Could not ask for a check-up: ${String(error)}`;
      this.note = text;
      this.store.showMessage(text);
    } finally {
      this.pending = null;
      this.updateButtons();
      this.render();
    }
  }

  private render(): void {
    const all = this.checkups.of(this.runId);
    const newest = all[all.length - 1] ?? null;
    const shown = (this.picked === null ? null : all.find((c) => c.seq === this.picked)) ?? newest;
    setText(this.elements.caption, this.caption(shown, newest));
    this.renderCards(shown);
    this.renderHistory(all, shown);
    this.renderDeterminism(shown === null ? null : latestDeterminism(all, shown.seq));
  }

  private caption(shown: Checkup | null, newest: Checkup | null): string {
    if (this.pending !== null) {
      const what = this.pending === "determinism" ? "The determinism check (one step replayed twice on a copy)" : "A check-up";
      return `${what} runs at run ${this.runId ?? "?"}'s next step boundary…`;
    }
    if (this.note !== null) return this.note;
    if (shown === null) {
      return this.possible
        ? "No check-up yet: press “Run check-up” (it runs on a copy of the model; training is untouched)."
        : "No check-up of this run yet. A check-up needs a live run to carry it out.";
    }
    const picked = shown !== newest ? " · an earlier check-up: click the newest to follow new ones" : "";
    return `Check-up at ${checkupSummary(shown)} · ${formatClock(shown.time)}${picked}`;
  }

  private renderCards(checkup: Checkup | null): void {
    const container = this.elements.cards;
    if (checkup === null) {
      container.replaceChildren();
      delete container.dataset["seq"];
      return;
    }
    container.dataset["seq"] = String(checkup.seq);
    if (checkup.cards.length === 0) {
      container.replaceChildren(element("p", "muted", "This check-up found nothing to report."));
      return;
    }
    container.replaceChildren(
      ...bySeverity(checkup.cards).map(({ severity, cards }) => {
        const group = element("section", "health-group");
        group.dataset["severity"] = severity;
        group.append(element("h3", "", `${GROUP_TITLES[severity]} (${formatCount(cards.length)})`), ...cards.map(cardView));
        return group;
      }),
    );
  }

  private renderHistory(all: readonly Checkup[], shown: Checkup | null): void {
    const table = this.elements.history;
    const body = table.tBodies[0] ?? table.createTBody();
    if (all.length === 0) {
      showEmpty(body, "No check-ups yet.", HISTORY_COLUMNS.length);
      return;
    }
    const newest = all[all.length - 1]!;
    body.replaceChildren(
      ...[...all].reverse().map((checkup) => {
        const tr = element("tr", "pickable");
        tr.dataset["seq"] = String(checkup.seq);
        if (checkup.step !== null) tr.dataset["step"] = String(checkup.step);
        if (checkup === shown) tr.setAttribute("aria-current", "true");
        tr.tabIndex = 0;
        const step = checkup.step === null ? "—" : formatCount(checkup.step);
        tr.title = `Show the check-up at step ${step}`;
        const counts = severityCounts(checkup.cards);
        tr.append(
          element("td", "num", step),
          element("td", "", formatClock(checkup.time)),
          element("td", "", areasText(checkup.areas)),
          ...SEVERITIES.map((severity) => {
            const td = element("td", "num health-count", formatCount(counts[severity]));
            td.dataset["severity"] = severity;
            if (counts[severity] > 0) td.classList.add("some");
            td.title = severityText(severity, counts[severity]);
            return td;
          }),
          element("td", "num", checkup.seconds === null ? "—" : `${formatValue(checkup.seconds)} s`),
        );
        const pick = () => {
          this.picked = checkup === newest ? null : checkup.seq;
          this.note = null;
          this.render();
        };
        tr.addEventListener("click", pick);
        tr.addEventListener("keydown", (event) => {
          if (event.key === "Enter") pick();
        });
        return tr;
      }),
    );
  }

  private renderDeterminism(result: DeterminismResult | null): void {
    const view = this.elements.determinismView;
    const title = element("h3", "", "Determinism");
    if (result === null) {
      delete view.dataset["identical"];
      delete view.dataset["seq"];
      view.replaceChildren(
        title,
        element(
          "p",
          "muted small-text",
          "No determinism check yet: “Check determinism” loads the last batch twice and replays one training step twice on a copy of the model, replays the steps since the last checkpoint, and says whether they come out bit for bit the same.",
        ),
      );
      return;
    }
    view.dataset["identical"] = String(result.identical);
    view.dataset["seq"] = String(result.checkup.seq);
    const verdict = element("p", "determinism-verdict", result.card.title);
    verdict.dataset["severity"] = result.card.severity;
    const step = result.checkup.step === null ? "" : ` at step ${formatCount(result.checkup.step)}`;
    const parts: HTMLElement[] = [title, verdict, element("p", "muted small-text", `From the check-up${step} · ${formatClock(result.checkup.time)} · ${result.card.fix}`)];
    if (result.details.length > 0) parts.push(evidenceList(result.details));
    if (result.replay !== null) {
      const replay = element("p", "replay-verdict", result.replay.card.title);
      replay.dataset["testid"] = "determinism-replay";
      replay.dataset["severity"] = result.replay.card.severity;
      replay.dataset["identical"] = String(result.replay.card.title.startsWith("identical"));
      parts.push(element("h4", "", "Replay since the last checkpoint"), replay,
        element("p", "muted small-text", result.replay.card.fix));
      if (result.replay.details.length > 0) parts.push(evidenceList(result.replay.details));
    }
    const contract = element("table", "determinism-contract");
    contract.dataset["testid"] = "determinism-contract";
    const head = contract.createTHead().insertRow();
    for (const name of ["what replay depends on", "this run"]) {
      const th = element("th", "", name);
      th.scope = "col";
      head.append(th);
    }
    const body = contract.createTBody();
    for (const [key, value] of result.contract) {
      const tr = body.insertRow();
      tr.dataset["key"] = key;
      const th = element("th", "", key);
      th.scope = "row";
      tr.append(th, element("td", "", value));
    }
    if (result.contract.length === 0) showEmpty(body, "The card gives no contract.", 2);
    const advice = element("ul", "determinism-advice");
    advice.dataset["testid"] = "determinism-advice";
    advice.append(...result.advice.map((line) => element("li", "", line)));
    parts.push(element("h4", "", "Environment contract"), contract);
    if (result.advice.length > 0) parts.push(element("h4", "", "Advice"), advice);
    view.replaceChildren(...parts);
  }
}

/** One card: severity, title, area and check; the fix; the evidence as a short key: value list. */
function cardView(card: HealthCard): HTMLElement {
  const article = element("article", "health-card");
  article.dataset["testid"] = "health-card";
  article.dataset["severity"] = card.severity;
  article.dataset["check"] = card.check;
  const head = element("div", "health-card-head");
  const badge = element("span", "severity", card.severity);
  badge.dataset["severity"] = card.severity;
  head.append(badge, element("span", "tag", card.area === card.check ? card.area : `${card.area} · ${card.check}`), element("span", "health-title", card.title));
  article.append(head);
  if (card.fix) {
    const fix = element("p", "health-fix");
    fix.append(element("strong", "", "Fix: "), card.fix);
    article.append(fix);
  }
  // The determinism card's contract and advice are the panel's own table and list, below.
  const own = card.check === DETERMINISM ? DETERMINISM_OWN_KEYS : [];
  const entries = evidenceEntries(card.evidence, { omit: own });
  if (entries.length > 0) article.append(evidenceList(entries));
  if (own.length > 0) article.append(element("p", "muted small-text", "Its environment contract and advice: under Determinism."));
  return article;
}

function evidenceList(entries: readonly [string, string][]): HTMLElement {
  const list = element("dl", "evidence");
  for (const [key, value] of entries) {
    const item = element("div");
    item.dataset["key"] = key;
    item.append(element("dt", "", key), element("dd", "", value));
    list.append(item);
  }
  return list;
}
