#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the store tests and export its URL.
#
#   source .ci/postgres.sh        # exports ASSISTANT_TEST_PG_URL (and ASSISTANT_TEST_PG_DATA)
#   .ci/postgres.sh               # same, but only prints `export ...` lines: eval "$(.ci/postgres.sh)"
#
# On a fresh Debian 12 machine as root it installs `postgresql` from apt if missing. It never touches
# the distribution's own cluster: it runs initdb in a new temporary folder (as the `postgres` user when
# run as root, because initdb refuses root) and listens on 127.0.0.1 only, on $ASSISTANT_PG_PORT
# (default 55432, or the next free port). A non-superuser role owns the test database, as in a real
# deployment. fsync is off: the data is thrown away, and it makes the tests faster.
# Stop it with `assistant_pg_stop` (defined when sourced; it also removes the temporary folder), or
# pg_ctl -D "$ASSISTANT_TEST_PG_DATA" stop   (as the postgres user when run as root).
#
# Everything runs in a subshell with `set -euo pipefail`, so sourcing this file does not change the
# options of the calling shell; only the exports and the two functions below leak out.

_assistant_pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

assistant_pg_stop() {
  [ -d "${ASSISTANT_TEST_PG_DATA:-}" ] || return 0
  local stop=("$(_assistant_pg_bindir)/pg_ctl" -D "$ASSISTANT_TEST_PG_DATA" -m fast -w stop)
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "${stop[@]}" >/dev/null; else "${stop[@]}" >/dev/null; fi
  local dir
  dir="$(dirname "$ASSISTANT_TEST_PG_DATA")"
  case "$dir" in /tmp/assistant-pg.*) rm -rf "$dir" ;; esac
  unset ASSISTANT_TEST_PG_URL ASSISTANT_TEST_PG_DATA
}

_assistant_pg_url="$(
  set -euo pipefail
  port="${ASSISTANT_PG_PORT:-55432}"
  log() { echo "[postgres.sh] $*" >&2; }

  if [ -z "$(_assistant_pg_bindir)" ]; then
    [ "$(id -u)" = 0 ] || { log "PostgreSQL is not installed and I am not root"; exit 1; }
    log "installing postgresql from apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
  fi
  bindir="$(_assistant_pg_bindir)"

  if [ "$(id -u)" = 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
  else
    as_pg() { "$@"; }
  fi

  # A server from an earlier run (or anything else) may hold the port: take the next free one.
  for _ in $(seq 20); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
    log "port $port is taken, trying $((port + 1))"
    port=$((port + 1))
  done

  data="$(mktemp -d /tmp/assistant-pg.XXXXXX)"
  [ "$(id -u)" = 0 ] && chown postgres: "$data"
  secret() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  super_pw="$(secret)"
  app_pw="$(secret)"
  pwfile="$data/.pwfile"
  as_pg sh -c "umask 077; printf '%s\n' '$super_pw' > '$pwfile'"

  log "initdb in $data ($bindir)"
  as_pg "$bindir/initdb" -D "$data/db" -U postgres --pwfile="$pwfile" -A scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >&2
  as_pg rm -f "$pwfile"

  log "starting on 127.0.0.1:$port"
  as_pg "$bindir/pg_ctl" -D "$data/db" -l "$data/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off" start >&2 \
    || { cat "$data/server.log" >&2; exit 1; }

  PGPASSWORD="$super_pw" "$bindir/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -v ON_ERROR_STOP=1 >&2 <<SQL
CREATE ROLE assistant LOGIN PASSWORD '$app_pw';
CREATE DATABASE assistant_test OWNER assistant;
SQL
  echo "postgresql+psycopg://assistant:$app_pw@127.0.0.1:$port/assistant_test $data/db"
)" || {
  echo "[postgres.sh] failed to start PostgreSQL" >&2
  unset _assistant_pg_url
  return 1 2>/dev/null || exit 1
}

export ASSISTANT_TEST_PG_URL="${_assistant_pg_url% *}"
export ASSISTANT_TEST_PG_DATA="${_assistant_pg_url##* }"
unset _assistant_pg_url
echo "[postgres.sh] ASSISTANT_TEST_PG_URL=$ASSISTANT_TEST_PG_URL" >&2
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  # Executed rather than sourced: hand the exports to the caller's eval.
  echo "export ASSISTANT_TEST_PG_URL='$ASSISTANT_TEST_PG_URL'"
  echo "export ASSISTANT_TEST_PG_DATA='$ASSISTANT_TEST_PG_DATA'"
fi
