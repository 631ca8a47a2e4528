import { FanoutServerError } from "./errors.js";

/** A Redis URL of fanout's, parsed (see {@link parseRedisUrl}). */
export interface RedisTarget {
  kind: "single" | "cluster" | "sentinel";
  tls: boolean;
  hosts: { host: string; port: number }[];
  username?: string;
  password?: string;
  db?: number;
  /** Sentinel: the service (master set) name. */
  service?: string;
}

const SCHEMES = "redis://, rediss://, redis-cluster://h1:p1,h2:p2 or redis-sentinel://s1:p1,s2:p2/<service>";

function bad(msg: string): FanoutServerError {
  return new FanoutServerError("bad_request", `Redis URL: ${msg}`);
}

function hostPort(s: string, defaultPort: number, url: string): { host: string; port: number } {
  let host = s;
  let port = defaultPort;
  const m = /^\[([^\]]+)\](?::(\d+))?$/.exec(s) ?? /^([^:]+)(?::(\d+))?$/.exec(s);
  if (!m) throw bad(`\`${s}\` in \`${url}\` is not host:port`);
  host = m[1]!;
  if (m[2] !== undefined) port = Number(m[2]);
  if (!host || !(port > 0 && port < 65536)) throw bad(`\`${s}\` in \`${url}\` is not host:port`);
  return { host, port };
}

/**
 * Parses fanout's Redis URLs, as the Rust publisher does:
 * - `redis://[user:pass@]host:port[/db]`, `rediss://…` — one server;
 * - `redis-cluster://[user:pass@]h1:p1,h2:p2,…` (`rediss-cluster://`) — Redis Cluster,
 *   any reachable node is enough;
 * - `redis-sentinel://[user:pass@]s1:p1,s2:p2/<service>[/db]` (`rediss-sentinel://`;
 *   or `?sentinelServiceName=<service>`) — the primary the sentinels name.
 */
export function parseRedisUrl(url: string): RedisTarget {
  if (typeof url !== "string") throw bad(`expected a string: ${SCHEMES}`);
  url = url.trim();
  const i = url.indexOf("://");
  if (i < 0) throw bad(`\`${url}\` is not a URL: expected ${SCHEMES}`);
  const scheme = url.slice(0, i).toLowerCase();
  let rest = url.slice(i + 3);
  const kinds: Record<string, [RedisTarget["kind"], boolean]> = {
    redis: ["single", false],
    rediss: ["single", true],
    "redis-cluster": ["cluster", false],
    "rediss-cluster": ["cluster", true],
    "redis-sentinel": ["sentinel", false],
    "rediss-sentinel": ["sentinel", true],
  };
  const k = kinds[scheme];
  if (!k) throw bad(`\`${scheme}://\` is not one of ${SCHEMES}`);
  const [kind, tls] = k;
  let query = "";
  const q = rest.indexOf("?");
  if (q >= 0) {
    query = rest.slice(q + 1);
    rest = rest.slice(0, q);
  }
  const slash = rest.indexOf("/");
  const authority = slash >= 0 ? rest.slice(0, slash) : rest;
  const path = slash >= 0 ? rest.slice(slash + 1) : "";
  const at = authority.lastIndexOf("@");
  const userinfo = at >= 0 ? authority.slice(0, at) : undefined;
  const hostList = (at >= 0 ? authority.slice(at + 1) : authority)
    .split(",")
    .map((h) => h.trim())
    .filter(Boolean);
  if (hostList.length === 0) throw bad(`\`${scheme}://\` needs at least one host:port`);
  if (kind === "single" && hostList.length > 1) {
    throw bad(`\`${scheme}://\` names one server; for several use redis-cluster:// or redis-sentinel://`);
  }
  const t: RedisTarget = { kind, tls, hosts: hostList.map((h) => hostPort(h, kind === "sentinel" ? 26379 : 6379, url)) };
  if (userinfo !== undefined) {
    const c = userinfo.indexOf(":");
    const user = decodeURIComponent(c >= 0 ? userinfo.slice(0, c) : userinfo);
    const pass = c >= 0 ? decodeURIComponent(userinfo.slice(c + 1)) : undefined;
    if (c < 0) {
      // `redis://secret@host`: a password alone, as redis-cli and the Rust crate read it.
      if (user) t.password = user;
    } else {
      if (user) t.username = user;
      if (pass) t.password = pass;
    }
  }
  const params = new URLSearchParams(query);
  const segments = path.split("/").filter(Boolean);
  const db = (s: string): number => {
    if (!/^\d+$/.test(s)) throw bad(`\`/${s}\` in \`${url}\` is not a database number`);
    return Number(s);
  };
  if (kind === "single") {
    if (segments.length > 1) throw bad(`\`${url}\` has more than a database number in its path`);
    if (segments[0] !== undefined) t.db = db(segments[0]);
  } else if (kind === "cluster") {
    if (segments.length) throw bad(`\`${scheme}://\` takes no path (Redis Cluster has one database)`);
  } else {
    const first = segments[0];
    if (first !== undefined && /^\d+$/.test(first)) t.db = db(first);
    else if (first !== undefined) {
      t.service = first;
      if (segments[1] !== undefined) t.db = db(segments[1]);
    }
    t.service = params.get("sentinelServiceName") ?? t.service;
    if (!t.service) throw bad(`\`${scheme}://\` needs the service name: ${scheme}://host:port,host:port/<service>`);
  }
  return t;
}

export function describeHosts(t: RedisTarget): string {
  return t.hosts.map((h) => (h.host.includes(":") ? `[${h.host}]:${h.port}` : `${h.host}:${h.port}`)).join(",");
}
