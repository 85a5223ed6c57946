import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { EventQueue, EventStream, type Delivery, type StreamState } from "../src/socket";
import { event, rawEvent } from "./helpers";

describe("EventQueue", () => {
  it("hands over what it holds in order, once", () => {
    const queue = new EventQueue(10);
    [1, 2, 3].forEach((seq) => queue.push(event(seq, "status", { status: "running" })));
    expect(queue.take()).toEqual({ events: [1, 2, 3].map((seq) => event(seq, "status", { status: "running" })), gapAfter: null });
    expect(queue.empty).toBe(true);
    expect(queue.take()).toEqual({ events: [], gapAfter: null });
  });

  it("when full, drops progress events first and says where the gap starts", () => {
    const queue = new EventQueue(3);
    queue.push(event(1, "status"));
    queue.push(event(2, "progress"));
    queue.push(event(3, "eval"));
    queue.push(event(4, "progress"));
    const { events, gapAfter } = queue.take();
    expect(events.map((e) => e.seq)).toEqual([1, 3]);
    expect(gapAfter).toBe(1); // re-read from seq 2 on
  });

  it("when full of other kinds, drops the oldest", () => {
    const queue = new EventQueue(2);
    for (const seq of [5, 6, 7, 8]) queue.push(event(seq, "status"));
    const { events, gapAfter } = queue.take();
    expect(events.map((e) => e.seq)).toEqual([7, 8]);
    expect(gapAfter).toBe(4);
    expect(queue.take().gapAfter).toBeNull(); // the gap is reported once
  });

  it("keeps the earliest gap across several overflows", () => {
    const queue = new EventQueue(1);
    for (const seq of [10, 11, 12]) queue.push(event(seq, "status"));
    expect(queue.take()).toMatchObject({ gapAfter: 9, events: [{ seq: 12 }] });
  });

  it("holds at least one event whatever the capacity", () => {
    const queue = new EventQueue(0);
    queue.push(event(1, "status"));
    expect(queue.length).toBe(1);
  });
});

/** A WebSocket the test drives: it opens, delivers and closes when told to. */
class FakeSocket {
  static all: FakeSocket[] = [];
  readonly url: string;
  onopen: (() => void) | null = null;
  onmessage: ((message: { data: unknown }) => void) | null = null;
  onclose: (() => void) | null = null;
  onerror: (() => void) | null = null;
  closed = false;

  constructor(url: string) {
    this.url = url;
    FakeSocket.all.push(this);
  }

  open(): void {
    this.onopen?.();
  }

  send(events: unknown[]): void {
    this.onmessage?.({ data: JSON.stringify({ events }) });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.onclose?.();
  }

  static last(): FakeSocket {
    const socket = FakeSocket.all[FakeSocket.all.length - 1];
    if (socket === undefined) throw new Error("no socket was opened");
    return socket;
  }
}

describe("EventStream", () => {
  let deliveries: Delivery[];
  let states: StreamState[];

  beforeEach(() => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "performance"] });
    vi.stubGlobal("window", globalThis);
    vi.stubGlobal("WebSocket", FakeSocket);
    vi.stubGlobal("requestAnimationFrame", (callback: (time: number) => void) => setTimeout(() => callback(0), 16));
    vi.stubGlobal("cancelAnimationFrame", (frame: number) => clearTimeout(frame));
    vi.spyOn(Math, "random").mockReturnValue(0); // the shortest jittered delay: half the ceiling
    FakeSocket.all = [];
    deliveries = [];
    states = [];
  });

  afterEach(() => {
    vi.useRealTimers();
    vi.unstubAllGlobals();
    vi.restoreAllMocks();
  });

  function start(afterSeq = 0): EventStream {
    const stream = new EventStream(
      {
        url: (seq) => `ws://127.0.0.1:8000/api/stream?after_seq=${seq}`,
        onDelivery: (delivery) => deliveries.push(delivery),
        onState: (state) => states.push(state),
        minDelayMs: 500,
        maxDelayMs: 4000,
      },
      afterSeq,
    );
    stream.start();
    return stream;
  }

  it("resumes after the given sequence number and delivers once per frame", () => {
    start(41);
    const socket = FakeSocket.last();
    expect(socket.url).toContain("after_seq=41");
    socket.open();
    socket.send([rawEvent(42, "status", { status: "running" })]);
    socket.send([rawEvent(43, "progress", { loss: 1 })]);
    expect(deliveries).toEqual([]); // not before the frame
    vi.advanceTimersByTime(16);
    expect(deliveries).toHaveLength(1);
    expect(deliveries[0]!.events.map((e) => [e.seq, e.kind])).toEqual([[42, "status"], [43, "progress"]]);
    expect(states).toEqual(["connecting", "open"]);
  });

  it("drops events it already has, and what is not an event", () => {
    start(5);
    const socket = FakeSocket.last();
    socket.open();
    socket.onmessage?.({ data: "not json" });
    socket.onmessage?.({ data: JSON.stringify({ hello: 1 }) });
    socket.send([rawEvent(4, "status"), rawEvent(6, "status"), rawEvent(6, "status"), { seq: "7" }, rawEvent(7, "waiting")]);
    vi.advanceTimersByTime(16);
    expect(deliveries.flatMap((d) => d.events.map((e) => e.seq))).toEqual([6, 7]);
  });

  it("reconnects with a growing delay, resuming after the last event seen", () => {
    start();
    FakeSocket.last().open();
    FakeSocket.last().send([rawEvent(1, "status"), rawEvent(2, "status")]);
    FakeSocket.last().close();
    expect(states.at(-1)).toBe("reconnecting");
    vi.advanceTimersByTime(249);
    expect(FakeSocket.all).toHaveLength(1);
    vi.advanceTimersByTime(1); // 500 ms ceiling, half of it fixed
    expect(FakeSocket.all).toHaveLength(2);
    expect(FakeSocket.last().url).toContain("after_seq=2");
    FakeSocket.last().close(); // refused again: the ceiling doubles
    vi.advanceTimersByTime(499);
    expect(FakeSocket.all).toHaveLength(2);
    vi.advanceTimersByTime(1);
    expect(FakeSocket.all).toHaveLength(3);
    for (let i = 0; i < 5; i++) {
      FakeSocket.last().close();
      vi.advanceTimersByTime(2000); // the 4 s maximum, halved
    }
    expect(FakeSocket.all).toHaveLength(8);
  });

  it("starts again from the shortest delay after a connection that stayed open", () => {
    start();
    for (let i = 0; i < 3; i++) {
      FakeSocket.last().close();
      vi.advanceTimersByTime(4000);
    }
    const before = FakeSocket.all.length;
    FakeSocket.last().open();
    vi.advanceTimersByTime(5000); // healthy for five seconds
    FakeSocket.last().close();
    vi.advanceTimersByTime(250);
    expect(FakeSocket.all).toHaveLength(before + 1);
  });

  it("stops for good: the socket closes and nothing reconnects or arrives", () => {
    const stream = start();
    const socket = FakeSocket.last();
    socket.open();
    socket.send([rawEvent(1, "status")]);
    stream.stop();
    vi.advanceTimersByTime(60_000);
    expect(socket.closed).toBe(true);
    expect(FakeSocket.all).toHaveLength(1);
    expect(deliveries).toEqual([]);
    expect(states.at(-1)).toBe("stopped");
  });

  describe("where the socket cannot connect", () => {
    function startPolling(poll: (afterSeq: number) => Promise<unknown>): EventStream {
      const stream = new EventStream({
        url: (seq) => `ws://127.0.0.1:8000/api/stream?after_seq=${seq}`,
        onDelivery: (delivery) => deliveries.push(delivery),
        onState: (state) => states.push(state),
        minDelayMs: 500,
        maxDelayMs: 4000,
        poll,
        pollAfterFailures: 2,
        pollIntervalMs: 1000,
      });
      stream.start();
      return stream;
    }

    it("polls the event log after two refused attempts, then goes back to the socket when one opens", async () => {
      const asked: number[] = [];
      // The second page repeats seq 1, as a log read around a reconnect may.
      const pages = [[rawEvent(1, "status")], [rawEvent(1, "status"), rawEvent(2, "status")]];
      const poll = vi.fn(async (afterSeq: number) => {
        asked.push(afterSeq);
        return { events: pages.shift() ?? [] };
      });
      startPolling(poll);
      FakeSocket.last().close(); // refused once: no polling yet
      await vi.advanceTimersByTimeAsync(250);
      expect(poll).not.toHaveBeenCalled();
      FakeSocket.last().close(); // refused twice: poll at once
      await vi.advanceTimersByTimeAsync(0);
      expect(asked).toEqual([0]);
      expect(states.at(-1)).toBe("polling");
      await vi.advanceTimersByTimeAsync(16);
      expect(deliveries.flatMap((d) => d.events.map((e) => e.seq))).toEqual([1]);
      await vi.advanceTimersByTimeAsync(1000);
      expect(asked).toEqual([0, 1]); // resumes after what it has; seq 1 is not delivered twice
      await vi.advanceTimersByTimeAsync(16);
      expect(deliveries.flatMap((d) => d.events.map((e) => e.seq))).toEqual([1, 2]);
      // The socket is still retried (the 1 s ceiling, halved, from the second refusal on).
      expect(FakeSocket.all).toHaveLength(3);
      FakeSocket.last().open();
      expect(states.at(-1)).toBe("open");
      const polls = poll.mock.calls.length;
      await vi.advanceTimersByTimeAsync(10_000);
      expect(poll.mock.calls.length).toBe(polls);
      FakeSocket.last().send([rawEvent(3, "status")]);
      await vi.advanceTimersByTimeAsync(16);
      expect(deliveries.flatMap((d) => d.events.map((e) => e.seq))).toEqual([1, 2, 3]);
    });

    it("keeps polling after a failed poll, saying it is reconnecting", async () => {
      const poll = vi.fn().mockRejectedValueOnce(new Error("offline")).mockResolvedValue({ events: [rawEvent(1, "status")] });
      startPolling(poll);
      FakeSocket.last().close();
      await vi.advanceTimersByTimeAsync(250);
      FakeSocket.last().close();
      await vi.advanceTimersByTimeAsync(0);
      expect(states.at(-1)).toBe("reconnecting");
      await vi.advanceTimersByTimeAsync(1000);
      expect(poll).toHaveBeenCalledTimes(2);
      expect(states).toContain("polling");
    });

    it("stops polling when stopped", async () => {
      const poll = vi.fn(async () => ({ events: [] }));
      const stream = startPolling(poll);
      FakeSocket.last().close();
      await vi.advanceTimersByTimeAsync(250);
      FakeSocket.last().close();
      await vi.advanceTimersByTimeAsync(0);
      stream.stop();
      const polls = poll.mock.calls.length;
      await vi.advanceTimersByTimeAsync(60_000);
      expect(poll).toHaveBeenCalledTimes(polls);
      expect(FakeSocket.all).toHaveLength(2);
    });
  });
});
