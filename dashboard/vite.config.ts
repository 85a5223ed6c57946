import { defineConfig } from "vite";

// The bundle is served by the Python package (and loaded by the VS Code webview) at whatever
// URL the server has, so every asset URL is relative; the page is small enough for one script.
export default defineConfig({
  base: "./",
  build: {
    outDir: "../src/onthefly/dashboard",
    emptyOutDir: true,
    target: "es2022",
    rolldownOptions: {
      output: { codeSplitting: false },
    },
  },
});
