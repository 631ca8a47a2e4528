/**
 * Liveness: protocol pings, a connection gone silent found and replaced, and the
 * page's online/offline and visibility events (with stubbed `window` and `document`).
 */

import { afterEach, describe, expect, it, vi } from "vitest";
import { client, states } from "./support/client.js";
import { mint, sleep, until } from "./support/edge.js";
import { FakeEdge } from "./support/fake.js";

let fake: FakeEdge;
afterEach(async () => {
  await fake?.stop();
});

async function connected(opts: { minReconnectDelay?: number; maxReconnectDelay?: number } = {}) {
  fake = await FakeEdge.start();
  const c = client({ url: fake.url, token: mint("1"), ...opts });
  c.connect();
  await until(() => c.state === "connected", 3000, "connected");
  return c;
}

describe("liveness", () => {
  it("sends protocol pings, and closes a connection that went silent, then reconnects", async () => {
    fake = await FakeEdge.start();
    fake.pingInterval = 0.5; // dead after 2 × 0.5 + 5 = 6 s of silence
    const c = client({ url: fake.url, token: mint("1") });
    c.connect();
    await until(() => c.state === "connected");
    await sleep(1600);
    expect(fake.last.frames.filter((f) => f.type === "ping").length).toBeGreaterThanOrEqual(2);
    fake.last.silent = true; // no pong, no frame: a half-open connection
    const seen = states(c);
    await until(() => seen.includes("disconnected"), 9000, "dead connection found");
    await until(() => c.state === "connected" && fake.conns.length === 2, 3000);
  });
});

describe("browser events", () => {
  afterEach(() => {
    vi.unstubAllGlobals();
  });

  function browser() {
    const win = new EventTarget();
    const doc = Object.assign(new EventTarget(), { visibilityState: "visible" });
    vi.stubGlobal("window", win);
    vi.stubGlobal("document", doc);
    return { win, doc };
  }

  it("offline: disconnects and waits; online: reconnects at once", async () => {
    const { win } = browser();
    const c = await connected({ minReconnectDelay: 10, maxReconnectDelay: 20 });
    win.dispatchEvent(new Event("offline"));
    expect(c.state).toBe("disconnected");
    await sleep(300);
    expect(fake.conns.length).toBe(1); // no retries while offline
    win.dispatchEvent(new Event("online"));
    await until(() => c.state === "connected" && fake.conns.length === 2);
  });

  it("visible again after a long time: a connection that does not answer a ping is replaced", async () => {
    const { doc } = browser();
    const now = Date.now();
    const c = await connected();
    // Hidden a minute ago.
    vi.spyOn(Date, "now").mockReturnValue(now - 60_000);
    doc.visibilityState = "hidden";
    doc.dispatchEvent(new Event("visibilitychange"));
    vi.restoreAllMocks();
    fake.last.silent = true; // a connection that died meanwhile
    // Recorded, not polled: the replacement may connect within one poll (full jitter
    // can pick a delay near 0).
    const seen = states(c);
    const t0 = Date.now();
    doc.visibilityState = "visible";
    doc.dispatchEvent(new Event("visibilitychange"));
    // A ping went out at once; the connection had 5 s to answer.
    await until(() => fake.last.frames.filter((f) => f.type === "ping").length >= 1, 1000, "a probe ping");
    await until(() => seen.includes("disconnected"), 8000, "the dead connection found");
    expect(Date.now() - t0).toBeLessThan(7000);
    await until(() => c.state === "connected" && fake.conns.length === 2, 3000, "replaced");
  });

  it("close() stops listening to the page", async () => {
    const { win } = browser();
    const c = await connected();
    c.close();
    win.dispatchEvent(new Event("online"));
    await sleep(100);
    expect(c.state).toBe("closed");
    expect(fake.conns.length).toBe(1);
  });
});
