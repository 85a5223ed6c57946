// Plan cards: a fork is first a card a person reads, edits and approves. "Fork…" on a saved slice
// opens a card prefilled for it (plan-form.ts); "Propose" saves it (the server checks it against
// the session, and a refusal, naming the field, shows next to the form in the server's words); a
// proposed card can be edited (only the changed fields are sent), approved or discarded. An
// approved card is carried out by its run at a step boundary (approved -> running -> done |
// failed): the list is read again on plan events, and every second while a card is approved or
// running. A done fork shows its verdict against the criterion stated beforehand, and its runs.
//
// "Merge…" in the lineage opens a merge card for the ticked runs (merge-form.ts). A proposed
// merge can be previewed: its run makes the candidate and compares it with every parent (a
// command: its outcome says when the card's `result.preview` holds the comparison), and the form
// shows the table, with a warning when the candidate lost to a parent (approving it then needs
// "override"). A done merge shows whether it was kept by the rule or by override, and its run.

import type { ApiClient, PlanOut, RunInfo, SliceInfo } from "./api";
import { initialValues, valuesOf } from "./card-form";
import { readComparison } from "./compare";
import { element } from "./dom";
import type { PickedRun } from "./lineage";
import {
  carrierOf,
  initialMergeValues,
  mergeCriterionText,
  mergeDraft,
  mergeOutcomeText,
  mergeValuesOf,
  previewIsCurrent,
  readMergeVerdict,
  readPreview,
} from "./merge-card";
import { MergeForm } from "./merge-form";
import type { Outcome } from "./outcomes";
import { CardForm, describeError, type CardFormElements } from "./plan-form";
import { cardTitle, criterionText, planText, referenceOf, verdictOf, verdictText } from "./plan-text";
import type { Store } from "./state";
import { showEmpty } from "./tables";

/** Between two reads of the cards while one is approved or running. */
const POLL_MS = 1000;
/** Making a candidate and evaluating it with every parent takes a while. */
const PREVIEW_TIMEOUT_MS = 10 * 60_000;
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
  /** The outcome of a command the page sent (a merge card's preview). */
  waitOutcome: (runId: number, commandId: number, timeoutMs: number) => Promise<Outcome>;
}

/** What a request's failure is shown next to (a form, or the message area when it is closed). */
interface PlanForm {
  readonly hidden: boolean;
  setBusy(busy: boolean): void;
  showError(error: unknown): void;
}

export class PlanPanel {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly list: HTMLTableElement;
  private readonly sources: PlanSources;
  private readonly form: CardForm;
  private readonly merges: MergeForm;
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
    this.merges = new MergeForm({ runs: sources.runs, slices: sources.slices }, {
      propose: () => void this.proposeMerge(),
      save: () => void this.saveMerge(),
      preview: () => void this.preview(),
      approve: () => void this.approveMerge(),
      discard: () => void (this.merges.editing && this.discard(this.merges.editing.id)),
    });
    elements.form.after(this.merges.form); // the merge form sits where the fork form does
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
    this.merges.close();
    this.form.open(initialValues({ name: `${slice.name} specialist`, run_id: runId, slice: slice.name, lr }), "New fork card", null);
  }

  /** Draft a merge card for the runs ticked in the lineage: carried out by a live run (a ticked
   *  one when one is live), each ticked run a parent with weight 1, the method linear. */
  async openMergeDraft(picked: readonly PickedRun[]): Promise<void> {
    let runId: number | null;
    try {
      runId = carrierOf((await this.api.session()).runs, picked.map((r) => r.id));
    } catch (error) {
      this.store.showMessage(`Could not read the session's runs: ${String(error)}`);
      return;
    }
    if (runId === null) {
      this.store.showMessage("No run can carry a merge out now: a merge needs a live run (training, paused or idle) to make the merged model.");
      return;
    }
    const draft = mergeDraft(picked, runId, this.sources.runs().map((r) => r.name));
    this.form.close();
    this.merges.open(initialMergeValues(draft), "New merge card", null);
  }

  /** Edit a proposed card in its form (a fork's or a merge's; a merge's stored preview shown). */
  openPlan(plan: PlanOut): void {
    const { card } = plan;
    if (card.kind === "fork") {
      this.merges.close();
      this.form.open(valuesOf(card), `Card ${plan.id} · proposed`, { id: plan.id, card });
    } else if (card.kind === "merge") {
      this.form.close();
      this.merges.open(mergeValuesOf(card), `Merge card ${plan.id} · proposed`, { id: plan.id, card });
      void this.showStoredPreview(plan);
    }
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
      for (const form of [this.form, this.merges]) {
        const edited = form.editing === null ? undefined : plans.find((p) => p.id === form.editing?.id);
        if (edited !== undefined && edited.status !== "proposed") form.close();
      }
    } catch (error) {
      if (generation === this.generation) this.store.showMessage(`Could not read the plan cards: ${String(error)}`);
    }
    this.schedulePoll();
  }

  /** The runs' names may have changed (new runs in the lineage): re-render names and choices. */
  runsChanged(): void {
    this.render();
    if (!this.form.hidden) this.form.fillChoices();
    if (!this.merges.hidden) this.merges.fillChoices();
  }

  slicesChanged(): void {
    if (!this.form.hidden) this.form.fillChoices();
    if (!this.merges.hidden) this.merges.fillChoices();
  }

  // ---- the requests ------------------------------------------------------------------------------

  private async propose(): Promise<void> {
    if (this.form.editing !== null) return;
    await this.act(this.form, async () => {
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
    return (await this.act(this.form, async () => this.openPlan(await this.api.editPlan(plan.id, changes)))) !== null;
  }

  private async approveEditing(): Promise<void> {
    const plan = this.form.editing;
    if (plan === null || !(await this.save())) return; // unsaved edits first: what is approved is what is shown
    await this.approve(plan.id);
  }

  private async proposeMerge(): Promise<void> {
    if (this.merges.editing !== null) return;
    await this.act(this.merges, async () => {
      const plan = await this.api.proposePlan(this.merges.card());
      this.store.showMessage(`Proposed merge card ${plan.id}: preview it, or approve it.`, "info");
      this.openPlan(plan);
    });
  }

  private async saveMerge(): Promise<boolean> {
    const plan = this.merges.editing;
    const changes = this.merges.changes();
    if (plan === null) return false;
    if (changes === null) return true;
    return (await this.act(this.merges, async () => this.openPlan(await this.api.editPlan(plan.id, changes)))) !== null;
  }

  private async approveMerge(): Promise<void> {
    const plan = this.merges.editing;
    if (plan === null || !(await this.saveMerge())) return; // what is approved is what is shown
    await this.approve(plan.id);
  }

  /** Preview the merge card the form edits (its unsaved edits saved first): the run makes the
   *  candidate and compares it with every parent; the form shows the table when it is stored. */
  private async preview(): Promise<void> {
    const editing = this.merges.editing;
    if (editing === null || !(await this.saveMerge())) return;
    const { id } = editing;
    const runId = this.merges.editing?.card.run_id ?? editing.card.run_id;
    const sent = await this.act(this.merges, () => this.api.previewPlan(id));
    if (sent === null) return;
    this.merges.showPreview({ state: "waiting", text: `Previewing… run ${runId} makes the candidate and compares it with every parent at its next step boundary.` });
    const outcome = await this.sources.waitOutcome(runId, sent.value.id, PREVIEW_TIMEOUT_MS);
    if (this.merges.editing?.id !== id) return; // the form went on to another card
    if (!outcome.applied) {
      this.merges.showPreview({ state: "failed", text: `Preview failed: ${outcome.reason}` });
      return;
    }
    try {
      await this.showStoredPreview(await this.api.plan(id));
    } catch (error) {
      this.merges.showPreview({ state: "failed", text: `Could not read card ${id}'s preview: ${String(error)}` });
    }
    void this.refresh();
  }

  /** The card's stored preview, if it has one, in the form (which must still edit that card). */
  private async showStoredPreview(plan: PlanOut): Promise<void> {
    const preview = readPreview(plan.result);
    if (preview === null || preview.comparisonId === null || plan.card.kind !== "merge") return;
    const comparison = await this.api.comparison(preview.comparisonId);
    const editing = this.merges.editing;
    if (editing?.id !== plan.id) return;
    this.merges.showPreview({
      state: "shown",
      id: comparison.id,
      table: readComparison(comparison.result),
      preview,
      current: previewIsCurrent(preview, editing.card),
    });
  }

  private async approve(id: number): Promise<void> {
    await this.act(this.formFor(id), async () => {
      const approved = await this.api.approvePlan(id);
      if (this.form.editing?.id === id) this.form.close();
      if (this.merges.editing?.id === id) this.merges.close();
      this.store.showMessage(`Approved card ${id}: run ${approved.plan.card.run_id} carries it out at its next step boundary.`, "info");
    });
  }

  private async discard(id: number): Promise<void> {
    await this.act(this.formFor(id), async () => {
      await this.api.discardPlan(id);
      if (this.form.editing?.id === id) this.form.close();
      if (this.merges.editing?.id === id) this.merges.close();
      this.store.showMessage(`Discarded card ${id}.`, "info");
    });
  }

  /** The form a request about card `id` reports to: the one editing it, else the fork form. */
  private formFor(id: number): PlanForm {
    return this.merges.editing?.id === id ? this.merges : this.form;
  }

  /** Run one request with the form busy; a refusal shows next to the form (in the message area
   *  when the form is closed). The request's answer if it went through, else null. */
  private async act<T>(form: PlanForm, request: () => Promise<T>): Promise<{ value: T } | null> {
    if (this.busy) return null;
    this.busy = true;
    form.setBusy(true);
    try {
      form.showError(null);
      return { value: await request() };
    } catch (error) {
      if (form.hidden) this.store.showMessage(describeError(error));
      else form.showError(error);
      return null;
    } finally {
      this.busy = false;
      form.setBusy(false);
      void this.refresh();
    }
  }

  // ---- the list ----------------------------------------------------------------------------------

  private render(): void {
    const body = this.list.tBodies[0] ?? this.list.createTBody();
    this.list.dataset["count"] = String(this.plans.length);
    if (this.plans.length === 0) {
      showEmpty(body, "No plan cards yet: press “Fork…” on a saved slice, or tick runs in the lineage and press “Merge…”.", COLUMNS.length);
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
    const criterion = card.kind === "fork" ? criterionText(card) : card.kind === "merge" ? mergeCriterionText(card) : "—";
    tr.append(element("td", "plan-name", `${plan.id} · ${cardTitle(card)}`), status, element("td", "", planText(card, runName)), element("td", "", criterion));
    tr.append(this.outcomeCell(plan), element("td", "", plan.runs.map((id) => this.runName(id)).join(", ") || "—"));
    const actions = element("td", "actions");
    if (plan.status === "proposed") {
      if (card.kind !== "curate") actions.append(this.button("Edit", `Edit card ${plan.id}`, async () => this.openPlan(plan)));
      if (card.kind === "merge") {
        actions.append(this.button("Preview", `Preview card ${plan.id}`, async () => {
          this.openPlan(plan);
          await this.preview();
        }));
      }
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
    if (plan.card.kind === "merge") return this.mergeOutcome(plan, cell);
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

  /** A merge's outcome: its preview while proposed, whether it was kept by the rule once done. */
  private mergeOutcome(plan: PlanOut, cell: HTMLTableCellElement): HTMLTableCellElement {
    const verdict = plan.status === "done" ? readMergeVerdict(plan.result) : null;
    const preview = plan.status === "proposed" ? readPreview(plan.result) : null;
    let shown: number | null = null;
    if (verdict !== null) {
      cell.dataset["met"] = String(verdict.met);
      cell.classList.add(verdict.met === false ? "bad" : "good");
      cell.textContent = mergeOutcomeText(verdict);
      const judged = plan.result?.["comparison_id"];
      shown = typeof judged === "number" ? judged : null;
    } else if (preview !== null) {
      cell.classList.add(preview.worse === null ? "good" : "bad");
      cell.textContent = preview.worse === null ? "previewed · not worse than any parent" : `previewed · ${preview.worse.text}`;
      shown = preview.comparisonId;
    } else {
      cell.textContent = plan.status === "running" ? "merging…" : plan.status === "approved" ? "waiting for a step boundary" : plan.status === "done" ? "done" : "—";
    }
    if (shown !== null) {
      const id = shown;
      cell.append(" ", this.button("Details", `Show card ${plan.id}'s comparison`, () => this.sources.showComparison(id), "link-button"));
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
