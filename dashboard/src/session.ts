// The session's own files, from the "Session" group of the controls: its archive (.otf: every run,
// its curves, samples, slices and checkpoints; `onthefly import` opens it elsewhere) and its report
// (one self-contained HTML file). Both come from the server, which writes them from the store, so
// they work with or without a training process (`onthefly open`): unlike the run's controls, these
// buttons never wait on the run's state.

import type { ApiClient } from "./api";
import { download } from "./dom";
import { describeArchive, runArchive } from "./exports";
import type { Store } from "./state";

export interface SessionFileElements {
  exportSession: HTMLButtonElement;
  report: HTMLButtonElement;
}

export class SessionFiles {
  private readonly api: ApiClient;
  private readonly store: Store;
  private readonly elements: SessionFileElements;

  constructor(api: ApiClient, store: Store, elements: SessionFileElements) {
    this.api = api;
    this.store = store;
    this.elements = elements;
    elements.exportSession.addEventListener("click", () => void this.exportSession());
    elements.report.addEventListener("click", () => this.report());
  }

  /** Export the session; the page says what came of it, and downloads a ready archive. The button
   *  stays disabled meanwhile: a second click would write a second archive. */
  private async exportSession(): Promise<void> {
    const button = this.elements.exportSession;
    if (button.disabled) return;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    this.store.showMessage("Exporting the session: the current weights are saved, then the archive is written…", "info");
    try {
      const outcome = await runArchive(this.api);
      this.store.showMessage(describeArchive(outcome), outcome.ok ? "info" : "error");
      if (outcome.ok) download(this.api.archiveFileUrl(outcome.job.id), outcome.job.filename);
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }

  /** The report is written when asked for and streamed as the download (under the server's name). */
  private report(): void {
    download(this.api.reportUrl());
    this.store.showMessage("Writing the session's report: it downloads as one HTML file when it is ready.", "info");
  }
}
