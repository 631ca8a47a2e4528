/**
 * What the client does on each close code, request timeouts, unanswered requests on a
 * lost connection, resubscribing with `since`, ending subscriptions — against a
 * scripted server that can close with any code and withhold any answer.
 */

import { afterEach, describe, expect, it } from "vitest";
import { client, Recorder, states } from "./support/client.js";
import { mint, sleep, until } from "./support/edge.js";
import { FakeEdge } from "./support/fake.js";

let fake: FakeEdge;
afterEach(async () => {
  await fake?.stop();
});

async function connected(opts: Parameters<typeof client>[0] extends infer O ? Partial<O> : never = {}) {
  fake = await FakeEdge.start();
  const c = client({ url: fake.url, token: mint("1"), ...opts });
  c.connect();
  await until(() => c.state === "connected", 3000, "connected");
  return c;
}

describe("close codes", () => {
  it("1001 (drain): reconnects within a second and resubscribes from the last message", async () => {
    const c = await connected({ minReconnectDelay: 5000, maxReconnectDelay: 10_000 });
    const rec = new Recorder();
    const sub = c.subscribe("chat:a", rec.handlers);
    await until(() => sub.state === "subscribed");
    fake.last.send({ type: "message", channel: "chat:a", data: "x", offset: 1, epoch: "E" });
    fake.last.send({ type: "message", channel: "chat:a", data: "y", offset: 2, epoch: "E" });
    await until(() => rec.messages.length === 2);
    const t0 = Date.now();
    fake.last.close(1001, "draining");
    await until(() => fake.conns.length === 2 && c.state === "connected", 3000);
    expect(Date.now() - t0).toBeLessThan(1500);
    await until(() => fake.last.frames.some((f) => f.type === "subscribe"));
    expect(fake.last.frames.find((f) => f.type === "subscribe")).toMatchObject({ channel: "chat:a", since: { offset: 2, epoch: "E" } });
    // The replay repeats what was delivered: dropped.
    fake.last.send({ type: "message", channel: "chat:a", data: "y", offset: 2, epoch: "E" });
    fake.last.send({ type: "message", channel: "chat:a", data: "z", offset: 3, epoch: "E" });
    await until(() => rec.messages.length === 3);
    expect(rec.data).toEqual(["x", "y", "z"]);
  });

  it("resubscribes from the subscribed position when no message came yet", async () => {
    const c = await connected();
    fake.offsets.set("chat:b", 41);
    const sub = c.subscribe("chat:b", {});
    await until(() => sub.state === "subscribed");
    fake.last.close(4009, "slow consumer");
    await until(() => fake.conns.length === 2 && sub.state === "subscribed");
    expect(fake.last.frames.find((f) => f.type === "subscribe").since).toEqual({ offset: 41, epoch: "E" });
  });

  it("1006/1011/1013/4009: backs off and reconnects", async () => {
    const c = await connected({ minReconnectDelay: 20, maxReconnectDelay: 100 });
    for (const code of [1011, 1013, 4009]) {
      const n = fake.conns.length;
      fake.last.close(code);
      await until(() => fake.conns.length === n + 1 && c.state === "connected", 3000, `reconnect after ${code}`);
    }
    const n = fake.conns.length;
    fake.last.ws.terminate(); // no close frame: 1006
    await until(() => fake.conns.length === n + 1 && c.state === "connected", 3000, "reconnect after 1006");
  });

  it("4004: gets a new token and reconnects with it", async () => {
    let calls = 0;
    const c = await connected({ getToken: async () => mint("1", 3600, { n: ++calls }) });
    expect(calls).toBe(0); // the initial token was given
    fake.last.close(4004, "token expired");
    await until(() => fake.conns.length === 2 && c.state === "connected");
    expect(calls).toBe(1);
    expect(fake.tokens[1]).not.toBe(fake.tokens[0]);
  });

  it("4001: one new token; refused again, it stops", async () => {
    let calls = 0;
    fake = await FakeEdge.start();
    fake.onFrame = (conn, f) => {
      if (f.type !== "auth") return;
      conn.close(4001, "bad token");
      return true;
    };
    const c = client({ url: fake.url, token: "t0", getToken: async () => `t${++calls}` });
    const seen = states(c);
    c.connect();
    await until(() => c.state === "closed");
    expect(calls).toBe(1);
    expect(fake.tokens).toEqual([]);
    expect(fake.conns.map((x) => x.frames[0].token)).toEqual(["t0", "t1"]);
    expect(seen.at(-1)).toBe("closed");
  });

  for (const code of [1002, 1008, 1009, 4003, 4010]) {
    it(`${code}: goes closed and never retries`, async () => {
      const c = await connected({ minReconnectDelay: 10, maxReconnectDelay: 20 });
      const pending = c.publish("chat:x", 1).catch((e) => e);
      fake.last.close(code, "stop");
      await until(() => c.state === "closed");
      expect((await pending).code).toBe("closed");
      await sleep(200);
      expect(fake.conns.length).toBe(1);
    });
  }
});

describe("requests", () => {
  it("time out with `timeout`", async () => {
    const c = await connected({ timeout: 300 });
    const t0 = Date.now();
    const err = await c.publish("chat:x", 1).catch((e) => e);
    expect(err.code).toBe("timeout");
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    expect((await c.presence("chat:x").catch((e) => e)).code).toBe("timeout");
    expect(c.state).toBe("connected");
  });

  it("carry one idempotency key per publish: a caller's own, or 32 fresh hex characters", async () => {
    const c = await connected();
    fake.onFrame = (conn, f) => {
      if (f.type === "publish") conn.send({ type: "reply", id: f.id, offset: 1, epoch: "E" });
    };
    await c.publish("chat:x", 1);
    await c.publish("chat:x", 2);
    await c.publish("chat:x", 3, { idempotencyKey: "order-17" });
    const keys = fake.last.frames.filter((f) => f.type === "publish").map((f) => f.idempotency_key);
    expect(keys[0]).toMatch(/^[0-9a-f]{32}$/);
    expect(keys[1]).toMatch(/^[0-9a-f]{32}$/);
    expect(keys[0]).not.toBe(keys[1]);
    expect(keys[2]).toBe("order-17");
  });

  it("lost with the connection, are resent under the same keys once reconnected, before later ones and in order", async () => {
    const c = await connected({ minReconnectDelay: 10, maxReconnectDelay: 50 });
    const first = c.publish("chat:x", 1);
    const second = c.publish("chat:x", 2, { event: "e" });
    await until(() => fake.last.frames.filter((f) => f.type === "publish").length === 2);
    const sent = fake.last.frames.filter((f) => f.type === "publish");
    // The edge had applied the first before the connection went: it answers `duplicate`.
    fake.onFrame = (conn, f) => {
      if (f.type !== "publish") return;
      const dup = f.idempotency_key === sent[0].idempotency_key;
      conn.send({ type: "reply", id: f.id, offset: f.data, epoch: "E", ...(dup ? { duplicate: true } : {}) });
    };
    fake.last.close(1011);
    await until(() => fake.conns.length === 2);
    const third = c.publish("chat:x", 3);
    expect(await first).toEqual({ offset: 1, epoch: "E", duplicate: true });
    expect(await second).toEqual({ offset: 2, epoch: "E" });
    expect(await third).toEqual({ offset: 3, epoch: "E" });
    const resent = fake.last.frames.filter((f) => f.type === "publish");
    expect(resent.map((f) => [f.data, f.idempotency_key, f.event])).toEqual([
      [1, sent[0].idempotency_key, undefined],
      [2, sent[1].idempotency_key, "e"],
      [3, expect.stringMatching(/^[0-9a-f]{32}$/), undefined],
    ]);
  });

  it("unanswered on a connection gone silent: the probe finds it dead and the publish is resent, not timed out", async () => {
    const c = await connected({ timeout: 300, minReconnectDelay: 10, maxReconnectDelay: 50 });
    const sent = c.publish("chat:x", 1);
    await until(() => fake.last.frames.some((f) => f.type === "publish"));
    // The node hangs: nothing more comes back on this connection, pings included.
    fake.last.silent = true;
    fake.onFrame = (conn, f) => {
      if (f.type === "publish") conn.send({ type: "reply", id: f.id, offset: 4, epoch: "E" });
    };
    expect(await sent).toEqual({ offset: 4, epoch: "E" });
    expect(fake.conns.length).toBe(2);
    const [first, again] = fake.conns.map((x) => x.frames.find((f) => f.type === "publish"));
    expect(again.idempotency_key).toBe(first.idempotency_key);
  }, 15_000);

  it("lost with the connection and then closed for good, reject with `closed`", async () => {
    const c = await connected({ minReconnectDelay: 5000, maxReconnectDelay: 10_000 });
    const sent = c.publish("chat:x", 1).catch((e) => e);
    await until(() => fake.last.frames.some((f) => f.type === "publish"));
    fake.last.close(1011);
    await until(() => c.state === "disconnected");
    c.close();
    expect((await sent).code).toBe("closed");
  });

  it("reject with the error frame's code", async () => {
    const c = await connected();
    fake.onFrame = (conn, f) => {
      if (f.type === "publish") conn.send({ type: "error", id: f.id, code: "rate_limited", message: "slow down" });
    };
    const err = await c.publish("chat:x", 1).catch((e) => e);
    expect([err.code, err.message]).toEqual(["rate_limited", "slow down"]);
  });
});

describe("subscriptions", () => {
  it("end on completed and forbidden, and are not resubscribed", async () => {
    const c = await connected();
    const job = new Recorder();
    const other = new Recorder();
    const a = c.subscribe("job_progress:1", job.handlers);
    const b = c.subscribe("chat:gone", other.handlers);
    await until(() => a.state === "subscribed" && b.state === "subscribed");
    fake.last.send({ type: "message", channel: "job_progress:1", data: { status: "succeeded" }, offset: 1, epoch: "E" });
    fake.last.send({ type: "unsubscribed", channel: "job_progress:1", reason: "completed" });
    fake.last.send({ type: "unsubscribed", channel: "chat:gone", reason: "forbidden" });
    await until(() => job.completed === 1 && other.errors.length === 1);
    expect(other.errors[0]!.code).toBe("forbidden");
    expect([a.state, b.state]).toEqual(["ended", "ended"]);
    fake.last.close(1011);
    await until(() => fake.conns.length === 2 && c.state === "connected");
    await sleep(100);
    expect(fake.last.frames.filter((f) => f.type === "subscribe")).toEqual([]);
    // The channel can be subscribed again.
    expect(c.subscribe("job_progress:1", {}).state).toBe("subscribing");
  });

  it("a refused subscribe ends with onError; a transient one is retried", async () => {
    const c = await connected({ minReconnectDelay: 10, maxReconnectDelay: 50 });
    let tries = 0;
    fake.onFrame = (conn, f) => {
      if (f.type !== "subscribe") return;
      if (f.channel === "chat:no") conn.send({ type: "error", id: f.id, code: "forbidden", message: "no" });
      else if (++tries < 3) conn.send({ type: "error", id: f.id, code: "unavailable", message: "later" });
      else return false;
      return true;
    };
    const no = new Recorder();
    const later = new Recorder();
    const a = c.subscribe("chat:no", no.handlers);
    const b = c.subscribe("chat:later", later.handlers);
    await until(() => a.state === "ended" && b.state === "subscribed");
    expect(no.errors.map((e) => e.code)).toEqual(["forbidden"]);
    expect(later.errors.map((e) => e.code)).toEqual(["unavailable", "unavailable"]);
  });

  it("an app callback that throws is reported, and delivery goes on", async () => {
    const c = await connected();
    const errors: string[] = [];
    c.on("error", (e) => void errors.push(e.message));
    const got: unknown[] = [];
    const sub = c.subscribe("chat:t", {
      onMessage: (m) => {
        got.push(m.data);
        if (m.data === 1) throw new Error("boom");
      },
    });
    await until(() => sub.state === "subscribed");
    fake.last.send({ type: "message", channel: "chat:t", data: 1, offset: 1, epoch: "E" });
    fake.last.send({ type: "message", channel: "chat:t", data: 2, offset: 2, epoch: "E" });
    await until(() => got.length === 2);
    expect(errors).toEqual(["a callback threw: boom"]);
  });

  it("refuses a second subscription to the same channel", async () => {
    const c = await connected();
    c.subscribe("chat:once", {});
    expect(() => c.subscribe("chat:once", {})).toThrow(/already subscribed/);
  });
});
