// The extension: "On the Fly: Show Dashboard" opens the panel, asks for the interpreter and the
// script (once: remembered per workspace), Run starts the script through `onthefly run` and the
// panel frames its dashboard; Stop, or closing the panel, ends the process. An exported session
// (.otf) opens from the explorer's context menu through `onthefly open`.

import * as path from "node:path";

import * as vscode from "vscode";

import { Backend, describeState, type BackendState } from "./backend";
import { parseHandshake, parsePrintedUrl, type Dashboard } from "./handshake";
import type { Action, PanelKind } from "./html";
import { checkInterpreter, findInterpreters, preferredInterpreter } from "./interpreter";
import { backendEnvironment, freePort, isLoopback, openArguments, runArguments } from "./launch";
import { DashboardPanel, VIEW_TYPE } from "./panel";

const INTERPRETER_KEY = "onthefly.interpreter";
const SCRIPT_KEY = "onthefly.script";
const SCRIPT_EXCLUDE = "**/{.venv,venv,env,.env,node_modules,site-packages,__pycache__,.git,.tox,build,dist}/**";

type Target = { mode: "script"; file: string } | { mode: "session"; file: string };

class Controller implements vscode.Disposable {
  private readonly output = vscode.window.createOutputChannel("On The Fly");
  private panel: DashboardPanel | null = null;
  private backend: Backend | null = null;
  private target: Target | null = null;
  private interpreter: string | null = null;
  private problem: string | null = null;
  private dashboardStatus: string | null = null;

  constructor(private readonly context: vscode.ExtensionContext) {}

  // ---- commands ---------------------------------------------------------------------------
  async showDashboard(): Promise<void> {
    this.ensurePanel().reveal();
    if (this.isBusy()) return; // the dashboard already shows (or is starting)
    const python = await this.resolveInterpreter(false);
    const script = await this.resolveScript(false);
    if (python !== undefined) await this.check(python);
    if (script !== undefined) this.target = { mode: "script", file: script };
    this.renderIdle();
  }

  async run(): Promise<void> {
    this.ensurePanel().reveal();
    const python = await this.resolveInterpreter(false);
    if (python === undefined) return;
    const script = this.target?.mode === "script" ? this.target.file : await this.resolveScript(false);
    if (script === undefined) return;
    this.target = { mode: "script", file: script };
    if (!(await this.check(python))) {
      this.renderIdle();
      return;
    }
    await this.stopBackend();
    const config = vscode.workspace.getConfiguration("onthefly", vscode.Uri.file(script));
    const args = runArguments(script, config.get<string[]>("scriptArguments") ?? []);
    await this.startBackend(python, args, this.workingFolder(script), parseHandshake);
  }

  async stop(): Promise<void> {
    await this.stopBackend();
  }

  async selectInterpreter(): Promise<void> {
    const python = await this.resolveInterpreter(true);
    if (python !== undefined) await this.check(python);
    if (!this.isBusy()) this.renderIdle();
  }

  async selectScript(): Promise<void> {
    const script = await this.resolveScript(true);
    if (script !== undefined) this.target = { mode: "script", file: script };
    if (!this.isBusy()) this.renderIdle();
  }

  async openSession(uri: vscode.Uri | undefined): Promise<void> {
    const file = uri?.fsPath ?? (await this.pickSessionFile());
    if (file === undefined) return;
    if (this.isBusy()) {
      const what = this.target ? path.basename(this.target.file) : "the running process";
      const answer = await vscode.window.showWarningMessage(`Stop ${what} and open ${path.basename(file)}?`, { modal: true }, "Stop and Open");
      if (answer !== "Stop and Open") return;
    }
    this.ensurePanel().reveal();
    const python = await this.resolveInterpreter(false);
    if (python === undefined) return;
    this.target = { mode: "session", file };
    if (!(await this.check(python))) {
      this.renderIdle();
      return;
    }
    await this.stopBackend();
    const port = await freePort();
    await this.startBackend(python, openArguments(file, port), path.dirname(file),
      (line, pid) => parseHandshake(line) ?? parsePrintedUrl(line, pid), port);
  }

  // ---- the backend --------------------------------------------------------------------------
  private async startBackend(python: string, args: string[], cwd: string,
    findDashboard: (line: string, pid: number) => Dashboard | null, port?: number): Promise<void> {
    const chosenPort = port ?? (await freePort());
    // The dashboard's address as this editor's webview reaches it: under code-server on another
    // machine, a proxy whose name the server must accept as Host.
    const external = await vscode.env.asExternalUri(vscode.Uri.parse(`http://127.0.0.1:${chosenPort}/`));
    const hostname = new URL(external.toString(true)).hostname;
    const env = backendEnvironment(process.env, { port: chosenPort, allowedHosts: isLoopback(hostname) ? [] : [hostname] });
    const timeout = vscode.workspace.getConfiguration("onthefly").get<number>("startupTimeoutSeconds") ?? 300;
    const what = this.targetName();
    this.output.appendLine(`[${new Date().toLocaleTimeString()}] ${python} ${args.slice(2).join(" ")}  (in ${cwd})`);
    this.dashboardStatus = null;
    const backend = new Backend({
      command: python,
      args,
      cwd,
      env,
      findDashboard,
      startupTimeoutMs: Math.max(5, timeout) * 1000,
      onOutput: (line) => this.output.appendLine(line),
      onState: (state) => {
        if (this.backend === backend) void this.showState(state);
      },
    });
    this.backend = backend;
    backend.start();
    this.output.appendLine(`${what}: ${describeState(backend.state, what, this.target?.mode)}`);
  }

  private async stopBackend(): Promise<void> {
    const backend = this.backend;
    if (backend !== null) await backend.stop();
  }

  private isBusy(): boolean {
    const kind = this.backend?.state.kind;
    return kind === "starting" || kind === "running" || kind === "stopping";
  }

  private async showState(state: BackendState): Promise<void> {
    const what = this.targetName();
    const status = describeState(state, what, this.target?.mode);
    this.updateTitle();
    const panel = this.panel;
    if (state.kind === "ended") {
      this.output.appendLine(`${status}`);
      const crashed = state.reason !== "stopped" && state.reason !== "finished";
      if (crashed) {
        const last = state.lastLines.filter((line) => line.trim() !== "").at(-1);
        void vscode.window.showErrorMessage(last ? `${status}: ${last}` : status, "Show Output").then((choice) => {
          if (choice === "Show Output") this.output.show(true);
        });
      }
      if (panel !== null) await panel.render(this.view("ended", status, state.lastLines, crashed), null);
      return;
    }
    if (panel === null) return;
    if (state.kind === "stopping") panel.update("stopping", status);
    else if (state.kind === "running") await panel.render(this.view("running", status), state.dashboard);
    else await panel.render(this.view(state.kind === "idle" ? "setup" : "starting", status), null);
  }

  // ---- the panel -------------------------------------------------------------------------------
  ensurePanel(existing?: vscode.WebviewPanel): DashboardPanel {
    if (this.panel !== null && !this.panel.isDisposed) return this.panel;
    this.panel = new DashboardPanel({
      onAction: (action) => void this.act(action),
      onDashboardStatus: (status) => {
        this.dashboardStatus = status;
        this.updateTitle();
      },
      onDisposed: () => {
        this.panel = null;
        void this.stopBackend(); // the panel closed: the process ends with it
      },
    }, existing);
    this.updateTitle();
    return this.panel;
  }

  private act(action: Action): Promise<void> {
    switch (action) {
      case "run":
        return this.run();
      case "stop":
        return this.stop();
      case "selectScript":
        return this.selectScript();
      case "selectInterpreter":
        return this.selectInterpreter();
      case "showOutput":
        this.output.show(true);
        return Promise.resolve();
    }
  }

  private view(kind: PanelKind, status: string, lastLines: readonly string[] = [], crashed = false) {
    return {
      kind,
      mode: this.target?.mode ?? "script",
      target: this.target ? vscode.workspace.asRelativePath(this.target.file) : null,
      interpreter: this.interpreter,
      status,
      problem: this.problem,
      lastLines,
      crashed,
    } as const;
  }

  private renderIdle(): void {
    const panel = this.panel;
    if (panel === null) return;
    const state = this.backend?.state;
    if (state?.kind === "ended") {
      const crashed = state.reason !== "stopped" && state.reason !== "finished";
      void panel.render(this.view("ended", describeState(state, this.targetName(), this.target?.mode), state.lastLines, crashed), null);
      return;
    }
    const status = this.target === null ? "Choose a training script" : describeState({ kind: "idle" }, this.targetName(), this.target.mode);
    void panel.render(this.view("setup", status), null);
  }

  private updateTitle(): void {
    if (this.panel === null) return;
    const name = this.target ? path.basename(this.target.file) : null;
    const status = this.backend?.state.kind === "running" ? this.dashboardStatus : null;
    this.panel.title = ["On The Fly", name].filter(Boolean).join(" · ") + (status ? ` (${status})` : "");
  }

  private targetName(): string {
    return this.target ? path.basename(this.target.file) : "the script";
  }

  // ---- interpreter and script ----------------------------------------------------------------
  private async resolveInterpreter(ask: boolean): Promise<string | undefined> {
    const resource = this.target ? vscode.Uri.file(this.target.file) : vscode.workspace.workspaceFolders?.[0]?.uri;
    const python = vscode.extensions.getExtension("ms-python.python");
    if (ask && python !== undefined) {
      // The Python extension owns the choice: its picker, then its answer.
      await vscode.commands.executeCommand("python.setInterpreter");
    }
    if (!ask || python !== undefined) {
      const choice = preferredInterpreter({
        pythonExtension: await pythonExtensionInterpreter(python, resource),
        setting: vscode.workspace.getConfiguration("onthefly", resource).get<string>("pythonPath"),
        remembered: this.context.workspaceState.get<string>(INTERPRETER_KEY),
      });
      if (choice !== null) {
        this.interpreter = choice.path;
        return choice.path;
      }
    }
    const picked = await this.pickInterpreter();
    if (picked !== undefined) {
      this.interpreter = picked;
      await this.context.workspaceState.update(INTERPRETER_KEY, picked);
    }
    return picked;
  }

  private async pickInterpreter(): Promise<string | undefined> {
    const folders = (vscode.workspace.workspaceFolders ?? []).map((f) => f.uri.fsPath);
    const found = findInterpreters(process.env, folders);
    const browse = "$(folder) Browse…";
    const items: vscode.QuickPickItem[] = [
      ...found.map((file) => ({ label: file, description: describeInterpreter(file, folders) })),
      { label: browse, description: "choose a Python executable", alwaysShow: true },
    ];
    const picked = await vscode.window.showQuickPick(items, {
      title: "On The Fly: the Python interpreter that runs the training script",
      placeHolder: found.length > 0 ? "Choose an interpreter (it needs the onthefly package)" : "No interpreter found on PATH: browse for one",
      ignoreFocusOut: true,
      matchOnDescription: true,
    });
    if (picked === undefined) return undefined;
    if (picked.label !== browse) return picked.label;
    const chosen = await vscode.window.showOpenDialog({ canSelectMany: false, openLabel: "Use this interpreter", title: "Python interpreter" });
    return chosen?.[0]?.fsPath;
  }

  private async resolveScript(ask: boolean): Promise<string | undefined> {
    const remembered = this.context.workspaceState.get<string>(SCRIPT_KEY);
    if (!ask && remembered !== undefined && (await exists(remembered))) return remembered;
    const files = await vscode.workspace.findFiles("**/*.py", SCRIPT_EXCLUDE, 2000);
    const active = vscode.window.activeTextEditor?.document;
    const activeFile = active?.languageId === "python" && active.uri.scheme === "file" ? active.uri.fsPath : undefined;
    const paths = [...new Set([...(activeFile ? [activeFile] : []), ...files.map((f) => f.fsPath).sort()])];
    if (paths.length === 0) {
      void vscode.window.showWarningMessage("On The Fly: this workspace has no Python file to run. Open a folder with your training script.");
      return undefined;
    }
    const picked = await vscode.window.showQuickPick(
      paths.map((file) => ({ label: vscode.workspace.asRelativePath(file), description: file === activeFile ? "active editor" : "", file })),
      { title: "On The Fly: the training script to run", placeHolder: "Choose the script (it calls onthefly.quickstart or start_run)", ignoreFocusOut: true },
    );
    if (picked === undefined) return undefined;
    await this.context.workspaceState.update(SCRIPT_KEY, picked.file);
    return picked.file;
  }

  private async pickSessionFile(): Promise<string | undefined> {
    const chosen = await vscode.window.showOpenDialog({ canSelectMany: false, filters: { "On The Fly session": ["otf"] }, openLabel: "Open session" });
    return chosen?.[0]?.fsPath;
  }

  /** Whether `python` can run On The Fly; if not, says so (panel and notification) with the fix. */
  private async check(python: string): Promise<boolean> {
    const result = await checkInterpreter(python, { cwd: vscode.workspace.workspaceFolders?.[0]?.uri.fsPath });
    if (result.ok) {
      this.problem = null;
      return true;
    }
    this.problem = result.message;
    this.output.appendLine(result.message);
    const actions = [...(result.fix !== null ? ["Copy Install Command"] : []), "Select Interpreter"];
    void vscode.window.showErrorMessage(result.message, ...actions).then(async (choice) => {
      if (choice === "Copy Install Command" && result.fix !== null) await vscode.env.clipboard.writeText(result.fix);
      else if (choice === "Select Interpreter") await this.selectInterpreter();
    });
    return false;
  }

  private workingFolder(script: string): string {
    return vscode.workspace.getWorkspaceFolder(vscode.Uri.file(script))?.uri.fsPath ?? path.dirname(script);
  }

  async dispose(): Promise<void> {
    await this.stopBackend();
    this.panel?.dispose();
    this.output.dispose();
  }
}

interface PythonExtensionApi {
  environments?: { getActiveEnvironmentPath?: (resource?: vscode.Uri) => { path?: string } | undefined };
  settings?: { getExecutionDetails?: (resource?: vscode.Uri) => { execCommand?: string[] } | undefined };
}

/** The Python extension's active interpreter for `resource`, when it is installed. */
async function pythonExtensionInterpreter(extension: vscode.Extension<unknown> | undefined, resource?: vscode.Uri): Promise<string | undefined> {
  if (extension === undefined) return undefined;
  try {
    const api = (extension.isActive ? extension.exports : await extension.activate()) as PythonExtensionApi | undefined;
    return api?.environments?.getActiveEnvironmentPath?.(resource)?.path ?? api?.settings?.getExecutionDetails?.(resource)?.execCommand?.[0];
  } catch {
    return undefined; // an older or broken Python extension: fall back to our own choice
  }
}

function describeInterpreter(file: string, folders: readonly string[]): string {
  if (folders.some((folder) => file.startsWith(folder + path.sep))) return "workspace environment";
  if (process.env["VIRTUAL_ENV"] && file.startsWith(process.env["VIRTUAL_ENV"])) return "active virtual environment";
  if (process.env["CONDA_PREFIX"] && file.startsWith(process.env["CONDA_PREFIX"])) return "active conda environment";
  return "on PATH";
}

async function exists(file: string): Promise<boolean> {
  try {
    await vscode.workspace.fs.stat(vscode.Uri.file(file));
    return true;
  } catch {
    return false;
  }
}

let controller: Controller | null = null;

export function activate(context: vscode.ExtensionContext): void {
  const active = new Controller(context);
  controller = active;
  const commands: [string, (...args: unknown[]) => Promise<void>][] = [
    ["onthefly.showDashboard", () => active.showDashboard()],
    ["onthefly.run", () => active.run()],
    ["onthefly.stop", () => active.stop()],
    ["onthefly.selectInterpreter", () => active.selectInterpreter()],
    ["onthefly.selectScript", () => active.selectScript()],
    ["onthefly.openSession", (uri) => active.openSession(uri instanceof vscode.Uri ? uri : undefined)],
  ];
  for (const [name, handler] of commands) context.subscriptions.push(vscode.commands.registerCommand(name, handler));
  // A panel left open when the window reloaded comes back showing the setup view (its process
  // ended with the old extension host).
  context.subscriptions.push(vscode.window.registerWebviewPanelSerializer(VIEW_TYPE, {
    deserializeWebviewPanel: async (panel) => {
      active.ensurePanel(panel);
      await active.showDashboard();
    },
  }));
}

export async function deactivate(): Promise<void> {
  await controller?.dispose();
  controller = null;
}
