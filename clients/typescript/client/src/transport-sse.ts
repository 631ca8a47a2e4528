/**
 * The event-stream transport: `GET /sse` read through `fetch` streaming rather than
 * `EventSource`, so that it runs in Node too, sends the token in `Authorization`, and
 * hands every event (including the final `close {code, reason}`) to the client, which
 * does its own reconnecting. Also the HTTP commands an event stream cannot carry
 * (`POST /client/publish`, `GET /client/presence`) and the incremental event-stream
 * parser.
 */

import { FanoutError } from "./errors.js";
import { statusCloseCode } from "./codes.js";
import type { Frame, Transport, TransportHandlers } from "./types.js";

export interface StreamEvent {
  event: string;
  data: string;
  id: string;
}

/**
 * An incremental `text/event-stream` parser (the HTML standard's rules): lines end in
 * LF, CRLF or CR, even when the CR and LF come in different chunks; `data:` lines are
 * joined with LF; a blank line dispatches; comments (`:`) and unknown fields are skipped;
 * `id` persists from event to event.
 */
export class EventStreamParser {
  private buf = "";
  private cr = false;
  private first = true;
  private event = "";
  private data: string[] = [];
  lastId = "";

  constructor(private readonly on: (e: StreamEvent) => void) {}

  push(chunk: string): void {
    if (!chunk) return;
    if (this.first) {
      if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
      this.first = false;
    }
    // A CR that ended the last chunk already ended its line: an LF right after it is
    // the same line end.
    if (this.cr && chunk[0] === "\n") chunk = chunk.slice(1);
    this.cr = false;
    let s = this.buf + chunk;
    let start = 0;
    for (let i = 0; i < s.length; i++) {
      const c = s[i];
      if (c !== "\n" && c !== "\r") continue;
      this.line(s.slice(start, i));
      if (c === "\r") {
        if (i + 1 === s.length) this.cr = true;
        else if (s[i + 1] === "\n") i++;
      }
      start = i + 1;
    }
    this.buf = s.slice(start);
  }

  private line(l: string): void {
    if (l === "") {
      if (this.data.length) this.on({ event: this.event || "message", data: this.data.join("\n"), id: this.lastId });
      this.event = "";
      this.data = [];
      return;
    }
    if (l[0] === ":") return;
    const colon = l.indexOf(":");
    const field = colon < 0 ? l : l.slice(0, colon);
    let value = colon < 0 ? "" : l.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.lastId = value;
  }
}

/** The HTTP base of an edge from its WebSocket URL: `wss://h/x/ws` → `https://h/x`. */
export function httpBase(wsUrl: string): string {
  const u = new URL(wsUrl);
  const proto = u.protocol === "wss:" ? "https:" : u.protocol === "ws:" ? "http:" : u.protocol;
  return `${proto}//${u.host}${u.pathname.replace(/\/ws\/?$/, "").replace(/\/$/, "")}`;
}

export interface StreamRequest {
  channels: string[];
  /** Each channel's position, `offset:epoch`, "" for none: the stream resumes from them. */
  lastEventId: string;
  token: string | undefined;
}

export class SseTransport implements Transport {
  readonly name = "sse";
  private abort = new AbortController();
  private done = false;

  constructor(base: string, req: StreamRequest, private fetchFn: typeof fetch, private h: TransportHandlers) {
    const q = req.channels.map((c) => "channel=" + encodeURIComponent(c)).join("&");
    const headers: Record<string, string> = { accept: "text/event-stream" };
    if (req.token) headers.authorization = "Bearer " + req.token;
    if (req.lastEventId.replace(/,/g, "")) headers["last-event-id"] = req.lastEventId;
    this.run(`${base}/sse?${q}`, headers).catch((e) =>
      this.end(1006, String((e && e.message) || e), false),
    );
  }

  private async run(url: string, headers: Record<string, string>): Promise<void> {
    const res = await this.fetchFn(url, { headers, signal: this.abort.signal, cache: "no-store" });
    if (res.status !== 200 || !res.body) {
      const err = await errorOf(res);
      return this.end(statusCloseCode(res.status), err.message, false);
    }
    // The `close` event: the stream's end and its code.
    const closed: { code?: number; reason?: string } = {};
    const parser = new EventStreamParser((e) => {
      if (this.done) return;
      let f: Frame;
      try {
        f = JSON.parse(e.data);
      } catch {
        return;
      }
      if (e.event === "close") {
        closed.code = f.code;
        closed.reason = f.reason || "";
      }
      else this.h.frame(f);
    });
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (this.done) return;
      if (done) break;
      this.h.alive();
      parser.push(dec.decode(value, { stream: true }));
      if (closed.code !== undefined) break;
    }
    reader.cancel().catch(() => {});
    this.end(closed.code ?? 1006, closed.reason ?? "the event stream ended", true);
  }

  send(): boolean {
    return false;
  }

  close(): void {
    this.done = true;
    this.abort.abort();
  }

  private end(code: number, reason: string, opened: boolean): void {
    if (this.done) return;
    this.done = true;
    this.abort.abort();
    this.h.close(code, reason, opened);
  }
}

/** The FanoutError an HTTP error answer carries (`{"error":{"code","message"}}`). */
export async function errorOf(res: Response): Promise<FanoutError> {
  let code = "", message = "";
  try {
    const body = await res.json();
    code = body.error.code;
    message = body.error.message;
  } catch {
    // Not ours (a proxy's page): the status says enough.
  }
  const e = new FanoutError(code || (res.status === 401 ? "unauthorized" : "unavailable"), message || `HTTP ${res.status}`);
  e.status = res.status;
  return e;
}

/**
 * One HTTP command (`/client/publish`, `/client/presence`) with the connection token:
 * resolves with the JSON answer, rejects with a FanoutError (`timeout`, `disconnected`
 * when the edge cannot be reached, else the answer's code and its `status`).
 */
export async function command<T>(
  fetchFn: typeof fetch,
  url: string,
  token: string | undefined,
  timeout: number,
  body?: unknown,
): Promise<T> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeout);
  const headers: Record<string, string> = {};
  if (token) headers.authorization = "Bearer " + token;
  if (body !== undefined) headers["content-type"] = "application/json";
  try {
    const res = await fetchFn(url, {
      method: body === undefined ? "GET" : "POST",
      headers,
      body: body === undefined ? null : JSON.stringify(body),
      signal: abort.signal,
    });
    if (!res.ok) throw await errorOf(res);
    return (await res.json()) as T;
  } catch (e) {
    if (e instanceof FanoutError) throw e;
    throw abort.signal.aborted
      ? new FanoutError("timeout", `no answer within ${timeout} ms`)
      : new FanoutError("disconnected", String((e as Error)?.message || e));
  } finally {
    clearTimeout(timer);
  }
}
