// RedisPublisher against a real redis-server, with a subscriber through the real edge.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RedisPublisher, connectionToken, type PublishAck } from "../src/index.js";
import { Edge, SECRET, Sub, execCli, startRedis, stopAll, until, freePort, type RedisProc } from "./support/procs.js";

let redis: RedisProc;
let edge: Edge;
let pub: RedisPublisher;

beforeAll(async () => {
  redis = await startRedis();
  edge = await Edge.start({ redisUrl: redis.url });
  pub = await RedisPublisher.connect(redis.url, { history: { test: { size: 1000, ttlSecs: 600 } } });
});
afterAll(async () => {
  await pub?.close();
  await stopAll();
});

const token = (channels = ["test:*", "job_progress:*"]) => connectionToken(SECRET, { user: "u1", channels });

describe("RedisPublisher, single Redis", () => {
  it("offsets 1..n in one epoch; the edge's subscriber gets the same offsets, event and data", async () => {
    const sub = await Sub.open(edge.ws, token());
    await sub.connected();
    const subscribed = await sub.subscribe("test:seq");
    expect(subscribed.type).toBe("subscribed");
    const acks: PublishAck[] = [];
    for (let i = 1; i <= 20; i++) acks.push(await pub.publish("test:seq", { i, text: "ünïcode ✓" }, { event: "tick" }));
    expect(acks.map((a) => a.offset)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(new Set(acks.map((a) => a.epoch)).size).toBe(1);
    expect(acks[0]!.epoch).toBe(subscribed.epoch); // the epoch the subscribe started
    await until(() => sub.messages("test:seq").length === 20, 5000, "20 messages");
    const got = sub.messages("test:seq");
    expect(got.map((m) => m.offset)).toEqual(acks.map((a) => a.offset));
    expect(got.every((m) => m.epoch === acks[0]!.epoch && m.event === "tick")).toBe(true);
    expect(got.map((m) => m.data)).toEqual(Array.from({ length: 20 }, (_, i) => ({ i: i + 1, text: "ünïcode ✓" })));
    // The history the edge replays (since offset 10) is the same.
    const late = await Sub.open(edge.ws, token());
    await late.connected();
    expect(await late.subscribe("test:seq", { since: { offset: 10, epoch: acks[0]!.epoch } })).toMatchObject({ recovered: true });
    await until(() => late.messages("test:seq").length === 10, 5000, "replay");
    expect(late.messages("test:seq").map((m) => m.offset)).toEqual(acks.slice(10).map((a) => a.offset));
    sub.close();
    late.close();
  });

  it("the same idempotency key twice: one message, the second answer is duplicate:true with the first offset", async () => {
    const sub = await Sub.open(edge.ws, token());
    await sub.connected();
    await sub.subscribe("test:dedup");
    const a = await pub.publish("test:dedup", { n: 1 }, { idempotencyKey: "order-42" });
    const b = await pub.publish("test:dedup", { n: 1 }, { idempotencyKey: "order-42" });
    expect(a.duplicate).toBeUndefined();
    expect(b).toEqual({ offset: a.offset, epoch: a.epoch, duplicate: true });
    const c = await pub.publish("test:dedup", { n: 2 });
    expect(c.offset).toBe(a.offset + 1);
    await until(() => sub.messages("test:dedup").length === 2, 5000, "2 messages");
    await new Promise((r) => setTimeout(r, 200));
    expect(sub.messages("test:dedup").map((m) => m.data)).toEqual([{ n: 1 }, { n: 2 }]);
    sub.close();
  });

  it("NOSCRIPT after SCRIPT FLUSH falls back to EVAL", async () => {
    await pub.publish("test:flush", 1);
    expect((await execCli(redis.port, "script", "flush")).trim()).toBe("OK");
    const ack = await pub.publish("test:flush", 2);
    expect(ack.offset).toBe(2);
    expect((await execCli(redis.port, "script", "exists", pubSha())).trim()).toBe("1");
  });

  it("helpers: exact channels, events and data; a finished job's history TTL", async () => {
    const sub = await Sub.open(edge.ws, connectionToken(SECRET, { user: "77", channels: ["job_progress:*"] }));
    await sub.connected();
    await sub.subscribe("job_progress:j1");
    await sub.subscribe("user:77");
    await pub.jobProgress("j1", { pct: 40, message: "enriching rows" });
    await pub.userEvent(77, "notification", { text: "export ready" });
    await pub.jobCompleted("j1", "succeeded", { rows: 1200 });
    await until(() => sub.frames.some((f) => f.type === "unsubscribed" && f.reason === "completed"), 5000, "completion");
    const job = sub.messages("job_progress:j1");
    expect(job.map((m) => [m.event, m.data])).toEqual([
      ["progress", { status: "running", pct: 40, message: "enriching rows" }],
      ["completed", { status: "succeeded", result: { rows: 1200 } }],
    ]);
    expect(sub.messages("user:77").map((m) => [m.event, m.data])).toEqual([["notification", { text: "export ready" }]]);
    const ttl = Number(await execCli(redis.port, "ttl", "fanout:{job_progress:j1}:history"));
    expect(ttl).toBeGreaterThan(3500);
    expect(ttl).toBeLessThanOrEqual(3600); // finished: 1 h, not the namespace's 24 h
    expect(Number(await execCli(redis.port, "ttl", "fanout:{test:seq}:meta"))).toBeLessThanOrEqual(600); // per-namespace override
    sub.close();
  });

  it("bad channels, keys and data are refused before anything is sent", async () => {
    const before = await execCli(redis.port, "dbsize");
    await expect(pub.publish("nocolon", 1)).rejects.toMatchObject({ code: "bad_request", message: expect.stringMatching(/namespace:rest/) });
    await expect(pub.publish("test:{x}", 1)).rejects.toMatchObject({ code: "bad_request" });
    await expect(pub.publish("test:x", 1, { idempotencyKey: "x".repeat(129) })).rejects.toMatchObject({ code: "bad_request" });
    await expect(pub.publish("test:x", { big: 1n })).rejects.toThrow(/not JSON-serializable/);
    expect(await execCli(redis.port, "dbsize")).toBe(before);
  });

  it("an unreachable Redis fails connect() in bounded time, naming host:port", async () => {
    const port = await freePort();
    const t = Date.now();
    await expect(RedisPublisher.connect(`redis://127.0.0.1:${port}`, { connectTimeout: 1000 })).rejects.toMatchObject({
      code: "unreachable",
      message: expect.stringContaining(`127.0.0.1:${port}`),
    });
    expect(Date.now() - t).toBeLessThan(3000);
  });

  it("a publish through a Redis restart is retried with the same key and lands once", async () => {
    const p = await RedisPublisher.connect(redis.url, { retry: { deadline: 8000 } });
    await p.publish("test:restart", 0);
    // Kill Redis and bring it back on the same port after 700 ms.
    const { kill } = await import("./support/procs.js");
    await kill(redis.proc, "SIGKILL");
    const pending = p.publish("test:restart", 1, { idempotencyKey: "restart-1" });
    await new Promise((r) => setTimeout(r, 700));
    redis = await startRedis([], redis.port);
    const ack = await pending;
    expect(ack.offset).toBe(1); // Redis came back empty: a new epoch
    expect(await p.publish("test:restart", 1, { idempotencyKey: "restart-1" })).toMatchObject({ duplicate: true, offset: 1 });
    expect((await execCli(redis.port, "xlen", "fanout:{test:restart}:history")).trim()).toBe("1");
    await p.close();
  });
});

function pubSha(): string {
  return (pub as unknown as { sha: string }).sha;
}
