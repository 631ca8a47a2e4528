/**
 * Fanout, the client: the connection's state machine (connect, reconnect per close
 * code with backoff, fall back from WebSocket to the event stream), requests and their
 * timeouts, the offline publish queue, token refresh, liveness (heartbeats, browser
 * online/visibility events), and the routing of frames to subscriptions.
 */

import { backoff, soon } from "./backoff.js";
import { closeAction } from "./codes.js";
import { FanoutError } from "./errors.js";
import { newKey } from "./key.js";
import { Subscription } from "./subscription.js";
import { refreshDelay } from "./token.js";
import { command, httpBase, SseTransport } from "./transport-sse.js";
import { WsTransport } from "./transport-ws.js";
import type {
  FanoutOptions,
  Frame,
  PresenceResult,
  PublishOptions,
  PublishResult,
  State,
  SubscribeOptions,
  Transport,
  TransportHandlers,
  TransportName,
  WebSocketCtor,
} from "./types.js";

/** Why the state changed, when a connection ended. */
export interface StateInfo {
  code?: number;
  reason?: string;
}

type Listeners = {
  state: (state: State, info: StateInfo) => void;
  error: (err: FanoutError) => void;
};

interface Pending {
  kind: string;
  sub?: Subscription<any> | undefined;
  res?: (f: Frame) => void;
  rej?: (e: FanoutError) => void;
  timer?: ReturnType<typeof setTimeout>;
}

interface Queued {
  frame: Frame;
  /** Send order: a publish put back after a lost connection goes before later ones. */
  seq: number;
  /** The `connect()` it belongs to: one left over from before a `close()` is not resent. */
  session: number;
  /** Failed sends while the connection stayed up (an event stream's HTTP command). */
  tries: number;
  res: (r: PublishResult) => void;
  rej: (e: FanoutError) => void;
}

/** Subscribe errors worth retrying: the edge could not do it now. */
const TRANSIENT = ["unavailable", "rate_limited", "internal"];
/** Time given to a connection to show it is alive after a pause (a hidden tab, a frozen page, going online). */
const PROBE_MS = 5000;
/** Sends of one publish that may fail while the connection stays up, before it rejects. */
const MAX_TRIES = 6;

const hasWindow = () => typeof window !== "undefined" && typeof window.addEventListener === "function";
const hasDocument = () => typeof document !== "undefined" && typeof document.addEventListener === "function";

export class Fanout {
  private st: State = "disconnected";
  private readonly o: FanoutOptions;
  private readonly transports: TransportName[];
  private readonly minDelay: number;
  private readonly maxDelay: number;
  private readonly timeout: number;
  private readonly maxQueued: number;
  private readonly base: string;
  private readonly subs = new Map<string, Subscription<any>>();
  private readonly ls: { [K in keyof Listeners]: Set<Listeners[K]> } = { state: new Set(), error: new Set() };
  private transport: Transport | null = null;
  /** Which transport's events count (bumped when one is replaced or dropped). */
  private tid = 0;
  private kind: TransportName;
  private token: string | undefined;
  private needToken = false;
  private authRetried = false;
  /** The app wants a connection (from `connect()` to `close()` or a terminal close). */
  private want = false;
  private offline = false;
  private attempts = 0;
  private wsFailures = 0;
  private wsWorked = false;
  /** Bumped by every attempt and close: async work of an older one is dropped. */
  private gen = 0;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private queue: Queued[] = [];
  private publishSeq = 0;
  /** Bumped by every close for good. */
  private session = 0;
  /** An event-stream publish is in flight (they go one at a time, to land in order). */
  private posting = false;
  private resendTimer: ReturnType<typeof setTimeout> | undefined;
  private pingMs = 25_000;
  private lastSeen = 0;
  private lastPing = 0;
  private lastTick = 0;
  private hiddenAt = 0;
  /** The channels of the open event stream, to know when the set changed. */
  private streamKey = "";
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private tick: ReturnType<typeof setInterval> | undefined;
  private streamTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(options: FanoutOptions) {
    this.o = options;
    this.transports = options.transports?.length ? options.transports : ["websocket", "sse"];
    this.kind = this.transports[0]!;
    this.minDelay = options.minReconnectDelay ?? 250;
    this.maxDelay = options.maxReconnectDelay ?? 10_000;
    this.timeout = options.timeout ?? 10_000;
    this.maxQueued = options.maxQueuedPublishes ?? 100;
    this.token = options.token;
    this.base = httpBase(options.url);
  }

  get state(): State {
    return this.st;
  }

  /** The transport in use (or to be tried next). */
  get transportName(): TransportName {
    return this.kind;
  }

  /** Listens to state changes or errors; returns the function that stops listening. */
  on<K extends keyof Listeners>(event: K, fn: Listeners[K]): () => void {
    this.ls[event].add(fn);
    return () => void this.ls[event].delete(fn);
  }

  connect(): void {
    if (this.want) return;
    this.want = true;
    this.attempts = 0;
    this.wsFailures = 0;
    this.authRetried = false;
    this.kind = this.transports[0]!;
    this.listen(true);
    void this.attempt();
  }

  /** Closes for good (until the next `connect()`): queued and unanswered requests reject with `closed`. */
  close(): void {
    this.terminate(undefined, "closed by the client", false);
  }

  subscribe<T = unknown>(channel: string, opts: SubscribeOptions<T> = {}): Subscription<T> {
    if (this.subs.has(channel)) throw new FanoutError("bad_request", `already subscribed to ${channel}`);
    const sub = new Subscription<T>(channel, opts, (s, tell) => this.forget(s, tell), (f) => this.guard(f));
    this.subs.set(channel, sub);
    if (this.st === "connected") {
      if (this.kind === "websocket") this.sendSubscribe(sub);
      else this.restream();
    }
    return sub;
  }

  /**
   * Publishes; while disconnected it waits in a bounded queue (the timeout counts once
   * it is sent). Each publish carries an idempotency key: one whose connection is lost
   * before the answer is sent again under that key once connected, so it is applied
   * exactly once, in order with the others (`duplicate` says an earlier send got through).
   */
  publish(channel: string, data: unknown, opts: PublishOptions = {}): Promise<PublishResult> {
    const frame: Frame = { type: "publish", channel, data, idempotency_key: opts.idempotencyKey ?? newKey() };
    if (opts.event !== undefined) frame.event = opts.event;
    return new Promise((res, rej) => {
      const q: Queued = { frame, seq: this.publishSeq++, session: this.session, tries: 0, res, rej };
      if (this.st === "closed") rej(new FanoutError("closed", "the client is closed"));
      else if (this.st === "connected" && this.kind === "websocket") this.sendPublish(q);
      else if (this.queue.length >= this.maxQueued)
        rej(new FanoutError("queue_full", `${this.maxQueued} publishes already wait to be sent`));
      else {
        this.queue.push(q);
        this.flush();
      }
    });
  }

  /** Who is subscribed to a channel (namespaces with presence); needs a connection. */
  async presence(channel: string): Promise<PresenceResult> {
    if (this.st !== "connected")
      throw new FanoutError(this.st === "closed" ? "closed" : "disconnected", `the client is ${this.st}`);
    if (this.kind === "sse") {
      return this.http<PresenceResult>(`/client/presence?channel=${encodeURIComponent(channel)}`);
    }
    const f = await this.request({ type: "presence", channel }, "presence");
    return { channel: f.channel, clients: f.clients };
  }

  // ---- connection ----

  private async attempt(): Promise<void> {
    const gen = ++this.gen;
    this.stopTimers();
    this.setState("connecting", {});
    if (this.o.getToken && (this.needToken || this.token === undefined)) {
      let t: string;
      try {
        t = await this.o.getToken();
      } catch (e) {
        if (gen !== this.gen) return;
        this.emit(new FanoutError("unauthorized", `getToken failed: ${(e as Error)?.message || e}`));
        return this.retry(backoff(this.attempts++, this.minDelay, this.maxDelay), {});
      }
      if (gen !== this.gen) return;
      if (!t) return this.terminate(4001, "getToken gave no token", true);
      this.token = t;
      this.needToken = false;
    }
    this.connectTimer = setTimeout(() => this.lost(1006, "not connected in time"), this.timeout);
    if (this.kind === "websocket") {
      const WS = this.o.WebSocket ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
      if (WS) {
        this.transport = new WsTransport(this.o.url, WS, this.token, this.handlers());
        return;
      }
      if (!this.transports.includes("sse"))
        return this.terminate(undefined, "no WebSocket implementation: pass the `WebSocket` option", true);
      this.kind = "sse";
    }
    this.openStream();
  }

  /** The handlers of the transport being created: anything from an older one is ignored. */
  private handlers(): TransportHandlers {
    const id = ++this.tid;
    const mine = () => id === this.tid;
    return {
      frame: (f) => mine() && this.onFrame(f),
      alive: () => mine() && (this.lastSeen = Date.now()),
      close: (code, reason, opened) => mine() && this.onClose(code, reason, opened),
    };
  }

  private onConnected(f: Frame): void {
    clearTimeout(this.connectTimer);
    this.pingMs = (f.ping_interval || 25) * 1000;
    const first = this.st !== "connected";
    this.setState("connected", {});
    this.attempts = 0;
    this.authRetried = false;
    this.lastSeen = this.lastPing = this.lastTick = Date.now();
    clearInterval(this.tick);
    this.tick = setInterval(() => this.heartbeat(), Math.min(1000, this.pingMs));
    this.scheduleRefresh();
    if (this.kind === "websocket") {
      this.wsWorked = true;
      this.wsFailures = 0;
      for (const sub of this.subs.values()) this.sendSubscribe(sub);
    } else {
      this.restream();
    }
    if (first) this.flush();
  }

  /** A connection (or stream) ended: reconnect as its code says, or stop. */
  private onClose(code: number, reason: string, opened: boolean): void {
    const connected = this.st === "connected";
    let action = closeAction(code);
    if (this.kind === "sse" && action === "stop" && code === 4003 && this.dropRefused(reason)) action = "soon";
    // A token refused again (expired or bad) before the connection got through is one
    // getToken cannot fix.
    const stop = action === "stop" || (action.startsWith("token") && (!this.o.getToken || this.authRetried));
    if (stop) return this.terminate(code, reason, true);
    this.drop();
    if (!this.want) return;
    const info = { code, reason };
    if (this.kind === "websocket" && !this.wsWorked && !connected && (!opened || code === 1006)) {
      // The upgrade is refused or cut (a proxy that does not pass WebSockets): after
      // two such failures in a row, the event stream.
      if (++this.wsFailures >= 2 && this.transports.includes("sse")) {
        this.kind = "sse";
        this.attempts = 0;
        return this.retry(0, info);
      }
    }
    switch (action) {
      case "token_once":
      case "token":
        this.authRetried = true;
        this.needToken = true;
        return this.retry(soon() / 4, info);
      case "soon":
        return this.retry(soon(), info);
      case "slow":
        return this.retry(backoff(this.attempts++ + 3, this.minDelay, this.maxDelay * 3), info);
      default:
        return this.retry(backoff(this.attempts++, this.minDelay, this.maxDelay), info);
    }
  }

  /**
   * An event stream refused for one channel (403/400, or `close` 4003 "could not
   * subscribe C"): that subscription ends with an error and the others carry on.
   */
  private dropRefused(reason: string): boolean {
    // The channel named as a whole word (channel names are [A-Za-z0-9_.:@=+/|-]).
    const name = /[\w.:@=+/|-]/;
    let found: Subscription<any> | undefined;
    for (const s of this.subs.values()) {
      const i = reason.indexOf(s.channel);
      const [before, after] = [reason[i - 1], reason[i + s.channel.length]];
      if (i >= 0 && !(before && name.test(before)) && !(after && name.test(after))) found = s;
    }
    found?.end("forbidden", reason);
    return !!found;
  }

  private retry(delay: number, info: StateInfo): void {
    this.setState("disconnected", info);
    clearTimeout(this.reconnectTimer);
    // Offline: wait for the browser's `online` instead.
    if (!this.offline) this.reconnectTimer = setTimeout(() => void this.attempt(), delay);
  }

  /** The transport is gone: timers stop, unanswered requests reject (they may or may not have been applied). */
  private drop(err = new FanoutError("disconnected", "the connection was lost before an answer")): void {
    const t = this.transport;
    this.transport = null;
    this.tid++;
    this.streamKey = "";
    t?.close();
    this.stopTimers();
    for (const sub of this.subs.values()) if (sub.state === "subscribed") sub.state = "subscribing";
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.rej?.(err);
    }
    this.pending.clear();
  }

  /** Closes the transport as dead (no traffic, no `connected` in time, a failed probe). */
  private lost(code: number, reason: string): void {
    if (this.transport || this.st === "connected") this.onClose(code, reason, true);
  }

  private terminate(code: number | undefined, reason: string, error: boolean): void {
    const was = this.want;
    this.want = false;
    this.gen++;
    const err = new FanoutError("closed", reason, code);
    this.drop(err);
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.streamTimer);
    clearTimeout(this.resendTimer);
    this.resendTimer = undefined;
    this.session++;
    this.listen(false);
    for (const q of this.queue) q.rej(err);
    this.queue = [];
    this.setState("closed", code === undefined ? { reason } : { code, reason });
    if (error && was) this.emit(err);
  }

  private stopTimers(): void {
    clearTimeout(this.connectTimer);
    clearTimeout(this.refreshTimer);
    clearInterval(this.tick);
    this.tick = undefined;
  }

  private setState(s: State, info: StateInfo): void {
    if (s === this.st) return;
    this.st = s;
    for (const fn of [...this.ls.state]) this.guard(() => fn(s, info));
  }

  private emit(err: FanoutError): void {
    for (const fn of [...this.ls.error]) {
      try {
        fn(err);
      } catch {
        // An error listener's own error has nowhere to go.
      }
    }
  }

  /** Runs an app callback: what it throws is reported as an `error`, not into the client. */
  private guard(f: () => void): void {
    try {
      f();
    } catch (e) {
      const err = new FanoutError("internal", `a callback threw: ${(e as Error)?.message || e}`);
      (err as { cause?: unknown }).cause = e;
      this.emit(err);
    }
  }

  // ---- liveness ----

  /**
   * Once a second: no traffic for 2 × ping interval + 5 s is a dead connection; a
   * WebSocket sends the protocol `ping` every ping interval, so that its `pong` is
   * traffic the page can see (the server's WebSocket pings are invisible to it). A
   * tick that comes late (a throttled or frozen page) judges nothing: it probes.
   */
  private heartbeat(): void {
    const now = Date.now();
    if (!this.transport) return;
    if (now - this.lastTick > 3000) this.probe();
    this.lastTick = now;
    if (now - this.lastSeen > 2 * this.pingMs + 5000) return this.lost(1006, "no traffic from the server");
    if (this.kind === "websocket" && now - this.lastPing >= this.pingMs) this.ping();
  }

  private ping(): void {
    this.lastPing = Date.now();
    this.transport?.send({ type: "ping" });
  }

  /** Is the connection still alive? It has a few seconds to show it (an event stream: until its next heartbeat). */
  private probe(): void {
    if (this.st !== "connected" || !this.transport) return;
    const window = this.kind === "websocket" ? PROBE_MS : this.pingMs + PROBE_MS;
    this.lastSeen = Math.min(this.lastSeen, Date.now() - (2 * this.pingMs + 5000) + window);
    if (this.kind === "websocket") this.ping();
  }

  private readonly onOnline = () => {
    this.offline = false;
    if (!this.want) return;
    if (this.st === "connected") return this.probe();
    if (this.st === "disconnected") {
      this.attempts = 0;
      clearTimeout(this.reconnectTimer);
      void this.attempt();
    }
  };

  private readonly onOffline = () => {
    this.offline = true;
    if (!this.want || this.st === "disconnected") return;
    this.drop();
    clearTimeout(this.reconnectTimer);
    this.setState("disconnected", { reason: "offline" });
  };

  private readonly onHidden = () => {
    this.hiddenAt ||= Date.now();
  };

  private readonly onVisible = () => {
    const away = this.hiddenAt ? Date.now() - this.hiddenAt : 0;
    this.hiddenAt = 0;
    if (away < 10_000 || !this.want) return;
    if (this.st === "connected") this.probe();
    else if (this.st === "disconnected" && !this.offline) {
      clearTimeout(this.reconnectTimer);
      void this.attempt();
    }
  };

  private readonly onVisibility = () => (document.visibilityState === "hidden" ? this.onHidden() : this.onVisible());

  private listen(on: boolean): void {
    const m = on ? "addEventListener" : "removeEventListener";
    if (hasWindow()) {
      window[m]("online", this.onOnline);
      window[m]("offline", this.onOffline);
    }
    if (hasDocument()) {
      document[m]("visibilitychange", this.onVisibility);
      document[m]("freeze", this.onHidden);
      document[m]("resume", this.onVisible);
    }
  }

  // ---- tokens ----

  /** Fetches the next token before the current one expires: in-band `refresh` on a WebSocket, a resumed stream on SSE. */
  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    const delay = this.o.getToken && this.token ? refreshDelay(this.token) : null;
    if (delay !== null) this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }

  private async refresh(): Promise<void> {
    const gen = this.gen;
    let t: string;
    try {
      t = await this.o.getToken!();
    } catch (e) {
      if (gen !== this.gen) return;
      this.emit(new FanoutError("unauthorized", `getToken failed: ${(e as Error)?.message || e}`));
      this.refreshTimer = setTimeout(() => void this.refresh(), 5000);
      return;
    }
    if (gen !== this.gen || this.st !== "connected" || !t) return;
    this.token = t;
    if (this.kind === "websocket") {
      this.request({ type: "refresh", token: t }, "refresh").catch((e) => this.emit(e));
    } else if (this.transport) {
      this.restream(true);
    }
    this.scheduleRefresh();
  }

  // ---- requests ----

  private request(frame: Frame, kind: string, sub?: Subscription<any>): Promise<Frame> {
    const id = this.nextId++;
    frame.id = id;
    return new Promise<Frame>((res, rej) => {
      const p: Pending = { kind, sub, res, rej };
      const expire = () => {
        this.pending.delete(id);
        rej(new FanoutError("timeout", `no answer to ${kind} within ${this.timeout} ms`));
      };
      if (!sub) {
        p.timer = setTimeout(() => {
          if (kind !== "publish" || this.st !== "connected") return expire();
          // Silence may be a dead connection: find out first, so that a publish lost
          // with it is resent (the probe's failure drops it as `disconnected`).
          this.probe();
          p.timer = setTimeout(expire, PROBE_MS + 1000);
        }, this.timeout);
      }
      this.pending.set(id, p);
      this.transport?.send(frame);
    });
  }

  private sendSubscribe(sub: Subscription<any>): void {
    if (sub.state === "ended") return;
    this.request({ type: "subscribe", channel: sub.channel, ...sub.request() }, "subscribe", sub).catch(() => {});
  }

  private sendPublish(q: Queued): void {
    const { channel, data, event, idempotency_key } = q.frame;
    const sse = this.kind === "sse";
    if (sse) this.posting = true;
    const p = sse
      ? this.http<Frame>("/client/publish", { channel, data, idempotency_key, ...(event === undefined ? {} : { event }) })
      : this.request({ ...q.frame }, "publish");
    p.then(
      (f) => q.res(f.duplicate ? { offset: f.offset, epoch: f.epoch, duplicate: true } : { offset: f.offset, epoch: f.epoch }),
      (e: FanoutError) => this.unanswered(q, e),
    ).finally(() => {
      if (!sse) return;
      this.posting = false;
      this.flush();
    });
  }

  /**
   * A publish that got no answer: lost with its connection, it goes back into the queue
   * (before anything published after it, whatever the bound) to be resent under the same
   * key; anything else (a refusal, a timeout, a close for good) rejects.
   */
  private unanswered(q: Queued, e: FanoutError): void {
    if (q.session !== this.session) return q.rej(new FanoutError("closed", "the client was closed"));
    if (e.code !== "disconnected" || !this.want) return q.rej(e);
    if (this.st === "connected") {
      // The connection stayed up (an event stream's HTTP command failed on its own):
      // maybe it is dead too; resend later, a bounded number of times.
      this.probe();
      if (++q.tries >= MAX_TRIES) return q.rej(e);
      clearTimeout(this.resendTimer);
      this.resendTimer = setTimeout(() => {
        this.resendTimer = undefined;
        this.flush();
      }, backoff(q.tries, this.minDelay, this.maxDelay) + this.minDelay);
    }
    const at = this.queue.findIndex((o) => o.seq > q.seq);
    this.queue.splice(at < 0 ? this.queue.length : at, 0, q);
  }

  /**
   * Sends what waits, once connected: over a WebSocket all of it (the connection keeps
   * the order); over an event stream one at a time, each after the answer to the last.
   */
  private flush(): void {
    if (this.st !== "connected" || this.resendTimer !== undefined) return;
    if (this.kind === "websocket") {
      const q = this.queue;
      this.queue = [];
      for (const item of q) this.sendPublish(item);
    } else if (!this.posting) {
      const next = this.queue.shift();
      if (next) this.sendPublish(next);
    }
  }

  /** An HTTP command of the event-stream transport; a 401 gets one new token and one more try. */
  private async http<T>(path: string, body?: unknown): Promise<T> {
    try {
      return await command<T>(this.fetchFn(), this.base + path, this.token, this.timeout, body);
    } catch (e) {
      if ((e as FanoutError).status !== 401 || !this.o.getToken) throw e;
      this.token = (await this.o.getToken()) || this.token;
      return command<T>(this.fetchFn(), this.base + path, this.token, this.timeout, body);
    }
  }

  // ---- frames ----

  private onFrame(f: Frame): void {
    const p = typeof f.id === "number" ? this.pending.get(f.id) : undefined;
    if (p) {
      this.pending.delete(f.id as number);
      clearTimeout(p.timer);
    }
    switch (f.type) {
      case "connected":
        return this.onConnected(f);
      case "subscribed": {
        // A reply goes to the subscription that asked (an older one of the channel may
        // have been unsubscribed since); an unsolicited one is a position reset.
        const sub = p ? p.sub : this.subs.get(f.channel);
        if (sub && (p || this.kind === "sse" || sub.state === "subscribed")) sub.subscribed(f);
        return;
      }
      case "message":
        this.subs.get(f.channel)?.message(f);
        return;
      case "unsubscribed": {
        const sub = this.subs.get(f.channel);
        if (f.reason !== "client" && sub?.state === "subscribed") {
          sub.end(f.reason);
          if (this.kind === "sse") this.restream();
        }
        return;
      }
      case "error": {
        const err = new FanoutError(f.code, f.message);
        if (!p) return this.emit(err);
        if (p.kind !== "subscribe" || !p.sub) return p.rej?.(err);
        const sub = p.sub;
        if (!TRANSIENT.includes(f.code)) return sub.end(f.code, f.message);
        sub.fail(err);
        const t = this.transport;
        setTimeout(() => {
          if (t === this.transport && this.subs.get(sub.channel) === sub) this.sendSubscribe(sub);
        }, backoff(2, this.minDelay, this.maxDelay));
        return;
      }
      default:
        p?.res?.(f);
    }
  }

  // ---- subscriptions ----

  /** A subscription ended (by the app or the server): the server is told if it still knows it. */
  private forget(sub: Subscription<any>, tell: boolean): void {
    if (this.subs.get(sub.channel) !== sub) return;
    this.subs.delete(sub.channel);
    if (this.st !== "connected") return;
    if (this.kind === "websocket") tell && this.request({ type: "unsubscribe", channel: sub.channel }, "unsubscribe", sub).catch(() => {});
    else this.restream();
  }

  /**
   * Event streams carry a fixed set of channels: when the set changes (or the token
   * does), the stream is reopened with every channel's position as `Last-Event-ID`, so
   * each resumes where it was. Changes made together reopen it once.
   */
  private restream(force = false): void {
    clearTimeout(this.streamTimer);
    this.streamTimer = setTimeout(() => {
      if (this.st !== "connected" || this.kind !== "sse") return;
      const key = [...this.subs.keys()].join("\n");
      if (force || key !== this.streamKey) this.openStream();
    }, 0);
  }

  private openStream(): void {
    const list = [...this.subs.values()];
    const old = this.transport;
    this.transport = null;
    this.tid++;
    old?.close();
    this.streamKey = list.map((s) => s.channel).join("\n");
    if (!list.length) {
      // Nothing to stream: publish and presence still work over HTTP.
      clearTimeout(this.connectTimer);
      if (this.st !== "connected") this.onConnected({ type: "connected" });
      return;
    }
    const lastEventId = list
      .map((s) => {
        const since = s.request().since;
        return since ? `${since.offset}:${since.epoch}` : "";
      })
      .join(",");
    this.transport = new SseTransport(
      this.base,
      { channels: list.map((s) => s.channel), lastEventId, token: this.token },
      this.fetchFn(),
      this.handlers(),
    );
  }

  /** The fetch to use. The global one is wrapped: browsers refuse it called as another
   *  object's method ("Illegal invocation"), which is how a transport holds it. */
  private fetchFn(): typeof fetch {
    return this.o.fetch ?? ((input, init) => fetch(input, init));
  }
}
