/**
 * Test support shared by the client's tests and @fanout/server's (its
 * test/support/procs.ts imports this file): free ports, polling, a real `redis-server`
 * and the real `fanout-edge` on them. Every process started here, or handed to
 * `track()`, is stopped by `stopAll()`.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { request } from "node:http";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../../../..");
export const EDGE_BIN = process.env.FANOUT_EDGE_BIN || join(REPO, "target/debug/fanout-edge");
export const REDIS_BIN = process.env.REDIS_SERVER_BIN || "/usr/bin/redis-server";

export function requireEdge(): void {
  if (!existsSync(EDGE_BIN)) {
    throw new Error(
      `fanout-edge not found at ${EDGE_BIN}: build it first (cargo build -p fanout-edge at the repository root) or set FANOUT_EDGE_BIN`,
    );
  }
}

const live = new Set<ChildProcess>();
const dirs: string[] = [];

/** Has `stopAll()` kill `p`. */
export function track(p: ChildProcess): ChildProcess {
  live.add(p);
  return p;
}

/** A fresh directory, removed by `stopAll()`. */
export function tempDir(): string {
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

export async function kill(p: ChildProcess | undefined, signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
  if (!p) return;
  if (p.exitCode !== null || p.signalCode !== null) return void live.delete(p);
  const gone = new Promise<void>((r) => p.once("exit", () => r()));
  p.kill(signal);
  const t = setTimeout(() => p.kill("SIGKILL"), 5000);
  await gone;
  clearTimeout(t);
  live.delete(p);
}

export async function stopAll(): Promise<void> {
  await Promise.all([...live].map((p) => kill(p, "SIGKILL")));
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
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

function ping(port: number): Promise<boolean> {
  return new Promise((ok) => {
    const s = new Socket();
    s.once("error", () => ok(false));
    s.connect(port, "127.0.0.1", () => {
      s.write("PING\r\n");
      s.once("data", (d) => {
        s.destroy();
        ok(String(d).startsWith("+PONG"));
      });
    });
  });
}

export interface RedisProc {
  port: number;
  url: string;
  proc: ChildProcess;
}

/** A throwaway `redis-server` without persistence on `port` or a free one (never 6379). */
export async function startRedis(extra: string[] = [], port?: number): Promise<RedisProc> {
  if (!existsSync(REDIS_BIN)) throw new Error(`redis-server not found at ${REDIS_BIN}; set REDIS_SERVER_BIN`);
  const p = port ?? (await freePort());
  const dir = tempDir();
  const args = ["--port", String(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir, ...extra];
  const proc = track(spawn(REDIS_BIN, args, { stdio: "ignore" }));
  await until(() => ping(p), 10_000, `redis-server on ${p}`);
  return { port: p, url: `redis://127.0.0.1:${p}`, proc };
}

/** A `fanout-edge` on `port`; each package's `Edge` says which flags it runs with. */
export abstract class EdgeProcess {
  proc!: ChildProcess;
  log = "";
  constructor(readonly port: number) {}

  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The flags after `--listen`, `--drain-secs 0` and `--node-id`. */
  protected abstract flags(): string[];

  /** Starts (or, after `stop()`, restarts) the edge and waits until it is ready. */
  async spawn(): Promise<void> {
    requireEdge();
    const args = ["--listen", `127.0.0.1:${this.port}`, "--drain-secs", "0", "--node-id", `edge-${this.port}`, ...this.flags()];
    // Only the flags configure it, not a FANOUT_* of the environment the tests run in.
    const env: NodeJS.ProcessEnv = { ...process.env, FANOUT_LOG: "warn" };
    for (const k of Object.keys(env)) if (k.startsWith("FANOUT_") && k !== "FANOUT_LOG") delete env[k];
    const proc = track(spawn(EDGE_BIN, args, { stdio: ["ignore", "pipe", "pipe"], env }));
    this.proc = proc;
    proc.stdout!.on("data", (d) => (this.log += d));
    proc.stderr!.on("data", (d) => (this.log += d));
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

  /** SIGTERM is a drain (every connection closed with 1001); waits for the exit. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    await kill(this.proc, signal);
  }
}
