import { describe, expect, it } from "vitest";

import { escapeHtml, frameSource, frameUrl, isAction, makeNonce, renderPanel, type PanelView } from "../src/html";

const base: PanelView = {
  kind: "setup",
  mode: "script",
  target: "train.py",
  interpreter: "/w/.venv/bin/python",
  status: "Ready to run train.py",
  problem: null,
  frame: null,
  lastLines: [],
  crashed: false,
};

const csp = (html: string) => /http-equiv="Content-Security-Policy" content="([^"]+)"/.exec(html)![1]!;

describe("renderPanel", () => {
  it("frames only the dashboard's address, sandboxed, under a strict policy", () => {
    const src = frameUrl("http://127.0.0.1:8080/proxy/8123/", "tok");
    const html = renderPanel({ ...base, kind: "running", frame: { src, origin: "http://127.0.0.1:8080" } }, { nonce: "abc123" });
    expect(csp(html)).toBe("default-src 'none'; frame-src http://127.0.0.1:8080/proxy/8123/; script-src 'nonce-abc123'; style-src 'nonce-abc123'; img-src data:");
    expect(html).toContain(`<iframe id="dashboard" title="On The Fly dashboard" src="http://127.0.0.1:8080/proxy/8123/?token=tok"`);
    expect(html).toMatch(/sandbox="allow-scripts allow-same-origin allow-forms allow-downloads"/);
    expect(html).toContain('const frameOrigin = "http://127.0.0.1:8080";');
    // Every script and style carries the nonce.
    expect(html.match(/<script(?! nonce="abc123")/g)).toBeNull();
    expect(html.match(/<style(?! nonce="abc123")/g)).toBeNull();
    // While it runs: Stop, no Run.
    expect(html).toMatch(/data-action="run" id="action-run" class="primary" hidden/);
    expect(html).not.toMatch(/data-action="stop" id="action-stop" hidden/);
  });

  it("frames nothing when no dashboard runs", () => {
    const html = renderPanel(base, { nonce: "n" });
    expect(csp(html)).toContain("frame-src 'none'");
    expect(html).not.toContain("<iframe");
    expect(html).toMatch(/data-action="stop" id="action-stop" hidden/);
  });

  it("shows a crash's last lines, escaped", () => {
    const html = renderPanel({ ...base, kind: "ended", status: "train.py crashed (exit code 1)", crashed: true, lastLines: ["Traceback …", "ValueError: <bad> & worse"] }, { nonce: "n" });
    expect(html).toContain('<pre class="crash" data-testid="last-lines">Traceback …\nValueError: &lt;bad&gt; &amp; worse</pre>');
    expect(html).toContain("train.py crashed (exit code 1)");
  });

  it("shows the interpreter's problem", () => {
    const html = renderPanel({ ...base, problem: "Install it with: pip install onthefly-ai" }, { nonce: "n" });
    expect(html).toContain('data-testid="problem">Install it with: pip install onthefly-ai</div>');
  });

  it("has no Run or Script buttons for an opened session", () => {
    const html = renderPanel({ ...base, mode: "session", target: "run.otf" }, { nonce: "n" });
    expect(html).not.toContain('data-action="run"');
    expect(html).not.toContain('data-action="selectScript"');
    expect(html).toContain("session: run.otf");
  });
});

describe("addresses", () => {
  it("puts the token in the frame's query and keeps the proxy's folder", () => {
    expect(frameUrl("http://127.0.0.1:8123/", "a b")).toBe("http://127.0.0.1:8123/?token=a+b");
    expect(frameUrl("https://code.example/proxy/8123", "t")).toBe("https://code.example/proxy/8123/?token=t");
    expect(frameSource("https://code.example/proxy/8123/?token=t")).toEqual({ origin: "https://code.example", source: "https://code.example/proxy/8123/" });
  });
});

describe("messages and escaping", () => {
  it("knows the buttons' actions and nothing else", () => {
    expect(["run", "stop", "selectScript", "selectInterpreter", "showOutput"].every(isAction)).toBe(true);
    expect(isAction("eval")).toBe(false);
    expect(isAction(undefined)).toBe(false);
  });

  it("escapes what HTML would read", () => {
    expect(escapeHtml(`<a href="x">'&'</a>`)).toBe("&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
  });

  it("makes nonces of letters and digits", () => {
    const nonce = makeNonce((n) => new Uint8Array(n).fill(255));
    expect(nonce).toMatch(/^[A-Za-z0-9]{16,}$/);
  });
});
