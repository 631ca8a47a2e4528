// Builds dist/ with the shared build (ESM bundle + declarations). ioredis and Node's
// built-ins stay imports; the publish script is bundled in (scripts/gen-script.mjs).
import { fileURLToPath } from "node:url";
import { buildPackage } from "../../scripts/build-package.mjs";

await buildPackage(fileURLToPath(new URL("..", import.meta.url)), { external: ["ioredis", "node:*"] });
