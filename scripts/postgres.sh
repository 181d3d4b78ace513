#!/usr/bin/env bash
# A throw-away PostgreSQL server on 127.0.0.1 for the tests and for trying multi-worker
# searches (no docker needed). Usage:
#   eval "$(scripts/postgres.sh start DIR)"   # prints: export AUTOBUILD_TEST_POSTGRES=...
#   scripts/postgres.sh stop DIR
# Debian/Ubuntu's PostgreSQL server binaries are found under /usr/lib/postgresql/*/bin (or
# PG_BIN). As root, the server runs as the `postgres` user (initdb refuses root).
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?data directory}
bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$bin" ] || [ ! -x "$bin/pg_ctl" ]; then
  echo "echo 'no PostgreSQL server binaries (install postgresql or set PG_BIN)' >&2"; exit 0
fi
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
  start)
    mkdir -p "$dir"; rm -rf "$dir/data"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    as_pg "$bin/initdb" -D "$dir/data" --auth=trust -U postgres >"$dir/initdb.log" 2>&1
    as_pg "$bin/pg_ctl" -D "$dir/data" -w -l "$dir/server.log" \
      -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null
    echo "export AUTOBUILD_TEST_POSTGRES=postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
