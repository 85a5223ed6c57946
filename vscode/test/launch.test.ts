import { describe, expect, it } from "vitest";

import { backendEnvironment, freePort, isLoopback, openArguments, runArguments } from "../src/launch";

describe("command lines", () => {
  it("runs the script through the package's CLI, its arguments after it", () => {
    const args = runArguments("/w/train.py", ["--epochs", "2"]);
    expect(args.slice(2)).toEqual(["run", "--no-browser", "/w/train.py", "--epochs", "2"]);
    expect(args[0]).toBe("-c");
    expect(args[1]).toContain("from onthefly.cli import main");
  });

  it("opens a session file on a given port", () => {
    expect(openArguments("/w/a.otf", 5555).slice(2)).toEqual(["open", "--no-browser", "--port", "5555", "/w/a.otf"]);
  });
});

describe("backendEnvironment", () => {
  it("asks for the handshake and unbuffered output, and never a browser", () => {
    const env = backendEnvironment({ PATH: "/bin", ONTHEFLY_OPEN_BROWSER: "1" }, { port: 5555 });
    expect(env).toMatchObject({ PATH: "/bin", ONTHEFLY_HANDSHAKE: "json", PYTHONUNBUFFERED: "1", ONTHEFLY_PORT: "5555" });
    expect(env["ONTHEFLY_OPEN_BROWSER"]).toBeUndefined();
    expect(env["ONTHEFLY_ALLOWED_HOSTS"]).toBeUndefined();
  });

  it("keeps the user's own port, and adds a proxy's host to the allowed ones", () => {
    const env = backendEnvironment({ ONTHEFLY_PORT: "7000", ONTHEFLY_ALLOWED_HOSTS: "a.example" }, { port: 5555, allowedHosts: ["code.example"] });
    expect(env["ONTHEFLY_PORT"]).toBe("7000");
    expect(env["ONTHEFLY_ALLOWED_HOSTS"]).toBe("a.example,code.example");
  });
});

describe("ports and hosts", () => {
  it("finds a free port", async () => {
    const port = await freePort();
    expect(port).toBeGreaterThan(0);
    expect(port).toBeLessThan(65536);
  });

  it("knows loopback names", () => {
    expect(["localhost", "127.0.0.1", "[::1]", "LOCALHOST"].every(isLoopback)).toBe(true);
    expect(isLoopback("code.example")).toBe(false);
  });
});
