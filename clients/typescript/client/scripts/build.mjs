// Builds dist/: the ESM bundle and the type declarations, from src/ (no runtime
// dependency: everything is bundled).
import { fileURLToPath } from "node:url";
import { buildPackage } from "../../scripts/build-package.mjs";

await buildPackage(fileURLToPath(new URL("..", import.meta.url)));
