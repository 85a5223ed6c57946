// Plan cards: a fork is first a card a person reads, edits and approves. "Fork…" on a saved slice
// opens a card prefilled for it (plan-form.ts); "Propose" saves it (the server checks it against
// the session, and a refusal, naming the field, shows next to the form in the server's words); a
// proposed card can be edited (only the changed fields are sent), approved or discarded. An
// approved card is carried out by its run at a step boundary (approved -> running -> done |
// failed): the list is read again on plan events, and every second while a card is approved or
// running. A done fork shows its verdict against the criterion stated beforehand, and its runs.

import type { ApiClient, PlanOut, RunInfo, SliceInfo } from "./api";
import { initialValues, valuesOf } from "./card-form";
import { element } from "./dom";
import { CardForm, describeError, type CardFormElements } from "./plan-form";
import { cardTitle, criterionText, planText, referenceOf, verdictOf, verdictText } from "./plan-text";
import type { Store } from "./state";
import { showEmpty } from "./tables";

/** Between two reads of the cards while one is approved or running. */
const POLL_MS = 1000;
/** A new card's learning rate when the run's is not known. */
const DEFAULT_LR = 0.01;
const COLUMNS = ["card", "status", "plan", "criterion", "outcome", "runs", ""] as const;

export interface PlanElements extends CardFormElements {
  list: HTMLTableElement;
}

/** What the panel reads from the rest of the page. */
export interface PlanSources {
  /** The session's runs (the lineage's nodes), for the parent's choices and the runs' names. */
  runs: () => readonly { id: number; name: string }[];
  slices: () => readonly SliceInfo[];
  /** The run the page shows. */
  run: () => RunInfo | null;
  /** A card finished (done or failed): the runs it made are in the lineage now. */
  onFinished: () => void;
  /** Show a stored comparison (a done fork's judging: parent, specialist, control). */
  showComparison: (id: number) => Promise<void>;
}

export class PlanPanel {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly list: HTMLTableElement;
  private readonly sources: PlanSources;
  private readonly form: CardForm;
  private statuses = new Map<number, PlanOut["status"]>();
  private plans: PlanOut[] = [];
  private generation = 0;
  private pollTimer: number | undefined;
  private busy = false;

  constructor(api: ApiClient, store: Store, elements: PlanElements, sources: PlanSources) {
    this.api = api;
    this.store = store;
    this.list = elements.list;
    this.sources = sources;
    this.form = new CardForm(elements, () => ({ runs: sources.runs(), slices: sources.slices() }), {
      propose: () => void this.propose(),
      save: () => void this.save(),
      approve: () => void this.approveEditing(),
      discard: () => void (this.form.editing && this.discard(this.form.editing.id)),
    });
    const head = this.list.createTHead().insertRow();
    for (const title of COLUMNS) {
      const th = element("th", "", title);
      th.scope = "col";
      head.append(th);
    }
    this.render();
  }

  /** Draft a fork card for a saved slice: its run the one the page shows when that one can carry
   *  a fork out (it is live), else the slice's; the learning rate that run's, when known. */
  openDraft(slice: SliceInfo): void {
    const current = this.sources.run();
    const runId = current !== null && current.live ? current.id : slice.run_id;
    const lr = (current?.id === runId ? current.lr : null) ?? DEFAULT_LR;
    this.form.open(initialValues({ name: `${slice.name} specialist`, run_id: runId, slice: slice.name, lr }), "New fork card", null);
  }

  /** Edit a proposed fork card (the form is a fork card's). */
  openPlan(plan: PlanOut): void {
    if (plan.card.kind !== "fork") return;
    this.form.open(valuesOf(plan.card), `Card ${plan.id} · proposed`, { id: plan.id, card: plan.card });
  }

  /** Read the cards again (after a plan event, or while one is being carried out). */
  async refresh(): Promise<void> {
    const generation = ++this.generation;
    try {
      const plans = await this.api.plans();
      if (generation !== this.generation) return;
      const finished = plans.some((p) => {
        const before = this.statuses.get(p.id);
        return before !== undefined && before !== p.status && (p.status === "done" || p.status === "failed");
      });
      this.plans = plans;
      this.statuses = new Map(plans.map((p) => [p.id, p.status]));
      this.render();
      if (finished) this.sources.onFinished();
      // A card approved or discarded elsewhere: the form no longer edits it.
      const edited = this.form.editing === null ? undefined : plans.find((p) => p.id === this.form.editing?.id);
      if (edited !== undefined && edited.status !== "proposed") this.form.close();
    } catch (error) {
      if (generation === this.generation) this.store.showMessage(`Could not read the plan cards: ${String(error)}`);
    }
    this.schedulePoll();
  }

  /** The runs' names may have changed (new runs in the lineage): re-render names and choices. */
  runsChanged(): void {
    this.render();
    if (!this.form.hidden) this.form.fillChoices();
  }

  slicesChanged(): void {
    if (!this.form.hidden) this.form.fillChoices();
  }

  // ---- the requests ------------------------------------------------------------------------------

  private async propose(): Promise<void> {
    if (this.form.editing !== null) return;
    await this.act(async () => {
      const plan = await this.api.proposePlan(this.form.card());
      this.store.showMessage(`Proposed card ${plan.id}: nothing happens until it is approved.`, "info");
      this.openPlan(plan);
    });
  }

  /** Send the changed fields; the card comes back checked, with every default filled in. */
  private async save(): Promise<boolean> {
    const plan = this.form.editing;
    const changes = this.form.changes();
    if (plan === null) return false;
    if (changes === null) return true;
    return this.act(async () => this.openPlan(await this.api.editPlan(plan.id, changes)));
  }

  private async approveEditing(): Promise<void> {
    const plan = this.form.editing;
    if (plan === null || !(await this.save())) return; // unsaved edits first: what is approved is what is shown
    await this.approve(plan.id);
  }

  private async approve(id: number): Promise<void> {
    await this.act(async () => {
      const approved = await this.api.approvePlan(id);
      if (this.form.editing?.id === id) this.form.close();
      this.store.showMessage(`Approved card ${id}: run ${approved.plan.card.run_id} carries it out at its next step boundary.`, "info");
    });
  }

  private async discard(id: number): Promise<void> {
    await this.act(async () => {
      await this.api.discardPlan(id);
      if (this.form.editing?.id === id) this.form.close();
      this.store.showMessage(`Discarded card ${id}.`, "info");
    });
  }

  /** Run one request with the form busy; a refusal shows next to the form (in the message area
   *  when the form is closed). True if it went through. */
  private async act(request: () => Promise<void>): Promise<boolean> {
    if (this.busy) return false;
    this.busy = true;
    this.form.setBusy(true);
    try {
      this.form.showError(null);
      await request();
      return true;
    } catch (error) {
      if (this.form.hidden) this.store.showMessage(describeError(error));
      else this.form.showError(error);
      return false;
    } finally {
      this.busy = false;
      this.form.setBusy(false);
      void this.refresh();
    }
  }

  // ---- the list ----------------------------------------------------------------------------------

  private render(): void {
    const body = this.list.tBodies[0] ?? this.list.createTBody();
    this.list.dataset["count"] = String(this.plans.length);
    if (this.plans.length === 0) {
      showEmpty(body, "No plan cards yet: press “Fork…” on a saved slice.", COLUMNS.length);
      return;
    }
    body.replaceChildren(...[...this.plans].reverse().map((plan) => this.row(plan)));
  }

  private row(plan: PlanOut): HTMLTableRowElement {
    const { card } = plan;
    const runName = (id: number) => this.runName(id);
    const tr = element("tr");
    tr.dataset["planId"] = String(plan.id);
    tr.dataset["status"] = plan.status;
    const chip = element("span", "status", plan.status);
    chip.dataset["status"] = plan.status;
    const status = element("td");
    status.append(chip);
    const criterion = card.kind === "fork" ? criterionText(card) : "—";
    tr.append(element("td", "plan-name", `${plan.id} · ${cardTitle(card)}`), status, element("td", "", planText(card, runName)), element("td", "", criterion));
    tr.append(this.outcomeCell(plan), element("td", "", plan.runs.map((id) => this.runName(id)).join(", ") || "—"));
    const actions = element("td", "actions");
    if (plan.status === "proposed") {
      if (card.kind === "fork") actions.append(this.button("Edit", `Edit card ${plan.id}`, async () => this.openPlan(plan)));
      actions.append(
        this.button("Approve", `Approve card ${plan.id}`, () => this.approve(plan.id)),
        this.button("Discard", `Discard card ${plan.id}`, () => this.discard(plan.id), "danger"),
      );
    }
    tr.append(actions);
    return tr;
  }

  private outcomeCell(plan: PlanOut): HTMLTableCellElement {
    const cell = element("td", "plan-outcome");
    if (plan.status === "failed") {
      cell.classList.add("bad");
      cell.textContent = plan.error ?? "failed";
      return cell;
    }
    const verdict = plan.status === "done" && plan.card.kind === "fork" ? verdictOf(plan.result) : null;
    if (verdict === null || plan.card.kind !== "fork") {
      cell.textContent = plan.status === "running" ? "training…" : plan.status === "approved" ? "waiting for a step boundary" : plan.status === "done" ? "done" : "—";
      return cell;
    }
    cell.dataset["met"] = String(verdict.met);
    cell.classList.add(verdict.met === true ? "good" : verdict.met === false ? "bad" : "muted");
    cell.textContent = verdictText(verdict);
    cell.title = `differences in accuracy points vs ${referenceOf(plan.card)}`;
    const judged = plan.result?.["comparison_id"];
    if (typeof judged === "number") {
      const show = this.button("Details", `Show card ${plan.id}'s comparison`, () => this.sources.showComparison(judged), "link-button");
      cell.append(" ", show);
    }
    return cell;
  }

  private runName(id: number): string {
    const run = this.sources.runs().find((r) => r.id === id);
    return run === undefined ? `run ${id}` : `${run.name} (${id})`;
  }

  private button(text: string, label: string, action: () => Promise<void>, tone = ""): HTMLButtonElement {
    const button = element("button", `small ${tone}`.trim(), text);
    button.type = "button";
    button.setAttribute("aria-label", label);
    button.title = label;
    button.addEventListener("click", () => {
      button.disabled = true;
      void action().finally(() => (button.disabled = false));
    });
    return button;
  }

  /** Poll while a card waits for its run or trains (its events may come from a run the page does
   *  not follow, and an approval is only an intention until the run takes it up). */
  private schedulePoll(): void {
    window.clearTimeout(this.pollTimer);
    if (this.plans.some((p) => p.status === "approved" || p.status === "running")) {
      this.pollTimer = window.setTimeout(() => void this.refresh(), POLL_MS);
    }
  }
}
