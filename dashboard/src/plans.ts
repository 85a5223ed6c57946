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
//
// "Gate…" in the lineage opens a gate card for the ticked runs, the generalist first
// (gate-form.ts). A done gate card's result (utilisation, the mixture against every expert, its
// artifact) shows under the list (mixture-view.ts), with "Benchmark…", which proposes a benchmark
// card for the mixture; a done benchmark card's report shows there too.

import type { ApiClient, PlanCard, PlanOut, RunInfo, SliceInfo } from "./api";
import { benchmarkCriterionText, benchmarkDraft, benchmarkOutcomeText, readBenchmarkVerdict } from "./benchmark-card";
import { initialValues, valuesOf } from "./card-form";
import { readComparison } from "./compare";
import { download, element } from "./dom";
import { gateCriterionText, gateDraft, gateOutcomeText, gateValuesOf, generalistFirst, initialGateValues, readGateVerdict } from "./gate-card";
import { GateForm } from "./gate-form";
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
import { MixtureView } from "./mixture-view";
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
  /** The lineage's edges (which of the ticked runs is the generalist of a gate card). */
  edges: () => readonly { parent: number; child: number }[];
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

/** No form: a refusal goes to the message area (a card proposed from a button, not a form). */
const MESSAGES: PlanForm = { hidden: true, setBusy: () => undefined, showError: () => undefined };

/** A card's form (a fork's, a merge's, a gate's): the card it describes, the proposed card it edits. */
interface EditingForm<C extends PlanCard> extends PlanForm {
  editing: { id: number; card: C } | null;
  card(): C;
  changes(): Partial<C> | null;
  close(): void;
}

export class PlanPanel {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly list: HTMLTableElement;
  private readonly sources: PlanSources;
  private readonly form: CardForm;
  private readonly merges: MergeForm;
  private readonly gates: GateForm;
  private readonly mixtures: MixtureView;
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
      propose: () => void this.propose(this.form, "nothing happens until it is approved."),
      save: () => void this.save(this.form),
      approve: () => void this.approveEdited(this.form),
      discard: () => void (this.form.editing && this.discard(this.form.editing.id)),
    });
    this.merges = new MergeForm({ runs: sources.runs, slices: sources.slices }, {
      propose: () => void this.propose(this.merges, "preview it, or approve it."),
      save: () => void this.save(this.merges),
      preview: () => void this.preview(),
      approve: () => void this.approveEdited(this.merges),
      discard: () => void (this.merges.editing && this.discard(this.merges.editing.id)),
    });
    this.gates = new GateForm({ runs: sources.runs, slices: sources.slices }, {
      propose: () => void this.propose(this.gates, "nothing happens until it is approved."),
      save: () => void this.save(this.gates),
      approve: () => void this.approveEdited(this.gates),
      discard: () => void (this.gates.editing && this.discard(this.gates.editing.id)),
    });
    elements.form.after(this.merges.form, this.gates.form); // the merge and gate forms sit where the fork form does
    this.mixtures = new MixtureView({
      runName: (id) => this.runName(id),
      downloadUrl: (id) => api.mixtureUrl(id),
      download: (id) => this.downloadMixture(id),
      benchmark: (plan) => this.proposeBenchmark(plan),
    });
    (this.list.parentElement ?? this.list).after(this.mixtures.element);
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
    this.closeForms();
    this.form.open(initialValues({ name: `${slice.name} specialist`, run_id: runId, slice: slice.name, lr }), "New fork card", null);
  }

  /** Draft a merge card for the runs ticked in the lineage: carried out by a live run (a ticked
   *  one when one is live), each ticked run a parent with weight 1, the method linear. */
  async openMergeDraft(picked: readonly PickedRun[]): Promise<void> {
    const runId = await this.carrier(picked.map((r) => r.id), "a merge needs a live run (training, paused or idle) to make the merged model.");
    if (runId === null) return;
    const draft = mergeDraft(picked, runId, this.sources.runs().map((r) => r.name));
    this.closeForms();
    this.merges.open(initialMergeValues(draft), "New merge card", null);
  }

  /** Draft a gate card for the runs ticked in the lineage: the generalist (the one with the
   *  fewest ancestors) first, each at its newest checkpoint, carried out by a live run. */
  async openGateDraft(picked: readonly PickedRun[]): Promise<void> {
    const runId = await this.carrier(picked.map((r) => r.id), "a gate needs a live run (training, paused or idle) to run the experts and train the gate.");
    if (runId === null) return;
    const experts = generalistFirst(picked, this.sources.edges());
    const draft = gateDraft(experts, runId, this.sources.runs().map((r) => r.name));
    this.closeForms();
    this.gates.open(initialGateValues(draft), "New gate card", null);
  }

  /** The live run that carries a merge, gate or benchmark card out (a picked one first); null,
   *  with the page saying why, when there is none. */
  private async carrier(picked: readonly number[], why: string): Promise<number | null> {
    let runId: number | null;
    try {
      runId = carrierOf((await this.api.session()).runs, picked);
    } catch (error) {
      this.store.showMessage(`Could not read the session's runs: ${String(error)}`);
      return null;
    }
    if (runId === null) this.store.showMessage(`No run can carry the card out now: ${why}`);
    return runId;
  }

  private closeForms(): void {
    this.form.close();
    this.merges.close();
    this.gates.close();
  }

  /** Edit a proposed card in its form (a fork's or a merge's; a merge's stored preview shown). */
  openPlan(plan: PlanOut): void {
    const { card } = plan;
    if (card.kind === "fork") {
      this.closeForms();
      this.form.open(valuesOf(card), `Card ${plan.id} · proposed`, { id: plan.id, card });
    } else if (card.kind === "merge") {
      this.closeForms();
      this.merges.open(mergeValuesOf(card), `Merge card ${plan.id} · proposed`, { id: plan.id, card });
      void this.showStoredPreview(plan);
    } else if (card.kind === "gate") {
      this.closeForms();
      this.gates.open(gateValuesOf(card), `Gate card ${plan.id} · proposed`, { id: plan.id, card });
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
      for (const form of [this.form, this.merges, this.gates]) {
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
    this.mixtures.runsChanged();
    this.slicesChanged();
  }

  slicesChanged(): void {
    for (const form of [this.form, this.merges, this.gates]) if (!form.hidden) form.fillChoices();
  }

  // ---- the requests ------------------------------------------------------------------------------

  /** Propose the card a form describes; the form then edits the proposed card. */
  private async propose<C extends PlanCard>(form: EditingForm<C>, next: string): Promise<void> {
    if (form.editing !== null) return;
    await this.act(form, async () => {
      const plan = await this.api.proposePlan(form.card());
      this.store.showMessage(`Proposed card ${plan.id}: ${next}`, "info");
      this.openPlan(plan);
    });
  }

  /** Send the changed fields; the card comes back checked, with every default filled in. */
  private async save<C extends PlanCard>(form: EditingForm<C>): Promise<boolean> {
    const plan = form.editing;
    const changes = form.changes();
    if (plan === null) return false;
    if (changes === null) return true;
    return (await this.act(form, async () => this.openPlan(await this.api.editPlan(plan.id, changes)))) !== null;
  }

  private async approveEdited<C extends PlanCard>(form: EditingForm<C>): Promise<void> {
    const plan = form.editing;
    if (plan === null || !(await this.save(form))) return; // unsaved edits first: what is approved is what is shown
    await this.approve(plan.id);
  }

  /** Preview the merge card the form edits (its unsaved edits saved first): the run makes the
   *  candidate and compares it with every parent; the form shows the table when it is stored. */
  private async preview(): Promise<void> {
    const editing = this.merges.editing;
    if (editing === null || !(await this.save(this.merges))) return;
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
      this.closeEditing(id);
      this.store.showMessage(`Approved card ${id}: run ${approved.plan.card.run_id} carries it out at its next step boundary.`, "info");
    });
  }

  private async discard(id: number): Promise<void> {
    await this.act(this.formFor(id), async () => {
      await this.api.discardPlan(id);
      this.closeEditing(id);
      this.store.showMessage(`Discarded card ${id}.`, "info");
    });
  }

  private closeEditing(id: number): void {
    for (const form of [this.form, this.merges, this.gates]) if (form.editing?.id === id) form.close();
  }

  /** The form a request about card `id` reports to: the one editing it, else the fork form. */
  private formFor(id: number): PlanForm {
    return [this.merges, this.gates].find((form) => form.editing?.id === id) ?? this.form;
  }

  /** "Benchmark…" on a done gate card: propose a benchmark card for its mixture, carried out by
   *  a live run (the gate card's own when it still is). It shows in the list, to approve. */
  private async proposeBenchmark(plan: PlanOut): Promise<void> {
    const mixture = plan.runs[0];
    if (mixture === undefined) return;
    const runId = await this.carrier([plan.card.run_id], "a benchmark needs a live run (training, paused or idle) to train the monolith.");
    if (runId === null) return;
    await this.act(MESSAGES, async () => {
      const proposed = await this.api.proposePlan(benchmarkDraft(runId, mixture));
      this.store.showMessage(`Proposed benchmark card ${proposed.id} for ${this.runName(mixture)}: approve it in the list to train the monolith and compare.`, "info");
    });
  }

  /** Mixture run `runId`'s artifact, saved as a file (or the server's reason, in the message area). */
  private async downloadMixture(runId: number): Promise<void> {
    try {
      const { blob, filename } = await this.api.mixtureFile(runId);
      const url = URL.createObjectURL(blob);
      download(url, filename);
      window.setTimeout(() => URL.revokeObjectURL(url), 60_000); // after the browser has taken the file
      this.store.showMessage(`Saved the mixture of run ${runId} as ${filename}.`, "info");
    } catch (error) {
      this.store.showMessage(`Could not download the mixture of run ${runId}: ${describeError(error)}`);
    }
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
      showEmpty(body, "No plan cards yet: press “Fork…” on a saved slice, or tick runs in the lineage and press “Merge…” or “Gate…”.", COLUMNS.length);
    } else {
      body.replaceChildren(...[...this.plans].reverse().map((plan) => this.row(plan)));
    }
    this.mixtures.update(this.plans);
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
    const criterion = card.kind === "fork" ? criterionText(card)
      : card.kind === "merge" ? mergeCriterionText(card)
      : card.kind === "gate" ? gateCriterionText(card)
      : card.kind === "benchmark" ? benchmarkCriterionText(card)
      : "—";
    tr.append(element("td", "plan-name", `${plan.id} · ${cardTitle(card)}`), status, element("td", "", planText(card, runName)), element("td", "", criterion));
    tr.append(this.outcomeCell(plan), element("td", "", plan.runs.map((id) => this.runName(id)).join(", ") || "—"));
    const actions = element("td", "actions");
    if (plan.status === "proposed") {
      if (card.kind !== "curate" && card.kind !== "benchmark") actions.append(this.button("Edit", `Edit card ${plan.id}`, async () => this.openPlan(plan)));
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
    if (plan.card.kind === "gate" || plan.card.kind === "benchmark") return this.mixtureOutcome(plan, cell);
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

  /** A gate's or benchmark's outcome once done (its verdict, and "Details": its result under the
   *  list), what it is doing before. */
  private mixtureOutcome(plan: PlanOut, cell: HTMLTableCellElement): HTMLTableCellElement {
    const { card } = plan;
    const verdict = plan.status === "done" ? mixtureVerdict(plan) : null;
    if (verdict === null) {
      const doing = card.kind === "gate" ? "training the gate…" : "training the monolith, evaluating…";
      cell.textContent = plan.status === "running" ? doing : plan.status === "approved" ? "waiting for a step boundary" : plan.status === "done" ? "done" : "—";
      return cell;
    }
    cell.dataset["met"] = String(verdict.met);
    cell.classList.add(verdict.met === true ? "good" : verdict.met === false ? "bad" : "muted");
    cell.textContent = verdict.text;
    cell.append(" ", this.button("Details", `Show card ${plan.id}'s result`, async () => this.mixtures.show(plan), "link-button"));
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

/** A done gate's or benchmark's verdict in words, and whether it was met. */
function mixtureVerdict(plan: PlanOut): { met: boolean | null; text: string } | null {
  const { card } = plan;
  if (card.kind === "gate") {
    const verdict = readGateVerdict(plan.result);
    return verdict === null ? null : { met: verdict.met, text: gateOutcomeText(verdict) };
  }
  if (card.kind === "benchmark") {
    const verdict = readBenchmarkVerdict(plan.result);
    return verdict === null ? null : { met: verdict.met, text: benchmarkOutcomeText(verdict, card.sets[0] ?? "test") };
  }
  return null;
}
