/**
 * Recovery across an edge restart with history kept in a real redis-server: an edge
 * drains (1001), messages are published through another edge while it is gone, it
 * comes back on the same port, and the client resubscribes with `since` (WebSocket) or
 * `Last-Event-ID` (event stream): `recovered:true`, every message once, in order.
 */

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Fanout, TransportName } from "../src/index.js";
import { client, Recorder, states } from "./support/client.js";
import { Edge, mint, startRedis, stopAll, until } from "./support/edge.js";

let redisUrl: string;
beforeAll(async () => {
  redisUrl = (await startRedis()).url;
});
afterAll(stopAll);

describe.each<TransportName>(["websocket", "sse"])("recovery over %s", (transport) => {
  it("an edge restart loses nothing: recovered with since, no reset, no duplicate", async () => {
    const channel = `chat:recover-${transport}`;
    const edge = await Edge.start({ redisUrl });
    const other = await Edge.start({ redisUrl });
    const c: Fanout = client({ url: edge.url, token: mint("r1"), transports: [transport] });
    const rec = new Recorder();
    const sub = c.subscribe(channel, rec.handlers);
    c.connect();
    await until(() => sub.state === "subscribed", 5000, "subscribed");
    for (let i = 1; i <= 5; i++) await edge.publish(channel, i);
    await until(() => rec.messages.length === 5, 5000, "the first 5");
    const seen = states(c);

    await edge.stop(); // drain: 1001 (a `close` event on the stream)
    await until(() => seen.includes("disconnected"), 5000, "disconnected");
    for (let i = 6; i <= 15; i++) await other.publish(channel, i);
    await edge.spawn(); // the same port: the client comes back to it
    await until(() => rec.messages.length === 15, 10_000, "the missed 10");
    for (let i = 16; i <= 20; i++) await other.publish(channel, i);
    await until(() => rec.messages.length === 20, 5000, "live ones");

    expect(rec.data).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(rec.offsets).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
    expect(rec.resets).toEqual([]);
    expect(c.state).toBe("connected");
    expect(sub.position).toEqual({ offset: 20, epoch: rec.messages[0]!.epoch });
  });
});
