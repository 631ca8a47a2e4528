/**
 * Reconnect delays: full-jitter exponential backoff (a uniform draw below a cap that
 * doubles per attempt), so that many clients losing one node spread out instead of
 * arriving together.
 */

/** Delay before reconnect attempt `attempt` (0-based), in ms: uniform in [0, min(max, min·2^attempt)). */
export function backoff(attempt: number, min: number, max: number, random = Math.random): number {
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** After a drain: reconnect at once but spread over a second. */
export function soon(random = Math.random): number {
  return Math.floor(random() * 1000);
}
