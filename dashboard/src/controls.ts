// The run's controls. A button is enabled only when the server says its command is possible now
// (RunInfo.commands); pressing it posts the command, and a refusal (the 4xx `detail`) is shown.

import { ApiError, type ApiClient, type CommandRequest, type RunInfo } from "./api";
import type { Store } from "./state";

export type ButtonName = "run" | "pause" | "resume" | "stop" | "test" | "train_more" | "set_lr";

export interface ControlElements {
  buttons: Record<ButtonName, HTMLButtonElement>;
  epochs: HTMLInputElement;
  lr: HTMLInputElement;
}

export class Controls {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly elements: ControlElements;
  /** Called after a command was sent (accepted or not), to re-read the run's state. */
  private readonly onSent: () => void;
  /** A command being posted: its button stays disabled until the answer. */
  private busy: ButtonName | null = null;
  /** Whether the user typed a learning rate, which live updates must then not overwrite. */
  private lrEdited = false;

  constructor(api: ApiClient, store: Store, elements: ControlElements, onSent: () => void) {
    this.api = api;
    this.store = store;
    this.elements = elements;
    this.onSent = onSent;
    for (const [name, button] of Object.entries(elements.buttons) as [ButtonName, HTMLButtonElement][]) {
      button.addEventListener("click", () => void this.send(name));
    }
    elements.lr.addEventListener("input", () => (this.lrEdited = true));
    // Enter in a field presses the button next to it.
    const submitOnEnter = (input: HTMLInputElement, name: ButtonName) =>
      input.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !elements.buttons[name].disabled) void this.send(name);
      });
    submitOnEnter(elements.lr, "set_lr");
    submitOnEnter(elements.epochs, "train_more");
    this.update(null);
  }

  /** Enable exactly the buttons whose command the run accepts now. */
  update(run: RunInfo | null): void {
    const possible = new Set(run?.commands ?? []);
    for (const [name, button] of Object.entries(this.elements.buttons) as [ButtonName, HTMLButtonElement][]) {
      button.disabled = this.busy === name || !possible.has(name);
    }
    this.elements.epochs.disabled = !possible.has("train_more");
    this.elements.lr.disabled = !possible.has("set_lr");
    const lr = this.elements.lr;
    // Show the run's current rate until the user starts typing one.
    if (run?.lr != null && !this.lrEdited && document.activeElement !== lr && lr.value !== String(run.lr)) {
      lr.value = String(run.lr);
    }
  }

  private request(name: ButtonName): CommandRequest | string {
    switch (name) {
      case "train_more": {
        const epochs = this.elements.epochs.valueAsNumber;
        return Number.isFinite(epochs) ? { kind: "train_more", epochs } : "Enter how many epochs to train.";
      }
      case "set_lr": {
        const lr = this.elements.lr.valueAsNumber;
        return Number.isFinite(lr) ? { kind: "set_lr", lr } : "Enter a learning rate.";
      }
      default:
        return { kind: name };
    }
  }

  private async send(name: ButtonName): Promise<void> {
    const request = this.request(name);
    if (typeof request === "string") {
      this.store.showMessage(request);
      return;
    }
    this.busy = name;
    this.update(this.store.run);
    try {
      const accepted = await this.api.command(this.runId(), request);
      this.store.showMessage(`${accepted.kind} sent; it takes effect at the next step boundary.`, "info");
      if (name === "set_lr") this.lrEdited = false;
    } catch (error) {
      const text = error instanceof ApiError ? error.message : `Could not send ${request.kind}: ${String(error)}`;
      this.store.showMessage(text);
    } finally {
      this.busy = null;
      this.update(this.store.run);
      this.onSent();
    }
  }

  private runId(): number {
    const run = this.store.run;
    if (run === null) throw new Error("no run to send the command to");
    return run.id;
  }
}
