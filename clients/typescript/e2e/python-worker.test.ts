/**
 * A Python worker (the `fanout` package) publishing straight into a Redis Cluster with
 * a replica per master, three edges behind HAProxy, pages in real Chromium: 1000
 * numbered progress events reach every page exactly once, in order, with offsets,
 * across a `CLUSTER FAILOVER` of the channel's master; a page that goes offline
 * meanwhile comes back, resubscribes with `since`, and recovers what the worker
 * published while it was away.
 */
import { afterAll, beforeAll, expect, it, onTestFinished } from "vitest";
import { chromium, type Browser, type Page } from "playwright-core";
import { execFileSync, spawn } from "node:child_process";
import path from "node:path";
import readline from "node:readline";
import {
  artifactsDir,
  HERE,
  PYTHON,
  startCluster,
  startPages,
  stopCluster,
  waitUntil,
  type Cluster,
} from "./harness.js";

let browser: Browser;
let cluster: Cluster;
let pages: { origin: string; stop: () => void };

beforeAll(async () => {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
  cluster = await startCluster(1, undefined, 1);
  pages = await startPages(cluster);
});
afterAll(async () => {
  await browser?.close();
  pages?.stop();
  if (cluster) stopCluster(cluster);
});

interface Seen {
  numbers: number[];
  offsets: number[];
  resets: number;
  states: string[];
  errors: string[];
}

/** What went wrong for a page: counts, and where numbers are missing or repeated (with offsets). */
function describe(s: Seen) {
  const at = new Map<number, number[]>();
  s.numbers.forEach((n, i) => at.set(n, [...(at.get(n) ?? []), s.offsets[i]!]));
  const missing = Array.from({ length: 1000 }, (_, i) => i + 1).filter((n) => !at.has(n));
  return {
    count: s.numbers.length,
    resets: s.resets,
    missing: missing.length ? `${missing.length}: ${missing[0]}…${missing.at(-1)}` : 0,
    repeated: [...at].filter(([, o]) => o.length > 1).map(([n, o]) => ({ n, offsets: o })),
  };
}

const redis = (port: number, ...args: string[]) =>
  execFileSync("redis-cli", ["-p", String(port), ...args], { encoding: "utf8" }).trim();

/** The replica of the master that holds `channel`'s keys (and its sharded pub/sub). */
function replicaOf(channel: string): { master: number; replica: number } {
  const slot = Number(redis(cluster.redisPort, "cluster", "keyslot", `fanout:{${channel}}:meta`));
  const nodes = redis(cluster.redisPort, "cluster", "nodes").split("\n").map((l) => l.split(" "));
  const master = nodes.find(
    (n) =>
      n[2]!.includes("master") &&
      n.slice(8).some((r) => {
        const [a, b] = r.split("-").map(Number);
        return slot >= a! && slot <= (b ?? a)!;
      }),
  )!;
  const replica = nodes.find((n) => n[3] === master[0])!;
  const port = (n: string[]) => Number(n[1]!.split(":")[1]!.split("@")[0]);
  return { master: port(master), replica: port(replica) };
}

it("1000 progress events from a Python worker: every page gets each once, in order, across a CLUSTER FAILOVER and an offline spell", async () => {
  const channel = "job_progress:py-1000";
  const count = 1000;
  const open = async (user: string): Promise<Page> => {
    const page = await (await browser.newContext()).newPage();
    page.on("pageerror", (e) => console.error(`${user} page error:`, e));
    const q = new URLSearchParams({ url: `ws://127.0.0.1:${cluster.lbPort}/ws`, user, channel, grant: "job_progress:*" });
    await page.goto(`${pages.origin}/numbers.html?${q}`);
    return page;
  };
  const steady = await open("steady");
  const away = await open("away");
  const seen = (p: Page) => p.evaluate(() => (window as any).e2e as Seen);
  await waitUntil("both pages connected", async () =>
    (await Promise.all([steady, away].map(seen))).every((s) => s.states.includes("connected")),
  );

  const { master, replica } = replicaOf(channel);
  const worker = spawn(PYTHON, [path.join(HERE, "python/publish_numbers.py"), cluster.redisUrl, channel, String(count), "0.004"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  worker.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((r) => worker.on("exit", (code) => r(code)));
  let failedOver = false;
  let wentOffline = false;
  onTestFinished(() => void worker.kill("SIGKILL"));
  for await (const line of readline.createInterface({ input: worker.stdout! })) {
    const n = Number(line.split(" ")[0]);
    if (n === 300 && !wentOffline) {
      wentOffline = true;
      await away.context().setOffline(true);
    }
    if (n === 500 && !failedOver) {
      failedOver = true;
      // Coordinated: the replica takes over once it has everything the master acknowledged.
      expect(redis(replica, "cluster", "failover")).toBe("OK");
    }
    // Away for 300 numbers, all kept (the worker keeps 1000 on this channel).
    if (n === 600) await away.context().setOffline(false);
  }
  expect(await exited, `the Python worker failed: ${stderr}`).toBe(0);
  await waitUntil("the replica is the master", () => redis(replica, "role").startsWith("master"));
  await waitUntil("the old master is its replica", () => redis(master, "role").startsWith("slave"));

  await waitUntil("both pages have every number", async () =>
    (await Promise.all([steady, away].map(seen))).every((s) => s.numbers.length >= count),
  60_000).catch(async (e) => {
    const all = await Promise.all([steady, away].map(seen));
    const brief = all.map((s) => ({ ...describe(s), states: s.states, errors: s.errors }));
    throw new Error(`${e.message}: ${JSON.stringify(brief)}`);
  });
  await new Promise((r) => setTimeout(r, 300)); // a duplicate would arrive by now
  const range = Array.from({ length: count }, (_, i) => i + 1);
  for (const s of await Promise.all([steady, away].map(seen))) {
    const lost = range.filter((n) => !s.numbers.includes(n)).length;
    const duplicates = s.numbers.length - new Set(s.numbers).size;
    expect({ lost, duplicates, resets: s.resets }, JSON.stringify(describe(s))).toEqual({ lost: 0, duplicates: 0, resets: 0 });
    expect(s.numbers).toEqual(range);
    // One offset per publish, increasing: what the worker published, numbered by Redis.
    expect(s.offsets).toEqual([...s.offsets].sort((a, b) => a - b));
    expect(new Set(s.offsets).size).toBe(count);
  }
  // The page that went offline really reconnected (and so recovered with `since`).
  const awaySeen = await seen(away);
  expect(awaySeen.states.filter((x) => x === "connected").length).toBeGreaterThan(1);
  await away.screenshot({ path: path.join(artifactsDir(), "python-worker-away.png") });
});
