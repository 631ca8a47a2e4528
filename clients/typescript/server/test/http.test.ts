// HttpPublisher against the real edge (with Redis), and retries against servers that fail.
import { createServer, request, type RequestListener, type Server } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FanoutServerError, HttpPublisher, connectionToken } from "../src/index.js";
import { ADMIN, Edge, SECRET, Sub, execCli, freePort, sleep, startRedis, stopAll, until, type RedisProc } from "./support/procs.js";

let redis: RedisProc;
let edge: Edge;

beforeAll(async () => {
  redis = await startRedis();
  edge = await Edge.start({ redisUrl: redis.url });
});
afterAll(() => stopAll());

const token = () => connectionToken(SECRET, { user: "u1", channels: ["test:*", "job_progress:*"] });
const xlen = async (channel: string) => Number(await execCli(redis.port, "xlen", `fanout:{${channel}}:history`));

/** A fetch that counts its calls. */
function counting(): { fetch: typeof fetch; calls: () => number } {
  let n = 0;
  return { fetch: ((input: any, init: any) => (n++, fetch(input, init))) as typeof fetch, calls: () => n };
}

async function listen(handler: RequestListener): Promise<{ server: Server; url: string }> {
  const server = createServer(handler);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  return { server, url: `http://127.0.0.1:${(server.address() as { port: number }).port}` };
}

describe("HttpPublisher", () => {
  it("publishes reach a subscriber with offsets; helpers and broadcast", async () => {
    const pub = new HttpPublisher({ url: edge.http, adminToken: ADMIN });
    const sub = await Sub.open(edge.ws, token());
    await sub.connected();
    await sub.subscribe("test:http");
    await sub.subscribe("test:other");
    await sub.subscribe("job_progress:h1");
    const a = await pub.publish("test:http", { text: "hi" }, { event: "said" });
    const b = await pub.publish("test:http", [1, 2]);
    expect(b).toEqual({ offset: a.offset + 1, epoch: a.epoch });
    const bc = await pub.broadcast(["test:http", "test:other"], { all: true });
    expect(bc.failed).toBe(0);
    expect(bc.results.map((r) => r.channel)).toEqual(["test:http", "test:other"]);
    await pub.jobProgress("h1", { pct: 50 });
    await pub.jobCompleted("h1", "failed", { error: "boom" });
    await until(() => sub.messages("test:http").length === 3 && sub.messages("job_progress:h1").length === 2, 5000, "messages");
    expect(sub.messages("test:http").map((m) => [m.offset, m.event, m.data])).toEqual([
      [a.offset, "said", { text: "hi" }],
      [a.offset + 1, undefined, [1, 2]],
      [a.offset + 2, undefined, { all: true }],
    ]);
    expect(sub.messages("job_progress:h1").map((m) => [m.event, m.data])).toEqual([
      ["progress", { status: "running", pct: 50 }],
      ["completed", { status: "failed", result: { error: "boom" } }],
    ]);
    sub.close();
  });

  it("the same key twice: duplicate:true, one message", async () => {
    const pub = new HttpPublisher({ url: edge.http, adminToken: ADMIN });
    const a = await pub.publish("test:dup", { n: 1 }, { idempotencyKey: "invoice-7" });
    const b = await pub.publish("test:dup", { n: 1 }, { idempotencyKey: "invoice-7" });
    expect(b).toEqual({ ...a, duplicate: true });
    expect(await xlen("test:dup")).toBe(1);
  });

  it("401 (bad admin token) is thrown at once, not retried", async () => {
    const c = counting();
    const pub = new HttpPublisher({ url: edge.http, adminToken: "wrong-token", fetch: c.fetch });
    const e = await pub.publish("test:x", 1).catch((e) => e);
    expect(e).toBeInstanceOf(FanoutServerError);
    expect(e).toMatchObject({ code: "unauthorized", status: 401, gaveUp: false });
    expect(c.calls()).toBe(1);
  });

  it("400 for a bad channel carries the edge's code, not retried", async () => {
    const c = counting();
    const pub = new HttpPublisher({ url: edge.http, adminToken: ADMIN, fetch: c.fetch });
    await expect(pub.publish("nocolon", 1)).rejects.toMatchObject({ code: "bad_request", status: 400, message: expect.stringMatching(/namespace/) });
    await expect(pub.broadcast(["test:ok", "bad channel"], 1)).rejects.toMatchObject({ code: "bad_request", status: 400 });
    expect(c.calls()).toBe(2);
    expect(await xlen("test:ok")).toBe(0);
  });

  it("an edge started late is retried within the deadline: the publish lands once", async () => {
    const port = await freePort();
    const c = counting();
    const pub = new HttpPublisher({ url: `http://127.0.0.1:${port}`, adminToken: ADMIN, fetch: c.fetch, retry: { deadline: 10_000 } });
    const pending = pub.publish("test:late", { n: 1 });
    await sleep(800);
    const late = await Edge.start({ port, redisUrl: redis.url });
    const ack = await pending;
    expect(ack.offset).toBe(1);
    expect(c.calls()).toBeGreaterThan(1);
    expect(await xlen("test:late")).toBe(1);
    // Restarted while a publish retries: lands once.
    await late.stop();
    const again = pub.publish("test:late", { n: 2 });
    await sleep(500);
    await late.spawn();
    expect((await again).offset).toBe(2);
    expect(await xlen("test:late")).toBe(2);
  });

  it("an answer lost after the edge applied the publish: resent under the same key, applied once", async () => {
    // A proxy that forwards the first request and then drops the connection instead of answering.
    let seen = 0;
    const proxy = await listen((req, res) => {
      const first = ++seen === 1;
      const up = request(edge.http + req.url!, { method: req.method, headers: req.headers }, (r) => {
        if (first) return void (r.resume(), req.socket.destroy());
        res.writeHead(r.statusCode!, r.headers);
        r.pipe(res);
      });
      req.pipe(up);
    });
    const pub = new HttpPublisher({ url: proxy.url, adminToken: ADMIN });
    const ack = await pub.publish("test:lost-answer", { n: 1 });
    expect(seen).toBe(2);
    expect(ack).toMatchObject({ offset: 1, duplicate: true });
    expect(await xlen("test:lost-answer")).toBe(1);
    proxy.server.close();
  });

  it("429 honours Retry-After; 503 is retried; the same key on every attempt; past the deadline it gives up", async () => {
    const keys: string[] = [];
    const times: number[] = [];
    const fake = await listen((req, res) => {
      keys.push(String(req.headers["idempotency-key"]));
      times.push(Date.now());
      req.resume();
      req.on("end", () => {
        if (keys.length === 1) return void res.writeHead(429, { "retry-after": "1", "content-type": "application/json" }).end('{"error":{"code":"rate_limited","message":"slow down"}}');
        if (keys.length === 2) return void res.writeHead(503).end("upstream down");
        res.writeHead(200, { "content-type": "application/json" }).end('{"offset":9,"epoch":"E"}');
      });
    });
    const pub = new HttpPublisher({ url: fake.url, adminToken: "t" });
    expect(await pub.publish("test:x", 1)).toEqual({ offset: 9, epoch: "E" });
    expect(keys.length).toBe(3);
    expect(new Set(keys).size).toBe(1);
    expect(keys[0]).toMatch(/^[0-9a-f]{32}$/);
    expect(times[1]! - times[0]!).toBeGreaterThanOrEqual(950);
    fake.server.close();

    const down = await listen((req, res) => void res.writeHead(503, { "content-type": "application/json" }).end('{"error":{"code":"unavailable","message":"broker down"}}'));
    const t = Date.now();
    const e = await new HttpPublisher({ url: down.url, adminToken: "t", retry: { deadline: 600 } }).publish("test:x", 1).catch((e) => e);
    expect(e).toMatchObject({ code: "unavailable", status: 503, gaveUp: true });
    expect(e.attempts).toBeGreaterThan(2);
    expect(e.message).toMatch(/may or may not have been applied/);
    expect(Date.now() - t).toBeLessThan(1500);
    down.server.close();
  });

  it("an unreachable edge fails within the deadline, naming host:port", async () => {
    const port = await freePort();
    const t = Date.now();
    const e = await new HttpPublisher({ url: `http://127.0.0.1:${port}`, adminToken: "t", retry: { deadline: 500 } }).publish("test:x", 1).catch((e) => e);
    expect(e).toMatchObject({ code: "unreachable", gaveUp: true });
    expect(e.message).toContain(`127.0.0.1:${port}`);
    expect(Date.now() - t).toBeLessThan(1500);
  });
});
