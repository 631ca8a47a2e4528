import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["test/support/setup.ts"],
    testTimeout: 20_000,
    hookTimeout: 20_000,
    // The integration tests mostly wait (on sockets and timers): more files at once
    // than there are cores.
    poolOptions: { forks: { minForks: 1, maxForks: 4 } },
  },
});
