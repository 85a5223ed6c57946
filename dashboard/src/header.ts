// The header: which project and run, its status, and where training is (step, epoch, speed).

import { byId, byTestId, setText } from "./dom";
import { formatCount, formatThroughput } from "./format";
import type { Store } from "./state";
import type { StreamState } from "./socket";

const CONNECTION_TEXT: Record<StreamState, string> = {
  connecting: "connecting…",
  open: "live",
  polling: "live (polling)",
  reconnecting: "reconnecting…",
  stopped: "disconnected",
};

export class Header {
  private readonly project = byTestId("project");
  private readonly runName = byTestId("run-name");
  private readonly status = byTestId("status");
  private readonly step = byTestId("step");
  private readonly epoch = byTestId("epoch");
  private readonly epochTarget = byId("epoch-target");
  private readonly throughput = byTestId("throughput");
  private readonly connection = byTestId("connection");
  private sentStatus: string | null = null;

  render(store: Store): void {
    const run = store.run;
    setText(this.project, store.session?.project ?? "—");
    setText(this.runName, run?.name ?? "no run yet");
    const status = run?.status ?? "—";
    setText(this.status, status);
    this.status.dataset["status"] = status;
    // The raw numbers ride along in data-value, for tools that read the page.
    setValue(this.step, run?.step ?? null, formatCount(run?.step));
    setValue(this.epoch, run?.epoch ?? null, run === null ? "—" : String(run.epoch));
    setText(this.epochTarget, run?.target_epochs ? ` / ${run.target_epochs}` : "");
    setValue(this.throughput, run?.samples_per_second ?? null, formatThroughput(run?.samples_per_second));
    document.title = run ? `${run.name} · ${status} · On The Fly` : "On The Fly";
    // Framed by the editor's panel (VS Code): it shows the run's status in its tab. The status
    // is no secret, and only a holder of the token could frame this page at all.
    if (window.parent !== window && status !== this.sentStatus) {
      this.sentStatus = status;
      window.parent.postMessage({ type: "onthefly.status", status }, "*");
    }
  }

  renderConnection(state: StreamState): void {
    setText(this.connection, CONNECTION_TEXT[state]);
    this.connection.dataset["state"] = state;
  }
}

function setValue(node: HTMLElement, value: number | null, text: string): void {
  setText(node, text);
  if (value === null) delete node.dataset["value"];
  else node.dataset["value"] = String(value);
}
