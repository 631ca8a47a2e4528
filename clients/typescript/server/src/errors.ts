/**
 * The edge's error codes (docs/protocol.md, "Error codes"), plus what this package
 * reports itself: `timeout` (no answer in time) and `unreachable` (no connection).
 * @fanout/client's `ErrorCode` lists the same protocol codes on purpose: neither package
 * depends on the other (the browser SDK has no dependencies; this one needs no browser code).
 */
export type FanoutErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "limit_exceeded"
  | "rate_limited"
  | "too_large"
  | "unavailable"
  | "internal"
  | "not_found"
  | "timeout"
  | "unreachable"
  | (string & {});

/**
 * Every error of this package. `code` is the edge's error code (or `timeout` /
 * `unreachable` / `bad_request` for what is found before anything is sent); `status` the
 * HTTP status when an edge answered, else 0. `retryable`: whether resending the same
 * publish (same idempotency key) may succeed. When `gaveUp` is true the retry deadline
 * passed: the publish may or may not have been applied — resend it with the same
 * `idempotencyKey` (within 5 minutes) to find out without publishing twice.
 */
export class FanoutServerError extends Error {
  override readonly name = "FanoutServerError";
  readonly code: FanoutErrorCode;
  readonly status: number;
  readonly retryable: boolean;
  gaveUp = false;
  attempts = 0;
  /** The idempotency key the publish was sent under (to resend it). */
  idempotencyKey?: string;
  /** `/api/broadcast`: the per-channel results of the last answer, when there was one. */
  results?: BroadcastResult[];

  constructor(code: FanoutErrorCode, message: string, opts: { status?: number; retryable?: boolean; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.code = code;
    this.status = opts.status ?? 0;
    this.retryable = opts.retryable ?? false;
  }
}

/** Where a publication landed. `duplicate`: this idempotency key had already been applied (nothing was published now; offset and epoch are the first publish's). */
export interface PublishAck {
  offset: number;
  epoch: string;
  duplicate?: boolean;
}

export type BroadcastResult =
  | { channel: string; offset: number; epoch: string; duplicate?: boolean }
  | { channel: string; error: { code: string; message: string } };

export interface BroadcastAck {
  results: BroadcastResult[];
  failed: number;
}
