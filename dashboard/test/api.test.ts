import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { ApiClient, ApiError, attachmentName } from "../src/api";

/** The requests the client made, answered from `answers` in order. */
function fakeFetch(...answers: Response[]) {
  const calls: { url: string; init: RequestInit }[] = [];
  const fetch = vi.fn(async (url: URL | string, init: RequestInit = {}) => {
    calls.push({ url: String(url), init });
    const answer = answers.shift();
    if (answer === undefined) throw new Error("no more answers");
    return answer;
  });
  vi.stubGlobal("fetch", fetch);
  return calls;
}

const json = (body: unknown, status = 200) => new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });

describe("ApiClient", () => {
  // A page behind a proxy (code-server's /proxy/PORT/), with a query and a hash: every URL is
  // relative to the page's folder, so it goes through the same proxy.
  const api = new ApiClient(new URL("http://localhost:18080/proxy/8123/?run=2#top"), "tok en");

  beforeEach(() => vi.unstubAllGlobals());
  afterEach(() => vi.unstubAllGlobals());

  it("sends the token in the Authorization header, never by cookie, to the page's own server", async () => {
    const calls = fakeFetch(json({ id: "s", project: "p", dir: "/d", pid: 1, version: "0", runs: [] }));
    await api.session();
    expect(calls).toHaveLength(1);
    const { url, init } = calls[0]!;
    expect(url).toBe("http://localhost:18080/proxy/8123/api/session");
    expect(init.method).toBe("GET");
    expect(init.headers).toEqual({ Authorization: "Bearer tok en" });
    expect(init.credentials).toBe("omit");
    expect(url).not.toContain("token");
  });

  it("puts the query's set parameters in the URL and leaves the rest to the server", async () => {
    const calls = fakeFetch(json({}), json({}));
    await api.samples(3, { epoch: null, sort: "aum", order: "asc", flag: "hard", label: null, limit: 50, offset: 100 });
    expect(new URL(calls[0]!.url).pathname).toBe("/proxy/8123/api/runs/3/samples");
    expect(Object.fromEntries(new URL(calls[0]!.url).searchParams)).toEqual({ sort: "aum", order: "asc", flag: "hard", limit: "50", offset: "100" });
    await api.metrics(3, { names: ["val_loss", "val_accuracy"], startStep: 10, points: 2000 });
    expect(Object.fromEntries(new URL(calls[1]!.url).searchParams)).toEqual({ names: "val_loss,val_accuracy", start_step: "10", points: "2000" });
  });

  it("posts JSON bodies with the header", async () => {
    const calls = fakeFetch(json({ id: 1, kind: "set_lr", args: { lr: 0.01 } }, 202));
    const accepted = await api.command(1, { kind: "set_lr", lr: 0.01 });
    expect(accepted.kind).toBe("set_lr");
    expect(calls[0]!.init).toMatchObject({ method: "POST", body: '{"kind":"set_lr","lr":0.01}' });
    expect(calls[0]!.init.headers).toEqual({ Authorization: "Bearer tok en", "Content-Type": "application/json" });
  });

  it("asks for an export by POST and reads it back by id, names escaped", async () => {
    const calls = fakeFetch(json({ id: "e/1", status: "pending" }, 202), json({ id: "e/1", status: "ready" }));
    await api.createExport("low loss", { format: "csv", data: true });
    await api.exportStatus("e/1");
    expect(calls.map((c) => [c.init.method, c.url])).toEqual([
      ["POST", "http://localhost:18080/proxy/8123/api/slices/low%20loss/exports"],
      ["GET", "http://localhost:18080/proxy/8123/api/exports/e%2F1"],
    ]);
    expect(JSON.parse(String(calls[0]!.init.body))).toEqual({ format: "csv", data: true });
  });

  it("downloads an export's file from a URL that carries no token", () => {
    expect(api.exportFileUrl("abc")).toBe("http://localhost:18080/proxy/8123/api/exports/abc/file");
  });

  it("asks for a session archive by POST and reads it back by id", async () => {
    const calls = fakeFetch(json({ id: "a/1", status: "pending" }, 202), json({ id: "a/1", status: "ready" }));
    await api.createArchive();
    await api.archiveStatus("a/1");
    expect(calls.map((c) => [c.init.method, c.url])).toEqual([
      ["POST", "http://localhost:18080/proxy/8123/api/session/archives"],
      ["GET", "http://localhost:18080/proxy/8123/api/session/archives/a%2F1"],
    ]);
  });

  it("downloads the session's archive and report from URLs that carry no token", () => {
    expect(api.archiveFileUrl("abc")).toBe("http://localhost:18080/proxy/8123/api/session/archives/abc/file");
    expect(api.reportUrl()).toBe("http://localhost:18080/proxy/8123/api/session/report");
  });

  it("fetches a mixture's artifact with the token's header, under the server's file name", async () => {
    expect(api.mixtureUrl(4)).toBe("http://localhost:18080/proxy/8123/api/runs/4/mixture");
    const calls = fakeFetch(new Response("tar bytes", { headers: { "Content-Disposition": 'attachment; filename="demo-mixture-run-4.tar"' } }));
    const { blob, filename } = await api.mixtureFile(4);
    expect(calls[0]!.url).toBe("http://localhost:18080/proxy/8123/api/runs/4/mixture");
    expect(calls[0]!.init.headers).toEqual({ Authorization: "Bearer tok en" });
    expect([await blob.text(), filename]).toEqual(["tar bytes", "demo-mixture-run-4.tar"]);
    fakeFetch(json({ detail: "run 2 (b) is not a mixture of experts; a gate card makes one" }, 409));
    await expect(api.mixtureFile(2)).rejects.toMatchObject({ status: 409, message: expect.stringContaining("not a mixture") });
  });

  it("reads a download's file name from its Content-Disposition", () => {
    expect(attachmentName('attachment; filename="a b.tar"', "x")).toBe("a b.tar");
    expect(attachmentName("attachment; filename*=UTF-8''d%C3%A9mo.tar; filename=\"demo.tar\"", "x")).toBe("démo.tar");
    expect(attachmentName("attachment; filename=plain.tar", "x")).toBe("plain.tar");
    expect(attachmentName('attachment; filename="../../etc/x.tar"', "x")).toBe("x.tar");
    expect(attachmentName("attachment", "fallback.tar")).toBe("fallback.tar");
    expect(attachmentName(null, "fallback.tar")).toBe("fallback.tar");
  });

  it("opens the stream with the token in the WebSocket URL (ws, or wss on https)", () => {
    const url = new URL(api.streamUrl(41));
    expect(`${url.protocol}//${url.host}${url.pathname}`).toBe("ws://localhost:18080/proxy/8123/api/stream");
    expect(Object.fromEntries(url.searchParams)).toEqual({ token: "tok en", after_seq: "41" });
    expect(url.hash).toBe("");
    expect(new ApiClient(new URL("https://localhost:1/"), "t").streamUrl(0)).toMatch(/^wss:\/\/localhost:1\/api\/stream\?/);
  });

  it("turns an error status into an ApiError with the server's detail", async () => {
    fakeFetch(json({ detail: "no slice named 'x'" }, 404));
    const error = await api.deleteSlice("x").catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ApiError);
    expect(error).toMatchObject({ status: 404, message: "no slice named 'x'" });
  });

  it("says which field a validation error is about", async () => {
    fakeFetch(
      json({ detail: [{ loc: ["body", "set_lr", "lr"], msg: "Input should be greater than 0" }, { loc: ["body"], msg: "bad" }] }, 422),
    );
    await expect(api.command(1, { kind: "set_lr", lr: -1 })).rejects.toThrow("lr: Input should be greater than 0; bad");
  });

  it("proposes, edits, approves and discards plan cards at their own paths", async () => {
    const calls = fakeFetch(json({ id: 4 }, 201), json({ id: 4 }), json({ plan: {}, command: {} }, 202), json({ id: 4 }), json([]), json({ nodes: [], edges: [] }));
    const card = { kind: "fork", name: "tail specialist", run_id: 1, slice: "tail", mix: "slice", ratio: 0.5, budget: 1, budget_unit: "epochs", lr: 0.01, trains: "all", rank: 4, seed: 0, control: true, min_slice_gain_pt: 0, max_other_drop_pt: 1 } as const;
    await api.proposePlan(card);
    await api.editPlan(4, { lr: 0.02, budget: 2 });
    await api.approvePlan(4);
    await api.discardPlan(4);
    await api.plans();
    await api.lineage();
    expect(calls.map((c) => [c.init.method, new URL(c.url).pathname])).toEqual([
      ["POST", "/proxy/8123/api/plans"],
      ["PATCH", "/proxy/8123/api/plans/4"],
      ["POST", "/proxy/8123/api/plans/4/approve"],
      ["POST", "/proxy/8123/api/plans/4/discard"],
      ["GET", "/proxy/8123/api/plans"],
      ["GET", "/proxy/8123/api/lineage"],
    ]);
    expect(JSON.parse(String(calls[1]!.init.body))).toEqual({ lr: 0.02, budget: 2 });
  });

  it("asks a run to compare, then reads the comparisons back", async () => {
    const calls = fakeFetch(json({ id: 9, kind: "compare", args: {} }, 202), json([]), json({ id: 2 }));
    await api.compare(1, { runs: [1, 2, 3], reference: 3, sets: ["tail", "val"], n_boot: 2000, seed: 0 });
    await api.comparisons();
    await api.comparison(2);
    expect(calls.map((c) => [c.init.method, new URL(c.url).pathname])).toEqual([
      ["POST", "/proxy/8123/api/runs/1/comparisons"],
      ["GET", "/proxy/8123/api/comparisons"],
      ["GET", "/proxy/8123/api/comparisons/2"],
    ]);
  });

  it("names the fields a validation error is about, for a form to mark", async () => {
    fakeFetch(json({ detail: [{ loc: ["body", "fork", "lr"], msg: "Input should be greater than 0" }, { loc: ["body", "fork", "budget"], msg: "bad" }] }, 422));
    const error = await api.plans().catch((e: unknown) => e);
    expect(error).toMatchObject({ status: 422, message: "lr: Input should be greater than 0; budget: bad", fields: ["lr", "budget"] });
  });

  it("falls back to the status when the error has no JSON detail", async () => {
    fakeFetch(new Response("<html>oops</html>", { status: 502, statusText: "Bad Gateway" }));
    await expect(api.session()).rejects.toMatchObject({ status: 502, message: "502 Bad Gateway" });
  });
});
