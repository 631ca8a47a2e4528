#!/usr/bin/env bash
# A local fanout cluster without Docker: Redis (or a 3-master Redis Cluster),
# three fanout-edge processes and HAProxy with cookie affinity
# (deploy/haproxy/haproxy.cfg), all on 127.0.0.1.
#
#   scripts/local-cluster.sh [start] [--cluster] [--detach]
#       starts everything, waits until it is ready, prints the URLs and tokens;
#       stays in the foreground until Ctrl-C, which stops everything
#       (--detach: returns at once and leaves it running)
#   scripts/local-cluster.sh stop            stops a detached cluster
#   scripts/local-cluster.sh status          what runs, and the URLs
#   scripts/local-cluster.sh token [USER] [CHANNEL...]
#       an HS256 token for USER (default demo) valid 24 h; CHANNEL patterns go
#       into its `channels` claim (default job_progress:*)
#
# --cluster: three Redis Cluster masters (with FANOUT_REDIS_REPLICAS replicas
# each, default 0), the edges on redis-cluster://h1:p1,h2:p2,h3:p3 (sharded
# pub/sub: needs a fanout-edge that supports it; one that does not refuses the
# URL at start, and this script shows its log).
#
# Environment:
#   FANOUT_BIN_DIR      where fanout-edge and fanout-publish are (default: the
#                       newer build of target/release and target/debug)
#   FANOUT_CLUSTER_DIR  state: pids, logs, Redis data (default .tmp/local-cluster)
#   FANOUT_JWT_SECRET, FANOUT_ADMIN_TOKEN   default: random for each start
#   FANOUT_DRAIN_SECS   drain of each edge on stop (default 2)
#   FANOUT_LB_PORT, FANOUT_LB_STATS_PORT, FANOUT_EDGE_PORTS ("p1 p2 p3")
#                       preferred ports (defaults 9000, 9001, "8081 8082 8083";
#                       free ones are picked when they are taken)
#   FANOUT_CONFIG       a config file for the edges (limits, namespaces)
#   FANOUT_REDIS_REPLICAS  replicas per master with --cluster (default 0)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$PATH:/usr/sbin:/sbin"

STATE=${FANOUT_CLUSTER_DIR:-$ROOT/.tmp/local-cluster}
PIDDIR=$STATE/pids
LOGDIR=$STATE/logs
ENVFILE=$STATE/cluster.env

die() {
  echo "local-cluster: $*" >&2
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---- helpers ----------------------------------------------------------------

port_free() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
# As servers bind (SO_REUSEADDR): connections in TIME_WAIT do not hold a port.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

TAKEN=" "
# pick_port PREFERRED [NEEDS_BUS]: PREFERRED when free, else a free port
# (with NEEDS_BUS, port+10000 must be free too: Redis Cluster's bus).
pick_port() {
  local port=${1:-} bus=${2:-} tries=0
  while :; do
    if [ -n "$port" ] && [[ $TAKEN != *" $port "* ]] && port_free "$port" &&
      { [ -z "$bus" ] || { [ "$port" -le 55535 ] && port_free $((port + 10000)); }; }; then
      TAKEN="$TAKEN$port "
      echo "$port"
      return
    fi
    tries=$((tries + 1))
    [ $tries -lt 200 ] || die "no free port found"
    port=$((20000 + RANDOM % 30000))
  done
}

random_token() {
  python3 -c 'import secrets; print(secrets.token_urlsafe(32))'
}

# wait_for NAME SECONDS COMMAND...: until COMMAND succeeds.
wait_for() {
  local name=$1 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

# wait_ready NAME SECONDS URL: until URL answers 200; gives up at once when
# the process NAME has exited.
wait_ready() {
  local deadline=$((SECONDS + $2))
  until http_ok "$3"; do
    alive "$1" || return 1
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

http_ok() {
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1")" = 200 ]
}

# bin NAME: FANOUT_BIN_DIR/NAME, else the newer of target/release and target/debug.
bin() {
  if [ -n "${FANOUT_BIN_DIR:-}" ]; then
    [ -x "$FANOUT_BIN_DIR/$1" ] || die "no $1 in FANOUT_BIN_DIR=$FANOUT_BIN_DIR"
    echo "$FANOUT_BIN_DIR/$1"
    return
  fi
  local best="" candidate
  for candidate in "$ROOT/target/release/$1" "$ROOT/target/debug/$1"; do
    if [ -x "$candidate" ] && { [ -z "$best" ] || [ "$candidate" -nt "$best" ]; }; then
      best=$candidate
    fi
  done
  [ -n "$best" ] || return 1
  echo "$best"
}

# start NAME COMMAND...: in its own session (Ctrl-C reaches this script only,
# which then stops everything in order), logging to logs/NAME.log.
start() {
  local name=$1
  shift
  setsid "$@" >"$LOGDIR/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDDIR/$name.pid"
}

# alive NAME: the process of pids/NAME.pid runs, and is still the one we started.
alive() {
  local pidfile=$PIDDIR/$1.pid pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  running "$pid" || return 1
  # A recycled pid would run something else.
  case $1 in
    redis*) grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null ;;
    edge*) grep -q fanout-edge "/proc/$pid/cmdline" 2>/dev/null ;;
    haproxy) grep -q haproxy "/proc/$pid/cmdline" 2>/dev/null ;;
    *) return 1 ;;
  esac
}

# running PID: the process exists and has not exited (a zombie waiting for an
# init that is slow to reap it has exited).
running() {
  kill -0 "$1" 2>/dev/null || return 1
  local state
  state=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
  [ "$state" != Z ]
}

# stop_one NAME SECONDS: SIGTERM, then SIGKILL after SECONDS.
stop_one() {
  local name=$1 grace=$2 pid
  if alive "$name"; then
    pid=$(cat "$PIDDIR/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while running "$pid" && [ $SECONDS -lt "$deadline" ]; do sleep 0.1; done
    if running "$pid"; then
      echo "local-cluster: $name did not stop in ${grace} s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$PIDDIR/$name.pid"
}

# setting NAME: a value of cluster.env.
setting() {
  sed -n "s/^$1='\{0,1\}\([^']*\)'\{0,1\}\$/\1/p" "$ENVFILE"
}

names() {
  [ -d "$PIDDIR" ] || return 0
  local f
  for f in "$PIDDIR"/*.pid; do
    [ -e "$f" ] || continue
    basename "$f" .pid
  done
}

cmd_stop() {
  [ -d "$PIDDIR" ] || { echo "local-cluster: nothing to stop ($STATE)"; return 0; }
  local drain=2 name
  [ -f "$ENVFILE" ] && drain=$(setting FANOUT_DRAIN_SECS)
  # Clients first lose the load balancer, then the edges drain, then Redis goes.
  stop_one haproxy 5
  local stoppers=()
  for name in $(names); do
    case $name in edge*)
      stop_one "$name" $((drain + 10)) &
      stoppers+=($!)
      ;;
    esac
  done
  # Only those: in the foreground the cluster's processes are children too.
  [ ${#stoppers[@]} -eq 0 ] || wait "${stoppers[@]}"
  for name in $(names); do stop_one "$name" 10; done
  echo "local-cluster: stopped (logs in $LOGDIR)"
}

cmd_status() {
  if [ ! -f "$ENVFILE" ] || [ -z "$(names)" ]; then
    echo "local-cluster: not running ($STATE)"
    return 1
  fi
  local name down=0
  for name in $(names); do
    if alive "$name"; then echo "up    $name (pid $(cat "$PIDDIR/$name.pid"))"; else
      echo "DOWN  $name (log: $LOGDIR/$name.log)"
      down=1
    fi
  done
  print_urls
  return $down
}

cmd_token() {
  [ -f "$ENVFILE" ] || die "not started: no secret yet ($ENVFILE)"
  local secret user=${1:-demo}
  secret=$(setting FANOUT_JWT_SECRET)
  shift || true
  if [ $# -eq 0 ]; then set -- 'job_progress:*'; fi
  python3 "$ROOT/scripts/deploy-checks.py" jwt "$secret" "$user" "$@"
}

print_urls() {
  local token publish redis admin secret lb stats e1 e2 e3
  token=$(cmd_token demo 'job_progress:*')
  publish=$(bin fanout-publish || true)
  redis=$(setting FANOUT_REDIS_URL) admin=$(setting FANOUT_ADMIN_TOKEN)
  secret=$(setting FANOUT_JWT_SECRET) lb=$(setting LB_PORT) stats=$(setting LB_STATS_PORT)
  e1=$(setting EDGE1_PORT) e2=$(setting EDGE2_PORT) e3=$(setting EDGE3_PORT)
  cat <<EOF

fanout local cluster ($STATE)
  WebSocket, through HAProxy:  ws://127.0.0.1:$lb/ws   (cookie FANOUTNODE pins an edge)
  HAProxy stats:               http://127.0.0.1:$stats/stats   (Prometheus: /metrics)
  edges:                       edge-1 http://127.0.0.1:$e1  edge-2 http://127.0.0.1:$e2  edge-3 http://127.0.0.1:$e3
                               (each: /ws /healthz /readyz /metrics /api/*)
  Redis:                       $redis
  admin token (/api/*):        $admin
  JWT HS256 secret:            $secret
  token for user demo (job_progress:*, 24 h):
    $token
  more tokens:                 scripts/local-cluster.sh token USER [CHANNEL...]

  try it:
    websocat 'ws://127.0.0.1:$lb/ws?token=$token'
      {"type":"subscribe","id":1,"channel":"job_progress:7"}
    curl -X POST http://127.0.0.1:$lb/api/publish -H 'Authorization: Bearer $admin' \\
      -d '{"channel":"job_progress:7","data":{"status":"running","pct":40},"event":"progress"}'
EOF
  if [ -n "$publish" ]; then
    echo "    $publish --redis-url '$redis' job_progress:7 '{\"pct\":50}' --event progress"
  fi
  echo "  stop:                        Ctrl-C in the foreground, or scripts/local-cluster.sh stop"
}

# ---- start ------------------------------------------------------------------

install_missing() {
  local missing=()
  have redis-server || missing+=(redis-server)
  have redis-cli || missing+=(redis-tools)
  have haproxy || missing+=(haproxy)
  have curl || missing+=(curl)
  have python3 || missing+=(python3)
  have setsid || missing+=(util-linux)
  [ ${#missing[@]} -eq 0 ] && return
  echo "local-cluster: installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # No system services from these packages (Redis on 6379, HAProxy): a
  # policy-rc.d refuses to start them, for this install only.
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
  [ -z "$policy" ] || $sudo rm -f "$policy"
  [ $rc -eq 0 ] || die "apt-get install ${missing[*]} failed"
}

start_redis_single() {
  local port
  port=$(pick_port "")
  mkdir -p "$STATE/redis"
  start redis redis-server --port "$port" --bind 127.0.0.1 --protected-mode yes \
    --dir "$STATE/redis" --save "" --appendonly no --daemonize no
  wait_for redis 15 redis-cli -p "$port" ping || { cat "$LOGDIR/redis.log" >&2; return 1; }
  REDIS_URL="redis://127.0.0.1:$port"
  REDIS_PORTS=$port
}

start_redis_cluster() {
  # Three masters, each with FANOUT_REDIS_REPLICAS replicas (default 0): with
  # replicas, a `CLUSTER FAILOVER` or a dead master fails over.
  local replicas=${FANOUT_REDIS_REPLICAS:-0}
  [[ $replicas =~ ^[0-9]$ ]] || die "FANOUT_REDIS_REPLICAS must be 0-9"
  local count=$((3 * (1 + replicas))) ports=() port i
  for i in $(seq 1 "$count"); do
    port=$(pick_port "" bus)
    ports+=("$port")
    mkdir -p "$STATE/redis-$i"
    rm -f "$STATE/redis-$i/nodes.conf"
    start "redis-$i" redis-server --port "$port" --bind 127.0.0.1 --protected-mode yes \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
      --dir "$STATE/redis-$i" --save "" --appendonly no --daemonize no
  done
  for i in $(seq 1 "$count"); do
    wait_for "redis-$i" 15 redis-cli -p "${ports[$((i - 1))]}" ping ||
      { cat "$LOGDIR/redis-$i.log" >&2; return 1; }
  done
  local nodes=()
  for port in "${ports[@]}"; do nodes+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${nodes[@]}" \
    --cluster-replicas "$replicas" --cluster-yes >"$LOGDIR/redis-cluster-create.log" 2>&1 ||
    { cat "$LOGDIR/redis-cluster-create.log" >&2; return 1; }
  for port in "${ports[@]}"; do
    wait_for redis-cluster 20 sh -c "redis-cli -p $port cluster info | grep -q '^cluster_state:ok'" ||
      { echo "Redis Cluster not ok:" >&2; redis-cli -p "$port" cluster info >&2; return 1; }
  done
  # Every replica in sync before anyone relies on a failover.
  for port in "${ports[@]}"; do
    wait_for redis-cluster 20 sh -c "redis-cli -p $port info replication | grep -Eq '^role:master|^master_link_status:up'" ||
      { echo "Redis replica on $port not in sync" >&2; return 1; }
  done
  REDIS_URL="redis-cluster://127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
  REDIS_PORTS="${ports[*]}"
}

cmd_start() {
  local cluster="" detach=""
  while [ $# -gt 0 ]; do
    case $1 in
      --cluster) cluster=1 ;;
      --detach) detach=1 ;;
      *) die "unknown option $1 (start [--cluster] [--detach])" ;;
    esac
    shift
  done
  local name
  for name in $(names); do
    alive "$name" && die "already running ($name); scripts/local-cluster.sh stop first"
  done
  install_missing
  local edge
  edge=$(bin fanout-edge) || die "no fanout-edge in target/release or target/debug: cargo build -p fanout-edge (or set FANOUT_BIN_DIR)"

  rm -rf "$PIDDIR" "$LOGDIR" "$ENVFILE"
  mkdir -p "$PIDDIR" "$LOGDIR"
  # From here on, a failure stops what was started.
  # Diagnostics go to stderr: harnesses that start the cluster keep only that.
  trap 'echo "local-cluster: start failed; stopping" >&2; cmd_stop' ERR

  local secret=${FANOUT_JWT_SECRET:-$(random_token)} admin=${FANOUT_ADMIN_TOKEN:-$(random_token)}
  local drain=${FANOUT_DRAIN_SECS:-2}
  if [ -n "$cluster" ]; then start_redis_cluster; else start_redis_single; fi

  local preferred edge_ports=() i
  read -r -a preferred <<<"${FANOUT_EDGE_PORTS:-8081 8082 8083}"
  for i in 0 1 2; do edge_ports+=("$(pick_port "${preferred[$i]:-}")"); done
  local lb_port lb_stats_port
  lb_port=$(pick_port "${FANOUT_LB_PORT:-9000}")
  lb_stats_port=$(pick_port "${FANOUT_LB_STATS_PORT:-9001}")

  cat >"$ENVFILE" <<EOF
# scripts/local-cluster.sh: this cluster's settings (source it in a shell).
FANOUT_REDIS_URL='$REDIS_URL'
REDIS_PORTS='$REDIS_PORTS'
FANOUT_JWT_SECRET='$secret'
FANOUT_ADMIN_TOKEN='$admin'
FANOUT_DRAIN_SECS='$drain'
EDGE1_PORT=${edge_ports[0]}
EDGE2_PORT=${edge_ports[1]}
EDGE3_PORT=${edge_ports[2]}
LB_PORT=$lb_port
LB_STATS_PORT=$lb_stats_port
EOF
  chmod 600 "$ENVFILE"

  for i in 1 2 3; do
    # Secrets through the environment, not the command line (ps shows that).
    FANOUT_JWT_SECRET=$secret FANOUT_ADMIN_TOKEN=$admin FANOUT_REDIS_URL=$REDIS_URL \
      FANOUT_DRAIN_SECS=$drain \
      start "edge-$i" "$edge" --listen "127.0.0.1:${edge_ports[$((i - 1))]}" --node-id "edge-$i"
  done
  for i in 1 2 3; do
    if ! wait_ready "edge-$i" 30 "http://127.0.0.1:${edge_ports[$((i - 1))]}/readyz"; then
      echo "local-cluster: edge-$i is not ready; its log:" >&2
      cat "$LOGDIR/edge-$i.log" >&2
      false
    fi
  done

  FANOUT_LB_BIND=127.0.0.1:$lb_port FANOUT_LB_STATS_BIND=127.0.0.1:$lb_stats_port \
    FANOUT_EDGE1=127.0.0.1:${edge_ports[0]} FANOUT_EDGE2=127.0.0.1:${edge_ports[1]} \
    FANOUT_EDGE3=127.0.0.1:${edge_ports[2]} \
    start haproxy haproxy -db -f "$ROOT/deploy/haproxy/haproxy.cfg"
  if ! wait_for haproxy 20 all_edges_up "$lb_stats_port" || ! http_ok "http://127.0.0.1:$lb_port/readyz"; then
    echo "local-cluster: HAProxy does not see three edges up; its log:" >&2
    cat "$LOGDIR/haproxy.log" >&2
    false
  fi
  trap - ERR

  print_urls
  if [ -n "$detach" ]; then
    echo "  (detached: logs in $LOGDIR)"
    return
  fi
  trap on_signal INT TERM HUP
  echo "  running; Ctrl-C stops everything"
  local reported=" "
  while :; do
    sleep 1 &
    wait $! || true
    for name in $(names); do
      if ! alive "$name" && [[ $reported != *" $name "* ]]; then
        echo "local-cluster: $name exited; last lines of $LOGDIR/$name.log:"
        tail -n 5 "$LOGDIR/$name.log"
        reported="$reported$name "
      fi
    done
  done
}

# Ctrl-C in the foreground: stop everything, in order, whatever else arrives.
on_signal() {
  trap '' INT TERM HUP PIPE
  set +e
  echo
  cmd_stop
  exit 0
}

all_edges_up() {
  [ "$(curl -s --max-time 2 "http://127.0.0.1:$1/stats;csv" |
    awk -F, '$1=="edges" && $2 ~ /^edge/ && $18 ~ /^UP/' | grep -c .)" -eq 3 ]
}

case ${1:-start} in
  start)
    shift || true
    cmd_start "$@"
    ;;
  --cluster | --detach) cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  token)
    shift
    cmd_token "$@"
    ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die "unknown command $1 (start, stop, status, token; --help)" ;;
esac
