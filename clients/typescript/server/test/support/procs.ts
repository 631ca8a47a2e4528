/**
 * Test support: real redis-servers (single and a 3 + 3 cluster) and real fanout-edge
 * processes on ports chosen at run time (never 6379), and a WebSocket subscriber.
 * `stopAll()` stops every process started here. What the client package's tests need
 * too (ports, polling, processes, redis-server, the edge process) is theirs, imported.
 */
import { execFile } from "node:child_process";
import { createServer } from "node:net";
import { promisify } from "node:util";
import { WebSocket } from "ws";
import { EdgeProcess, freePort, startRedis, until, type RedisProc } from "../../../client/test/support/processes.js";

export {
  EDGE_BIN,
  REDIS_BIN,
  REPO,
  freePort,
  kill,
  sleep,
  startRedis,
  stopAll,
  tempDir,
  until,
  type RedisProc,
} from "../../../client/test/support/processes.js";
export const REDIS_CLI = process.env.REDIS_CLI_BIN || "/usr/bin/redis-cli";
export const SECRET = "server-test-secret-0123456789abcdef";
export const ADMIN = "server-test-admin-0123456789";

function bindable(port: number): Promise<boolean> {
  return new Promise((ok) => {
    const s = createServer();
    s.once("error", () => ok(false));
    s.listen(port, "127.0.0.1", () => s.close(() => ok(true)));
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

export const execCli = async (port: number, ...args: string[]): Promise<string> =>
  (await promisify(execFile)(REDIS_CLI, ["-h", "127.0.0.1", "-p", String(port), ...args])).stdout;

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

export class Edge extends EdgeProcess {
  constructor(
    port: number,
    readonly args: string[],
  ) {
    super(port);
  }

  get ws(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  /** Starts an edge; `args` beyond --listen (defaults: the test secret and admin token). */
  static async start(opts: { port?: number; redisUrl?: string; args?: string[]; secret?: boolean } = {}): Promise<Edge> {
    const args = [...(opts.secret === false ? [] : ["--jwt-secret", SECRET]), "--admin-token", ADMIN, ...(opts.args ?? [])];
    if (opts.redisUrl) args.push("--redis-url", opts.redisUrl);
    const e = new Edge(opts.port ?? (await freePort()), args);
    await e.spawn();
    return e;
  }

  protected flags(): string[] {
    return this.args;
  }

  override async stop(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    await super.stop(signal);
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
