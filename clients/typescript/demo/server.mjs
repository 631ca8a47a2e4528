// The demo's backend, as the FastAPI/Next.js apps of the field have one: it serves the
// page, mints the user's token (`/token`), and plays the worker — `/jobs` runs a job
// (one step per row of a posted CSV) that publishes its progress, `/notify` sends the user a notification — through the
// edge's server API. Settings from the environment:
//   FANOUT_URL          the edge (or load balancer), default http://127.0.0.1:8080
//   FANOUT_JWT_SECRET   the edge's HS256 secret, FANOUT_ADMIN_TOKEN its admin token
//   PORT                where this listens, default 5173 (127.0.0.1)
import { createHmac, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";
import { fileURLToPath } from "node:url";

const dist = fileURLToPath(new URL("./dist/", import.meta.url));
const edge = (process.env.FANOUT_URL ?? "http://127.0.0.1:8080").replace(/\/$/, "");
const secret = process.env.FANOUT_JWT_SECRET;
const admin = process.env.FANOUT_ADMIN_TOKEN;
const port = Number(process.env.PORT ?? 5173);
if (!secret || !admin) {
  console.error("set FANOUT_JWT_SECRET and FANOUT_ADMIN_TOKEN to the edge's (see the README)");
  process.exit(2);
}

const b64 = (s) => Buffer.from(s).toString("base64url");
/** A connection token: the user's own channel, any job's progress (a real app would
 *  name the user's jobs), ten minutes — the SDK asks for a new one before it expires. */
function token(user) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64(JSON.stringify({ sub: user, iat: now, exp: now + 600, channels: ["job_progress:*"] }));
  return `${head}.${body}.${createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url")}`;
}

async function publish(channel, data, event) {
  const r = await fetch(`${edge}/api/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${admin}`, "content-type": "application/json" },
    body: JSON.stringify({ channel, data, ...(event ? { event } : {}) }),
  });
  if (!r.ok) console.error(`publish ${channel}: ${r.status} ${await r.text()}`);
}

/** A fake job: `steps` steps of progress, then `succeeded` (the edge ends the subscriptions). */
async function runJob(id, steps) {
  for (let step = 1; step <= steps; step++) {
    await new Promise((r) => setTimeout(r, 3000 / steps));
    const pct = Math.round((step * 100) / steps);
    await publish(`job_progress:${id}`, { status: "running", pct, message: `${step}/${steps}` }, "progress");
  }
  await publish(`job_progress:${id}`, { status: "succeeded", pct: 100 }, "completed");
}

/** The rows of an uploaded CSV (after its header), at most 1000; 10 without one. */
async function rows(req) {
  let size = 0;
  const chunks = [];
  for await (const c of req) {
    size += c.length;
    if (size > 1 << 20) throw new Error("CSV over 1 MiB");
    chunks.push(c);
  }
  const lines = Buffer.concat(chunks).toString().split(/\r?\n/).filter((l) => l.trim());
  return lines.length ? Math.min(1000, Math.max(1, lines.length - 1)) : 10;
}

const pages = {
  "/": ["index.html", "text/html"],
  "/index.html": ["index.html", "text/html"],
  "/app.js": ["app.js", "text/javascript"],
};

http
  .createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://x");
    const user = url.searchParams.get("user") ?? "guest";
    if (url.pathname === "/token") {
      res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
      return res.end(token(user));
    }
    if (url.pathname === "/jobs" && req.method === "POST") {
      let steps;
      try {
        steps = await rows(req);
      } catch (e) {
        return res.writeHead(413, { "content-type": "text/plain" }).end(String(e.message));
      }
      const id = randomBytes(4).toString("hex");
      void runJob(id, steps);
      res.writeHead(200, { "content-type": "application/json" });
      return res.end(JSON.stringify({ id }));
    }
    if (url.pathname === "/notify" && req.method === "POST") {
      await publish(`user:${user}`, { text: `export ready at ${new Date().toLocaleTimeString()}` }, "notice");
      return res.writeHead(204).end();
    }
    const page = pages[url.pathname];
    if (!page) return res.writeHead(404).end();
    let body = readFileSync(dist + page[0]);
    if (page[0] === "index.html") {
      // The page connects to the edge's WebSocket endpoint.
      const ws = `${edge.replace(/^http/, "ws")}/ws`;
      body = Buffer.from(body.toString().replace("<head>", `<head><script>window.FANOUT_URL=${JSON.stringify(ws)}</script>`));
    }
    res.writeHead(200, { "content-type": page[1], "cache-control": "no-store" });
    res.end(body);
  })
  .listen(port, "127.0.0.1", () => console.log(`fanout demo on http://127.0.0.1:${port}/?user=alice (edge ${edge})`));
