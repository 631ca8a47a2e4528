// RedisPublisher against a real Redis Cluster (3 primaries + 3 replicas): 200 numbered
// publishes with a CLUSTER FAILOVER midway land each exactly once, in order.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RedisPublisher } from "../src/index.js";
import { execCli, sleep, startCluster, stopAll, until, type RedisProc } from "./support/procs.js";

let cluster: { nodes: RedisProc[]; url: string };

beforeAll(async () => {
  cluster = await startCluster();
}, 40_000);
afterAll(() => stopAll());

/** The port of the primary serving `slot`, and of one of its replicas. */
async function owners(anyPort: number, slot: number): Promise<{ primary: number; replica: number }> {
  const lines = (await execCli(anyPort, "cluster", "nodes")).trim().split("\n").map((l) => l.split(" "));
  const primary = lines.find(
    (f) =>
      f[2]!.includes("master") &&
      f.slice(8).some((r) => {
        const [a, b] = r.split("-").map(Number);
        return b === undefined ? a === slot : slot >= a! && slot <= b;
      }),
  )!;
  const replica = lines.find((f) => f[3] === primary[0])!;
  const port = (f: string[]) => Number(f[1]!.split("@")[0]!.split(":")[1]);
  return { primary: port(primary), replica: port(replica) };
}

describe("RedisPublisher, Redis Cluster", () => {
  it("200 numbered publishes with a CLUSTER FAILOVER midway: every number once, in order", async () => {
    const channel = "test:failover";
    const pub = await RedisPublisher.connect(cluster.url, { history: { test: { size: 1000, ttlSecs: 600 } } });
    const port0 = cluster.nodes[0]!.port;
    const slot = Number((await execCli(port0, "cluster", "keyslot", `fanout:{${channel}}:meta`)).trim());
    const { primary, replica } = await owners(port0, slot);
    const acks: { offset: number; epoch: string; duplicate?: boolean }[] = [];
    let failover: Promise<string> | undefined;
    for (let n = 1; n <= 200; n++) {
      if (n === 101) failover = execCli(replica, "cluster", "failover");
      acks.push(await pub.publish(channel, { n }, { event: "n" }));
      if (n > 100) await sleep(5); // spread the second half over the failover
      // 151..200 go to the new primary, so 101..150 straddle the switch.
      if (n === 150) await until(async () => (await execCli(replica, "role")).startsWith("master"), 15_000, "the replica to be primary");
    }
    expect((await failover!).trim()).toBe("OK");
    await until(async () => (await execCli(replica, "role")).startsWith("master"), 10_000, "the replica to be primary");
    expect((await execCli(primary, "role")).startsWith("slave")).toBe(true);

    // The history, read from the new primary.
    const out = await execCli(replica, "--no-raw", "xrange", `fanout:{${channel}}:history`, "-", "+");
    const entries = [...out.matchAll(/"(\{\\"offset.*?)"\n/g)].map((m) => JSON.parse(JSON.parse(`"${m[1]}"`)));
    const numbers = entries.map((e) => e.data.n as number);
    const seen = new Map<number, number>();
    for (const n of numbers) seen.set(n, (seen.get(n) ?? 0) + 1);
    const lost = Array.from({ length: 200 }, (_, i) => i + 1).filter((n) => !seen.has(n)).length;
    const duplicates = [...seen.values()].reduce((s, c) => s + c - 1, 0);
    console.log(`failover test: ${numbers.length} entries, lost ${lost}, duplicates ${duplicates}`);
    expect({ lost, duplicates }).toEqual({ lost: 0, duplicates: 0 });
    expect(numbers).toEqual(Array.from({ length: 200 }, (_, i) => i + 1));
    expect(entries.map((e) => e.offset)).toEqual(Array.from({ length: 200 }, (_, i) => i + 1));
    expect(acks.map((a) => a.offset)).toEqual(Array.from({ length: 200 }, (_, i) => i + 1));
    expect(new Set(entries.map((e) => e.epoch)).size).toBe(1);
    await pub.close();
  }, 60_000);
});
