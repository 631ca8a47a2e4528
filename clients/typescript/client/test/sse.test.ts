/**
 * The client over the event stream against the real edge: delivery, publish and
 * presence over HTTP, the stream reopened (and resumed) when the channel set changes,
 * completion, and the fallback from a WebSocket a proxy refuses.
 */

import { afterAll, describe, expect, it } from "vitest";
import { client, Recorder, states } from "./support/client.js";
import { Edge, mint, sleep, stopAll, until } from "./support/edge.js";
import { NoUpgradeProxy } from "./support/proxy.js";

afterAll(stopAll);

describe("event-stream transport against fanout-edge", () => {
  it("subscribes, receives in order, publishes and asks presence over HTTP", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("s1"), transports: ["sse"] });
    const a = new Recorder();
    const b = new Recorder();
    const sa = c.subscribe("chat:sa", a.handlers);
    const sb = c.subscribe("chat:sb", b.handlers);
    c.connect();
    await until(() => sa.state === "subscribed" && sb.state === "subscribed", 5000, "subscribed");
    expect(c.state).toBe("connected");
    expect(c.transportName).toBe("sse");
    for (let i = 1; i <= 10; i++) await edge.publish(i % 2 ? "chat:sa" : "chat:sb", i);
    const r = await c.publish("chat:sa", { mine: true }, { event: "note" });
    expect(r).toEqual({ offset: 6, epoch: sa.position!.epoch });
    await until(() => a.messages.length === 6 && b.messages.length === 5);
    expect(a.data).toEqual([1, 3, 5, 7, 9, { mine: true }]);
    expect(a.offsets).toEqual([1, 2, 3, 4, 5, 6]);
    expect(a.messages[5]!.event).toBe("note");
    expect(b.data).toEqual([2, 4, 6, 8, 10]);
    const p = await until(async () => {
      const x = await c.presence("chat:sa");
      return x.clients.length ? x : null;
    });
    expect(p!.clients[0]).toMatchObject({ user: "s1" });
    const err = await c.publish("job_progress:1", 1).catch((e) => e);
    expect([err.code, err.status]).toEqual(["forbidden", 403]);
  });

  it("resends a publish whose answer was lost under the same key: applied once", async () => {
    const edge = await Edge.start();
    let cut = 1;
    const keys: string[] = [];
    // The first publish reaches the edge, but its answer is lost on the way back.
    const lossy: typeof fetch = async (input, init) => {
      const res = await fetch(input, init);
      if (String(input).endsWith("/client/publish")) {
        keys.push(JSON.parse(String(init!.body)).idempotency_key);
        if (cut-- > 0) throw new TypeError("network error");
      }
      return res;
    };
    const c = client({ url: edge.url, token: mint("s9"), transports: ["sse"], fetch: lossy, minReconnectDelay: 20 });
    const rec = new Recorder();
    const sub = c.subscribe("chat:once", rec.handlers);
    c.connect();
    await until(() => sub.state === "subscribed");
    const r = await c.publish("chat:once", "mine");
    expect(r).toEqual({ offset: 1, epoch: sub.position!.epoch, duplicate: true });
    expect(keys).toHaveLength(2);
    expect(keys[1]).toBe(keys[0]);
    await edge.publish("chat:once", "next");
    await until(() => rec.messages.length === 2);
    expect(rec.data).toEqual(["mine", "next"]);
    expect(rec.offsets).toEqual([1, 2]);
  });

  it("publishes one at a time, in order, through failed sends; gives up after a few while connected", async () => {
    const edge = await Edge.start();
    let failNext = 2;
    let down = false;
    // Sends that never reach the edge: the first two, then every one while `down`.
    const flaky: typeof fetch = async (input, init) => {
      if (String(input).endsWith("/client/publish") && (down || failNext-- > 0)) throw new TypeError("network error");
      return fetch(input, init);
    };
    const c = client({ url: edge.url, token: mint("s10"), transports: ["sse"], fetch: flaky, minReconnectDelay: 20, maxReconnectDelay: 40 });
    const rec = new Recorder();
    const sub = c.subscribe("chat:order", rec.handlers);
    c.connect();
    await until(() => sub.state === "subscribed");
    const results = await Promise.all(["a", "b", "c"].map((x) => c.publish("chat:order", x)));
    expect(results.map((r) => r.offset)).toEqual([1, 2, 3]);
    await until(() => rec.messages.length === 3);
    expect(rec.data).toEqual(["a", "b", "c"]);
    down = true;
    const err = await c.publish("chat:order", "never").catch((e) => e);
    expect(err.code).toBe("disconnected");
    expect(c.state).toBe("connected");
  });

  it("reopens the stream when the channel set changes, resuming every channel without loss or duplicate", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("s2", 3600, { channels: ["job_progress:*"] }), transports: ["sse"] });
    const a = new Recorder();
    const sa = c.subscribe("chat:keep", a.handlers);
    c.connect();
    await until(() => sa.state === "subscribed");
    await edge.publish("chat:keep", 1);
    await until(() => a.messages.length === 1);
    // Publishing goes on while the stream is reopened for a second channel.
    const job = new Recorder();
    const publishing = (async () => {
      for (let i = 2; i <= 20; i++) await edge.publish("chat:keep", i);
    })();
    await sleep(5);
    const sj = c.subscribe("job_progress:3", job.handlers);
    await publishing;
    await until(() => a.messages.length === 20 && sj.state === "subscribed", 5000, "all 20");
    expect(a.offsets).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(a.resets).toEqual([]);
    // A job that completes ends its subscription; the stream goes on for the others.
    await edge.publish("job_progress:3", { status: "succeeded" });
    await until(() => job.completed === 1);
    expect(sj.state).toBe("ended");
    expect(job.data).toEqual([{ status: "succeeded" }]);
    await edge.publish("chat:keep", 21);
    await until(() => a.messages.length === 21);
    // Unsubscribed: the stream is reopened without it.
    sa.unsubscribe();
    await sleep(100);
    await edge.publish("chat:keep", 22);
    await sleep(100);
    expect(a.messages.length).toBe(21);
  });

  it("moves to a fresh token before the old one expires, resuming the stream", async () => {
    const edge = await Edge.start();
    let calls = 0;
    const c = client({
      url: edge.url,
      transports: ["sse"],
      getToken: async () => {
        calls++;
        return mint("s5", 3);
      },
    });
    const seen = states(c);
    const rec = new Recorder();
    c.subscribe("chat:fresh", rec.handlers);
    c.connect();
    await until(() => c.state === "connected");
    let i = 0;
    const timer = setInterval(() => void edge.publish("chat:fresh", ++i), 250);
    // Past the first token's exp + the edge's 5 s leeway: without a new token the stream would end with 4004.
    await sleep(9500);
    clearInterval(timer);
    await sleep(300);
    expect(calls).toBeGreaterThanOrEqual(3);
    expect(seen).toEqual(["connecting", "connected"]);
    await until(() => rec.messages.length === i);
    expect(rec.data).toEqual(Array.from({ length: i }, (_, k) => k + 1));
    expect(rec.resets).toEqual([]);
  });

  it("falls back to the event stream when WebSockets are refused", async () => {
    const edge = await Edge.start();
    const proxy = await NoUpgradeProxy.start(edge.http);
    try {
      const c = client({ url: proxy.url, token: mint("s3") });
      const rec = new Recorder();
      const sub = c.subscribe("chat:fallback", rec.handlers);
      c.connect();
      await until(() => sub.state === "subscribed", 5000, "subscribed over the fallback");
      expect(c.transportName).toBe("sse");
      expect(proxy.refused).toBe(2);
      await edge.publish("chat:fallback", "over sse");
      expect(await c.publish("chat:fallback", "from me")).toMatchObject({ offset: 2 });
      await until(() => rec.messages.length === 2);
      expect(rec.data).toEqual(["over sse", "from me"]);
    } finally {
      await proxy.stop();
    }
  });

  it("goes closed when the stream is refused for a bad token and getToken cannot help", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: "bad", transports: ["sse"] });
    const errors: unknown[] = [];
    c.on("error", (e) => void errors.push([e.code, e.closeCode]));
    c.subscribe("chat:x", {});
    c.connect();
    await until(() => c.state === "closed");
    expect(errors).toEqual([["closed", 4001]]);
  });

  it("ends only the refused channel's subscription when a stream is refused for it", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("s4"), transports: ["sse"] });
    const ok = new Recorder();
    const no = new Recorder();
    const a = c.subscribe("chat:fine", ok.handlers);
    const b = c.subscribe("user:someone-else", no.handlers);
    c.connect();
    await until(() => a.state === "subscribed", 5000, "the other channel subscribed");
    expect(b.state).toBe("ended");
    expect(no.errors.map((e) => e.code)).toEqual(["forbidden"]);
    await edge.publish("chat:fine", "yes");
    await until(() => ok.messages.length === 1);
  });
});
