import { createHash } from "node:crypto";
import { Redis, Cluster, type RedisOptions, type ClusterOptions } from "ioredis";
import {
  checkChannel,
  newEpoch,
  preparePublish,
  PublisherBase,
  retrying,
  retryPolicy,
  sleep,
  TERMINAL_STATUSES,
  withData,
  type PublishOptions,
  type RetryOptions,
} from "./common.js";
import { FanoutServerError, type PublishAck } from "./errors.js";
import { PUBLISH_SCRIPT } from "./publish-script.generated.js";
import { describeHosts, parseRedisUrl, type RedisTarget } from "./redis-url.js";

export { PUBLISH_SCRIPT };

/** How much history a namespace keeps. */
export interface HistoryPolicy {
  /** Messages kept; 0 keeps none (offsets and epoch are still assigned). */
  size: number;
  /** Seconds history (and offset/epoch) outlives the last publish. */
  ttlSecs: number;
  /** `job_progress`: seconds a finished job's history lives after its terminal message (default: `ttlSecs`). */
  finishedTtlSecs?: number;
}

export interface RedisPublisherOptions {
  /** Retries (default: 10 s deadline, backoff 20 ms doubling to 1 s, ±25 % jitter), and `attemptTimeout` (ms one attempt may go unanswered, default 2000). */
  retry?: RetryOptions & { attemptTimeout?: number };
  /** Ms `connect()` waits for Redis to be ready before it fails (default 10000). */
  connectTimeout?: number;
  /** History for namespaces without a policy of their own (default 100 messages, 3600 s). */
  defaultHistory?: HistoryPolicy;
  /** Per-namespace history, e.g. `{ chat: { size: 500, ttlSecs: 86400 } }` (built in: `job_progress` 100 / 24 h / finished 1 h). Keep it equal to the edge's `[namespaces.*]`. */
  history?: Record<string, HistoryPolicy>;
  /** How long (s, default 300) and how many (default 10000) idempotency keys a channel remembers. */
  dedup?: { windowSecs?: number; maxKeys?: number };
  /** Extra ioredis options (for all node connections). */
  redisOptions?: RedisOptions;
}

const TRANSIENT_REPLIES = new Set(["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN", "READONLY", "BUSY"]);

/**
 * Whether resending the same publish (same key) may succeed: lost connections, timeouts,
 * cluster redirections and transitions. Script errors, authentication and other replies
 * are not.
 */
export function isTransientRedisError(e: unknown): boolean {
  if (e instanceof FanoutServerError) return e.retryable;
  const err = e as { name?: string; message?: string };
  if (err?.name === "ReplyError") {
    const first = String(err.message ?? "").split(/\s/, 1)[0] ?? "";
    return TRANSIENT_REPLIES.has(first);
  }
  // Anything else ioredis rejects with is about the connection: closed, reset,
  // refused, MaxRetriesPerRequestError, ClusterAllFailedError, too many redirections.
  return true;
}

const BUILTIN_HISTORY: Record<string, HistoryPolicy> = {
  job_progress: { size: 100, ttlSecs: 24 * 3600, finishedTtlSecs: 3600 },
};

/**
 * Publishes straight into Redis with fanout's publish script
 * (crates/fanout-protocol/src/publish.lua, bundled): the same offsets, epochs, history
 * and idempotency as the edge and the Rust publisher. One idempotency key per publish,
 * resent through failovers, so a publish is applied at most once.
 */
export class RedisPublisher extends PublisherBase {
  /** The ioredis client (a `Cluster` for `redis-cluster://`). */
  readonly client: Redis | Cluster;
  readonly target: RedisTarget;
  private readonly sha = createHash("sha1").update(PUBLISH_SCRIPT).digest("hex");
  private readonly sharded: boolean;
  private readonly retry: Required<RetryOptions> & { attemptTimeout: number };
  private readonly defaultHistory: HistoryPolicy;
  private readonly history: Record<string, HistoryPolicy>;
  private readonly dedupWindow: number;
  private readonly dedupMaxKeys: number;
  private lastError: unknown;

  private constructor(client: Redis | Cluster, target: RedisTarget, opts: RedisPublisherOptions) {
    super();
    this.client = client;
    this.target = target;
    this.sharded = target.kind === "cluster";
    this.retry = { ...retryPolicy(opts.retry), attemptTimeout: opts.retry?.attemptTimeout ?? 2000 };
    this.defaultHistory = opts.defaultHistory ?? { size: 100, ttlSecs: 3600 };
    this.history = { ...BUILTIN_HISTORY, ...opts.history };
    this.dedupWindow = Math.max(1, Math.floor(opts.dedup?.windowSecs ?? 300));
    this.dedupMaxKeys = Math.max(1, Math.floor(opts.dedup?.maxKeys ?? 10_000));
    for (const [ns, p] of Object.entries({ default: this.defaultHistory, ...this.history })) checkPolicy(ns, p);
  }

  /**
   * Connects to `redis://`, `rediss://`, `redis-cluster://h1:p1,h2:p2` or
   * `redis-sentinel://s1:p1,s2:p2/<service>` and waits until Redis is ready (at most
   * `connectTimeout`). Afterwards it reconnects by itself, and in a cluster follows
   * failovers and slot moves.
   */
  static async connect(url: string, opts: RedisPublisherOptions = {}): Promise<RedisPublisher> {
    const target = parseRedisUrl(url);
    const base: RedisOptions = {
      username: target.username,
      password: target.password,
      tls: target.tls ? {} : undefined,
      connectTimeout: 2000,
      // Reconnect quickly; commands queued meanwhile fail after 2 reconnect attempts,
      // and the publisher resends them under their key.
      retryStrategy: (n: number) => Math.min(n * 50, 1000),
      maxRetriesPerRequest: 2,
      ...opts.redisOptions,
    };
    let client: Redis | Cluster;
    if (target.kind === "cluster") {
      const clusterOpts: ClusterOptions = {
        redisOptions: base,
        scaleReads: "master",
        clusterRetryStrategy: (n: number) => Math.min(n * 50, 1000),
        retryDelayOnFailover: 50,
        retryDelayOnClusterDown: 50,
        retryDelayOnTryAgain: 50,
        slotsRefreshTimeout: 2000,
        lazyConnect: true,
      };
      client = new Cluster(target.hosts, clusterOpts);
    } else if (target.kind === "sentinel") {
      client = new Redis({
        ...base,
        sentinels: target.hosts,
        name: target.service!,
        db: target.db ?? 0,
        enableTLSForSentinelMode: target.tls,
        sentinelRetryStrategy: (n: number) => Math.min(n * 50, 1000),
        failoverDetector: true,
        lazyConnect: true,
      });
    } else {
      client = new Redis({ ...base, host: target.hosts[0]!.host, port: target.hosts[0]!.port, db: target.db ?? 0, lazyConnect: true });
    }
    const publisher = new RedisPublisher(client, target, opts);
    client.on("error", (e) => (publisher.lastError = e));
    await publisher.waitReady(opts.connectTimeout ?? 10_000);
    return publisher;
  }

  private async waitReady(ms: number): Promise<void> {
    const client = this.client;
    let timer: NodeJS.Timeout | undefined;
    const ready = new Promise<void>((ok, fail) => {
      client.once("ready", ok);
      timer = setTimeout(() => fail(new Error("timeout")), ms);
      client.connect().catch((e: unknown) => (this.lastError = e));
    });
    try {
      await ready;
    } catch {
      client.disconnect();
      const why = this.lastError ? `: ${(this.lastError as Error).message}` : "";
      throw new FanoutServerError(
        "unreachable",
        `could not connect to Redis (${this.target.kind}) at ${describeHosts(this.target)} within ${ms} ms${why}`,
        { retryable: true, cause: this.lastError },
      );
    } finally {
      clearTimeout(timer);
    }
  }

  /** Closes the connection(s). */
  async close(): Promise<void> {
    try {
      await Promise.race([this.client.quit(), sleep(2000).then(() => Promise.reject(new Error("quit timed out")))]);
    } catch {
      this.client.disconnect();
    }
  }

  /** The history kept for channels of `namespace`. */
  historyFor(namespace: string): HistoryPolicy {
    return this.history[namespace] ?? this.defaultHistory;
  }

  /** Publishes `data` on `channel`; resolves with where it landed. */
  override async publish(channel: string, data: unknown, opts: PublishOptions = {}): Promise<PublishAck> {
    checkChannel(channel);
    const { key, json } = preparePublish(data, opts);
    const policy = this.historyFor(channel.slice(0, channel.indexOf(":")));
    // Made once: every resend carries the same body (and ts), epoch and key.
    const head: Record<string, unknown> = { fanout: 1, ts: Date.now() };
    if (opts.event) head.event = opts.event;
    const body = withData(head, json);
    const keys = [`fanout:{${channel}}:meta`, `fanout:{${channel}}:history`, `fanout:{${channel}}:dedup`];
    const args = [
      channel,
      body,
      String(Math.floor(policy.size)),
      String(Math.max(1, Math.floor(policy.ttlSecs))),
      newEpoch(),
      this.sharded ? "1" : "0",
      String(finishedTtl(channel, data, policy)),
      key,
      String(this.dedupWindow),
      String(this.dedupMaxKeys),
    ];
    return this.run(channel, keys, args, key);
  }

  private run(channel: string, keys: string[], args: string[], key: string): Promise<PublishAck> {
    return retrying(this.retry, this.retry.attemptTimeout, key, {
      attempt: async (limit) => parseAck(await withTimeout(this.evalScript(keys, args), limit, this.target)),
      next: (error, _attempts, backoff) => {
        if (!isTransientRedisError(error)) {
          if (error instanceof FanoutServerError) throw error;
          throw new FanoutServerError("internal", `redis (${describeHosts(this.target)}): ${(error as Error).message}`, { cause: error });
        }
        return backoff;
      },
      jitter: (wait) => wait * (0.75 + Math.random() * 0.5),
      gaveUp: (error, attempts, elapsed) =>
        new FanoutServerError(
          "unavailable",
          `publish on ${channel} not acknowledged by Redis at ${describeHosts(this.target)} after ${attempts} attempt(s) in ${elapsed} ms ` +
            `(retry deadline); it may or may not have been applied — resend it with idempotencyKey "${key}" to find out without publishing twice; ` +
            `last error: ${(error as Error)?.message ?? error}`,
          { retryable: true, cause: error },
        ),
    });
  }

  /** One attempt: EVALSHA, or EVAL when Redis does not have the script (NOSCRIPT). */
  private async evalScript(keys: string[], args: string[]): Promise<unknown> {
    try {
      return await this.client.evalsha(this.sha, keys.length, ...keys, ...args);
    } catch (e) {
      if (/^NOSCRIPT/.test((e as Error)?.message ?? "")) return await this.client.eval(PUBLISH_SCRIPT, keys.length, ...keys, ...args);
      throw e;
    }
  }
}

function checkPolicy(ns: string, p: HistoryPolicy): void {
  const ok =
    p &&
    Number.isFinite(p.size) &&
    p.size >= 0 &&
    Number.isFinite(p.ttlSecs) &&
    p.ttlSecs > 0 &&
    (p.finishedTtlSecs === undefined || (Number.isFinite(p.finishedTtlSecs) && p.finishedTtlSecs > 0));
  if (!ok) throw new FanoutServerError("bad_request", `history policy of ${ns}: size ≥ 0 and ttlSecs > 0 (seconds) are required, got ${JSON.stringify(p)}`);
}

/** The TTL a terminal `job_progress` message gives its channel's history, else 0. */
function finishedTtl(channel: string, data: unknown, policy: HistoryPolicy): number {
  if (policy.finishedTtlSecs === undefined || !channel.startsWith("job_progress:")) return 0;
  const status = data !== null && typeof data === "object" && !Array.isArray(data) ? (data as { status?: unknown }).status : undefined;
  return typeof status === "string" && (TERMINAL_STATUSES as readonly string[]).includes(status) ? Math.max(1, Math.floor(policy.finishedTtlSecs)) : 0;
}

function parseAck(reply: unknown): PublishAck {
  if (!Array.isArray(reply) || (reply.length !== 2 && reply.length !== 3)) {
    throw new FanoutServerError("internal", `unexpected reply from the publish script: ${JSON.stringify(reply)}`);
  }
  const offset = Number(reply[0]);
  const epoch = String(reply[1]);
  if (!Number.isSafeInteger(offset) || offset < 0) throw new FanoutServerError("internal", `unexpected offset from the publish script: ${String(reply[0])}`);
  return Number(reply[2]) === 1 ? { offset, epoch, duplicate: true } : { offset, epoch };
}

function withTimeout<T>(p: Promise<T>, ms: number, target: RedisTarget): Promise<T> {
  let timer: NodeJS.Timeout;
  p.catch(() => {}); // a late rejection of an abandoned attempt is not unhandled
  return Promise.race([
    p,
    new Promise<never>((_, fail) => {
      timer = setTimeout(
        () => fail(new FanoutServerError("timeout", `Redis at ${describeHosts(target)} did not answer within ${ms} ms`, { retryable: true })),
        ms,
      );
    }),
  ]).finally(() => clearTimeout(timer));
}
