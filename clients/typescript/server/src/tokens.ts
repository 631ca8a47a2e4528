import { createHmac, createPrivateKey, sign, type KeyObject } from "node:crypto";
import { channelError } from "./common.js";
import { FanoutServerError } from "./errors.js";

/** The algorithms the edge verifies: HS256 (`--jwt-secret`), RS256 / ES256 / EdDSA (`--jwt-public-key`, `--jwt-jwks`). */
export type TokenAlgorithm = "HS256" | "RS256" | "ES256" | "EdDSA";

/** The shortest HS256 secret the edge accepts (`--jwt-secret`), in bytes. */
export const MIN_HS256_SECRET_BYTES = 16;

export interface TokenOptions {
  /** The user id: the token's `sub`. */
  user: string | number;
  /** Seconds the token is valid. */
  ttl?: number;
  /** Default: HS256 for a secret; for a PEM private key or KeyObject, its own (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA). */
  algorithm?: TokenAlgorithm;
  /** `aud`, required by the edge when it runs with `--jwt-audience`. */
  audience?: string;
  /** `iss`, required by the edge when it runs with `--jwt-issuer`. */
  issuer?: string;
  /** `kid` header: which key of the edge's `--jwt-jwks` verifies the token. */
  kid?: string;
  /** More claims (they cannot replace `sub`, `exp`, `iat`, `channels`, `channel`, `aud`, `iss`). */
  extra?: Record<string, unknown>;
  /** The time to issue at, seconds since the Unix epoch (default: now). */
  now?: number;
}

export interface ConnectionTokenOptions extends TokenOptions {
  /** Channels granted: exact names or `prefix*` (the prefix must contain the `:`), e.g. `["job_progress:7", "chat:*"]`. */
  channels?: string[];
  /** Default 3600. */
  ttl?: number;
}

export interface SubscriptionTokenOptions extends TokenOptions {
  /** The one channel this token lets `user` subscribe to. */
  channel: string;
  /** Default 600. */
  ttl?: number;
}

/** A secret (string or bytes) for HS256, or a private key (PEM or KeyObject) for RS256 / ES256 / EdDSA. */
export type SigningKey = string | Buffer | Uint8Array | KeyObject;

const RESERVED = new Set(["sub", "exp", "iat", "channels", "channel", "aud", "iss"]);

/** A connection token: `{sub, exp, iat, channels?, aud?, iss?}`. */
export function connectionToken(key: SigningKey, opts: ConnectionTokenOptions): string {
  const claims: Record<string, unknown> = {};
  if (opts.channels !== undefined) {
    if (!Array.isArray(opts.channels) || opts.channels.some((c) => typeof c !== "string" || c === "")) {
      throw new FanoutServerError("bad_request", "token: `channels` must be an array of channel names or `prefix*` patterns");
    }
    claims.channels = opts.channels;
  }
  return mint(key, opts, opts.ttl ?? 3600, claims);
}

/** A subscription token for one channel: `{sub, channel, exp, iat, aud?, iss?}`; sent in the `subscribe` frame's `token`. */
export function subscriptionToken(key: SigningKey, opts: SubscriptionTokenOptions): string {
  const e = channelError(opts?.channel);
  if (e) throw new FanoutServerError("bad_request", `token: invalid channel ${JSON.stringify(opts?.channel)}: ${e}`);
  return mint(key, opts, opts.ttl ?? 600, { channel: opts.channel });
}

function b64url(x: string | Buffer): string {
  return Buffer.from(x).toString("base64url");
}

function isPem(k: SigningKey): boolean {
  return (typeof k === "string" || Buffer.isBuffer(k)) && String(k).trimStart().startsWith("-----BEGIN");
}

function mint(key: SigningKey, opts: TokenOptions, ttl: number, specific: Record<string, unknown>): string {
  if (!opts || (typeof opts.user !== "string" && typeof opts.user !== "number") || String(opts.user) === "") {
    throw new FanoutServerError("bad_request", "token: `user` (the token's sub) is required");
  }
  if (!Number.isFinite(ttl) || ttl <= 0) throw new FanoutServerError("bad_request", `token: ttl must be a positive number of seconds, got ${ttl}`);
  const now = Math.floor(opts.now ?? Date.now() / 1000);
  const { alg, signer } = signerFor(key, opts.algorithm);
  const header: Record<string, unknown> = { alg, typ: "JWT" };
  if (opts.kid !== undefined) header.kid = opts.kid;
  const claims: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(opts.extra ?? {})) {
    if (RESERVED.has(k)) throw new FanoutServerError("bad_request", `token: extra claim \`${k}\` is set by its own option`);
    claims[k] = v;
  }
  Object.assign(claims, { sub: String(opts.user), iat: now, exp: now + Math.ceil(ttl) }, specific);
  if (opts.audience !== undefined) claims.aud = opts.audience;
  if (opts.issuer !== undefined) claims.iss = opts.issuer;
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  return `${input}.${b64url(signer(input))}`;
}

function signerFor(key: SigningKey, algorithm: TokenAlgorithm | undefined): { alg: TokenAlgorithm; signer: (input: string) => Buffer } {
  const asymmetric = isPem(key) || (typeof key === "object" && "asymmetricKeyType" in key && (key as KeyObject).type === "private");
  if (!asymmetric && (algorithm === undefined || algorithm === "HS256")) {
    if (typeof key === "object" && "type" in key && (key as KeyObject).type !== "secret") {
      throw new FanoutServerError("bad_request", "token: HS256 needs a secret; a public key cannot sign");
    }
    const secret = typeof key === "string" ? Buffer.from(key) : key instanceof Uint8Array ? Buffer.from(key) : (key as KeyObject).export();
    if (secret.length < MIN_HS256_SECRET_BYTES) {
      throw new FanoutServerError(
        "bad_request",
        `token: the HS256 secret is ${secret.length} bytes; the edge refuses secrets under ${MIN_HS256_SECRET_BYTES} bytes (--jwt-secret), so no token it signs would verify — use a longer random secret (32+ bytes)`,
      );
    }
    return { alg: "HS256", signer: (input) => createHmac("sha256", secret).update(input).digest() };
  }
  if (algorithm === "HS256") throw new FanoutServerError("bad_request", "token: HS256 needs a secret, not a private key");
  let pk: KeyObject;
  try {
    pk = typeof key === "object" && "asymmetricKeyType" in key ? (key as KeyObject) : createPrivateKey(key as string | Buffer);
  } catch (e) {
    throw new FanoutServerError("bad_request", `token: ${algorithm ?? "the key"} needs a private key in PEM (or a KeyObject): ${(e as Error).message}`, { cause: e });
  }
  if (pk.type !== "private") throw new FanoutServerError("bad_request", "token: a private key is needed to sign, not a public one");
  const type = pk.asymmetricKeyType;
  const curve = pk.asymmetricKeyDetails?.namedCurve;
  const own: TokenAlgorithm | undefined =
    type === "rsa" ? "RS256" : type === "ec" && curve === "prime256v1" ? "ES256" : type === "ed25519" ? "EdDSA" : undefined;
  if (!own) {
    throw new FanoutServerError("bad_request", `token: a ${type}${curve ? ` (${curve})` : ""} key is not one the edge verifies: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA)`);
  }
  const alg = algorithm ?? own;
  if (alg !== own) throw new FanoutServerError("bad_request", `token: ${alg} cannot be signed with a ${type}${curve ? ` (${curve})` : ""} key; that key signs ${own}`);
  if (alg === "RS256") return { alg, signer: (input) => sign("sha256", Buffer.from(input), pk) };
  // JOSE wants ES256 signatures as r||s (64 bytes), not DER.
  if (alg === "ES256") return { alg, signer: (input) => sign("sha256", Buffer.from(input), { key: pk, dsaEncoding: "ieee-p1363" }) };
  return { alg, signer: (input) => sign(null, Buffer.from(input), pk) };
}
