/**
 * Idempotency keys for publishes: 128 random bits as 32 hex characters.
 * `crypto.getRandomValues` rather than `randomUUID`, which browsers offer only in
 * secure contexts (a page on plain http from another host has none).
 */
export function newKey(random: (a: Uint8Array) => Uint8Array = (a) => globalThis.crypto.getRandomValues(a)): string {
  let s = "";
  for (const b of random(new Uint8Array(16))) s += (b < 16 ? "0" : "") + b.toString(16);
  return s;
}
