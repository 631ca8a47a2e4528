#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing (redis-server,
# haproxy, and the deploy validators), runs every test of the workspace against real
# processes, then validates every deployment artefact (scripts/validate-deploy.sh).
# README: "Test". Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

# binary:package pairs; one `apt-get update`, one install, only for what is absent.
needs=(
  redis-server:redis-server redis-cli:redis-tools haproxy:haproxy
  nginx:nginx-light promtool:prometheus yamllint:yamllint shellcheck:shellcheck curl:curl
  valgrind:valgrind chromium:chromium npm:npm
)
missing=()
for pair in "${needs[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  export FANOUT_APT_UPDATED=1
  # Installing haproxy / nginx / prometheus must not start them as services (nginx
  # would take port 80): a policy-rc.d refuses, for this install only.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
  fi
  rc=0
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
  [ -z "$policy" ] || $SUDO rm -f "$policy"
  [ "$rc" -eq 0 ] || { echo "test.sh: apt-get install failed" >&2; exit "$rc"; }
fi
# Tests start their own redis-server / haproxy processes on free loopback ports; no
# system service is needed (and 6379 is never used). The browser tests drive Debian's
# chromium (never a downloaded browser build).

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --workspace --doc
else
  cargo test --workspace --all-features --no-fail-fast "$@"
fi

# The edge's pointer `unsafe` (the tagged queue slot in outbox.rs) under a memory checker:
# Miri needs a nightly component this machine does not have, so the queue's unit tests
# (one pushes and takes 12,800 tagged frames across threads) run under valgrind's
# memcheck, which fails on any invalid read, write or free and on a definite leak.
edge_lib_tests=$(cargo test -p fanout-edge --lib --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite --show-possibly-lost=no \
  "$edge_lib_tests" --test-threads 1 outbox::

# Deployment artefacts, offline, with a live node built by the tests above (wherever
# CARGO_TARGET_DIR puts it).
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
FANOUT_EDGE_BIN="${FANOUT_EDGE_BIN:-$target_dir/debug/fanout-edge}" scripts/validate-deploy.sh

# The Python worker package (clients/python): lint, types, and tests against real Redis,
# Redis Cluster, Sentinel and the edge built above, in a venv (.tmp/venv-python) that the
# browser tests below also use for the example's backend and worker.
FANOUT_EDGE_BIN="${FANOUT_EDGE_BIN:-$target_dir/debug/fanout-edge}" scripts/test-python.sh
# The TypeScript SDK, React hooks and server helper: unit tests, tests against the edge
# built above, and the browser tests (real Chromium, three edges behind HAProxy, real
# Redis; the job-progress example with its Python backend and worker). Packages come
# from the committed lockfile.
(
  cd clients/typescript
  npm ci --no-audit --no-fund
  npm run build
  npm run typecheck
  FANOUT_EDGE_BIN="${FANOUT_EDGE_BIN:-$target_dir/debug/fanout-edge}" \
    FANOUT_BIN_DIR="${FANOUT_BIN_DIR:-$target_dir/debug}" npm test
)
