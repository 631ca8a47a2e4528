/**
 * Test support: the real `fanout-edge` binary (and, for recovery across a restart, a
 * real `redis-server`) on free ports, HS256 tokens minted with node:crypto, and the
 * edge's server API. Every process started here is stopped by `stopAll()`.
 */

import { createHmac } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { EdgeProcess, freePort, httpJson, tempDir } from "./processes.js";

export { requireEdge, sleep, startRedis, stopAll, until } from "./processes.js";
export const SECRET = "test-secret-0123456789abcdef";
export const ADMIN = "test-admin-token-0123456789";

/** A namespace open to every authenticated user, client publishing and presence on. */
const CONFIG = `
[limits]
ping_interval_secs = 2

[namespaces.chat]
subscribe = "authenticated"
publish = "authenticated"
presence = true
`;

export class Edge extends EdgeProcess {
  constructor(
    port: number,
    readonly redisUrl?: string,
  ) {
    super(port);
  }

  get url(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  static async start(opts: { port?: number; redisUrl?: string } = {}): Promise<Edge> {
    const e = new Edge(opts.port ?? (await freePort()), opts.redisUrl);
    await e.spawn();
    return e;
  }

  protected flags(): string[] {
    const cfg = join(tempDir(), "edge.toml");
    writeFileSync(cfg, CONFIG);
    const args = ["--jwt-secret", SECRET, "--admin-token", ADMIN, "--config", cfg];
    if (this.redisUrl) args.push("--redis-url", this.redisUrl);
    return args;
  }

  async api(path: string, body?: unknown): Promise<any> {
    const r = await httpJson(body === undefined ? "GET" : "POST", this.http + path, body, ADMIN);
    if (r.status !== 200) throw new Error(`${path}: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  publish(channel: string, data: unknown, event?: string): Promise<{ offset: number; epoch: string }> {
    return this.api("/api/publish", event ? { channel, data, event } : { channel, data });
  }
}

function b64url(s: string): string {
  return Buffer.from(s).toString("base64url");
}

/** An HS256 connection token for `sub`, valid `ttl` seconds. */
export function mint(sub: string, ttl = 3600, claims: Record<string, unknown> = {}): string {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + ttl, ...claims }));
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}
