/**
 * A subscription and its position: what to ask for on each (re)subscribe (`since` the
 * last message seen, or the `subscribed` frame's position before any message), which
 * messages to deliver (each once, in order: a message at or before the last delivered
 * offset of the same epoch is a duplicate from a replay), and when to tell the app to
 * reload (`recovered:false`, unsolicited or not). No I/O: the client feeds it frames.
 */

import { FanoutError } from "./errors.js";
import type { Frame, Message, Position, SubscribeOptions } from "./types.js";

/** `subscribing` until the server confirms, and again while the connection is down; `ended` for good. */
export type SubscriptionState = "subscribing" | "subscribed" | "ended";

/** Calls an app callback; what it throws is reported instead of breaking the client. */
export type Guard = (f: () => void) => void;

export class Subscription<T = unknown> {
  state: SubscriptionState = "subscribing";
  /** The last message seen, or the `subscribed` position before any message, or null. */
  position: Position | null = null;
  /** The last delivered message's position: the base for dropping duplicates. */
  private last: Position | null = null;
  /** The `since` of the subscribe in flight. */
  private asked: Position | null = null;

  /** @internal Made by `client.subscribe()`. */
  constructor(
    readonly channel: string,
    private readonly opts: SubscribeOptions<T>,
    private readonly detach: (s: Subscription<T>, byApp: boolean) => void,
    private readonly guard: Guard = (f) => f(),
  ) {}

  /** Ends it: nothing more is delivered, and the server is told (if it knows it). */
  unsubscribe(): void {
    if (this.state === "ended") return;
    this.state = "ended";
    this.detach(this, true);
  }

  /** @internal What to subscribe with now: `since` once there is a position, else the options' `since`/`last`. */
  request(): { since?: Position; last?: number; token?: string } {
    this.state = "subscribing";
    const since = this.position ?? this.opts.since ?? null;
    this.asked = since;
    const r: { since?: Position; last?: number; token?: string } = {};
    if (since) r.since = { offset: since.offset, epoch: since.epoch };
    else if (this.opts.last !== undefined) r.last = this.opts.last;
    if (this.opts.token) r.token = this.opts.token;
    return r;
  }

  /** @internal A `subscribed` frame: the answer to our subscribe, or (when already subscribed) a position reset. */
  subscribed(f: Frame): void {
    if (this.state === "ended") return;
    const pos: Position = { offset: f.offset, epoch: f.epoch };
    if (this.state === "subscribed") {
      if (f.recovered === false) this.reset(pos);
      return;
    }
    this.state = "subscribed";
    if (!this.asked) {
      // A fresh subscribe: whatever follows (the latest state, `last` N) is new.
      this.position = pos;
      this.last = null;
    } else if (f.recovered === false) {
      this.reset(pos);
    } else {
      this.position = this.asked;
      this.last = this.asked;
    }
  }

  private reset(pos: Position): void {
    this.position = pos;
    this.last = pos;
    this.guard(() => this.opts.onReset?.(pos));
  }

  /** @internal A `message` frame; returns whether it was delivered. */
  message(f: Frame): boolean {
    if (this.state !== "subscribed") return false;
    const m: Message<T> = { channel: this.channel, data: f.data };
    if (typeof f.offset === "number") {
      const epoch: string | undefined = f.epoch ?? this.last?.epoch ?? this.position?.epoch;
      const last = this.last;
      if (last && epoch === last.epoch && f.offset <= last.offset) return false;
      m.offset = f.offset;
      if (epoch !== undefined) {
        m.epoch = epoch;
        this.last = this.position = { offset: f.offset, epoch };
      }
    }
    if (f.event !== undefined) m.event = f.event;
    if (f.ts !== undefined) m.ts = f.ts;
    this.guard(() => this.opts.onMessage?.(m));
    return true;
  }

  /** @internal The server ended it (`completed`, `forbidden`, …) or refused it (`error`). */
  end(reason: string, message?: string): void {
    if (this.state === "ended") return;
    this.state = "ended";
    this.detach(this, false);
    if (reason === "completed") this.guard(() => this.opts.onCompleted?.());
    else this.fail(new FanoutError(reason, message || `${this.channel}: ${reason}`));
  }

  /** @internal Reports an error without ending it (e.g. a subscribe refused for now, to be retried). */
  fail(err: FanoutError): void {
    this.guard(() => this.opts.onError?.(err));
  }
}
