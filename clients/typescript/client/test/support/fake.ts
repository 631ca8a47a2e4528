/**
 * Test support: a scripted WebSocket server speaking just enough of the protocol
 * (`auth` → `connected`, `subscribe` → `subscribed`, `ping` → `pong`), to close
 * connections with any code and to withhold answers — what the real edge cannot be
 * made to do on demand.
 */

import { WebSocketServer, type WebSocket } from "ws";
import type { AddressInfo } from "node:net";

export interface FakeConn {
  ws: WebSocket;
  frames: any[];
  /** Answers nothing (a half-open connection); frames are still recorded. */
  silent: boolean;
  send(f: object): void;
  close(code: number, reason?: string): void;
}

export class FakeEdge {
  readonly server: WebSocketServer;
  readonly conns: FakeConn[] = [];
  tokens: string[] = [];
  pingInterval = 25;
  /** Channel → offset answered in `subscribed`. */
  offsets = new Map<string, number>();
  /** Answers a frame (after the defaults, unless it returns true to replace them). */
  onFrame: (c: FakeConn, f: any) => boolean | void = () => {};

  private constructor(server: WebSocketServer) {
    this.server = server;
    server.on("connection", (ws) => {
      const c: FakeConn = {
        ws,
        frames: [],
        silent: false,
        send: (f) => ws.send(JSON.stringify(f)),
        close: (code, reason = "") => ws.close(code, reason),
      };
      this.conns.push(c);
      ws.on("message", (d) => {
        const f = JSON.parse(String(d));
        c.frames.push(f);
        if (c.silent || this.onFrame(c, f)) return;
        if (f.type === "auth") {
          this.tokens.push(f.token);
          c.send({ type: "connected", client: `c${this.conns.length}`, node: "fake", user: "1", ping_interval: this.pingInterval });
        } else if (f.type === "subscribe") {
          c.send({ type: "subscribed", id: f.id, channel: f.channel, offset: this.offsets.get(f.channel) ?? 0, epoch: "E", ...(f.since ? { recovered: true } : {}) });
        } else if (f.type === "ping") {
          c.send({ type: "pong", ...(f.id === undefined ? {} : { id: f.id }) });
        }
      });
    });
  }

  static start(): Promise<FakeEdge> {
    return new Promise((ok) => {
      const s: WebSocketServer = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: () => "fanout.json" }, () => ok(new FakeEdge(s)));
    });
  }

  get url(): string {
    return `ws://127.0.0.1:${(this.server.address() as AddressInfo).port}/ws`;
  }

  get last(): FakeConn {
    return this.conns[this.conns.length - 1]!;
  }

  stop(): Promise<void> {
    for (const c of this.conns) c.ws.terminate();
    return new Promise((ok) => this.server.close(() => ok()));
  }
}
