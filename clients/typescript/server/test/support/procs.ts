/**
 * Test support: real redis-servers (single and a 3 + 3 cluster) and real fanout-edge
 * processes on ports chosen at run time (never 6379), and a WebSocket subscriber.
 * `stopAll()` stops every process started here.
 */
import { spawn, execFile, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { WebSocket } from "ws";

const repo = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../../../..");
export const REPO = repo;
export const EDGE_BIN = process.env.FANOUT_EDGE_BIN || join(repo, "target/debug/fanout-edge");
export const REDIS_BIN = process.env.REDIS_SERVER_BIN || "/usr/bin/redis-server";
export const REDIS_CLI = process.env.REDIS_CLI_BIN || "/usr/bin/redis-cli";
export const SECRET = "server-test-secret-0123456789abcdef";
export const ADMIN = "server-test-admin-0123456789";

const live = new Set<ChildProcess>();
const dirs: string[] = [];

export function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "fanout-server-ts-"));
  dirs.push(d);
  return d;
}

function bindable(port: number): Promise<boolean> {
  return new Promise((ok) => {
    const s = createServer();
    s.once("error", () => ok(false));
    s.listen(port, "127.0.0.1", () => s.close(() => ok(true)));
  });
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

/** A port p (never 6379) with p + 10000 free too (the cluster bus port). */
async function freeClusterPort(taken: Set<number>): Promise<number> {
  for (;;) {
    const p = 20000 + Math.floor(Math.random() * 25000);
    if (p === 6379 || taken.has(p) || taken.has(p + 10000)) continue;
    if ((await bindable(p)) && (await bindable(p + 10000))) {
      taken.add(p);
      return p;
    }
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function until<T>(f: () => T | Promise<T>, ms = 5000, what = "condition"): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
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

export const execCli = async (port: number, ...args: string[]): Promise<string> =>
  (await promisify(execFile)(REDIS_CLI, ["-h", "127.0.0.1", "-p", String(port), ...args])).stdout;

export interface RedisProc {
  port: number;
  url: string;
  proc: ChildProcess;
}

/** A redis-server without persistence on a free port (never 6379). */
export async function startRedis(extra: string[] = [], port?: number): Promise<RedisProc> {
  port ??= await freePort();
  const dir = tempDir();
  const proc = spawn(REDIS_BIN, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir, ...extra], {
    stdio: "ignore",
  });
  live.add(proc);
  await until(() => ping(port!), 10_000, `redis-server on ${port}`);
  return { port, url: `redis://127.0.0.1:${port}`, proc };
}

/** Redis Cluster: 3 primaries + 3 replicas, every slot covered. */
export async function startCluster(): Promise<{ nodes: RedisProc[]; url: string }> {
  const taken = new Set<number>();
  const ports: number[] = [];
  for (let i = 0; i < 6; i++) ports.push(await freeClusterPort(taken));
  const nodes = await Promise.all(
    ports.map((p) =>
      startRedis(["--cluster-enabled", "yes", "--cluster-config-file", `nodes-${p}.conf`, "--cluster-node-timeout", "2000"], p),
    ),
  );
  await execCli(ports[0]!, "--cluster", "create", ...ports.map((p) => `127.0.0.1:${p}`), "--cluster-replicas", "1", "--cluster-yes");
  await until(
    async () => {
      for (const p of ports) {
        const info = await execCli(p, "cluster", "info");
        if (!info.includes("cluster_state:ok")) return false;
        // Every node knows all 6 (replicas included) before tests rely on them.
        if (!info.includes("cluster_known_nodes:6")) return false;
      }
      const nodesOut = await execCli(ports[0]!, "cluster", "nodes");
      if (nodesOut.split("\n").filter((l) => l.includes("slave")).length !== 3) return false;
      // Replicas in sync (a manual failover waits for that, and gives up after 5 s).
      for (const p of ports) {
        const repl = await execCli(p, "info", "replication");
        if (repl.includes("role:slave") && !repl.includes("master_link_status:up")) return false;
      }
      return true;
    },
    20_000,
    "the cluster to be ok",
  );
  return { nodes, url: `redis-cluster://${ports.map((p) => `127.0.0.1:${p}`).join(",")}` };
}

export class Edge {
  proc!: ChildProcess;
  log = "";
  constructor(
    readonly port: number,
    readonly args: string[],
  ) {}

  get ws(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }
  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts an edge; `args` beyond --listen (defaults: the test secret and admin token). */
  static async start(opts: { port?: number; redisUrl?: string; args?: string[]; secret?: boolean } = {}): Promise<Edge> {
    const args = [...(opts.secret === false ? [] : ["--jwt-secret", SECRET]), "--admin-token", ADMIN, ...(opts.args ?? [])];
    if (opts.redisUrl) args.push("--redis-url", opts.redisUrl);
    const e = new Edge(opts.port ?? (await freePort()), args);
    await e.spawn();
    return e;
  }

  async spawn(): Promise<void> {
    const args = ["--listen", `127.0.0.1:${this.port}`, "--drain-secs", "0", "--node-id", `edge-${this.port}`, ...this.args];
    const env: NodeJS.ProcessEnv = { ...process.env, FANOUT_LOG: "warn" };
    for (const k of Object.keys(env)) if (k.startsWith("FANOUT_") && k !== "FANOUT_LOG") delete env[k];
    this.proc = spawn(EDGE_BIN, args, { stdio: ["ignore", "pipe", "pipe"], env });
    live.add(this.proc);
    this.proc.stdout!.on("data", (d) => (this.log += d));
    this.proc.stderr!.on("data", (d) => (this.log += d));
    const proc = this.proc;
    await until(
      async () => {
        if (proc.exitCode !== null) throw new Error(`fanout-edge exited (${proc.exitCode}):\n${this.log}`);
        try {
          const r = await fetch(`${this.http}/readyz`, { headers: { connection: "close" } });
          await r.text();
          return r.status === 200;
        } catch {
          return false;
        }
      },
      10_000,
      "fanout-edge to be ready",
    );
  }

  async stop(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    await kill(this.proc, signal);
  }
}

export interface Frame {
  type: string;
  [k: string]: any;
}

/** A WebSocket client of the edge that records every frame. */
export class Sub {
  frames: Frame[] = [];
  closed?: { code: number; reason: string };
  private constructor(readonly ws: WebSocket) {
    ws.on("message", (d) => this.frames.push(JSON.parse(String(d))));
    ws.on("close", (code, reason) => (this.closed = { code, reason: String(reason) }));
  }

  static async open(url: string, token: string): Promise<Sub> {
    const ws = new WebSocket(`${url}?token=${encodeURIComponent(token)}`, "fanout.json");
    const s = new Sub(ws);
    await new Promise<void>((ok, fail) => {
      ws.once("open", () => ok());
      ws.once("error", fail);
      ws.once("close", () => ok());
    });
    return s;
  }

  async connected(): Promise<Frame> {
    const f = await until(
      () => this.frames.find((f) => f.type === "connected") ?? (this.closed && Promise.reject(new Error(`closed ${this.closed.code} ${this.closed.reason}`))),
      5000,
      "connected",
    );
    return f!;
  }

  async subscribe(channel: string, extra: Record<string, unknown> = {}): Promise<Frame> {
    const id = Math.floor(Math.random() * 1e9);
    this.ws.send(JSON.stringify({ type: "subscribe", id, channel, ...extra }));
    return (await until(() => this.frames.find((f) => f.id === id), 5000, `answer to subscribe ${channel}`))!;
  }

  messages(channel: string): Frame[] {
    return this.frames.filter((f) => f.type === "message" && f.channel === channel);
  }

  close(): void {
    this.ws.close();
  }
}
