/**
 * Token expiry: the `exp` claim of a JWT, read without verifying (the edge verifies),
 * and when to fetch the next token so that it arrives before the edge closes the
 * connection with 4004.
 */

/** The `exp` claim (seconds since the epoch) of a JWT, or null when it has none or is not a JWT. */
export function tokenExp(token: string): number | null {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(b64 + "===".slice((b64.length + 3) % 4));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" && isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/**
 * Milliseconds from `now` until the token should be replaced: 30 s or a tenth of its
 * remaining life before `exp`, whichever is nearer to `exp` (a short-lived token is not
 * refreshed at once), never less than 1 s (no tight loop on a token that is already
 * due). Null when the token carries no `exp`.
 */
export function refreshDelay(token: string, now = Date.now()): number | null {
  const exp = tokenExp(token);
  if (exp === null) return null;
  const left = exp * 1000 - now;
  return Math.max(1000, left - Math.min(30_000, left / 10));
}
