/**
 * Real parts for the browser tests: a local fanout cluster (Redis, three edges, HAProxy
 * with the shipped config) started by `scripts/local-cluster.sh`; a static server for
 * the test pages and the SDK bundle, with a token endpoint the pages use as their
 * `getToken`; a proxy that refuses WebSocket upgrades (a network that blocks them);
 * HS256 tokens; and Chromium (Debian's) through playwright-core. Everything listens on
 * 127.0.0.1 and is stopped by the `stop` functions.
 */
import { execFileSync, spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, "../../..");
/** Screenshots of the pages after each test: kept as artefacts of the run. */
export const ARTIFACTS = path.join(ROOT, ".tmp/e2e-artifacts");

export interface Cluster {
  dir: string;
  secret: string;
  admin: string;
  /** What the edges use: redis://… or redis-cluster://… */
  redisUrl: string;
  /** The first Redis port; with a Redis Cluster, `redisPorts` has every node's. */
  redisPort: number;
  redisPorts: number[];
  edgePorts: number[];
  lbPort: number;
  pid(name: string): number;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function settings(file: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(file, "utf8").split("\n")) {
    const m = /^([A-Z0-9_]+)='?([^']*)'?$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

/**
 * Starts Redis, three edges (drain window `drainSecs`) and HAProxy. With
 * `redisClusterReplicas`, Redis is a 3-master Redis Cluster with that many replicas each.
 */
export async function startCluster(drainSecs = 1, config?: string, redisClusterReplicas?: number): Promise<Cluster> {
  const dir = mkdtempSync(path.join(tmpdir(), "fanout-e2e-"));
  const binDir = process.env.FANOUT_BIN_DIR ?? path.join(ROOT, "target/debug");
  if (!existsSync(path.join(binDir, "fanout-edge"))) {
    throw new Error(
      `no fanout-edge in ${binDir}: cargo build -p fanout-edge first (scripts/test.sh does), or set FANOUT_BIN_DIR`,
    );
  }
  const ports = await Promise.all([0, 1, 2, 3, 4].map(() => freePort()));
  const args = redisClusterReplicas === undefined ? ["start", "--detach"] : ["start", "--cluster", "--detach"];
  const env = {
    ...process.env,
    ...(redisClusterReplicas === undefined ? {} : { FANOUT_REDIS_REPLICAS: String(redisClusterReplicas) }),
    FANOUT_CLUSTER_DIR: dir,
    FANOUT_BIN_DIR: binDir,
    FANOUT_DRAIN_SECS: String(drainSecs),
    FANOUT_EDGE_PORTS: `${ports[0]} ${ports[1]} ${ports[2]}`,
    FANOUT_LB_PORT: String(ports[3]),
    FANOUT_LB_STATS_PORT: String(ports[4]),
    ...(config ? { FANOUT_CONFIG: config } : {}),
  };
  try {
    execFileSync(path.join(ROOT, "scripts/local-cluster.sh"), args, { env, stdio: ["ignore", "ignore", "inherit"] });
  } catch (e) {
    // Stop whatever did start: a failed start must not leave processes behind.
    stopCluster({ dir } as Cluster);
    throw e;
  }
  const e = settings(path.join(dir, "cluster.env"));
  return {
    dir,
    secret: e.FANOUT_JWT_SECRET!,
    admin: e.FANOUT_ADMIN_TOKEN!,
    redisUrl: e.FANOUT_REDIS_URL!,
    redisPort: Number(e.REDIS_PORTS!.split(" ")[0]),
    redisPorts: e.REDIS_PORTS!.split(" ").map(Number),
    edgePorts: [Number(e.EDGE1_PORT), Number(e.EDGE2_PORT), Number(e.EDGE3_PORT)],
    lbPort: Number(e.LB_PORT),
    pid: (name) => Number(readFileSync(path.join(dir, "pids", `${name}.pid`), "utf8").trim()),
  };
}

export function stopCluster(c: Cluster): void {
  try {
    execFileSync(path.join(ROOT, "scripts/local-cluster.sh"), ["stop"], {
      env: { ...process.env, FANOUT_CLUSTER_DIR: c.dir, FANOUT_DRAIN_SECS: "0" },
      stdio: "ignore",
    });
  } catch {
    // Best effort: a test that killed a process already stopped it.
  }
}

/** Kills Redis and starts it again on its port, with nothing kept (no persistence). */
export async function restartRedis(c: Cluster): Promise<void> {
  process.kill(c.pid("redis"), "SIGKILL");
  await waitUntil("redis gone", async () => !(await reachable(c.redisPort)));
  const dir = mkdtempSync(path.join(tmpdir(), "fanout-e2e-redis-"));
  const child = spawn(
    "redis-server",
    ["--port", String(c.redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: "ignore", detached: true },
  );
  child.unref();
  restarted.push(child.pid!);
  await waitUntil("redis back", () => reachable(c.redisPort));
}

/** Processes the tests started themselves (stopped by `stopRestarted`). */
const restarted: number[] = [];
export function stopRestarted(): void {
  for (const pid of restarted.splice(0)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
}

function reachable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.on("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.on("error", () => resolve(false));
  });
}

export async function waitUntil(what: string, check: () => Promise<boolean> | boolean, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out after ${ms} ms waiting for: ${what}`);
}

const b64 = (s: string) => Buffer.from(s).toString("base64url");

/** An HS256 connection token for `sub`, valid `ttlSecs`, granting `channels` (patterns). */
export function token(secret: string, sub: string, ttlSecs = 3600, channels?: string[]): string {
  const header = b64(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const now = Math.floor(Date.now() / 1000);
  const payload = b64(JSON.stringify({ sub, exp: now + ttlSecs, iat: now, ...(channels ? { channels } : {}) }));
  const sig = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${sig}`;
}

/** The server API of the edge on `port`. */
export async function api(c: Cluster, port: number, endpoint: string, body?: unknown): Promise<any> {
  const r = await fetch(`http://127.0.0.1:${port}/api/${endpoint}`, {
    method: body === undefined ? "GET" : "POST",
    headers: { authorization: `Bearer ${c.admin}`, "content-type": "application/json", connection: "close" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${endpoint} ${r.status}: ${text}`);
  return JSON.parse(text);
}

/** Connections open on each edge (0 for one that does not answer). */
export async function connectionsByEdge(c: Cluster): Promise<number[]> {
  return Promise.all(
    c.edgePorts.map((p) => api(c, p, "stats").then((s) => s.node.connections as number, () => 0)),
  );
}

/** Serves the pages, the SDK bundle and a token endpoint; returns its origin and a stop function. */
export async function startPages(c: Cluster): Promise<{ origin: string; stop: () => void }> {
  const sdk = path.join(ROOT, "clients/typescript/client/dist/index.js");
  if (!existsSync(sdk)) throw new Error(`no ${sdk}: npm run build in clients/typescript first`);
  const files: Record<string, [string, string]> = {
    "/sdk/index.js": [sdk, "text/javascript"],
    "/numbers.html": [path.join(HERE, "pages/numbers.html"), "text/html"],
  };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://x");
    if (url.pathname === "/token") {
      const user = url.searchParams.get("user") ?? "e2e";
      const ttl = Number(url.searchParams.get("ttl") ?? 3600);
      const channels = url.searchParams.getAll("grant");
      res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
      res.end(token(c.secret, user, ttl, channels.length ? channels : undefined));
      return;
    }
    const file = files[url.pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": file[1], "cache-control": "no-store" });
    res.end(readFileSync(file[0]));
  });
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, "127.0.0.1", r));
  return { origin: `http://127.0.0.1:${port}`, stop: () => server.close() };
}

/**
 * A proxy to `target` that passes plain HTTP (event streams, `/client/*`) and refuses
 * every WebSocket upgrade with 403, as some corporate networks do.
 */
export async function startNoUpgradeProxy(target: number): Promise<{ port: number; stop: () => void }> {
  const server = http.createServer((req, res) => {
    const up = http.request(
      { host: "127.0.0.1", port: target, path: req.url, method: req.method, headers: req.headers },
      (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers);
        r.pipe(res);
        // An upstream that dies mid-stream ends the client's stream too, as a real
        // proxy does (else only the client's liveness check would notice).
        r.on("close", () => {
          if (!r.complete) res.destroy();
        });
      },
    );
    up.on("error", () => res.destroy());
    req.pipe(up);
    res.on("close", () => up.destroy());
  });
  server.on("upgrade", (_req, socket) => {
    socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n");
  });
  const port = await freePort();
  await new Promise<void>((r) => server.listen(port, "127.0.0.1", r));
  return {
    port,
    stop: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

export function artifactsDir(): string {
  mkdirSync(ARTIFACTS, { recursive: true });
  return ARTIFACTS;
}

/** The demo's backend (`demo/server.mjs`) in front of `cluster`'s load balancer. */
export async function startDemo(c: Cluster): Promise<{ origin: string; stop: () => void }> {
  const port = await freePort();
  const child = spawn(process.execPath, [path.join(ROOT, "clients/typescript/demo/server.mjs")], {
    env: {
      ...process.env,
      FANOUT_URL: `http://127.0.0.1:${c.lbPort}`,
      FANOUT_JWT_SECRET: c.secret,
      FANOUT_ADMIN_TOKEN: c.admin,
      PORT: String(port),
    },
    stdio: ["ignore", "ignore", "inherit"],
  });
  await waitUntil("the demo server", () => reachable(port));
  return { origin: `http://127.0.0.1:${port}`, stop: () => child.kill("SIGKILL") };
}

/** The Python with the `fanout` package, FastAPI and uvicorn (scripts/test-python.sh makes it). */
export const PYTHON = process.env.FANOUT_PYTHON ?? path.join(ROOT, ".tmp/venv-python/bin/python");

export interface Example {
  origin: string;
  /** Starts the worker (again, with `env` added; one running is killed first); resolves once it takes jobs. */
  startWorker(env?: Record<string, string>): Promise<void>;
  /** `kill -9` of the worker. */
  killWorker(): void;
  /** Resolves with the worker's exit code when it exits. */
  workerExit(): Promise<number | null>;
  /** What the worker logged (stderr) since it was last started. */
  workerLog(): string;
  stop(): void;
}

/**
 * `examples/job-progress` next to the cluster: its FastAPI backend (uvicorn) serving the
 * demo page, and its worker publishing into the cluster's Redis with the Python package.
 */
export async function startExample(c: Cluster, rowSeconds = 0.05): Promise<Example> {
  if (!existsSync(PYTHON)) throw new Error(`no ${PYTHON}: run scripts/test-python.sh first, or set FANOUT_PYTHON`);
  const dir = path.join(ROOT, "examples/job-progress");
  const port = await freePort();
  const env = {
    ...process.env,
    FANOUT_REDIS_URL: c.redisUrl,
    FANOUT_JWT_SECRET: c.secret,
    FANOUT_WS_URL: `ws://127.0.0.1:${c.lbPort}/ws`,
    EXAMPLE_ROW_SECONDS: String(rowSeconds),
    PYTHONUNBUFFERED: "1",
  };
  const backend = spawn(PYTHON, ["-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", String(port), "--log-level", "warning"], {
    cwd: dir,
    env,
    stdio: ["ignore", "ignore", "inherit"],
  });
  let worker: ReturnType<typeof spawn> | null = null;
  let log = "";
  let exited: Promise<number | null> = Promise.resolve(null);
  const startWorker = (extra: Record<string, string> = {}) =>
    new Promise<void>((resolve, reject) => {
      worker?.kill("SIGKILL");
      const w = spawn(PYTHON, ["worker.py"], { cwd: dir, env: { ...env, ...extra }, stdio: ["ignore", "ignore", "pipe"] });
      worker = w;
      log = "";
      exited = new Promise((r) => w.on("exit", (code) => r(code)));
      w.stderr!.on("data", (d: Buffer) => {
        log += d.toString();
        if (process.env.E2E_DEBUG) process.stderr.write(d);
        if (log.includes("worker ready")) resolve();
      });
      w.on("exit", (code, signal) => reject(new Error(`worker exited (${code ?? signal}) before ready: ${log}`)));
    });
  const stop = () => {
    worker?.kill("SIGKILL");
    backend.kill("SIGKILL");
  };
  try {
    await waitUntil("the example backend", () => reachable(port));
    await startWorker();
  } catch (e) {
    stop();
    throw e;
  }
  return {
    origin: `http://127.0.0.1:${port}`,
    startWorker,
    killWorker: () => worker?.kill("SIGKILL"),
    workerExit: () => exited,
    workerLog: () => log,
    stop,
  };
}
