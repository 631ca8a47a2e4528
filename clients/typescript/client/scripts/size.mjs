// The size budget: the minified bundle, gzipped, must stay under 10 KB. Prints both sizes.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";
import { fileURLToPath } from "node:url";

const LIMIT = 10 * 1024;
const root = fileURLToPath(new URL("..", import.meta.url));
const out = await build({
  entryPoints: [`${root}/src/index.ts`],
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: "es2020",
  minify: true,
  write: false,
});
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 }).length;
console.log(`@fanout/client: ${code.length} B minified, ${gz} B gzipped (limit ${LIMIT} B)`);
if (gz > LIMIT) {
  console.error(`over the size budget by ${gz - LIMIT} B`);
  process.exit(1);
}
