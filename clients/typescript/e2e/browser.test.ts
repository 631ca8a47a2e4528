/**
 * `@fanout/client` in real Chromium (Debian's, driven by playwright-core) against real
 * edges behind the shipped HAProxy config, with real Redis. Each test gets a fresh
 * cluster; pages record what the application sees (numbers in order, resets, states).
 * A screenshot of every page is kept in `.tmp/e2e-artifacts/`.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { chromium, type Browser, type Page } from "playwright-core";
import path from "node:path";
import { fileURLToPath } from "node:url";
import {
  api,
  artifactsDir,
  connectionsByEdge,
  restartRedis,
  startCluster,
  startNoUpgradeProxy,
  startPages,
  stopCluster,
  stopRestarted,
  waitUntil,
  type Cluster,
} from "./harness.js";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const HERE = path.dirname(fileURLToPath(import.meta.url));

interface Seen {
  numbers: number[];
  resets: number;
  states: string[];
  tokens: number;
  errors: string[];
  /** With a room: per sender, the numbers that arrived; the offsets; resets. */
  room: Record<string, number[]>;
  roomOffsets: number[];
  roomResets: number;
  /** What this page's own publishes answered. */
  published: { n: number; offset: number; duplicate: boolean }[];
  publishErrors: string[];
}

let browser: Browser;
let cluster: Cluster;
let pages: { origin: string; stop: () => void };
const opened: Page[] = [];

beforeAll(async () => {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});
afterAll(async () => {
  await browser?.close();
});
beforeEach(async () => {
  cluster = await startCluster(1, path.join(HERE, "fanout.toml"));
  pages = await startPages(cluster);
});
afterEach(async (ctx) => {
  const dir = artifactsDir();
  for (const [i, page] of opened.entries()) {
    await page
      .screenshot({ path: path.join(dir, `${ctx.task.name.replace(/\W+/g, "-")}-${i}.png`) })
      .catch(() => {});
    await page.context().close();
  }
  opened.length = 0;
  pages.stop();
  stopCluster(cluster);
  stopRestarted();
});

/** A page (its own browser context: its own cookies, so its own HAProxy affinity). */
async function open(query: Record<string, string>): Promise<Page> {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e));
  if (process.env.E2E_DEBUG) {
    page.on("requestfailed", (r) => console.error("request failed:", r.method(), r.url(), r.failure()?.errorText));
    page.on("response", (r) => console.error("response:", r.status(), r.request().method(), r.url()));
    page.on("console", (m) => console.error("console:", m.text()));
  }
  opened.push(page);
  await page.goto(`${pages.origin}/numbers.html?${new URLSearchParams(query)}`);
  return page;
}

const seen = (page: Page): Promise<Seen> => page.evaluate(() => (window as any).e2e as Seen);
const lbUrl = () => `ws://127.0.0.1:${cluster.lbPort}/ws`;
const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** Publishes `n` on `channel` through the edge on `port`, retrying while it is unavailable. */
async function publish(port: number, channel: string, n: number): Promise<void> {
  await waitUntil(`publish ${n}`, () =>
    api(cluster, port, "publish", { channel, data: { n } }).then(
      () => true,
      () => false,
    ),
  );
}

async function connectedAll(list: Page[]): Promise<void> {
  await waitUntil("every page connected and subscribed", async () => {
    const all = await Promise.all(list.map(seen));
    return all.every((s) => s.states.includes("connected"));
  }).catch(async (e) => {
    throw new Error(`${e.message}; the pages saw ${JSON.stringify(await Promise.all(list.map(seen)))}`);
  });
}

describe("in Chromium, behind HAProxy", () => {
  it("a page's node hangs and is killed -9, then another drains: every number once, in order, no reset — published by the server and by the pages", async () => {
    const channel = "user:e2e";
    const room = "room:e2e";
    const senders = 3;
    const mine = 60;
    const list = await Promise.all(range(1, senders).map(() => open({ url: lbUrl(), user: "e2e", channel, room })));
    await connectedAll(list);
    await waitUntil("three connections", async () => (await connectionsByEdge(cluster)).reduce((a, b) => a + b) === 3);
    // The node most pages are on dies; then another one with pages drains; the third
    // carries the server's publishes throughout. Meanwhile every page publishes its own
    // numbers into the room without waiting for answers.
    const conns = await connectionsByEdge(cluster);
    const order = [0, 1, 2].sort((a, b) => conns[b]! - conns[a]!);
    const [killed, drained, survivor] = order as [number, number, number];
    const publishing = list.map((page, i) =>
      page.evaluate(([from, count]) => (window as any).publishNumbers(from, count, 40), [i, mine] as const),
    );
    // Fewer than a `user:` channel keeps (100): however long a page takes to come back
    // (bounced by the draining node), what it missed is still in history.
    const last = 90;
    for (let n = 1; n <= last; n++) {
      await publish(cluster.edgePorts[survivor]!, channel, n);
      if (n === 20) {
        // Hung first, so that the pages on it have publishes sent and never answered
        // when it dies: they must be resent, once each.
        process.kill(cluster.pid(`edge-${killed + 1}`), "SIGSTOP");
        await new Promise((r) => setTimeout(r, 300));
        process.kill(cluster.pid(`edge-${killed + 1}`), "SIGKILL");
      }
      if (n === 50) process.kill(cluster.pid(`edge-${drained + 1}`), "SIGTERM");
      await new Promise((r) => setTimeout(r, 20));
    }
    await Promise.all(publishing);
    const complete = (s: Seen) =>
      s.numbers.length >= last && range(0, senders - 1).every((from) => (s.room[from]?.length ?? 0) >= mine);
    await waitUntil("every page has every number", async () => (await Promise.all(list.map(seen))).every(complete),
    60_000).catch(async (e) => {
      const all = await Promise.all(list.map(seen));
      const brief = all.map((s) => ({
        count: s.numbers.length,
        last: s.numbers.at(-1),
        resets: s.resets,
        room: Object.fromEntries(Object.entries(s.room).map(([k, v]) => [k, v.length])),
        published: s.published.length,
        publishErrors: s.publishErrors,
        states: s.states.slice(-6),
        errors: s.errors,
      }));
      throw new Error(`${e.message}; killed edge-${killed + 1}, drained edge-${drained + 1}; pages: ${JSON.stringify(brief)}`);
    });
    await new Promise((r) => setTimeout(r, 300)); // a duplicate would arrive by now
    const all = await Promise.all(list.map(seen));
    for (const s of all) {
      expect(s.numbers).toEqual(range(1, last));
      expect(s.resets).toBe(0);
      // Every page's publishes, each applied once (a resend under its key is answered
      // `duplicate`, not published again), in the order each page sent them.
      expect(s.publishErrors).toEqual([]);
      expect(s.published).toHaveLength(mine);
      for (let from = 0; from < senders; from++) expect(s.room[from]).toEqual(range(1, mine));
      expect(s.roomOffsets).toEqual([...s.roomOffsets].sort((a, b) => a - b));
      expect(new Set(s.roomOffsets).size).toBe(senders * mine);
      expect(s.roomResets).toBe(0);
    }
    // Every page saw the same room history: the same offsets.
    expect(all[1]!.roomOffsets).toEqual(all[0]!.roomOffsets);
    expect(all[2]!.roomOffsets).toEqual(all[0]!.roomOffsets);
    // At least one page was on the killed node and came back.
    const reconnected = all.filter((s) => s.states.filter((x) => x === "connected").length > 1);
    expect(reconnected.length).toBeGreaterThan(0);
    const resent = all.flatMap((s) => s.published.filter((p) => p.duplicate)).length;
    console.info(`kill test: ${reconnected.length} pages reconnected; ${resent} publishes answered \`duplicate\` on resend`);
  });

  it("Redis restarted without persistence: the page is told to reset, never left silent", async () => {
    const channel = "user:e2e-redis";
    const page = await open({ url: lbUrl(), user: "e2e-redis", channel });
    await connectedAll([page]);
    for (let n = 1; n <= 5; n++) await publish(cluster.edgePorts[0]!, channel, n);
    await waitUntil("five numbers", async () => (await seen(page)).numbers.length === 5);
    await restartRedis(cluster);
    // History is gone: the next publishes start a new epoch at offset 1. Whether the
    // page's node sees them live or reads them when it resubscribes, its position's
    // epoch is gone: the page is told to reset (it reloads), never left behind silently.
    for (let n = 6; n <= 10; n++) await publish(cluster.edgePorts[1]!, channel, n);
    await waitUntil("a reset", async () => (await seen(page)).resets >= 1, 60_000).catch(async (e) => {
      throw new Error(`${e.message}; the page saw ${JSON.stringify(await seen(page))}`);
    });
    // After the reset the channel goes on: what is published next arrives, in order.
    const before = (await seen(page)).numbers.length;
    for (let n = 11; n <= 13; n++) await publish(cluster.edgePorts[2]!, channel, n);
    await waitUntil("the numbers after the reset", async () => (await seen(page)).numbers.includes(13));
    const s = await seen(page);
    expect(s.numbers.slice(0, 5)).toEqual([1, 2, 3, 4, 5]);
    const after = s.numbers.slice(before);
    expect(after.slice(-3)).toEqual([11, 12, 13]);
    expect(after).toEqual([...after].sort((a, b) => a - b));
  });

  it("a token expiring mid-session is refreshed in-band; 4010 closes for good", async () => {
    const channel = "user:e2e-token";
    const page = await open({ url: lbUrl(), user: "e2e-token", channel, ttl: "4" });
    await connectedAll([page]);
    // Three token lifetimes (and the edge's 5 s leeway) later, the session goes on.
    await new Promise((r) => setTimeout(r, 12_000));
    for (let n = 1; n <= 3; n++) await publish(cluster.edgePorts[0]!, channel, n);
    await waitUntil("numbers after the token's first expiry", async () => (await seen(page)).numbers.length === 3);
    let s = await seen(page);
    expect(s.tokens).toBeGreaterThanOrEqual(3);
    expect(s.states.filter((x) => x === "connected")).toHaveLength(1);

    await api(cluster, cluster.edgePorts[0]!, "disconnect", { user: "e2e-token", reason: "e2e" });
    await waitUntil("closed", async () => (await seen(page)).states.at(-1) === "closed:4010");
    const before = (await seen(page)).states.length;
    await new Promise((r) => setTimeout(r, 3000));
    s = await seen(page);
    expect(s.states.length).toBe(before); // no reconnect attempt
    expect((await connectionsByEdge(cluster)).reduce((a, b) => a + b)).toBe(0);
  });

  it("WebSockets blocked by a proxy: falls back to SSE with the same guarantees", async () => {
    const proxy = await startNoUpgradeProxy(cluster.lbPort);
    try {
      const channel = "user:e2e-sse";
      const page = await open({ url: `ws://127.0.0.1:${proxy.port}/ws`, user: "e2e-sse", channel });
      await connectedAll([page]);
      await waitUntil("one stream open", async () => (await connectionsByEdge(cluster)).reduce((a, b) => a + b) === 1);
      const conns = await connectionsByEdge(cluster);
      const on = conns.findIndex((n) => n === 1);
      const other = (on + 1) % 3;
      const last = 60;
      for (let n = 1; n <= last; n++) {
        await publish(cluster.edgePorts[other]!, channel, n);
        if (n === 20) process.kill(cluster.pid(`edge-${on + 1}`), "SIGKILL");
        await new Promise((r) => setTimeout(r, 20));
      }
      await waitUntil("every number", async () => (await seen(page)).numbers.length >= last, 60_000);
      const s = await seen(page);
      expect(s.numbers).toEqual(range(1, last));
      expect(s.resets).toBe(0);
      // It was an event stream all along.
      let streams = 0;
      for (const [i, port] of cluster.edgePorts.entries()) {
        if (i === on) continue;
        const metrics = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
        streams += Number(/fanout_client_http_requests_total\{endpoint="sse",status="200"\} (\d+)/.exec(metrics)?.[1] ?? 0);
      }
      expect(streams).toBeGreaterThan(0);
    } finally {
      proxy.stop();
    }
  });
});
