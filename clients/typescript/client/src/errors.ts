/**
 * FanoutError: the one error type the SDK rejects with and reports. Its `code` is a
 * protocol error code (from an `error` frame or an HTTP error body) or one of the
 * client's own (`timeout`, `closed`, `queue_full`, `disconnected`).
 */

export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "limit_exceeded"
  | "rate_limited"
  | "too_large"
  | "unavailable"
  | "internal"
  // Client-side codes.
  | "timeout"
  | "closed"
  | "queue_full"
  | "disconnected"
  | "transport";

export class FanoutError extends Error {
  override readonly name = "FanoutError";
  /** The close code of the connection, when the error ended one. */
  closeCode?: number;
  /** The HTTP status, for an error answered by an HTTP command or a refused event stream. */
  status?: number;

  constructor(
    readonly code: ErrorCode | (string & {}),
    message?: string,
    closeCode?: number,
  ) {
    super(message || code);
    if (closeCode !== undefined) this.closeCode = closeCode;
  }
}
