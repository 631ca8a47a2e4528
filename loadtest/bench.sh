#!/usr/bin/env bash
# Runs the benchmark scenarios of docs/benchmarks.md on this machine, each against a
# fresh fanout-edge (release build) on its own redis-server, and writes every report
# (JSON) and latency plot (SVG) to the results directory.
#
#   loadtest/bench.sh [SCENARIO...]     default: all of them
#       broadcast broadcast-sse per-user job-progress churn idle idle-sse idle-shared
#       cluster cluster-light storm storm-nojitter
# (`-sse`: the same run as without, its clients on Server-Sent Events, not WebSockets;
# `storm`: the local cluster, clients through HAProxy; one edge drained at T+5 s, another
# killed at T+15 s; `-nojitter`: the same with fixed reconnect delays. Not in the
# default set: it kills an edge; run it by name.)
#
# Environment: FANOUT_BENCH_OUT (default .tmp/bench), FANOUT_BENCH_DURATION (10),
# FANOUT_BENCH_EDGE (an edge binary to measure instead of this tree's, for A/B runs),
# FANOUT_BENCH_STORM_CLIENTS (storm clients, default 9900: HAProxy's own connection
# limit under this machine's 20,000 open files is 9,989 client connections).
# Everything listens on 127.0.0.1; every run is bounded by the load generator's own
# limits. `cluster` needs haproxy (scripts/local-cluster.sh starts 3 edges behind it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${FANOUT_BENCH_OUT:-$ROOT/.tmp/bench}
DURATION=${FANOUT_BENCH_DURATION:-10}
SECRET=bench-secret-0123456789abcdef
ADMIN=bench-admin-0123456789abcdef
mkdir -p "$OUT"

cargo build --release -q -p fanout-edge -p fanout-loadtest -p fanout-publisher
BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
LT=$BIN/fanout-loadtest
EDGE=${FANOUT_BENCH_EDGE:-$BIN/fanout-edge}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

REDIS_PID="" EDGE_PID="" CLUSTER=""
stop() { if [ -n "$1" ]; then kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; fi; }
cleanup() {
  stop "$EDGE_PID"
  stop "$REDIS_PID"
  EDGE_PID="" REDIS_PID=""
  if [ -n "$CLUSTER" ]; then scripts/local-cluster.sh stop >/dev/null 2>&1 || true; CLUSTER=""; fi
}
trap cleanup EXIT

# A fresh redis-server and edge, so that each memory figure starts from the same place.
# shellcheck disable=SC2120
fresh() {
  cleanup
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --logfile "$OUT/redis.log" &
  REDIS_PID=$!
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  EDGE_PORT=$(free_port)
  FANOUT_LOG=warn "$EDGE" --listen "127.0.0.1:$EDGE_PORT" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" --jwt-secret "$SECRET" \
    --admin-token "$ADMIN" --drain-secs 0 "$@" >>"$OUT/edge.log" 2>&1 &
  EDGE_PID=$!
  for _ in $(seq 50); do
    curl -fs "http://127.0.0.1:$EDGE_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  sleep 1
}

run() {
  local name=$1 plot=()
  shift
  if [ "$1" != idle ] && [ "$1" != churn ]; then plot=(--plot "$OUT/$name.svg"); fi
  echo "== $name"
  "$LT" "$@" --jwt-secret "$SECRET" --json "$OUT/$name.json" ${plot[@]+"${plot[@]}"} | grep -v '^{'
}

common() { echo --url "ws://127.0.0.1:$EDGE_PORT/ws" --server-pid "$EDGE_PID"; }

scenarios=("$@")
[ ${#scenarios[@]} -eq 0 ] && scenarios=(broadcast broadcast-sse per-user job-progress churn idle idle-sse
  idle-shared cluster cluster-light)
for s in "${scenarios[@]}"; do
  case $s in
  broadcast | broadcast-sse)
    fresh
    transport=ws
    [ "$s" = broadcast-sse ] && transport=sse
    # shellcheck disable=SC2046
    run "$s" broadcast $(common) --redis-url "redis://127.0.0.1:$REDIS_PORT" \
      --clients 2000 --rate 200 --duration "$DURATION" --transport "$transport"
    ;;
  per-user)
    fresh
    # shellcheck disable=SC2046
    run per-user per-user $(common) --redis-url "redis://127.0.0.1:$REDIS_PORT" \
      --clients 5000 --rate 5000 --duration "$DURATION"
    ;;
  job-progress)
    fresh
    # shellcheck disable=SC2046
    run job-progress job-progress $(common) --redis-url "redis://127.0.0.1:$REDIS_PORT" \
      --clients 3000 --watchers 3 --interval-ms 100 --duration "$DURATION"
    ;;
  churn)
    fresh
    # shellcheck disable=SC2046
    run churn churn $(common) --rate 500 --clients 1000 --duration "$DURATION"
    ;;
  idle | idle-sse)
    fresh
    transport=ws
    [ "$s" = idle-sse ] && transport=sse
    # shellcheck disable=SC2046
    run "$s" idle $(common) --clients 10000 --duration 5 --transport "$transport"
    ;;
  idle-shared)
    fresh
    # shellcheck disable=SC2046
    run idle-shared idle $(common) --clients 10000 --duration 5 --channel loadtest:idle
    ;;
  cluster | cluster-light)
    cleanup
    export FANOUT_JWT_SECRET=$SECRET FANOUT_ADMIN_TOKEN=$ADMIN FANOUT_BIN_DIR=$BIN
    export FANOUT_CLUSTER_DIR=$OUT/cluster FANOUT_DRAIN_SECS=0
    scripts/local-cluster.sh stop >/dev/null 2>&1 || true
    CLUSTER=1
    scripts/local-cluster.sh start --detach >"$OUT/cluster-start.log"
    # shellcheck disable=SC1091
    . "$OUT/cluster/cluster.env"
    pids=()
    for f in "$OUT"/cluster/pids/edge-*.pid; do pids+=(--server-pid "$(cat "$f")"); done
    load=(--clients 2000 --rate 200)
    [ "$s" = cluster-light ] && load=(--clients 1000 --rate 100)
    lb=$(cat "$OUT/cluster/pids/haproxy.pid")
    before=$(awk '{print $14 + $15}' "/proc/$lb/stat")
    run "$s" broadcast --url "ws://127.0.0.1:$LB_PORT/ws" "${pids[@]}" \
      --redis-url "$FANOUT_REDIS_URL" "${load[@]}" --duration "$DURATION"
    after=$(awk '{print $14 + $15}' "/proc/$lb/stat")
    awk -v a="$after" -v b="$before" 'BEGIN { printf "haproxy CPU (connect + load) %.2f s\n", (a - b) / 100 }'
    scripts/local-cluster.sh stop >/dev/null
    CLUSTER=""
    ;;
  storm | storm-nojitter)
    cleanup
    export FANOUT_JWT_SECRET=$SECRET FANOUT_ADMIN_TOKEN=$ADMIN
    export FANOUT_CLUSTER_DIR=$OUT/cluster FANOUT_DRAIN_SECS=2
    # The local cluster runs FANOUT_BIN_DIR's fanout-edge: a directory with the edge to
    # measure (FANOUT_BENCH_EDGE) beside this tree's other binaries.
    FANOUT_BIN_DIR=$OUT/storm-bin
    mkdir -p "$FANOUT_BIN_DIR"
    ln -sf "$EDGE" "$FANOUT_BIN_DIR/fanout-edge"
    ln -sf "$BIN/fanout-publish" "$FANOUT_BIN_DIR/fanout-publish"
    export FANOUT_BIN_DIR
    scripts/local-cluster.sh stop >/dev/null 2>&1 || true
    CLUSTER=1
    scripts/local-cluster.sh start --detach >"$OUT/cluster-start.log"
    # shellcheck disable=SC1091
    . "$OUT/cluster/cluster.env"
    jitter=()
    [ "$s" = storm-nojitter ] && jitter=(--no-jitter)
    piddir=$OUT/cluster/pids
    # edge-1 drains at T+5 s (2 s of paced 1001 closes), edge-2 is killed at T+15 s;
    # edge-3 takes everyone in the end (its CPU and memory are reported).
    run "$s" storm --url "ws://127.0.0.1:$LB_PORT/ws" --redis-url "$FANOUT_REDIS_URL" \
      --clients "${FANOUT_BENCH_STORM_CLIENTS:-9900}" --rate 2000 --duration 30 --grace 30 \
      --drain-pid "$(cat "$piddir/edge-1.pid")" --drain-at 5 \
      --kill-pid "$(cat "$piddir/edge-2.pid")" --kill-at 15 \
      --server-pid "$(cat "$piddir/edge-3.pid")" ${jitter[@]+"${jitter[@]}"}
    scripts/local-cluster.sh stop >/dev/null
    CLUSTER=""
    ;;
  *)
    echo "unknown scenario: $s" >&2
    exit 2
    ;;
  esac
done
echo "reports in $OUT"
