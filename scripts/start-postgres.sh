#!/usr/bin/env bash
# Start a local PostgreSQL for the tests and print its URL on stdout (everything else goes to stderr).
# Idempotent, for a fresh Debian machine (as root) or one where it already runs:
#   apt-get install postgresql if missing, start the cluster, create role and database `wasmflow`.
# Usage: WASMFLOW_TEST_POSTGRES_URL=$(bash scripts/start-postgres.sh)
set -euo pipefail

USER_NAME=${WASMFLOW_PG_USER:-wasmflow}
PASSWORD=${WASMFLOW_PG_PASSWORD:-wasmflow}
DB_NAME=${WASMFLOW_PG_DB:-wasmflow_test}
PORT=${WASMFLOW_PG_PORT:-5432}

say() { echo "$@" >&2; }
URL="postgresql://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB_NAME"

# Already running with the role and database (a second `make test`, or a non-root user after a root set-up).
if command -v psql >/dev/null 2>&1 && psql "$URL" -tAc 'select 1' >/dev/null 2>&1; then
  echo "$URL"
  exit 0
fi

if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "error: PostgreSQL is not installed and this is not a Debian machine (no apt-get) to install it on"
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "error: PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    exit 1
  fi
  say "==> apt-get install postgresql"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi

if [ "$(id -u)" -ne 0 ]; then
  say "error: PostgreSQL is installed but $URL does not answer, and starting it needs root"
  exit 1
fi

VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n1)
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main"' | grep -q .; then
  say "==> creating cluster $VERSION/main"
  pg_createcluster "$VERSION" main --port "$PORT" >&2
fi
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
  say "==> starting PostgreSQL $VERSION/main"
  pg_ctlcluster "$VERSION" main start >&2
fi

# Wait until it accepts connections (a fresh start can take a moment).
for _ in $(seq 1 50); do
  if su postgres -c "psql -p $PORT -tAc 'select 1'" >/dev/null 2>&1; then break; fi
  sleep 0.2
done

psql_admin() { su postgres -c "psql -p $PORT -v ON_ERROR_STOP=1 -tAc \"$1\""; }

if [ -z "$(psql_admin "select 1 from pg_roles where rolname='$USER_NAME'")" ]; then
  say "==> creating role $USER_NAME"
  psql_admin "create role $USER_NAME login password '$PASSWORD'" >&2
fi
if [ -z "$(psql_admin "select 1 from pg_database where datname='$DB_NAME'")" ]; then
  say "==> creating database $DB_NAME"
  psql_admin "create database $DB_NAME owner $USER_NAME" >&2
fi

echo "$URL"
