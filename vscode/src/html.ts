// The panel's page: a toolbar (what runs, with which interpreter; Run, Stop, Change…), and under
// it the dashboard in a sandboxed iframe, or what the panel has to say instead (ready to run,
// starting, a crash with the script's last lines). Pure: the extension gives it every value.
//
// Security (the pattern of Microsoft's TensorBoard webview): a Content-Security-Policy that lets
// the page run only its own nonce'd script and style and frame only the dashboard's address; the
// iframe sandboxed; messages from the extension taken only from the webview's own origin, and
// from the frame only when they come from the dashboard's origin.

export type PanelKind = "setup" | "starting" | "running" | "stopping" | "ended";

export interface PanelView {
  kind: PanelKind;
  /** "script": a training script (Run/Stop); "session": an exported session opened. */
  mode: "script" | "session";
  /** The script's or session file's path, as shown. */
  target: string | null;
  interpreter: string | null;
  /** The header's line (backend.describeState). */
  status: string;
  /** A problem to show above everything (the interpreter lacks onthefly, …). */
  problem: string | null;
  /** The dashboard's address as this webview reaches it (asExternalUri), with its token. */
  frame: { src: string; origin: string } | null;
  /** A crashed or ended backend's last lines. */
  lastLines: readonly string[];
  crashed: boolean;
}

export interface PageContext {
  nonce: string;
}

/** The buttons' messages to the extension (anything else the extension ignores). */
export const ACTIONS = ["run", "stop", "selectScript", "selectInterpreter", "showOutput"] as const;
export type Action = (typeof ACTIONS)[number];

export function isAction(value: unknown): value is Action {
  return typeof value === "string" && (ACTIONS as readonly string[]).includes(value);
}

export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}

/** The frame-src source for a dashboard address: its origin and folder (`http://h:1/proxy/8/`). */
export function frameSource(externalRoot: string): { origin: string; source: string } {
  const url = new URL(externalRoot);
  const folder = url.pathname.endsWith("/") ? url.pathname : url.pathname.replace(/[^/]*$/, "");
  return { origin: url.origin, source: `${url.origin}${folder}` };
}

/** The iframe's address: the dashboard's root (as the webview reaches it) with the token in its
 *  query, which the page takes and removes from its address at once. */
export function frameUrl(externalRoot: string, token: string): string {
  const url = new URL(externalRoot);
  if (!url.pathname.endsWith("/")) url.pathname += "/";
  url.searchParams.set("token", token);
  return url.toString();
}

function csp(view: PanelView, nonce: string): string {
  const frame = view.frame === null ? "'none'" : frameSource(view.frame.src).source;
  return [
    "default-src 'none'",
    `frame-src ${frame}`,
    `script-src 'nonce-${nonce}'`,
    `style-src 'nonce-${nonce}'`,
    "img-src data:",
  ].join("; ");
}

function button(action: Action, label: string, options: { primary?: boolean; hidden?: boolean } = {}): string {
  const classes = options.primary ? ' class="primary"' : "";
  return `<button type="button" data-action="${action}" id="action-${action}"${classes}${options.hidden ? " hidden" : ""}>${escapeHtml(label)}</button>`;
}

function body(view: PanelView): string {
  if (view.kind === "running" || view.kind === "stopping") {
    if (view.frame !== null) {
      // allow-same-origin: the dashboard keeps its own origin (its API calls and storage);
      // it is never the webview's, so it cannot reach the webview or the extension.
      return `<iframe id="dashboard" title="On The Fly dashboard" src="${escapeHtml(view.frame.src)}"
        sandbox="allow-scripts allow-same-origin allow-forms allow-downloads"
        allow="clipboard-write" referrerpolicy="no-referrer"></iframe>`;
    }
  }
  const parts: string[] = [];
  if (view.kind === "setup") {
    parts.push(view.mode === "script"
      ? `<p>Press <strong>Run</strong> to start the script with the dashboard attached.</p>`
      : `<p>Opening the session…</p>`);
  } else if (view.kind === "starting") {
    parts.push(`<p class="muted" data-testid="starting">Waiting for the script to start its dashboard (it may load its data first). Its output is in the "On The Fly" output channel.</p>`);
  } else if (view.kind === "ended") {
    parts.push(`<p data-testid="ended">${escapeHtml(view.status)}</p>`);
    if (view.lastLines.length > 0) {
      const label = view.crashed ? "Its last lines" : "Its last output";
      parts.push(`<h2>${label}</h2><pre class="${view.crashed ? "crash" : "tail"}" data-testid="last-lines">${escapeHtml(view.lastLines.join("\n"))}</pre>`);
    }
  }
  return `<div class="message">${parts.join("\n")}</div>`;
}

/** The panel's whole page for one view. */
export function renderPanel(view: PanelView, context: PageContext): string {
  const { nonce } = context;
  const running = view.kind === "starting" || view.kind === "running" || view.kind === "stopping";
  const script = view.mode === "script";
  const frameOrigin = view.frame === null ? null : frameSource(view.frame.src).origin;
  const problem = view.problem === null ? "" : `<div class="problem" role="alert" data-testid="problem">${escapeHtml(view.problem)}</div>`;
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="${csp(view, nonce).replace(/&/g, "&amp;").replace(/"/g, "&quot;")}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>On The Fly</title>
<style nonce="${nonce}">
  html, body { height: 100%; margin: 0; padding: 0; overflow: hidden; }
  body { display: flex; flex-direction: column; font-family: var(--vscode-font-family); font-size: var(--vscode-font-size);
         color: var(--vscode-foreground); background: var(--vscode-editor-background); }
  header { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 12px; padding: 6px 10px;
           border-bottom: 1px solid var(--vscode-panel-border, transparent); }
  header .status { font-weight: 600; }
  header .facts { color: var(--vscode-descriptionForeground); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; max-width: 60ch; }
  header .buttons { margin-left: auto; display: flex; gap: 6px; }
  button { font: inherit; padding: 3px 10px; border: 1px solid var(--vscode-button-border, transparent); border-radius: 2px; cursor: pointer;
           color: var(--vscode-button-secondaryForeground); background: var(--vscode-button-secondaryBackground); }
  button.primary { color: var(--vscode-button-foreground); background: var(--vscode-button-background); }
  button:hover { filter: brightness(1.1); }
  .problem { margin: 8px 10px 0; padding: 6px 10px; border: 1px solid var(--vscode-inputValidation-errorBorder, #be1100);
             background: var(--vscode-inputValidation-errorBackground, #5a1d1d); white-space: pre-wrap; user-select: text; }
  .message { padding: 12px 16px; overflow: auto; }
  .muted { color: var(--vscode-descriptionForeground); }
  h2 { font-size: 1em; margin: 12px 0 4px; }
  pre { margin: 0; padding: 8px; overflow: auto; max-height: 70vh; user-select: text;
        font-family: var(--vscode-editor-font-family); font-size: var(--vscode-editor-font-size);
        background: var(--vscode-textCodeBlock-background); }
  pre.crash { border-left: 3px solid var(--vscode-errorForeground, #f14c4c); }
  iframe { flex: 1; width: 100%; border: 0; background: #fff; }
</style>
</head>
<body data-state="${view.kind}">
<header>
  <span class="status" data-testid="status">${escapeHtml(view.status)}</span>
  <span class="facts" data-testid="facts" title="${escapeHtml(view.interpreter ?? "")}">${escapeHtml(
    [view.target ? `${script ? "script" : "session"}: ${view.target}` : "", view.interpreter ? `python: ${view.interpreter}` : ""]
      .filter(Boolean).join(" · "),
  )}</span>
  <span class="buttons">
    ${script ? button("run", "Run", { primary: true, hidden: running }) : ""}
    ${button("stop", "Stop", { hidden: !running })}
    ${script ? button("selectScript", "Script…", { hidden: running }) : ""}
    ${button("selectInterpreter", "Interpreter…", { hidden: running })}
    ${button("showOutput", "Output")}
  </span>
</header>
${problem}
${body(view)}
<script nonce="${nonce}">
(() => {
  const vscode = acquireVsCodeApi();
  const frameOrigin = ${JSON.stringify(frameOrigin)};
  for (const element of document.querySelectorAll("button[data-action]")) {
    element.addEventListener("click", () => vscode.postMessage({ type: element.dataset.action }));
  }
  const frame = document.getElementById("dashboard");
  const status = document.querySelector("[data-testid=status]");
  window.addEventListener("message", (event) => {
    if (frame !== null && event.source === frame.contentWindow) {
      // The dashboard may talk to the panel, but only the dashboard itself: a page it navigated
      // to, or anything else framed there, is not listened to.
      if (event.origin !== frameOrigin) return;
      const data = event.data;
      if (data && typeof data === "object" && data.type === "onthefly.status" && typeof data.status === "string") {
        vscode.postMessage({ type: "dashboardStatus", status: data.status.slice(0, 40) });
      }
      return;
    }
    // From the extension: VS Code delivers its messages from this webview's own origin.
    if (event.origin !== window.origin) return;
    const message = event.data;
    if (!message || typeof message !== "object" || message.type !== "state") return;
    if (typeof message.status === "string") status.textContent = message.status;
    if (typeof message.kind === "string") document.body.dataset.state = message.kind;
    const running = message.kind === "starting" || message.kind === "running" || message.kind === "stopping";
    for (const element of document.querySelectorAll("button[data-action]")) {
      const action = element.dataset.action;
      if (action === "stop") element.hidden = !running;
      else if (action !== "showOutput") element.hidden = running;
    }
  });
})();
</script>
</body>
</html>`;
}

/** A random nonce for the page's script and style. */
export function makeNonce(random: (size: number) => Uint8Array): string {
  return Buffer.from(random(16)).toString("hex");
}
