// Fails the run at once, with what to do, when the edge binary the integration tests
// start is missing.
import { requireEdge } from "./edge.js";

export default function setup(): void {
  requireEdge();
}
