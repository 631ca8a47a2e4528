#!/usr/bin/env bash
# The Python worker package (clients/python): lint, type-check and test it against real
# processes (redis-server, Redis Cluster, Sentinel and the fanout edge on free ports).
# Needs python3 with venv, redis-server and redis-cli (scripts/test.sh installs them),
# and the edge binary: FANOUT_EDGE_BIN, default target/debug/fanout-edge.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.tmp/venv-python"
pkg="$root/clients/python"

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$root/.tmp"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check -r "$pkg/requirements-dev.txt" \
  -r "$root/examples/job-progress/requirements.txt"
# Non-editable: the tests import the installed package (the scripts it ships are checked
# byte for byte against crates/fanout-protocol/src/*.lua). --force-reinstall of the
# package alone, so that a changed source tree is always what is tested.
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$pkg"
rm -rf "$pkg/build" "$pkg"/src/*.egg-info

export FANOUT_EDGE_BIN="${FANOUT_EDGE_BIN:-$root/target/debug/fanout-edge}"
if [ ! -x "$FANOUT_EDGE_BIN" ]; then
  echo "test-python.sh: the edge binary $FANOUT_EDGE_BIN is missing (cargo build -p fanout-edge, or set FANOUT_EDGE_BIN)" >&2
  exit 1
fi

# The example and the browser tests' worker use the package too (the browser tests run
# them from this venv): linted with the package's settings.
others=("$root/examples/job-progress" "$root/clients/typescript/e2e/python")
cd "$pkg"
echo "test-python.sh: ruff check"
"$venv/bin/ruff" check .
(cd "$root" && "$venv/bin/ruff" check --config "$pkg/pyproject.toml" "${others[@]}")
echo "test-python.sh: ruff format --check"
"$venv/bin/ruff" format --check .
(cd "$root" && "$venv/bin/ruff" format --check --config "$pkg/pyproject.toml" "${others[@]}")
echo "test-python.sh: mypy --strict"
"$venv/bin/mypy" --strict
(cd "$root/examples/job-progress" && "$venv/bin/mypy" --strict --config-file "$pkg/pyproject.toml" app.py worker.py jobs.py)
echo "test-python.sh: pytest"
"$venv/bin/pytest" -q -p no:cacheprovider "$@"
