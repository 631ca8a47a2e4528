// Bundles the demo (React, the hooks and the SDK) into dist/app.js, next to index.html.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
mkdirSync(`${root}/dist`, { recursive: true });
await build({
  entryPoints: [`${root}/src/main.tsx`],
  outfile: `${root}/dist/app.js`,
  bundle: true,
  format: "esm",
  target: "es2020",
  jsx: "automatic",
  minify: true,
  sourcemap: true,
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "warning",
});
copyFileSync(`${root}/src/index.html`, `${root}/dist/index.html`);
console.log("built demo/dist");
