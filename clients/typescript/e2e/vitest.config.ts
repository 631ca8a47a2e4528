import { defineConfig } from "vitest/config";

// One cluster and one browser for the whole file; tests run one after another.
export default defineConfig({
  test: {
    include: ["*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    fileParallelism: false,
  },
});
