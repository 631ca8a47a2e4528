/**
 * Test support: the real `fanout-edge` binary (and, for recovery across a restart, a
 * real `redis-server`) on free ports, HS256 tokens minted with node:crypto, and the
 * edge's server API. Every process started here is stopped by `stopAll()`.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { request } from "node:http";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repo = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../../../..");
export const EDGE_BIN = process.env.FANOUT_EDGE_BIN || join(repo, "target/debug/fanout-edge");
export const REDIS_BIN = process.env.REDIS_SERVER_BIN || "/usr/bin/redis-server";
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

export function requireEdge(): void {
  if (!existsSync(EDGE_BIN)) {
    throw new Error(
      `fanout-edge not found at ${EDGE_BIN}: build it first (cargo build -p fanout-edge at the repository root) or set FANOUT_EDGE_BIN`,
    );
  }
}

const live = new Set<ChildProcess>();
const dirs: string[] = [];

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "fanout-ts-"));
  dirs.push(d);
  return d;
}

export async function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.on("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => ok(port));
    });
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls until `f` returns a truthy value (or throws after `ms`). */
export async function until<T>(f: () => T | Promise<T>, ms = 5000, what = "condition"): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export class Edge {
  proc!: ChildProcess;
  log = "";
  constructor(
    readonly port: number,
    readonly redisUrl?: string,
  ) {}

  get url(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }
  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  static async start(opts: { port?: number; redisUrl?: string } = {}): Promise<Edge> {
    const e = new Edge(opts.port ?? (await freePort()), opts.redisUrl);
    await e.spawn();
    return e;
  }

  async spawn(): Promise<void> {
    requireEdge();
    const cfg = join(tempDir(), "edge.toml");
    writeFileSync(cfg, CONFIG);
    const args = ["--listen", `127.0.0.1:${this.port}`, "--jwt-secret", SECRET, "--admin-token", ADMIN];
    args.push("--config", cfg, "--drain-secs", "0", "--node-id", `edge-${this.port}`);
    if (this.redisUrl) args.push("--redis-url", this.redisUrl);
    const env: NodeJS.ProcessEnv = { ...process.env, FANOUT_LOG: "warn" };
    delete env.FANOUT_JWT_SECRET;
    delete env.FANOUT_ADMIN_TOKEN;
    this.proc = spawn(EDGE_BIN, args, { stdio: ["ignore", "pipe", "pipe"], env });
    live.add(this.proc);
    this.proc.stdout!.on("data", (d) => (this.log += d));
    this.proc.stderr!.on("data", (d) => (this.log += d));
    const proc = this.proc;
    await until(
      async () => {
        if (proc.exitCode !== null) throw new Error(`fanout-edge exited (${proc.exitCode}):\n${this.log}`);
        try {
          return (await httpJson("GET", `${this.http}/readyz`)).status === 200;
        } catch {
          return false;
        }
      },
      10_000,
      "fanout-edge to be ready",
    );
  }

  /** SIGTERM (a drain: every connection closed with 1001) and wait for the exit. */
  async stop(): Promise<void> {
    await kill(this.proc);
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

/**
 * One HTTP request without keep-alive: an idle pooled connection (as `fetch` keeps
 * for 4 s) would hold up the edge's graceful shutdown, which waits for its
 * connections.
 */
export function httpJson(method: string, url: string, body?: unknown, token?: string): Promise<{ status: number; body: any }> {
  return new Promise((ok, fail) => {
    const headers: Record<string, string> = { connection: "close" };
    if (token) headers.authorization = `Bearer ${token}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const req = request(url, { method, headers, agent: false }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (text += d));
      res.on("end", () => {
        let json: unknown = text;
        try {
          json = JSON.parse(text);
        } catch {
          // Not JSON: kept as text.
        }
        ok({ status: res.statusCode ?? 0, body: json });
      });
    });
    req.on("error", fail);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

export async function kill(p: ChildProcess | undefined, signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
  if (!p || p.exitCode !== null || p.signalCode !== null) return void live.delete(p!);
  const gone = new Promise<void>((r) => p.once("exit", () => r()));
  p.kill(signal);
  const t = setTimeout(() => p.kill("SIGKILL"), 5000);
  await gone;
  clearTimeout(t);
  live.delete(p);
}

/** A throwaway `redis-server` without persistence on a free port (never 6379). */
export async function startRedis(): Promise<{ url: string; proc: ChildProcess }> {
  if (!existsSync(REDIS_BIN)) throw new Error(`redis-server not found at ${REDIS_BIN}; set REDIS_SERVER_BIN`);
  const port = await freePort();
  const dir = tempDir();
  const proc = spawn(REDIS_BIN, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], {
    stdio: "ignore",
  });
  live.add(proc);
  const { Socket } = await import("node:net");
  await until(
    () =>
      new Promise<boolean>((ok) => {
        const s = new Socket();
        s.once("error", () => ok(false));
        s.connect(port, "127.0.0.1", () => {
          s.write("PING\r\n");
          s.once("data", (d) => {
            s.destroy();
            ok(String(d).startsWith("+PONG"));
          });
        });
      }),
    10_000,
    "redis-server",
  );
  return { url: `redis://127.0.0.1:${port}`, proc };
}

export async function stopAll(): Promise<void> {
  await Promise.all([...live].map((p) => kill(p, "SIGKILL")));
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
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
