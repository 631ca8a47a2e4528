import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["test/support/setup.ts"],
    testTimeout: 30_000,
    // Files one at a time: they start real edges and time liveness, and two cores
    // shared with other files' processes delay timers past what the tests allow.
    fileParallelism: false,
    hookTimeout: 20_000,
  },
});
