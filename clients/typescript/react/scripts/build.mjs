// Builds dist/: the ESM module and its type declarations. React and the client stay
// imports of the app's own copies.
import { fileURLToPath } from "node:url";
import { buildPackage } from "../../scripts/build-package.mjs";

await buildPackage(fileURLToPath(new URL("..", import.meta.url)), { external: ["react", "@fanout/client"] });
