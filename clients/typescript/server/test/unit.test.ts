// What is checked before anything is sent, and the bundled publish script.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { FanoutServerError, HttpPublisher, RedisPublisher, channelError, newIdempotencyKey, parseRedisUrl, validIdempotencyKey } from "../src/index.js";
import { REPO } from "./support/procs.js";

const LUA = join(REPO, "crates/fanout-protocol/src/publish.lua");
const DIST = join(REPO, "clients/typescript/server/dist/index.js");

describe("the publish script", () => {
  it("the built package carries crates/fanout-protocol/src/publish.lua verbatim", async () => {
    expect(existsSync(DIST), "dist/index.js missing: run `npm run build` first").toBe(true);
    const built = (await import(DIST)) as { PUBLISH_SCRIPT: string };
    expect(built.PUBLISH_SCRIPT === readFileSync(LUA, "utf8"), "dist's publish script differs from publish.lua: rebuild (npm run build)").toBe(true);
  });
});

describe("validation", () => {
  it("channels follow the edge's rules", () => {
    expect(channelError("job_progress:7")).toBeNull();
    expect(channelError("chat:room:1")).toBeNull();
    expect(channelError("")).toMatch(/empty/);
    expect(channelError("nocolon")).toMatch(/namespace:rest/);
    expect(channelError(":x")).toMatch(/namespace:rest/);
    expect(channelError("user:")).toMatch(/namespace:rest/);
    expect(channelError("user:{42}")).toMatch(/"\{"/);
    expect(channelError("user:4 2")).toMatch(/" "/);
    expect(channelError("user:*")).toMatch(/"\*"/);
    expect(channelError(`user:${"a".repeat(255)}`)).toMatch(/255 bytes/);
  });

  it("idempotency keys: 32 hex by default; 1-128 printable ASCII without spaces", () => {
    const k = newIdempotencyKey();
    expect(k).toMatch(/^[0-9a-f]{32}$/);
    expect(k).not.toBe(newIdempotencyKey());
    expect(validIdempotencyKey("a-b_c:1")).toBe(true);
    expect(validIdempotencyKey("")).toBe(false);
    expect(validIdempotencyKey("a b")).toBe(false);
    expect(validIdempotencyKey("é")).toBe(false);
    expect(validIdempotencyKey("x".repeat(129))).toBe(false);
    expect(validIdempotencyKey("x".repeat(128))).toBe(true);
  });

  it("HttpPublisher refuses bad URLs naming the schemes, and sends nothing for bad data or keys", async () => {
    expect(() => new HttpPublisher({ url: "ws://h:1/ws", adminToken: "t" })).toThrow(/http:\/\/, https:\/\//);
    expect(() => new HttpPublisher({ url: "edge:8080", adminToken: "t" })).toThrow(/http:\/\/|not a URL/);
    expect(() => new HttpPublisher({ url: "http://h:1", adminToken: "" })).toThrow(/adminToken/);
    let calls = 0;
    const p = new HttpPublisher({ url: "http://127.0.0.1:1", adminToken: "t", fetch: (async () => (calls++, new Response("{}"))) as typeof fetch });
    const cyclic: any = { a: 1 };
    cyclic.self = cyclic;
    await expect(p.publish("test:x", { n: 10n })).rejects.toThrow(/not JSON-serializable.*BigInt/);
    await expect(p.publish("test:x", cyclic)).rejects.toThrow(/not JSON-serializable.*circular/i);
    await expect(p.publish("test:x", undefined)).rejects.toThrow(/not JSON-serializable/);
    await expect(p.publish("test:x", 1, { idempotencyKey: "a b" })).rejects.toMatchObject({ code: "bad_request" });
    expect(calls).toBe(0);
  });

  it("Redis URLs: the four schemes, and clear refusals", async () => {
    expect(parseRedisUrl("redis://127.0.0.1:7000/2")).toMatchObject({ kind: "single", db: 2, hosts: [{ host: "127.0.0.1", port: 7000 }] });
    expect(parseRedisUrl("rediss://u:p%40ss@h:7000")).toMatchObject({ kind: "single", tls: true, username: "u", password: "p@ss" });
    expect(parseRedisUrl("redis-cluster://a:7000, b:7001,c:7002").hosts.map((h) => `${h.host}:${h.port}`)).toEqual(["a:7000", "b:7001", "c:7002"]);
    expect(parseRedisUrl("redis-sentinel://s1:26379,s2:26380/mymaster/2")).toMatchObject({ kind: "sentinel", service: "mymaster", db: 2 });
    expect(parseRedisUrl("redis-sentinel://s1?sentinelServiceName=m")).toMatchObject({ service: "m", hosts: [{ host: "s1", port: 26379 }] });
    expect(() => parseRedisUrl("http://x")).toThrow(/not one of redis:\/\/, rediss:\/\/, redis-cluster:\/\/.*redis-sentinel:\/\//);
    expect(() => parseRedisUrl("127.0.0.1:6380")).toThrow(/not a URL/);
    expect(() => parseRedisUrl("redis-sentinel://s1:26379")).toThrow(/service name/);
    expect(() => parseRedisUrl("redis-cluster://")).toThrow(/at least one host/);
    expect(() => parseRedisUrl("redis-cluster://a:1/3")).toThrow(/no path/);
    await expect(RedisPublisher.connect("mysql://x")).rejects.toBeInstanceOf(FanoutServerError);
  });
});
