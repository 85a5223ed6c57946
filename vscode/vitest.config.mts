import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    environment: "node",
    // The backend tests start real processes (python3): a busy machine needs more than 5 s.
    testTimeout: 30_000,
  },
});
