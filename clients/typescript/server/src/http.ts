import { preparePublish, PublisherBase, retrying, retryPolicy, withData, type PublishOptions, type RetryOptions } from "./common.js";
import { FanoutServerError, type BroadcastAck, type PublishAck } from "./errors.js";

export interface HttpPublisherOptions {
  /** The edge's base URL, `http://edge:8080` or `https://…` (a path prefix is kept). */
  url: string;
  /** The edge's `--admin-token`. */
  adminToken: string;
  /** How long one request may go unanswered (ms, default 5000); it is then resent. */
  timeout?: number;
  /** Retries of transient failures (default: 10 s deadline, backoff 20 ms doubling to 1 s, full jitter). */
  retry?: RetryOptions;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
}

/** Statuses after which the same request (same idempotency key) is resent. */
const RETRY_STATUSES = new Set([408, 429, 502, 503, 504]);

const STATUS_CODES: Record<number, string> = {
  400: "bad_request",
  401: "unauthorized",
  403: "forbidden",
  404: "not_found",
  408: "timeout",
  413: "too_large",
  429: "rate_limited",
  500: "internal",
};

/**
 * Publishes through the edge's server API (`POST /api/publish`, `/api/broadcast`). Every
 * logical publish has one idempotency key, sent with each resend: network errors,
 * timeouts, 408, 429 (after `Retry-After`), 502/503/504 are retried with full-jitter
 * backoff until the deadline, and the publish is applied at most once. 400, 401, 403,
 * 404, 413 and 500 are thrown at once.
 */
export class HttpPublisher extends PublisherBase {
  readonly url: string;
  private readonly adminToken: string;
  private readonly timeout: number;
  private readonly retry: Required<RetryOptions>;
  private readonly fetch: typeof fetch;
  private readonly hostPort: string;

  constructor(opts: HttpPublisherOptions) {
    super();
    let u: URL;
    try {
      u = new URL(opts?.url);
    } catch {
      throw new FanoutServerError("bad_request", `HttpPublisher: ${JSON.stringify(opts?.url)} is not a URL: expected http://host:port or https://host:port (the edge's HTTP address)`);
    }
    if (u.protocol !== "http:" && u.protocol !== "https:") {
      throw new FanoutServerError(
        "bad_request",
        `HttpPublisher: \`${u.protocol}//\` is not one of http://, https:// (the edge's HTTP address, not its /ws URL or Redis)`,
      );
    }
    if (typeof opts.adminToken !== "string" || opts.adminToken === "") {
      throw new FanoutServerError("bad_request", "HttpPublisher: adminToken (the edge's --admin-token) is required");
    }
    this.url = u.href.replace(/\/+$/, "");
    this.hostPort = u.host || u.hostname;
    this.adminToken = opts.adminToken;
    this.timeout = opts.timeout ?? 5000;
    this.retry = retryPolicy(opts.retry);
    const f = opts.fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new FanoutServerError("bad_request", "HttpPublisher: no fetch (Node ≥ 20 has one; or pass `fetch`)");
    this.fetch = f;
  }

  /** Publishes `data` on `channel`; resolves with where it landed. */
  override async publish(channel: string, data: unknown, opts: PublishOptions = {}): Promise<PublishAck> {
    const { body, key } = this.body({ channel }, data, opts);
    return (await this.send("/api/publish", body, key)).body as PublishAck;
  }

  /**
   * Publishes the same message on 1–1000 channels (all validated by the edge before any
   * is published). A partial failure (503) is resent whole under the same key: channels
   * already published answer `duplicate: true`. Past the deadline, the error carries the
   * last per-channel `results`.
   */
  async broadcast(channels: string[], data: unknown, opts: PublishOptions = {}): Promise<BroadcastAck> {
    if (!Array.isArray(channels)) throw new FanoutServerError("bad_request", "channels must be an array");
    const { body, key } = this.body({ channels }, data, opts);
    return (await this.send("/api/broadcast", body, key)).body as BroadcastAck;
  }

  private body(head: Record<string, unknown>, data: unknown, opts: PublishOptions): { body: string; key: string } {
    const { key, json } = preparePublish(data, opts);
    const fields = { ...head, ...(opts.event ? { event: opts.event } : {}), idempotency_key: key };
    return { body: withData(fields, json), key };
  }

  private send(path: string, body: string, key: string): Promise<{ status: number; body: unknown }> {
    let retryAfter = 0;
    return retrying(this.retry, this.timeout, key, {
      attempt: async (limit) => {
        retryAfter = 0;
        const r = await this.attempt(path, body, key, limit);
        if (r.ok) return r;
        retryAfter = r.retryAfter;
        throw r.error;
      },
      next: (e, attempts, backoff) => {
        const error = e as FanoutServerError;
        error.attempts = attempts;
        error.idempotencyKey = key;
        if (!error.retryable) throw error;
        return Math.max(retryAfter, Math.random() * backoff); // full jitter
      },
      gaveUp: (e, attempts, elapsed) => {
        const error = e as FanoutServerError;
        const gaveUp = new FanoutServerError(
          error.code,
          `${error.message} — gave up after ${attempts} attempt(s) in ${elapsed} ms (retry deadline ${this.retry.deadline} ms); ` +
            `the publish may or may not have been applied: resend it with idempotencyKey "${key}" to find out without publishing twice`,
          { status: error.status, retryable: true, cause: error },
        );
        if (error.results) gaveUp.results = error.results;
        return gaveUp;
      },
    });
  }

  private async attempt(
    path: string,
    body: string,
    key: string,
    limit: number,
  ): Promise<{ ok: true; status: number; body: unknown } | { ok: false; error: FanoutServerError; retryAfter: number }> {
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), limit);
    let res: Response;
    let text: string;
    try {
      res = await this.fetch(this.url + path, {
        method: "POST",
        headers: {
          authorization: `Bearer ${this.adminToken}`,
          "content-type": "application/json",
          "idempotency-key": key,
        },
        body,
        signal: ac.signal,
      });
      text = await res.text();
    } catch (e) {
      if (ac.signal.aborted) {
        throw new FanoutServerError("timeout", `the edge at ${this.hostPort} did not answer ${path} within ${limit} ms`, { retryable: true, cause: e });
      }
      const cause = (e as { cause?: { code?: string; message?: string } }).cause;
      const why = cause?.code ?? cause?.message ?? (e as Error).message;
      throw new FanoutServerError("unreachable", `could not reach the edge at ${this.hostPort} (${path}): ${why}`, { retryable: true, cause: e });
    } finally {
      clearTimeout(timer);
    }
    let json: any;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    if (res.status === 200 && json && typeof json === "object") return { ok: true, status: 200, body: json };
    const code: string = json?.error?.code ?? STATUS_CODES[res.status] ?? (res.status >= 500 ? "unavailable" : `http_${res.status}`);
    const message: string =
      json?.error?.message ??
      (path === "/api/broadcast" && json?.results ? `${json.failed} channel(s) of the broadcast failed` : text.slice(0, 200) || res.statusText);
    const error = new FanoutServerError(code, `${path} → ${res.status} ${code}: ${message}`, {
      status: res.status,
      retryable: RETRY_STATUSES.has(res.status),
    });
    if (Array.isArray(json?.results)) error.results = json.results;
    return { ok: false, error, retryAfter: retryAfterMs(res.headers.get("retry-after")) };
  }
}

/** `Retry-After` (seconds or an HTTP date) in ms; 0 when absent or unreadable. */
function retryAfterMs(v: string | null): number {
  if (!v) return 0;
  const s = Number(v);
  if (Number.isFinite(s)) return Math.max(0, s * 1000);
  const t = Date.parse(v);
  return Number.isFinite(t) ? Math.max(0, t - Date.now()) : 0;
}
