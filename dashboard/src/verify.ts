// "Verify suspects": the live run confirms its likely-mislabelled samples out of fold. A command
// (POST api/runs/{id}/verify) carried out at the run's next step boundary: copies of its model
// train on the rest of the data while the run waits, each suspect is judged by a copy that never
// saw it, and the confirmed ones become a slice. The button is there while the run takes the
// command and the table shows suspects; the line beside it says what came of the last request.

import { ApiError, type ApiClient, type RunInfo } from "./api";
import { setText } from "./dom";
import { formatCount } from "./format";
import type { CommandOutcomes } from "./outcomes";
import type { Store } from "./state";

export interface VerifyElements {
  button: HTMLButtonElement;
  status: HTMLElement;
}

/** Out-of-fold copies can take minutes: their answer is awaited this long. */
const OUTCOME_TIMEOUT_MS = 30 * 60_000;

/** What the command's result says, in words; null when it is not a verification's result. */
export function verifiedText(result: Record<string, unknown>): string | null {
  const { suspects, confirmed, slice, folds, epochs, seconds } = result;
  if (typeof suspects !== "number" || typeof confirmed !== "number") return null;
  const how = typeof folds === "number" && typeof epochs === "number"
    ? ` (${folds} folds × ${epochs} epoch${epochs === 1 ? "" : "s"}` : " (";
  const took = typeof seconds === "number" ? `, ${seconds.toFixed(1)} s)` : ")";
  const saved = typeof slice === "string" ? `; saved as slice “${slice}”` : "; none confirmed, no slice saved";
  return `${formatCount(confirmed)} of ${formatCount(suspects)} suspects confirmed out of fold${how}${took}${saved}`;
}

export class VerifySuspects {
  private runId: number | null = null;
  private possible = false;
  private suspects = 0;
  private epoch: number | null = null;
  private pending = false;

  constructor(
    private readonly api: ApiClient,
    private readonly store: Store,
    private readonly outcomes: CommandOutcomes,
    private readonly elements: VerifyElements,
    private readonly onSaved: () => void,
  ) {
    elements.button.addEventListener("click", () => void this.request());
    this.render();
  }

  /** The page's run, and whether it takes the command now. */
  update(run: RunInfo | null): void {
    const runId = run?.id ?? null;
    if (runId !== this.runId) setText(this.elements.status, "");
    this.runId = runId;
    this.possible = run?.commands.includes("verify_suspects") ?? false;
    this.render();
  }

  /** How many samples the table shows flagged likely mislabelled, at which epoch (the one verified). */
  setSuspects(count: number, epoch: number | null): void {
    this.suspects = count;
    this.epoch = epoch;
    this.render();
  }

  private render(): void {
    const button = this.elements.button;
    button.hidden = !this.possible && !this.pending;
    button.disabled = this.pending || this.suspects === 0;
    setText(button, this.pending ? "Verifying…" : "Verify suspects");
    button.title = this.suspects === 0
      ? "No sample is flagged likely mislabelled at this epoch"
      : `Confirm the ${formatCount(this.suspects)} likely mislabelled samples of epoch ${this.epoch ?? "?"} with ` +
        "out-of-fold copies of the model " +
        "(5 folds × 5 epochs; the run waits meanwhile, then trains on as it would have)";
  }

  private async request(): Promise<void> {
    const runId = this.runId;
    if (runId === null || this.pending) return;
    this.pending = true;
    this.render();
    setText(this.elements.status, `Verifying ${formatCount(this.suspects)} suspects at run ${runId}'s next step boundary…`);
    try {
      const accepted = await this.api.verifySuspects(runId, this.epoch);
      const outcome = await this.outcomes.wait(runId, accepted.id, OUTCOME_TIMEOUT_MS);
      if (outcome.applied) {
        setText(this.elements.status, verifiedText(outcome.result) ?? "Verified.");
        this.onSaved();
      } else {
        setText(this.elements.status, `Verify suspects rejected: ${outcome.reason}`);
      }
    } catch (error) {
      const text = error instanceof ApiError ? error.message : `Could not ask for a verification: ${String(error)}`;
      setText(this.elements.status, text);
      this.store.showMessage(text);
    } finally {
      this.pending = false;
      this.render();
    }
  }
}
