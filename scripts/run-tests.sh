#!/usr/bin/env bash
# The test suite with everything it can use here: `make test` and `.ci/run` both come through this script.
#   - PostgreSQL: unless WASMFLOW_TEST_POSTGRES_URL is set, starts the throwaway one of
#     scripts/start-postgres.sh (installing it with apt-get as root). Where that cannot be done, the
#     PostgreSQL tests skip with the reason (WASMFLOW_TEST_POSTGRES_SKIP); under CI=true it is a failure.
#   - WasmEdge: unless WASMFLOW_WASMEDGE_LIB is set, the first of /opt/wasmedge/lib, ~/.wasmedge/lib
#     holding a libwasmedge.so.
# Arguments go to pytest (`bash scripts/run-tests.sh tests/test_kv_store.py -k sqlite`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${WASMFLOW_TEST_POSTGRES_URL:-}" ]; then
  pg_log=$(mktemp)
  if url=$(bash scripts/start-postgres.sh 2>"$pg_log"); then
    export WASMFLOW_TEST_POSTGRES_URL=$url
    echo "==> PostgreSQL for the tests: $url"
  else
    reason=$(grep -m1 '^error: ' "$pg_log" | sed 's/^error: //' || true)
    reason=${reason:-$(tail -n 3 "$pg_log" | tr '\n' ' ')}
    if [ -n "${CI:-}" ]; then
      cat "$pg_log" >&2
      echo "error: CI needs PostgreSQL for the tests and scripts/start-postgres.sh could not start it" >&2
      rm -f "$pg_log"
      exit 1
    fi
    export WASMFLOW_TEST_POSTGRES_SKIP="PostgreSQL tests skipped: $reason (or set WASMFLOW_TEST_POSTGRES_URL)"
    echo "==> $WASMFLOW_TEST_POSTGRES_SKIP" >&2
  fi
  rm -f "$pg_log"
fi

# WasmEdge is not packaged by Debian or PyPI: its engine tests run where a libwasmedge is installed and
# skip, saying so, elsewhere.
if [ -z "${WASMFLOW_WASMEDGE_LIB:-}" ]; then
  for lib in /opt/wasmedge/lib "$HOME/.wasmedge/lib"; do
    if [ -e "$lib/libwasmedge.so" ]; then export WASMFLOW_WASMEDGE_LIB=$lib; break; fi
  done
fi

exec .venv/bin/pytest -q -ra "$@"
