/**
 * `@fanout/server`: what backends and workers use to publish fanout events — over the
 * edge's HTTP API ({@link HttpPublisher}) or straight into Redis ({@link RedisPublisher}),
 * each publish applied exactly once through retries — and to mint the JWTs browsers
 * connect and subscribe with ({@link connectionToken}, {@link subscriptionToken}).
 */
export { HttpPublisher, type HttpPublisherOptions } from "./http.js";
export { RedisPublisher, isTransientRedisError, PUBLISH_SCRIPT, type HistoryPolicy, type RedisPublisherOptions } from "./redis.js";
export { parseRedisUrl, type RedisTarget } from "./redis-url.js";
export {
  connectionToken,
  subscriptionToken,
  MIN_HS256_SECRET_BYTES,
  type ConnectionTokenOptions,
  type SubscriptionTokenOptions,
  type SigningKey,
  type TokenAlgorithm,
  type TokenOptions,
} from "./tokens.js";
export { FanoutServerError, type FanoutErrorCode, type PublishAck, type BroadcastAck, type BroadcastResult } from "./errors.js";
export {
  channelError,
  newIdempotencyKey,
  validIdempotencyKey,
  MAX_CHANNEL_LEN,
  MAX_IDEMPOTENCY_KEY_LEN,
  TERMINAL_STATUSES,
  type JobProgress,
  type JobStatus,
  type Publisher,
  type PublishOptions,
  type RetryOptions,
} from "./common.js";

import * as tokens from "./tokens.js";
/** The token functions as one namespace: `tokens.connectionToken(…)`. */
export { tokens };
