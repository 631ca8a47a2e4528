import { randomBytes, randomInt } from "node:crypto";
import { FanoutServerError, type PublishAck } from "./errors.js";

/** The longest channel name, in bytes. */
export const MAX_CHANNEL_LEN = 255;
/** The longest idempotency key accepted. */
export const MAX_IDEMPOTENCY_KEY_LEN = 128;
/** Statuses that end a job (`job_progress` subscribers are unsubscribed after it). */
export const TERMINAL_STATUSES = ["succeeded", "failed", "cancelled"] as const;
export type JobStatus = (typeof TERMINAL_STATUSES)[number];

const CHANNEL_CHARS = /^[A-Za-z0-9_\-.:@=+/|]*$/;

/** Why `channel` is not a valid channel name (the edge's rules), or `null` when it is. */
export function channelError(channel: unknown): string | null {
  if (typeof channel !== "string") return "channel name must be a string";
  if (channel.length === 0) return "channel name is empty";
  if (Buffer.byteLength(channel) > MAX_CHANNEL_LEN) return `channel name is longer than ${MAX_CHANNEL_LEN} bytes`;
  if (!CHANNEL_CHARS.test(channel)) {
    const bad = [...channel].find((c) => !CHANNEL_CHARS.test(c));
    return `channel name has a character outside [A-Za-z0-9_.:@=+/|-]: ${JSON.stringify(bad)}`;
  }
  const colon = channel.indexOf(":");
  if (colon <= 0 || colon + 1 === channel.length) return "channel name must be `namespace:rest`";
  return null;
}

export function checkChannel(channel: unknown): asserts channel is string {
  const e = channelError(channel);
  if (e) throw new FanoutServerError("bad_request", `invalid channel ${JSON.stringify(channel)}: ${e}`);
}

/** Whether `key` can be an idempotency key: 1 to 128 printable ASCII characters, no spaces. */
export function validIdempotencyKey(key: unknown): key is string {
  return typeof key === "string" && key.length > 0 && key.length <= MAX_IDEMPOTENCY_KEY_LEN && /^[\x21-\x7e]+$/.test(key);
}

export function checkKey(key: unknown): asserts key is string {
  if (!validIdempotencyKey(key)) {
    throw new FanoutServerError(
      "bad_request",
      `invalid idempotency key ${JSON.stringify(key)}: 1 to ${MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters, no spaces`,
    );
  }
}

/** A fresh idempotency key: 16 random bytes as 32 hex digits. */
export function newIdempotencyKey(): string {
  return randomBytes(16).toString("hex");
}

const ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/** A fresh epoch: 12 random alphanumerics (used only if the channel has none yet). */
export function newEpoch(): string {
  let s = "";
  for (let i = 0; i < 12; i++) s += ALNUM[randomInt(ALNUM.length)];
  return s;
}

/** `data` as JSON text, or a `bad_request` error (BigInt, cycles, undefined, functions) before anything is sent. */
export function encodeData(data: unknown): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(data);
  } catch (e) {
    throw new FanoutServerError("bad_request", `data is not JSON-serializable: ${(e as Error).message}`, { cause: e });
  }
  if (text === undefined) {
    throw new FanoutServerError("bad_request", `data is not JSON-serializable: ${typeof data} has no JSON form`);
  }
  return text;
}

export function checkEvent(event: unknown): asserts event is string | undefined {
  if (event !== undefined && typeof event !== "string") {
    throw new FanoutServerError("bad_request", "event must be a string");
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export interface RetryOptions {
  /** How long a publish may take, every attempt and backoff included (ms, default 10000); 0 = one attempt. */
  deadline?: number;
  /** The first backoff (ms, default 20); it doubles after each failed attempt. */
  initialBackoff?: number;
  /** The longest backoff (ms, default 1000). */
  maxBackoff?: number;
}

export function retryPolicy(r: RetryOptions | undefined): Required<RetryOptions> {
  return { deadline: r?.deadline ?? 10_000, initialBackoff: r?.initialBackoff ?? 20, maxBackoff: r?.maxBackoff ?? 1000 };
}

/** What the retry loop asks of a transport. */
export interface Attempts<T> {
  /** One attempt, given the ms it may take; rejects with why it failed. */
  attempt(limit: number): Promise<T>;
  /** Throws when resending cannot help; else the wait before the next attempt (held against the deadline). */
  next(error: unknown, attempts: number, backoff: number): number;
  /** The wait actually slept (default: `wait`). */
  jitter?(wait: number): number;
  /** The error thrown when the deadline leaves no room for another attempt. */
  gaveUp(error: unknown, attempts: number, elapsed: number): FanoutServerError;
}

/**
 * Resends one publish (always under the same idempotency `key`) until it succeeds, fails
 * for good, or the policy's deadline passes; the backoff doubles up to `maxBackoff`.
 */
export async function retrying<T>(policy: Required<RetryOptions>, attemptTimeout: number, key: string, a: Attempts<T>): Promise<T> {
  const started = Date.now();
  const deadline = started + policy.deadline;
  let backoff = policy.initialBackoff;
  for (let attempts = 1; ; attempts++) {
    const limit = Math.max(1, Math.min(attemptTimeout, deadline - Date.now()));
    let error: unknown;
    try {
      return await a.attempt(limit);
    } catch (e) {
      error = e;
    }
    const wait = a.next(error, attempts, backoff);
    if (policy.deadline <= 0 || Date.now() + wait >= deadline) {
      const e = a.gaveUp(error, attempts, Date.now() - started);
      e.gaveUp = true;
      e.attempts = attempts;
      e.idempotencyKey = key;
      throw e;
    }
    await sleep(a.jitter ? a.jitter(wait) : wait);
    backoff = Math.min(backoff * 2, policy.maxBackoff);
  }
}

export interface PublishOptions {
  /** The event name subscribers see (`message.event`). */
  event?: string;
  /**
   * The idempotency key (default: a fresh one per call, sent with every retry). Passing
   * the key of an earlier publish (within 5 minutes) applies it at most once.
   */
  idempotencyKey?: string;
}

/** Data of a `progress` message (`status: "running"` is added). */
export interface JobProgress {
  /** Percent done. */
  pct?: number;
  message?: string;
  [field: string]: unknown;
}

export function progressData(progress: JobProgress = {}): Record<string, unknown> {
  if (progress === null || typeof progress !== "object") throw new FanoutServerError("bad_request", "progress must be an object");
  return Object.assign({ status: "running" }, progress, { status: "running" });
}

export function completionData(status: JobStatus, result: unknown): Record<string, unknown> {
  if (!(TERMINAL_STATUSES as readonly string[]).includes(status)) {
    throw new FanoutServerError("bad_request", `job status must be one of ${TERMINAL_STATUSES.join(", ")}, not ${JSON.stringify(status)}`);
  }
  return { status, result: result === undefined ? null : result };
}

/** The methods both publishers share. */
export interface Publisher {
  publish(channel: string, data: unknown, opts?: PublishOptions): Promise<PublishAck>;
  jobProgress(jobId: string | number, progress?: JobProgress, opts?: PublishOptions): Promise<PublishAck>;
  jobCompleted(jobId: string | number, status: JobStatus, result?: unknown, opts?: PublishOptions): Promise<PublishAck>;
  userEvent(user: string | number, event: string, data: unknown, opts?: Omit<PublishOptions, "event">): Promise<PublishAck>;
}

/** What every publish checks before anything is sent: the event, the key (a fresh one by default) and the data's JSON. */
export function preparePublish(data: unknown, opts: PublishOptions): { key: string; json: string } {
  checkEvent(opts.event);
  const key = opts.idempotencyKey ?? newIdempotencyKey();
  checkKey(key);
  return { key, json: encodeData(data) };
}

/** `fields` as a JSON object with `"data":<json>` last, `json` spliced in as is (not parsed and re-encoded). */
export function withData(fields: Record<string, unknown>, json: string): string {
  return `${JSON.stringify(fields).slice(0, -1)},"data":${json}}`;
}

/** The job and user helpers, the same over either transport: each is one `publish`. */
export abstract class PublisherBase implements Publisher {
  abstract publish(channel: string, data: unknown, opts?: PublishOptions): Promise<PublishAck>;

  /** `{"status":"running", pct, message, …}` as event `progress` on `job_progress:<jobId>`. */
  jobProgress(jobId: string | number, progress: JobProgress = {}, opts: PublishOptions = {}): Promise<PublishAck> {
    return this.publish(`job_progress:${jobId}`, progressData(progress), { event: "progress", ...opts });
  }

  /** `{"status", "result"}` as event `completed` on `job_progress:<jobId>`: the job's terminal message. */
  jobCompleted(jobId: string | number, status: JobStatus, result?: unknown, opts: PublishOptions = {}): Promise<PublishAck> {
    return this.publish(`job_progress:${jobId}`, completionData(status, result), { event: "completed", ...opts });
  }

  /** `data` as `event` on `user:<user>`. */
  userEvent(user: string | number, event: string, data: unknown, opts: Omit<PublishOptions, "event"> = {}): Promise<PublishAck> {
    return this.publish(`user:${user}`, data, { ...opts, event });
  }
}
