// Builds one package's dist/: its ESM bundle (with a source map) and its type
// declarations (tsc with the package's tsconfig.build.json), from src/index.ts.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { rmSync } from "node:fs";
import { fileURLToPath } from "node:url";

const tsc = fileURLToPath(new URL("../node_modules/typescript/bin/tsc", import.meta.url));

/** `root`: the package's directory; `external`: imports left to the app's own copies. */
export async function buildPackage(root, { external = [] } = {}) {
  rmSync(`${root}/dist`, { recursive: true, force: true });
  await build({
    entryPoints: [`${root}/src/index.ts`],
    outfile: `${root}/dist/index.js`,
    bundle: true,
    format: "esm",
    platform: "neutral",
    target: "es2020",
    external,
    sourcemap: true,
    logLevel: "warning",
  });
  execFileSync(process.execPath, [tsc, "-p", `${root}/tsconfig.build.json`], { stdio: "inherit" });
  console.log(`built ${root}dist/index.js and dist/*.d.ts`);
}
