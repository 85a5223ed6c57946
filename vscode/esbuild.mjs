// Bundles the extension into one CommonJS file for VS Code's extension host (`vscode` is given
// by the host at run time, never bundled).
import { build } from "esbuild";

await build({
  entryPoints: ["src/extension.ts"],
  outfile: "dist/extension.js",
  bundle: true,
  platform: "node",
  format: "cjs",
  target: "node20",
  external: ["vscode"],
  sourcemap: true,
  minify: false,
  logLevel: "warning",
});
