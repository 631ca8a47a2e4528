/**
 * The client over WebSocket against the real edge (embedded broker): delivery in
 * order, publish and presence round trips, the offline queue, in-band token refresh,
 * an administrator's disconnect, refused tokens, and a restart that lost history.
 */

import { afterAll, describe, expect, it } from "vitest";
import { FanoutError } from "../src/index.js";
import { client, Recorder, states } from "./support/client.js";
import { Edge, mint, sleep, stopAll, until } from "./support/edge.js";

afterAll(stopAll);

describe("websocket transport against fanout-edge", () => {
  it("subscribes and receives every message in order", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("u1") });
    const rec = new Recorder();
    const sub = c.subscribe("chat:order", rec.handlers);
    c.connect();
    await until(() => sub.state === "subscribed", 5000, "subscribed");
    expect(c.state).toBe("connected");
    expect(sub.position?.offset).toBe(0);
    for (let i = 1; i <= 30; i++) await edge.publish("chat:order", { i }, "tick");
    await until(() => rec.messages.length === 30, 5000, "30 messages");
    expect(rec.offsets).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
    expect(rec.messages[0]).toMatchObject({ channel: "chat:order", data: { i: 1 }, event: "tick", offset: 1 });
    expect(typeof rec.messages[0]!.ts).toBe("number");
    expect(sub.position).toEqual({ offset: 30, epoch: rec.messages[29]!.epoch });
    // Unsubscribed: nothing more arrives.
    sub.unsubscribe();
    await edge.publish("chat:order", { i: 31 });
    await sleep(200);
    expect(rec.messages.length).toBe(30);
  });

  it("starts from `last` N, or from a job's latest state", async () => {
    const edge = await Edge.start();
    for (let i = 1; i <= 5; i++) await edge.publish("chat:hist", i);
    for (let i = 1; i <= 3; i++) await edge.publish("job_progress:9", { pct: i * 10 });
    const c = client({ url: edge.url, token: mint("u9", 3600, { channels: ["job_progress:9"] }) });
    const hist = new Recorder();
    const job = new Recorder();
    c.subscribe("chat:hist", { last: 2, ...hist.handlers });
    c.subscribe("job_progress:9", job.handlers);
    c.connect();
    await until(() => hist.messages.length === 2 && job.messages.length === 1);
    expect(hist.offsets).toEqual([4, 5]);
    expect(job.data).toEqual([{ pct: 30 }]);
    await edge.publish("job_progress:9", { status: "failed" });
    await until(() => job.completed === 1);
    expect(job.data).toEqual([{ pct: 30 }, { status: "failed" }]);
  });

  it("publishes with a reply of offset and epoch, and rejects what the edge refuses", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("u2") });
    const rec = new Recorder();
    c.subscribe("chat:pub", rec.handlers);
    c.connect();
    const r1 = await c.publish("chat:pub", { text: "hi" });
    const r2 = await c.publish("chat:pub", { text: "again" }, { event: "note" });
    expect(r1.offset).toBe(1);
    expect(r2).toEqual({ offset: 2, epoch: r1.epoch });
    await until(() => rec.messages.length === 2);
    expect(rec.messages[1]).toMatchObject({ data: { text: "again" }, event: "note", offset: 2, epoch: r1.epoch });
    const err = await c.publish("job_progress:1", {}).catch((e) => e);
    expect(err).toBeInstanceOf(FanoutError);
    expect(err.code).toBe("forbidden");
    // A caller's resend under its own key (after a `timeout`, say) is applied once.
    const r3 = await c.publish("chat:pub", "once", { idempotencyKey: "retry-1" });
    expect(await c.publish("chat:pub", "once", { idempotencyKey: "retry-1" })).toEqual({ ...r3, duplicate: true });
    await c.publish("chat:pub", "after");
    await until(() => rec.messages.length === 4);
    expect(rec.data.slice(2)).toEqual(["once", "after"]);
    expect((await c.publish("chat:pub", 1, { idempotencyKey: "has space" }).catch((e) => e)).code).toBe("bad_request");
  });

  it("answers presence", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("u3") });
    const sub = c.subscribe("chat:here", {});
    c.connect();
    await until(() => sub.state === "subscribed");
    const p = await until(async () => {
      const r = await c.presence("chat:here");
      return r.clients.length ? r : null;
    });
    expect(p!.channel).toBe("chat:here");
    expect(p!.clients[0]).toMatchObject({ user: "u3", node: `edge-${edge.port}` });
    expect((await c.presence("user:u3").catch((e) => e)).code).toBe("bad_request");
  });

  it("queues publishes while disconnected, up to its bound, and sends them once connected", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("u4"), maxQueuedPublishes: 3 });
    const queued = [1, 2, 3].map((i) => c.publish("chat:q", { i }));
    const over = await c.publish("chat:q", { i: 4 }).catch((e) => e);
    expect(over).toBeInstanceOf(FanoutError);
    expect(over.code).toBe("queue_full");
    c.connect();
    const results = await Promise.all(queued);
    expect(results.map((r) => r.offset)).toEqual([1, 2, 3]);

    // close() rejects whatever still waits.
    const d = client({ url: edge.url, token: mint("u4") });
    const waiting = d.publish("chat:q", {}).catch((e) => e);
    d.close();
    expect((await waiting).code).toBe("closed");
    expect((await d.publish("chat:q", {}).catch((e) => e)).code).toBe("closed");
  });

  it("refreshes a short-lived token in-band and keeps its connection", async () => {
    const edge = await Edge.start();
    let calls = 0;
    const c = client({
      url: edge.url,
      getToken: async () => {
        calls++;
        return mint("u5", 3);
      },
    });
    const seen = states(c);
    const rec = new Recorder();
    c.subscribe("chat:refresh", rec.handlers);
    c.connect();
    await until(() => c.state === "connected");
    // Past the first token's exp + the edge's 5 s leeway: without refresh it would be closed 4004.
    await sleep(9500);
    expect(calls).toBeGreaterThanOrEqual(3);
    expect(seen).toEqual(["connecting", "connected"]);
    await edge.publish("chat:refresh", "still here");
    await until(() => rec.messages.length === 1);
    expect(rec.data).toEqual(["still here"]);
  });

  it("goes closed without retrying when an administrator disconnects it (4010)", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("u6") });
    const errors: FanoutError[] = [];
    c.on("error", (e) => void errors.push(e));
    const infos: unknown[] = [];
    c.on("state", (s, info) => void infos.push([s, info.code]));
    c.connect();
    await until(() => c.state === "connected");
    const r = await edge.api("/api/disconnect", { user: "u6", reason: "banned" });
    expect(r.disconnected).toBe(1);
    await until(() => c.state === "closed");
    expect(infos).toEqual([["connecting", undefined], ["connected", undefined], ["closed", 4010]]);
    expect(errors.map((e) => [e.code, e.closeCode])).toEqual([["closed", 4010]]);
    // No reconnect.
    await sleep(1000);
    expect(c.state).toBe("closed");
    expect((await edge.api("/api/stats")).node.connections).toBe(0);
    expect((await c.publish("chat:x", 1).catch((e) => e)).code).toBe("closed");
  });

  it("asks getToken once after a refused token (4001), then gives up", async () => {
    const edge = await Edge.start();
    let calls = 0;
    const c = client({
      url: edge.url,
      token: "not-a-jwt",
      getToken: async () => {
        calls++;
        return mint("u7", 3600, { exp: 1 }); // already expired long ago: refused too
      },
    });
    const seen = states(c);
    c.connect();
    await until(() => c.state === "closed", 5000, "closed");
    expect(calls).toBe(1);
    expect(seen).toEqual(["connecting", "disconnected", "connecting", "closed"]);

    // Without getToken: closed at once.
    const d = client({ url: edge.url, token: "not-a-jwt" });
    d.connect();
    await until(() => d.state === "closed");
  });

  it("reconnects after a drain and resets a channel whose history the restart lost", async () => {
    const edge = await Edge.start();
    const c = client({ url: edge.url, token: mint("u8") });
    const rec = new Recorder();
    const sub = c.subscribe("chat:restart", rec.handlers);
    c.connect();
    await until(() => sub.state === "subscribed");
    for (let i = 1; i <= 3; i++) await edge.publish("chat:restart", i);
    await until(() => rec.messages.length === 3);
    const before = sub.position!;
    const seen = states(c);

    await edge.stop(); // drain: 1001
    await edge.spawn(); // same port, same secret, an empty embedded broker
    await until(() => rec.resets.length === 1, 10_000, "onReset");
    expect(seen).toContain("disconnected");
    expect(c.state).toBe("connected");
    // The old position's epoch is gone: the app is told to reload, never silently skipped.
    expect(rec.resets[0]!.epoch).not.toBe(before.epoch);
    expect(sub.position).toEqual(rec.resets[0]);
    await edge.publish("chat:restart", "after");
    await until(() => rec.messages.length === 4);
    expect(rec.messages[3]).toMatchObject({ data: "after", offset: 1, epoch: rec.resets[0]!.epoch });
  });
});
