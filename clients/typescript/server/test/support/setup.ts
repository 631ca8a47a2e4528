// Fails the run at once, saying what to do, when a binary the tests start is missing.
import { existsSync } from "node:fs";
import { EDGE_BIN, REDIS_BIN, REDIS_CLI } from "./procs.js";

export default function setup(): void {
  if (!existsSync(EDGE_BIN)) throw new Error(`fanout-edge not found at ${EDGE_BIN}: build it (cargo build -p fanout-edge) or set FANOUT_EDGE_BIN`);
  if (!existsSync(REDIS_BIN)) throw new Error(`redis-server not found at ${REDIS_BIN}: set REDIS_SERVER_BIN`);
  if (!existsSync(REDIS_CLI)) throw new Error(`redis-cli not found at ${REDIS_CLI}: set REDIS_CLI_BIN`);
}
