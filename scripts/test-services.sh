#!/usr/bin/env bash
# Starts private PostgreSQL and Redis servers for the test suite (idempotent) and exports
# PARLEY_TEST_POSTGRES_URL / PARLEY_TEST_REDIS_URL. Source it: `. scripts/test-services.sh start`.
# Where a server is not installed, its variable stays unset and those tests are skipped,
# except under CI=true, where they fail instead (see tests/conftest.py).
# Both ports lie outside Linux's default ephemeral range (32768-60999), so no outgoing
# connection of the suite can be holding one of them as its source port when a server starts.
PG_PORT=${PARLEY_TEST_PG_PORT:-25432}
REDIS_PORT=${PARLEY_TEST_REDIS_PORT:-63799}
BASE=${PARLEY_TEST_SERVICES_DIR:-/tmp/parley-test-services}

_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

_as_postgres() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

_start_postgres() {
  local bin; bin=$(_pg_bin)
  [ -n "$bin" ] || { echo "test-services: PostgreSQL not installed; its tests will skip" >&2; return 0; }
  local data="$BASE/pg"
  mkdir -p "$BASE" && chmod 755 "$BASE"
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres "$data"
    _as_postgres "$bin/initdb -D $data -U postgres --auth=trust -E UTF8 >/dev/null" || return 1
  fi
  if _as_postgres "$bin/pg_ctl -D $data status >/dev/null 2>&1" &&
     [ "$(sed -n 4p "$data/postmaster.pid" 2>/dev/null)" != "$PG_PORT" ]; then
    _as_postgres "$bin/pg_ctl -D $data -m fast -w stop >/dev/null"  # running on another port
  fi
  if ! _as_postgres "$bin/pg_ctl -D $data status >/dev/null 2>&1"; then
    _as_postgres "$bin/pg_ctl -D $data -w -l $data/log -o '-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off' start >/dev/null" || return 1
  fi
  export PARLEY_TEST_POSTGRES_URL="postgresql+asyncpg://postgres@127.0.0.1:$PG_PORT/postgres"
  export PARLEY_TEST_PG_BIN="$bin"
}

_start_redis() {
  command -v redis-server >/dev/null || { echo "test-services: redis-server not installed; its tests will skip" >&2; return 0; }
  mkdir -p "$BASE/redis"
  if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' \
      --appendonly no --dir "$BASE/redis" --logfile "$BASE/redis/log" || return 1
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  export PARLEY_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
}

case "${1:-start}" in
  start) _start_postgres && _start_redis ;;
  stop)
    bin=$(_pg_bin)
    [ -n "$bin" ] && [ -d "$BASE/pg" ] && _as_postgres "$bin/pg_ctl -D $BASE/pg -m fast stop" >/dev/null 2>&1
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
    true ;;
esac
