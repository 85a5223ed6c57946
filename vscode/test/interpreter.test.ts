import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";

import { describe, expect, it } from "vitest";

import { checkInterpreter, compareVersions, findInterpreters, judge, preferredInterpreter, quoteArgument } from "../src/interpreter";

describe("preferredInterpreter", () => {
  it("takes the Python extension's, else the setting, else the one remembered", () => {
    expect(preferredInterpreter({ pythonExtension: "/a/python", setting: "/b/python", remembered: "/c/python" })).toEqual({ path: "/a/python", source: "python-extension" });
    expect(preferredInterpreter({ setting: "/b/python", remembered: "/c/python" })).toEqual({ path: "/b/python", source: "setting" });
    expect(preferredInterpreter({ setting: "  ", remembered: "/c/python" })).toEqual({ path: "/c/python", source: "remembered" });
  });

  it("asks (null) when nothing is known", () => {
    expect(preferredInterpreter({})).toBeNull();
    expect(preferredInterpreter({ pythonExtension: "", setting: "" })).toBeNull();
  });
});

describe("findInterpreters", () => {
  const have = (...files: string[]) => (file: string) => files.includes(file);

  it("lists the workspace's environments, the active one, then PATH's pythons, once each", () => {
    const found = findInterpreters(
      { PATH: "/w/.venv/bin:/usr/bin:/bin:/usr/bin", VIRTUAL_ENV: "/envs/x" },
      ["/w"],
      have("/w/.venv/bin/python", "/w/.venv/bin/python3", "/envs/x/bin/python", "/usr/bin/python3", "/bin/python3"),
      "linux",
    );
    expect(found).toEqual(["/w/.venv/bin/python", "/envs/x/bin/python", "/w/.venv/bin/python3", "/usr/bin/python3", "/bin/python3"]);
  });

  it("knows Windows' layout", () => {
    const found = findInterpreters({ Path: "C:\\Python312" }, ["C:\\w"], have("C:\\w\\.venv\\Scripts\\python.exe", "C:\\Python312\\python.exe"), "win32");
    expect(found).toEqual(["C:\\w\\.venv\\Scripts\\python.exe", "C:\\Python312\\python.exe"]);
  });
});

describe("judge", () => {
  it("names the exact pip command when onthefly is missing", () => {
    const result = judge("/opt/my env/bin/python", "3.11.7", null);
    expect(result).toMatchObject({ ok: false, problem: "missing", fix: '"/opt/my env/bin/python" -m pip install onthefly-ai' });
    if (result.ok) throw new Error("unreachable");
    expect(result.message).toContain("pip install onthefly-ai");
    expect(result.message).toContain("/opt/my env/bin/python");
  });

  it("says when onthefly is older than the extension needs, with the upgrade command", () => {
    const result = judge("/usr/bin/python3", "3.11.7", "0.0.9", "0.1.0");
    expect(result).toMatchObject({ ok: false, problem: "too-old", fix: "/usr/bin/python3 -m pip install --upgrade onthefly-ai" });
    if (result.ok) throw new Error("unreachable");
    expect(result.message).toMatch(/onthefly 0\.0\.9, older than this extension needs \(0\.1\.0 or newer\)/);
  });

  it("accepts the minimum version and newer", () => {
    expect(judge("python", "3.12.1", "0.1.0", "0.1.0")).toEqual({ ok: true, python: "3.12.1", version: "0.1.0" });
    expect(judge("python", "3.12.1", "0.10.0.dev1", "0.9")).toMatchObject({ ok: true });
  });
});

describe("compareVersions and quoteArgument", () => {
  it.each([
    ["0.1.0", "0.1.0", 0],
    ["0.1", "0.1.0", 0],
    ["0.10.0", "0.9.9", 1],
    ["1.0.0rc1", "1.0.0", 0],
    ["0.0.9", "0.1.0", -1],
  ])("%s vs %s", (a, b, expected) => {
    expect(compareVersions(a, b)).toBe(expected);
  });

  it("quotes only what a shell would split", () => {
    expect(quoteArgument("/usr/bin/python3")).toBe("/usr/bin/python3");
    expect(quoteArgument("/a b/python")).toBe('"/a b/python"');
  });
});

// Real interpreters: the machine's python3, with a stand-in `onthefly` package on PYTHONPATH.
function python3(): string | null {
  try {
    execFileSync("python3", ["-c", "pass"]);
    return "python3";
  } catch {
    return null;
  }
}

function fakePackage(version: string): string {
  const root = mkdtempSync(path.join(tmpdir(), "otf-fake-"));
  mkdirSync(path.join(root, "onthefly"));
  writeFileSync(path.join(root, "onthefly", "__init__.py"), `__version__ = "${version}"\n`);
  return root;
}

describe.runIf(python3() !== null)("checkInterpreter", () => {
  // A python whose onthefly (if any) is only what PYTHONPATH gives: no distribution metadata.
  const bare = { ...process.env, PYTHONNOUSERSITE: "1" };

  it("finds the stand-in package's version in a real interpreter", async () => {
    const result = await checkInterpreter("python3", { env: { ...bare, PYTHONPATH: fakePackage("9.9.9") } });
    expect(result).toMatchObject({ ok: true, version: "9.9.9" });
  });

  it("says the package is too old", async () => {
    const result = await checkInterpreter("python3", { env: { ...bare, PYTHONPATH: fakePackage("0.0.1") }, minVersion: "0.1.0" });
    expect(result).toMatchObject({ ok: false, problem: "too-old" });
  });

  it("says the package is missing, with the pip command", async () => {
    // -I would also drop PYTHONPATH; an empty folder in front hides nothing, so ask python3
    // itself whether it has onthefly first (a developer's machine may).
    const has = execFileSync("python3", ["-c", "import importlib.util as u; print(u.find_spec('onthefly') is not None)"], { env: bare, encoding: "utf8" }).trim();
    if (has === "True") return;
    const result = await checkInterpreter("python3", { env: bare });
    expect(result).toMatchObject({ ok: false, problem: "missing" });
    if (result.ok) throw new Error("unreachable");
    expect(result.message).toContain("pip install onthefly-ai");
  });

  it("says an interpreter that cannot be run cannot be run", async () => {
    const result = await checkInterpreter("/nonexistent/python");
    expect(result).toMatchObject({ ok: false, problem: "not-runnable", fix: null });
    if (result.ok) throw new Error("unreachable");
    expect(result.message).toContain("/nonexistent/python");
  });
});
