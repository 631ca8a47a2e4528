/**
 * @fanout/client: the browser and Node client of fanout. Exports the client, its error
 * type and the public types.
 */

export { Fanout } from "./client.js";
export type { StateInfo } from "./client.js";
export { FanoutError } from "./errors.js";
export type { ErrorCode } from "./errors.js";
export { Subscription } from "./subscription.js";
export type { SubscriptionState } from "./subscription.js";
export type {
  FanoutOptions,
  Message,
  Position,
  PresenceClient,
  PresenceResult,
  PublishOptions,
  PublishResult,
  State,
  SubscribeOptions,
  TransportName,
  WebSocketCtor,
  WebSocketLike,
} from "./types.js";
