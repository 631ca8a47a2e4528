/**
 * The demo app (React under StrictMode, the hooks, the SDK) in real Chromium, two users
 * behind HAProxy with real Redis: a job's progress bar runs to `succeeded`, a
 * notification arrives, a chat line and a typing indicator go from one page to the
 * other exactly once, and presence lists both users. Screenshots in
 * `.tmp/e2e-artifacts/`.
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import { chromium, type Browser, type Page } from "playwright-core";
import path from "node:path";
import { artifactsDir, ROOT, startCluster, startDemo, stopCluster, type Cluster } from "./harness.js";

let browser: Browser;
let cluster: Cluster;
let demo: { origin: string; stop: () => void };

beforeAll(async () => {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
  cluster = await startCluster(1, path.join(ROOT, "clients/typescript/demo/fanout.toml"));
  demo = await startDemo(cluster);
});
afterAll(async () => {
  await browser?.close();
  demo?.stop();
  if (cluster) stopCluster(cluster);
});

async function open(user: string): Promise<Page> {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 720 } })).newPage();
  page.on("pageerror", (e) => console.error(`${user} page error:`, e));
  await page.goto(`${demo.origin}/?user=${user}`);
  await page.getByTestId("state").filter({ hasText: "connected" }).waitFor();
  return page;
}

it("jobs, notifications, chat with typing and presence, under StrictMode", async () => {
  const [alice, bob] = [await open("alice"), await open("bob")];

  await alice.getByTestId("start-job").click();
  const job = alice.locator("[data-testid^=job-]").first();
  await job.and(alice.locator("[data-status=succeeded][data-completed=true]")).waitFor({ timeout: 20_000 });
  await expect(job.textContent()).resolves.toContain("succeeded 100% ✓");

  await alice.getByTestId("notify").click();
  await alice.getByTestId("notifications").locator("li").first().waitFor();
  await expect(bob.getByTestId("notifications").locator("li").count()).resolves.toBe(0);

  await bob.getByTestId("members").filter({ hasText: "alice, bob" }).waitFor({ timeout: 10_000 });
  await alice.getByTestId("say").pressSequentially("hello bob", { delay: 30 });
  await bob.getByTestId("typing").filter({ hasText: "alice typing" }).waitFor({ timeout: 5000 });
  await alice.getByTestId("say").press("Enter");
  await bob.getByTestId("chat").locator("li", { hasText: "alice: hello bob" }).waitFor();
  // Once, though StrictMode mounted every subscription twice.
  await new Promise((r) => setTimeout(r, 500));
  await expect(bob.getByTestId("chat").locator("li", { hasText: "hello bob" }).count()).resolves.toBe(1);
  await expect(alice.getByTestId("chat").locator("li", { hasText: "hello bob" }).count()).resolves.toBe(1);

  const dir = artifactsDir();
  await alice.screenshot({ path: path.join(dir, "demo-alice.png") });
  await bob.screenshot({ path: path.join(dir, "demo-bob.png") });
});
