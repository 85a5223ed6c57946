// The live event stream: a WebSocket that reconnects with exponential backoff and jitter, resumes
// with `after_seq` so nothing is lost, drops anything it has already seen so nothing is duplicated,
// and hands events over at most once per animation frame through a bounded queue.
//
// Where the socket cannot connect at all (a proxy in front of the page that does not carry
// WebSockets), the stream polls the same event log over HTTP (`poll`) while it keeps retrying the
// socket, and goes back to the socket as soon as one opens.

import { parseEvent, type ServerEvent } from "./event-types";

export type StreamState = "connecting" | "open" | "polling" | "reconnecting" | "stopped";

/** What one delivery holds. `gapAfter` is set when the queue overflowed and events were dropped:
 *  the receiver must re-read its state, and the event log from that sequence number on. */
export interface Delivery {
  events: ServerEvent[];
  gapAfter: number | null;
}

export interface StreamOptions {
  /** The URL to connect to, resuming after the given sequence number. */
  url: (afterSeq: number) => string;
  onDelivery: (delivery: Delivery) => void;
  onState?: (state: StreamState) => void;
  /** First reconnect delay; doubles per failed attempt up to `maxDelayMs`. */
  minDelayMs?: number;
  maxDelayMs?: number;
  /** Events held while the page is not drawing (a background tab); beyond it, old ones are dropped. */
  maxQueue?: number;
  /** The event log after a sequence number over HTTP (`GET api/events`), read while the socket
   *  cannot connect; its answer has the socket message's shape (`{events: [...]}`). */
  poll?: ((afterSeq: number) => Promise<unknown>) | null;
  /** Socket attempts in a row that never opened before polling starts. */
  pollAfterFailures?: number;
  /** Time between the end of one poll and the next. */
  pollIntervalMs?: number;
}

const DEFAULTS = { minDelayMs: 500, maxDelayMs: 15_000, maxQueue: 10_000, poll: null, pollAfterFailures: 2, pollIntervalMs: 1_000 };
/** A connection that stayed open this long was healthy: the next reconnect starts from the
 *  shortest delay again. (Resetting on open alone would retry fast forever against a server that
 *  accepts and then drops the connection.) */
const STABLE_MS = 5_000;

export class EventStream {
  private readonly options: Required<StreamOptions>;
  private socket: WebSocket | null = null;
  private lastSeq: number;
  private attempt = 0;
  private retryTimer: number | undefined;
  private stopped = true;
  private readonly queue: EventQueue;
  private frame = 0;
  /** Socket attempts in a row that closed without ever opening. */
  private failedOpens = 0;
  private polling = false;
  private pollTimer: number | undefined;

  constructor(options: StreamOptions, afterSeq = 0) {
    this.options = { onState: () => {}, ...DEFAULTS, ...options };
    this.lastSeq = afterSeq;
    this.queue = new EventQueue(this.options.maxQueue);
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.connect();
  }

  stop(): void {
    this.stopped = true;
    window.clearTimeout(this.retryTimer);
    this.stopPolling();
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    this.options.onState("stopped");
  }

  private connect(): void {
    this.options.onState(this.attempt === 0 ? "connecting" : "reconnecting");
    const socket = new WebSocket(this.options.url(this.lastSeq));
    this.socket = socket;
    let openedAt: number | null = null;
    socket.onopen = () => {
      if (socket !== this.socket) return;
      openedAt = performance.now();
      this.failedOpens = 0;
      this.stopPolling(); // the socket carries the stream again
      this.options.onState("open");
    };
    socket.onmessage = (message: MessageEvent) => {
      if (socket !== this.socket) return;
      if (typeof message.data !== "string") return;
      try {
        this.receive(JSON.parse(message.data));
      } catch {
        // not ours; the stream only sends JSON
      }
    };
    socket.onclose = () => {
      if (socket !== this.socket) return;
      this.socket = null;
      if (openedAt !== null && performance.now() - openedAt >= STABLE_MS) this.attempt = 0;
      if (openedAt === null) this.failedOpens += 1;
      if (this.stopped) return;
      if (this.options.poll !== null && this.failedOpens >= this.options.pollAfterFailures) this.startPolling();
      this.scheduleReconnect();
    };
    // An error is always followed by a close, which does the reconnecting.
    socket.onerror = () => {};
  }

  private scheduleReconnect(): void {
    if (!this.polling) this.options.onState("reconnecting");
    const { minDelayMs, maxDelayMs } = this.options;
    const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** this.attempt);
    // "Equal jitter": half the delay fixed, half random, so many tabs do not retry in lockstep.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.attempt += 1;
    this.retryTimer = window.setTimeout(() => {
      if (!this.stopped) this.connect();
    }, delay);
  }

  private startPolling(): void {
    if (this.polling) return;
    this.polling = true;
    void this.pollOnce();
  }

  private stopPolling(): void {
    this.polling = false;
    window.clearTimeout(this.pollTimer);
  }

  /** One read of the event log; the next is scheduled when it has answered (never two at once). */
  private async pollOnce(): Promise<void> {
    const poll = this.options.poll;
    if (!this.polling || this.stopped || poll === null) return;
    try {
      const page = await poll(this.lastSeq);
      if (!this.polling || this.stopped) return; // the socket opened meanwhile: it has the stream
      this.options.onState("polling");
      this.receive(page);
    } catch {
      if (this.polling && !this.stopped) this.options.onState("reconnecting");
    }
    if (this.polling && !this.stopped) {
      this.pollTimer = window.setTimeout(() => void this.pollOnce(), this.options.pollIntervalMs);
    }
  }

  private receive(message: unknown): void {
    if (typeof message !== "object" || message === null) return;
    const events = (message as { events?: unknown }).events;
    if (!Array.isArray(events)) return;
    for (const raw of events) {
      const event = parseEvent(raw);
      // After a reconnect the server may resend what we already have: keep each seq once.
      if (event === null || event.seq <= this.lastSeq) continue;
      this.lastSeq = event.seq;
      this.queue.push(event);
    }
    if (!this.frame && !this.queue.empty) {
      this.frame = requestAnimationFrame(() => this.deliver());
    }
  }

  private deliver(): void {
    this.frame = 0;
    if (this.stopped) return;
    this.options.onDelivery(this.queue.take());
  }
}

/** A FIFO with a bound. When full it first discards `progress` events (their data is in the
 *  metrics history, which the receiver re-reads on a gap), then the oldest of the rest. */
export class EventQueue {
  private items: ServerEvent[] = [];
  private gapAfter: number | null = null;
  private readonly capacity: number;

  constructor(capacity: number) {
    this.capacity = Math.max(1, capacity);
  }

  get empty(): boolean {
    return this.items.length === 0;
  }

  get length(): number {
    return this.items.length;
  }

  push(event: ServerEvent): void {
    this.items.push(event);
    if (this.items.length <= this.capacity) return;
    let kept: ServerEvent[] = this.items.filter((item) => item.kind !== "progress");
    if (kept.length > this.capacity) kept = kept.slice(kept.length - this.capacity);
    const keptSet = new Set(kept);
    const firstDropped = this.items.find((item) => !keptSet.has(item));
    if (firstDropped !== undefined) {
      this.gapAfter = Math.min(this.gapAfter ?? Infinity, firstDropped.seq - 1);
    }
    this.items = kept;
  }

  take(): Delivery {
    const delivery = { events: this.items, gapAfter: this.gapAfter };
    this.items = [];
    this.gapAfter = null;
    return delivery;
  }
}
