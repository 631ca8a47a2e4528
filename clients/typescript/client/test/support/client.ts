/**
 * Test support: clients that are closed after each test, and a recorder of what a
 * subscription received.
 */

import WebSocket from "ws";
import { afterEach } from "vitest";
import { Fanout } from "../../src/index.js";
import type { FanoutOptions, Message, Position, State, WebSocketCtor } from "../../src/index.js";
import { FanoutError } from "../../src/index.js";

const open: Fanout[] = [];
afterEach(() => {
  for (const c of open.splice(0)) c.close();
});

/** A client on the `ws` package (Node 20 has no global WebSocket), with fast reconnects. */
export function client(opts: Omit<FanoutOptions, "WebSocket"> & { WebSocket?: WebSocketCtor }): Fanout {
  const c = new Fanout({
    WebSocket: WebSocket as unknown as WebSocketCtor,
    minReconnectDelay: 50,
    maxReconnectDelay: 500,
    ...opts,
  });
  open.push(c);
  return c;
}

export class Recorder {
  messages: Message[] = [];
  resets: Position[] = [];
  errors: FanoutError[] = [];
  completed = 0;
  readonly handlers = {
    onMessage: (m: Message) => void this.messages.push(m),
    onReset: (p: Position) => void this.resets.push(p),
    onCompleted: () => void this.completed++,
    onError: (e: FanoutError) => void this.errors.push(e),
  };
  get data(): unknown[] {
    return this.messages.map((m) => m.data);
  }
  get offsets(): (number | undefined)[] {
    return this.messages.map((m) => m.offset);
  }
}

/** Every state a client goes through, from now on. */
export function states(c: Fanout): State[] {
  const seen: State[] = [];
  c.on("state", (s) => void seen.push(s));
  return seen;
}
