/**
 * The WebSocket transport: one socket speaking `fanout.json`, authenticated by a first
 * `auth` frame (a browser cannot set headers, and a token in the URL ends up in access
 * logs). Outgoing frames are paced below the edge's default rate limit (50 frames/s,
 * burst 100), so that resubscribing many channels after a reconnect is not refused.
 */

import type { Frame, Transport, TransportHandlers, WebSocketCtor, WebSocketLike } from "./types.js";

const BURST = 80;
const PER_SECOND = 40;

export class WsTransport implements Transport {
  readonly name = "websocket";
  private ws: WebSocketLike;
  private opened = false;
  private done = false;
  private tokens = BURST;
  private at = Date.now();
  private queue: string[] = [];
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(url: string, WS: WebSocketCtor, token: string | undefined, private h: TransportHandlers) {
    const ws = (this.ws = new WS(url, "fanout.json"));
    ws.onopen = () => {
      this.opened = true;
      if (token !== undefined) this.send({ type: "auth", token });
    };
    ws.onmessage = (e) => {
      if (this.done) return;
      this.h.alive();
      let f: Frame;
      try {
        f = JSON.parse(typeof e.data === "string" ? e.data : new TextDecoder().decode(e.data));
      } catch {
        return;
      }
      if (f && typeof f.type === "string") this.h.frame(f);
    };
    ws.onclose = (e) => this.end(e.code || 1006, e.reason || "");
    ws.onerror = () => {};
  }

  send(f: Frame): boolean {
    this.queue.push(JSON.stringify(f));
    this.flush();
    return true;
  }

  private flush(): void {
    const now = Date.now();
    this.tokens = Math.min(BURST, this.tokens + ((now - this.at) * PER_SECOND) / 1000);
    this.at = now;
    while (this.queue.length && this.tokens >= 1 && !this.done) {
      this.tokens--;
      try {
        this.ws.send(this.queue.shift()!);
      } catch {
        // The socket is closing: its close event follows.
      }
    }
    if (this.queue.length && !this.timer && !this.done) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.flush();
      }, 1000 / PER_SECOND);
    }
  }

  /** Closed by the client: its handlers hear nothing more. */
  close(): void {
    this.stop();
    try {
      this.ws.close(1000);
    } catch {
      // Already closed.
    }
  }

  /** The socket closed (the server's code, or 1006 when it just ended). */
  private end(code: number, reason: string): void {
    if (this.done) return;
    this.stop();
    this.h.close(code, reason, this.opened);
  }

  private stop(): void {
    this.done = true;
    clearTimeout(this.timer);
    this.queue = [];
  }
}
