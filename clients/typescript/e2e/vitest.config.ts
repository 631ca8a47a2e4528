import { defineConfig } from "vitest/config";

// One browser per file; files and tests run one after another (each starts real
// processes on the same two cores).
export default defineConfig({
  test: {
    include: ["*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    fileParallelism: false,
    // One more try for a test that fails: three edges, HAProxy, Redis and Chromium on
    // two cores now and then miss a deadline (the Redis-restart test failed once in a
    // dozen full runs, fast, not reproduced alone). A real fault fails both tries.
    retry: 1,
  },
});
