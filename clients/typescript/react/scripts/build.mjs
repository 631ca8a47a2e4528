// Builds dist/: the ESM module (React and the client stay imports of the app's own
// copies) and its type declarations.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { rmSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
rmSync(`${root}/dist`, { recursive: true, force: true });
await build({
  entryPoints: [`${root}/src/index.ts`],
  outfile: `${root}/dist/index.js`,
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: "es2020",
  external: ["react", "@fanout/client"],
  sourcemap: true,
  logLevel: "warning",
});
execFileSync(process.execPath, [`${root}/../node_modules/typescript/bin/tsc`, "-p", `${root}/tsconfig.build.json`], {
  stdio: "inherit",
});
console.log("built dist/index.js and dist/*.d.ts");
