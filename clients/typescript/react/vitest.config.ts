import { defineConfig } from "vitest/config";

// Unit tests with a fake client in jsdom; the hooks against real edges in a real
// browser are in ../e2e.
export default defineConfig({
  test: {
    include: ["test/**/*.test.tsx"],
    environment: "jsdom",
  },
});
