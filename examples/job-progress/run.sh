#!/usr/bin/env bash
# The job-progress example in one command: the FastAPI backend, the Python worker and
# the React page, next to an edge.
#
#   examples/job-progress/run.sh            # Redis, three edges and HAProxy of its own
#                                           # (scripts/local-cluster.sh), then the example
#   FANOUT_REDIS_URL=… FANOUT_JWT_SECRET=… FANOUT_WS_URL=ws://…/ws examples/job-progress/run.sh
#                                           # next to an edge you already run on that Redis
#
# Then open http://127.0.0.1:${PORT:-8000}/?user=alice and upload a CSV. Ctrl-C stops
# what this started.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${EXAMPLE_VENV:-$ROOT/.tmp/venv-example}
PORT=${PORT:-8000}

# The page: the client SDK's demo app.
if [ ! -f "$ROOT/clients/typescript/demo/dist/app.js" ]; then
  (cd "$ROOT/clients/typescript" && npm ci && npm run build)
fi

# Python: the fanout package from this repository, FastAPI, uvicorn.
if [ ! -x "$VENV/bin/uvicorn" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$ROOT/clients/python" -r "$HERE/requirements.txt"
fi

started_cluster="" worker="" backend=""
stop() {
  local rc=$?
  # Cleanup runs to the end, whatever else arrives (a second Ctrl-C included).
  trap - EXIT
  trap "" INT TERM
  set +e
  [ -n "$backend" ] && kill "$backend" 2>/dev/null
  [ -n "$worker" ] && kill "$worker" 2>/dev/null
  wait 2>/dev/null
  [ -n "$started_cluster" ] && "$ROOT/scripts/local-cluster.sh" stop
  exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT TERM

if [ -z "${FANOUT_REDIS_URL:-}" ]; then
  export FANOUT_CLUSTER_DIR=${FANOUT_CLUSTER_DIR:-$ROOT/.tmp/example-cluster}
  started_cluster=1
  # The demo page also has a chat room: its namespaces.
  FANOUT_CONFIG=${FANOUT_CONFIG:-$ROOT/clients/typescript/demo/fanout.toml} \
    "$ROOT/scripts/local-cluster.sh" start --detach
  # shellcheck disable=SC1091
  . "$FANOUT_CLUSTER_DIR/cluster.env"
  export FANOUT_REDIS_URL FANOUT_JWT_SECRET
  export FANOUT_WS_URL=${FANOUT_WS_URL:-ws://127.0.0.1:$LB_PORT/ws}
fi
: "${FANOUT_JWT_SECRET:?set FANOUT_JWT_SECRET to the secret of the edge}"
: "${FANOUT_WS_URL:?set FANOUT_WS_URL to the WebSocket URL of the edge, ws://host:port/ws}"

cd "$HERE"
"$VENV/bin/python" worker.py &
worker=$!
"$VENV/bin/uvicorn" app:app --host 127.0.0.1 --port "$PORT" --log-level warning &
backend=$!
echo "job-progress example: http://127.0.0.1:$PORT/?user=alice (edge $FANOUT_WS_URL); Ctrl-C stops it"
# Whichever stops first (a crash, a port in use) stops the rest, with its exit code.
wait -n "$worker" "$backend"
