/**
 * The SDK's public types (options, positions, messages, presence) and the internal
 * shape shared by the two transports.
 */

import type { FanoutError } from "./errors.js";

export type State = "disconnected" | "connecting" | "connected" | "closed";
export type TransportName = "websocket" | "sse";

/** A place in a channel's history: `offset` only means something with its `epoch`. */
export interface Position {
  offset: number;
  epoch: string;
}

export interface Message<T = unknown> {
  channel: string;
  data: T;
  /** Absent for a raw Redis `PUBLISH` (not kept, not recoverable). */
  offset?: number;
  epoch?: string;
  event?: string;
  /** Publish time, ms since the epoch. */
  ts?: number;
}

export interface SubscribeOptions<T = unknown> {
  /** Resume after this position (e.g. one saved across a page load). */
  since?: Position;
  /** Start with the N newest kept messages (WebSocket only; ignored with `since`). */
  last?: number;
  /** A subscription token, for channels the connection token does not grant (WebSocket only). */
  token?: string;
  onMessage?(m: Message<T>): void;
  /** History could not cover the gap: reload the channel's state; messages continue after `position`. */
  onReset?(position: Position): void;
  /** The job finished (`unsubscribed {reason:"completed"}`): the subscription is over. */
  onCompleted?(): void;
  /** A refusal or an end by the server (`forbidden` …); `sub.state` tells whether it ended. */
  onError?(err: FanoutError): void;
}

export interface PublishResult {
  offset: number;
  epoch: string;
  /** The key was already applied (an earlier send got through): this is that publish's position. */
  duplicate?: boolean;
}

export interface PublishOptions {
  event?: string;
  /**
   * One key per logical publish (1–64 printable ASCII characters, no spaces); made for
   * you when omitted. Pass your own to resend, with the same key, a publish that
   * rejected with `timeout`: it is applied at most once within the edge's 5-minute window.
   */
  idempotencyKey?: string;
}

export interface PresenceClient {
  client: string;
  user: string;
  node: string;
}

export interface PresenceResult {
  channel: string;
  clients: PresenceClient[];
}

/** The part of the WebSocket API the client uses (browsers, Node ≥ 22, or the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}
export type WebSocketCtor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface FanoutOptions {
  /** `ws://host/ws` or `wss://host/ws`; the event stream and HTTP commands are derived from it. */
  url: string;
  token?: string;
  /** Called for a fresh token before the current one expires, and after 4004/4001. Resolving to "" stops the client. */
  getToken?: () => Promise<string>;
  /** Tried in order; default `["websocket", "sse"]`. */
  transports?: TransportName[];
  /** A WebSocket implementation (Node 20 has none built in: pass the `ws` package's). */
  WebSocket?: WebSocketCtor;
  /** A fetch implementation for the event stream and HTTP commands (default: the global one). */
  fetch?: typeof fetch;
  /** Backoff bounds, ms (default 250 → 10000). */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** Request timeout, and the time a connection may take to be `connected`, ms (default 10000). */
  timeout?: number;
  /** Publishes kept while disconnected (default 100); past it, `publish` rejects with `queue_full`. */
  maxQueuedPublishes?: number;
}

/** A server frame (a WebSocket message, or an event stream's event data). */
export interface Frame {
  type: string;
  id?: number | string;
  [k: string]: any;
}

/** What a transport tells the client; `close` is called once, and never after the client closed it. */
export interface TransportHandlers {
  frame(f: Frame): void;
  /** Anything arrived (a frame, a heartbeat): the connection is alive. */
  alive(): void;
  close(code: number, reason: string, opened: boolean): void;
}

export interface Transport {
  readonly name: TransportName;
  /** False when the transport cannot carry client frames (the event stream). */
  send(f: Frame): boolean;
  close(): void;
}
