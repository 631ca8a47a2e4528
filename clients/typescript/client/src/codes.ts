/**
 * The close-code table: what the client does when a connection (or an event stream)
 * ends with a given code, as the protocol documents it. Pure, so that the whole table
 * is unit-tested in one place.
 */

/**
 * - `soon`: the node is draining; reconnect at once (jittered, so a node's clients do
 *   not all arrive elsewhere together) and recover.
 * - `backoff`: reconnect with backoff and recover.
 * - `slow`: the client itself was too much (rate or connection limits): back off longer.
 * - `token`: the token expired; get a new one and reconnect.
 * - `token_once`: the token was refused; get a new one once, and stop if that fails too.
 *   (The client also stops when a token fresh from getToken is refused as expired: it
 *   would loop.)
 * - `stop`: never retry (a client bug, a policy, an administrator).
 */
export type CloseAction = "soon" | "backoff" | "slow" | "token" | "token_once" | "stop";

const TABLE: Record<number, CloseAction> = {
  1001: "soon",
  1002: "stop",
  1007: "stop",
  1008: "stop",
  1009: "stop",
  4001: "token_once",
  4003: "stop",
  4004: "token",
  4008: "slow",
  4010: "stop",
};

/** What to do after a close with `code`; anything unlisted (1006, 1011, 1013, 4009 …) backs off. */
export function closeAction(code: number): CloseAction {
  return TABLE[code] ?? "backoff";
}

/**
 * The close code an HTTP refusal of an event stream stands for: the stream's refusals
 * come as statuses before any event, and are handled like the WebSocket's close codes.
 */
export function statusCloseCode(status: number): number {
  if (status === 401) return 4001;
  if (status === 400 || status === 403) return 4003;
  if (status === 429) return 4008;
  return 1013;
}
