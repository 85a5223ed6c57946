// The live event stream: a WebSocket that reconnects with exponential backoff and jitter, resumes
// with `after_seq` so nothing is lost, drops anything it has already seen so nothing is duplicated,
// and hands events over at most once per animation frame through a bounded queue.

import { parseEvent, type ServerEvent } from "./event-types";

export type StreamState = "connecting" | "open" | "reconnecting" | "stopped";

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
}

const DEFAULTS = { minDelayMs: 500, maxDelayMs: 15_000, maxQueue: 10_000 };
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
      this.options.onState("open");
    };
    socket.onmessage = (message: MessageEvent) => {
      if (socket !== this.socket) return;
      this.receive(message.data);
    };
    socket.onclose = () => {
      if (socket !== this.socket) return;
      this.socket = null;
      if (openedAt !== null && performance.now() - openedAt >= STABLE_MS) this.attempt = 0;
      if (!this.stopped) this.scheduleReconnect();
    };
    // An error is always followed by a close, which does the reconnecting.
    socket.onerror = () => {};
  }

  private scheduleReconnect(): void {
    this.options.onState("reconnecting");
    const { minDelayMs, maxDelayMs } = this.options;
    const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** this.attempt);
    // "Equal jitter": half the delay fixed, half random, so many tabs do not retry in lockstep.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.attempt += 1;
    this.retryTimer = window.setTimeout(() => {
      if (!this.stopped) this.connect();
    }, delay);
  }

  private receive(data: unknown): void {
    if (typeof data !== "string") return;
    let message: unknown;
    try {
      message = JSON.parse(data);
    } catch {
      return; // not ours; the stream only sends JSON
    }
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
