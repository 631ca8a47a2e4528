/**
 * `examples/job-progress` — the seeds' flow end to end — in real Chromium: the FastAPI
 * backend mints the token and queues the uploaded CSV, the Python worker publishes each
 * row's progress straight into Redis with the `fanout` package, and the demo page's
 * `useJobProgress` draws the bar, through three edges behind HAProxy. A second client
 * (the SDK in Node) records every progress message, to count what the page was sent.
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import { chromium, type Browser, type Page } from "playwright-core";
import path from "node:path";
import WebSocket from "ws";
import { Fanout, type WebSocketCtor } from "@fanout/client";
import {
  artifactsDir,
  ROOT,
  startCluster,
  startExample,
  stopCluster,
  token,
  waitUntil,
  type Cluster,
  type Example,
} from "./harness.js";

let browser: Browser;
let cluster: Cluster;
let example: Example;
const clients: Fanout[] = [];

beforeAll(async () => {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
  // The demo page's namespaces (its chat room), as run.sh starts it.
  cluster = await startCluster(1, path.join(ROOT, "clients/typescript/demo/fanout.toml"));
  example = await startExample(cluster);
});
afterAll(async () => {
  for (const c of clients) c.close();
  await browser?.close();
  example?.stop();
  if (cluster) stopCluster(cluster);
});

const csv = (rows: number) => ["email,company", ...Array.from({ length: rows }, (_, i) => `user${i}@example.com,Co ${i}`)].join("\n");

async function open(user: string): Promise<Page> {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 720 } })).newPage();
  page.on("pageerror", (e) => console.error(`${user} page error:`, e));
  await page.goto(`${example.origin}/?user=${user}`);
  await page.getByTestId("state").filter({ hasText: "connected" }).waitFor();
  return page;
}

/** Uploads a CSV of `rows` rows; the job's id, from the bar that appears. */
async function upload(page: Page, rows: number, name: string): Promise<string> {
  await page.getByTestId("upload").setInputFiles({ name, mimeType: "text/csv", buffer: Buffer.from(csv(rows)) });
  const bar = page.locator("[data-testid^=job-]").first();
  await bar.waitFor();
  return (await bar.getAttribute("data-testid"))!.slice("job-".length);
}

/** Every progress message of job `id`, as the SDK delivers them (from the first on). */
function record(id: string): { rows: number[]; completed: () => boolean; resets: () => number } {
  const rows: number[] = [];
  let done = false;
  let resets = 0;
  const c = new Fanout({
    url: `ws://127.0.0.1:${cluster.lbPort}/ws`,
    token: token(cluster.secret, "observer", 3600, ["job_progress:*"]),
    WebSocket: WebSocket as unknown as WebSocketCtor,
  });
  clients.push(c);
  c.subscribe<{ row?: number }>(`job_progress:${id}`, {
    last: 1000,
    onMessage: (m) => {
      if (typeof m.data.row === "number") rows.push(m.data.row);
    },
    onCompleted: () => void (done = true),
    onReset: () => void resets++,
  });
  c.connect();
  return { rows, completed: () => done, resets: () => resets };
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i + 1);

it("upload → the bar runs to 100 % → completed", async () => {
  const page = await open("alice");
  const id = await upload(page, 40, "leads.csv");
  const seen = record(id);
  const bar = page.getByTestId(`job-${id}`);
  await bar.and(page.locator("[data-status=succeeded][data-completed=true]")).waitFor({ timeout: 30_000 });
  await expect(bar.getAttribute("data-pct")).resolves.toBe("100");
  await waitUntil("the observer saw the completion", () => seen.completed());
  expect(seen.rows).toEqual(range(40));
  await page.screenshot({ path: path.join(artifactsDir(), "example-upload.png") });
});

it("the worker killed -9 mid-job and restarted: the page shows the resumed progress, nothing lost or repeated", async () => {
  const page = await open("bob");
  const rows = 80;
  const id = await upload(page, rows, "big.csv");
  const seen = record(id);
  const bar = page.getByTestId(`job-${id}`);
  const pct = async () => Number(await bar.getAttribute("data-pct"));
  await waitUntil("the job under way", async () => (await pct()) >= 20, 30_000);
  example.killWorker();
  // With no worker, the bar stops where the last published row put it.
  await new Promise((r) => setTimeout(r, 1500));
  const stalled = await pct();
  await new Promise((r) => setTimeout(r, 1000));
  expect(await pct()).toBe(stalled);
  expect(stalled).toBeLessThan(100);
  await page.screenshot({ path: path.join(artifactsDir(), "example-worker-killed.png") });

  // A new worker takes the job over once the dead one's lease expires (3 s).
  await example.startWorker();
  await bar.and(page.locator("[data-status=succeeded][data-completed=true]")).waitFor({ timeout: 30_000 });
  await waitUntil("the observer saw the completion", () => seen.completed());
  expect(seen.rows).toEqual(range(rows));
  expect(seen.resets()).toBe(0);
  expect(example.workerLog()).toContain(`job ${id}: resuming after row`);
  await page.screenshot({ path: path.join(artifactsDir(), "example-resumed.png") });
});

it("the worker dies right after publishing a row, before recording it: the row is published again under its key, and nobody receives it twice", async () => {
  const page = await open("carol");
  const rows = 40;
  const dieAfter = 17;
  await example.startWorker({ EXAMPLE_DIE_AFTER_ROW: String(dieAfter) });
  const id = await upload(page, rows, "crash.csv");
  const seen = record(id);
  expect(await example.workerExit()).toBe(3);
  await waitUntil(`row ${dieAfter} arrived`, () => seen.rows.includes(dieAfter));
  await example.startWorker();
  await page.getByTestId(`job-${id}`).and(page.locator("[data-status=succeeded][data-completed=true]")).waitFor({ timeout: 30_000 });
  await waitUntil("the observer saw the completion", () => seen.completed());
  // The resumed worker published row 17 again: the key made it a duplicate.
  expect(example.workerLog()).toContain(`job ${id}: resuming after row ${dieAfter - 1} of ${rows}`);
  expect(example.workerLog()).toMatch(/already applied/);
  expect(seen.rows).toEqual(range(rows));
});
