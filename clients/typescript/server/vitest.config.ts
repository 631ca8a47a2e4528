import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["test/support/setup.ts"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Files one at a time: they start real redis-servers and edges on two cores.
    fileParallelism: false,
  },
});
