// The webview panel that shows the dashboard. It renders a PanelView (html.ts); the dashboard's
// address goes through `vscode.env.asExternalUri` at every render, never cached (a forwarded
// port may have closed and been opened again elsewhere), and is the only thing the page may frame.

import { randomBytes } from "node:crypto";

import * as vscode from "vscode";

import { frameUrl, isAction, makeNonce, renderPanel, type Action, type PanelView } from "./html";
import type { Dashboard } from "./handshake";

export const VIEW_TYPE = "onthefly.dashboard";

export interface PanelEvents {
  onAction: (action: Action) => void;
  /** The dashboard (framed) said its run's status. */
  onDashboardStatus: (status: string) => void;
  onDisposed: () => void;
}

export class DashboardPanel {
  readonly panel: vscode.WebviewPanel;
  private disposed = false;
  private renderCount = 0;

  constructor(events: PanelEvents, existing?: vscode.WebviewPanel) {
    this.panel = existing ?? vscode.window.createWebviewPanel(VIEW_TYPE, "On The Fly", vscode.ViewColumn.Active, {
      enableScripts: true,
      retainContextWhenHidden: true, // a hidden dashboard keeps its curves and its stream
      localResourceRoots: [],
    });
    if (existing !== undefined) this.panel.webview.options = { enableScripts: true, localResourceRoots: [] };
    this.panel.webview.onDidReceiveMessage((message: unknown) => {
      const type = (message as { type?: unknown } | null)?.type;
      if (isAction(type)) events.onAction(type);
      else if (type === "dashboardStatus") {
        const status = (message as { status?: unknown }).status;
        if (typeof status === "string" && /^[a-z_ -]{1,40}$/.test(status)) events.onDashboardStatus(status);
      }
    });
    this.panel.onDidDispose(() => {
      this.disposed = true;
      events.onDisposed();
    });
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  reveal(): void {
    if (!this.disposed) this.panel.reveal(undefined, false);
  }

  set title(title: string) {
    if (!this.disposed) this.panel.title = title;
  }

  /** Renders a whole view; with `dashboard`, the dashboard framed at its external address. */
  async render(view: Omit<PanelView, "frame">, dashboard: Dashboard | null): Promise<void> {
    const generation = ++this.renderCount;
    let frame: PanelView["frame"] = null;
    if (dashboard !== null) {
      const external = await vscode.env.asExternalUri(vscode.Uri.parse(dashboard.root));
      const src = frameUrl(external.toString(true), dashboard.token);
      frame = { src, origin: new URL(src).origin };
    }
    if (this.disposed || generation !== this.renderCount) return; // a newer render won
    this.panel.webview.html = renderPanel({ ...view, frame }, { nonce: makeNonce(randomBytes) });
  }

  /** Updates the header only (the framed dashboard is not reloaded). */
  update(kind: PanelView["kind"], status: string): void {
    if (!this.disposed) void this.panel.webview.postMessage({ type: "state", kind, status });
  }

  dispose(): void {
    if (!this.disposed) this.panel.dispose();
  }
}
