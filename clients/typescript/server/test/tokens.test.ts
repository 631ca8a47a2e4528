// Tokens minted with node:crypto, verified by node:crypto and by the real edge.
import { generateKeyPairSync, createPublicKey, verify, type KeyObject } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectionToken, subscriptionToken, tokens, type TokenAlgorithm } from "../src/index.js";
import { Edge, SECRET, Sub, stopAll, tempDir } from "./support/procs.js";

afterAll(() => stopAll());

const pairs: Record<Exclude<TokenAlgorithm, "HS256">, { privateKey: KeyObject; publicKey: KeyObject }> = {
  RS256: generateKeyPairSync("rsa", { modulusLength: 2048 }),
  ES256: generateKeyPairSync("ec", { namedCurve: "P-256" }),
  EdDSA: generateKeyPairSync("ed25519"),
};
const pem = (k: KeyObject) => k.export({ type: "pkcs8", format: "pem" }) as string;
const decode = (t: string) => t.split(".").slice(0, 2).map((p) => JSON.parse(Buffer.from(p, "base64url").toString()));

async function connects(edge: Edge, token: string): Promise<Sub> {
  const s = await Sub.open(edge.ws, token);
  await s.connected();
  return s;
}

describe("tokens against the real edge (HS256)", () => {
  let edge: Edge;
  beforeAll(async () => {
    edge = await Edge.start({ args: ["--jwt-audience", "app", "--jwt-issuer", "backend"] });
  });

  it("a connection token opens a connection; a subscription token subscribes to its one channel", async () => {
    const s = await connects(edge, connectionToken(SECRET, { user: 42, channels: ["test:*"], audience: "app", issuer: "backend" }));
    expect(s.frames[0]).toMatchObject({ type: "connected", user: "42" });
    expect(await s.subscribe("test:a")).toMatchObject({ type: "subscribed" });
    expect(await s.subscribe("job_progress:7")).toMatchObject({ type: "error", code: "forbidden" });
    const sub = subscriptionToken(SECRET, { user: 42, channel: "job_progress:7", audience: "app", issuer: "backend" });
    expect(await s.subscribe("job_progress:7", { token: sub })).toMatchObject({ type: "subscribed" });
    // Bound to its channel and its user.
    expect(await s.subscribe("job_progress:8", { token: sub })).toMatchObject({ type: "error", code: "forbidden" });
    const other = subscriptionToken(SECRET, { user: 43, channel: "job_progress:9", audience: "app", issuer: "backend" });
    expect(await s.subscribe("job_progress:9", { token: other })).toMatchObject({ type: "error", code: "forbidden" });
    s.close();
  });

  it("claims: sub, exp = iat + ttl, channels, aud, iss, kid, extra", () => {
    const [h, c] = decode(connectionToken(SECRET, { user: "u", channels: ["a:*"], ttl: 60, kid: "k1", audience: "app", extra: { role: "admin" }, now: 1000 }));
    expect(h).toEqual({ alg: "HS256", typ: "JWT", kid: "k1" });
    expect(c).toEqual({ role: "admin", sub: "u", iat: 1000, exp: 1060, channels: ["a:*"], aud: "app" });
    const [, s] = decode(subscriptionToken(SECRET, { user: "u", channel: "job_progress:1", now: 1000 }));
    expect(s).toEqual({ sub: "u", iat: 1000, exp: 1600, channel: "job_progress:1" });
    expect(tokens.connectionToken).toBe(connectionToken);
  });

  it("an expired token is closed with 4004; a missing aud with 4001", async () => {
    const expired = await Sub.open(edge.ws, connectionToken(SECRET, { user: "u", ttl: 60, now: Date.now() / 1000 - 3600, audience: "app", issuer: "backend" }));
    await expect(expired.connected()).rejects.toThrow(/closed 4004/);
    const noAud = await Sub.open(edge.ws, connectionToken(SECRET, { user: "u", issuer: "backend" }));
    await expect(noAud.connected()).rejects.toThrow(/closed 4001/);
  });

  it("refuses what the edge would refuse, clearly", () => {
    expect(() => connectionToken("short-secret", { user: "u" })).toThrow(/12 bytes.*under 16 bytes/);
    expect(() => connectionToken(SECRET, { user: "" })).toThrow(/user/);
    expect(() => subscriptionToken(SECRET, { user: "u", channel: "nocolon" })).toThrow(/invalid channel/);
    expect(() => connectionToken(SECRET, { user: "u", extra: { sub: "other" } })).toThrow(/sub/);
    expect(() => connectionToken(pem(pairs.RS256.privateKey), { user: "u", algorithm: "ES256" })).toThrow(/cannot be signed with a rsa key/);
    expect(() => connectionToken(pem(pairs.RS256.privateKey), { user: "u", algorithm: "HS256" })).toThrow(/HS256 needs a secret/);
    const p384 = generateKeyPairSync("ec", { namedCurve: "P-384" }).privateKey;
    expect(() => connectionToken(p384, { user: "u" })).toThrow(/not one the edge verifies/);
  });
});

describe.each(["RS256", "ES256", "EdDSA"] as const)("%s tokens", (alg) => {
  let edge: Edge;
  beforeAll(async () => {
    const file = join(tempDir(), "public.pem");
    writeFileSync(file, pairs[alg].publicKey.export({ type: "spki", format: "pem" }) as string);
    edge = await Edge.start({ secret: false, args: ["--jwt-public-key", file] });
  });

  it("verify with node:crypto against the public key (ES256 as r||s) and are accepted by the edge", async () => {
    for (const key of [pem(pairs[alg].privateKey), pairs[alg].privateKey]) {
      const t = connectionToken(key, { user: "9", channels: ["test:*"] });
      const [h] = decode(t);
      expect(h.alg).toBe(alg);
      const [head, body, sig] = t.split(".");
      const raw = Buffer.from(sig!, "base64url");
      const pub = createPublicKey(pairs[alg].publicKey.export({ type: "spki", format: "pem" }));
      const data = Buffer.from(`${head}.${body}`);
      const ok =
        alg === "EdDSA" ? verify(null, data, pub, raw) : alg === "ES256" ? verify("sha256", data, { key: pub, dsaEncoding: "ieee-p1363" }, raw) : verify("sha256", data, pub, raw);
      expect(ok).toBe(true);
      if (alg === "ES256") expect(raw.length).toBe(64);
      const s = await connects(edge, t);
      expect(await s.subscribe("test:a")).toMatchObject({ type: "subscribed" });
      const st = subscriptionToken(key, { user: "9", channel: "job_progress:1" });
      expect(await s.subscribe("job_progress:1", { token: st })).toMatchObject({ type: "subscribed" });
      s.close();
    }
    // An HS256 token (the classic confusion) is refused: 4001.
    const hs = await Sub.open(edge.ws, connectionToken(SECRET, { user: "9" }));
    await expect(hs.connected()).rejects.toThrow(/closed 4001/);
  });
});
