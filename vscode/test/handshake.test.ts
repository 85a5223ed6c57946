import { describe, expect, it } from "vitest";

import { LineSplitter, Tail, parseHandshake, parsePrintedUrl, redactTokens, serverRoot } from "../src/handshake";

const TOKEN = "Zm9vYmFyYmF6cXV4LXRva2VuLTEyMzQ1Njc4OTAxMjM0NQ";

describe("parseHandshake", () => {
  it("reads the line the training process prints with ONTHEFLY_HANDSHAKE=json", () => {
    const line = JSON.stringify({ onthefly: { url: `http://127.0.0.1:8123/?token=${TOKEN}`, token: TOKEN, pid: 4242 } });
    expect(parseHandshake(line)).toEqual({ root: "http://127.0.0.1:8123/", token: TOKEN, pid: 4242 });
    expect(parseHandshake(`  ${line}\r`)).not.toBeNull();
  });

  it.each([
    ["the script's own output", "epoch 1 loss 0.5"],
    ["JSON of something else", '{"loss": 0.5}'],
    ["broken JSON", '{"onthefly": {"url": '],
    ["no token", JSON.stringify({ onthefly: { url: "http://127.0.0.1:1/", token: "", pid: 1 } })],
    ["a pid that is not a process id", JSON.stringify({ onthefly: { url: "http://127.0.0.1:1/", token: "t", pid: "1" } })],
    ["a URL that is not http", JSON.stringify({ onthefly: { url: "file:///etc/passwd", token: "t", pid: 1 } })],
    ["fields that are not an object", JSON.stringify({ onthefly: "http://127.0.0.1:1/" })],
  ])("ignores %s", (_what, line) => {
    expect(parseHandshake(line)).toBeNull();
  });
});

describe("parsePrintedUrl", () => {
  it("reads the URL that `onthefly open` prints", () => {
    const line = `On The Fly dashboard for session 20260101-abc: http://127.0.0.1:5555/?token=${TOKEN}`;
    expect(parsePrintedUrl(line, 77)).toEqual({ root: "http://127.0.0.1:5555/", token: TOKEN, pid: 77 });
    expect(parsePrintedUrl("imported x.otf as session 2026", 77)).toBeNull();
  });
});

describe("serverRoot", () => {
  it("keeps the scheme, host and port only", () => {
    expect(serverRoot("http://localhost:80/x/y?token=1#h")).toBe("http://localhost/");
    expect(serverRoot("https://[::1]:9/")).toBe("https://[::1]:9/");
    expect(serverRoot("not a url")).toBeNull();
  });
});

describe("redactTokens", () => {
  it("removes tokens from URLs and JSON, and nothing else", () => {
    expect(redactTokens(`On The Fly dashboard: http://127.0.0.1:1/?token=${TOKEN}`)).toBe("On The Fly dashboard: http://127.0.0.1:1/?token=…");
    expect(redactTokens(`{"token": "${TOKEN}"}`)).toBe('{"token": "…"}');
    expect(redactTokens("token=short loss 0.1")).toBe("token=short loss 0.1");
  });
});

describe("LineSplitter", () => {
  it("hands over whole lines across chunks, and the last one at the end", () => {
    const lines = new LineSplitter();
    expect(lines.push("a\nb")).toEqual(["a"]);
    expect(lines.push("c\r\nd\n\n")).toEqual(["bc", "d", ""]);
    expect(lines.push("e")).toEqual([]);
    expect(lines.flush()).toEqual(["e"]);
    expect(lines.flush()).toEqual([]);
  });
});

describe("Tail", () => {
  it("keeps the last lines only", () => {
    const tail = new Tail(2);
    ["1", "2", "3"].forEach((line) => tail.push(line));
    expect(tail.value).toEqual(["2", "3"]);
  });
});
