#!/usr/bin/env bash
# Throw-away PostgreSQL and Redis servers for the service tests (tests/servers.py), bound to
# 127.0.0.1 only and kept entirely inside a directory of the caller's choosing.
#
#   scripts/servers.sh install                  apt-get install redis-server postgresql when
#                                               missing (fast no-op when present; exits 0 with
#                                               a message on stderr when it cannot install)
#   scripts/servers.sh start-postgres DIR PORT  initdb DIR/data when new, start it on
#                                               127.0.0.1:PORT (socket in DIR/sock, log in
#                                               DIR/postgres.log), create database `latprune`;
#                                               last stdout line: the SQLAlchemy URL
#   scripts/servers.sh stop-postgres DIR
#   scripts/servers.sh start-redis DIR PORT     redis-server on 127.0.0.1:PORT, no persistence,
#                                               working dir DIR; last stdout line: the URL
#   scripts/servers.sh stop-redis PORT
#
# Starting an already running server only prints its URL. PostgreSQL refuses to run as root:
# as root its processes run as $LATPRUNE_PG_USER, else `postgres` (the Debian package's user),
# else a system user `latprune-pg` created here. DIR must then be reachable by that user
# (a private parent such as pytest's /tmp/pytest-of-root is not).
set -euo pipefail

say() { echo "servers.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    sed -n '5,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- locating binaries --------------------------------------------------------------------

pg_bindir() {
    if [ -n "${PG_BINDIR:-}" ]; then
        [ -x "$PG_BINDIR/initdb" ] || return 1
        echo "$PG_BINDIR"; return 0
    fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
    return 1
}

have_postgres() { pg_bindir >/dev/null; }
have_redis() { command -v redis-server >/dev/null 2>&1; }

# --- install ------------------------------------------------------------------------------

cmd_install() {
    local missing=""
    have_redis || missing="$missing redis-server"
    have_postgres || missing="$missing postgresql"
    if [ -z "$missing" ]; then return 0; fi

    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            say "need root or passwordless sudo to apt-get install$missing; not installed" \
                "(the tests that need PostgreSQL/Redis will skip)"
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get to install$missing; not installed (the tests that need them will skip)"
        return 0
    fi
    say "installing$missing with apt-get ..."
    # Keep the packages' maintainer scripts from starting the system-wide services
    # (postgresql's `main` cluster on 5432, redis on 6379): we start our own servers.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [ ! -e "$policy" ] && [ -z "$sudo" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local ok=""
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1; then
        ok=1
    elif $sudo apt-get update -q >/dev/null 2>&1 \
            && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null 2>&1; then
        ok=1
    fi
    if [ -n "$added_policy" ]; then rm -f "$policy"; fi
    if [ -z "$ok" ]; then
        say "apt-get install$missing failed; not installed (the tests that need them will skip)"
        return 0
    fi
    have_redis || say "redis-server still missing after apt-get install"
    have_postgres || say "PostgreSQL's initdb still missing after apt-get install"
    return 0
}

# --- PostgreSQL ---------------------------------------------------------------------------

PG_USER=""
pg_user() {
    if [ "$(id -u)" != 0 ]; then PG_USER=$(id -un); return 0; fi
    if [ -n "${LATPRUNE_PG_USER:-}" ]; then
        id -u "$LATPRUNE_PG_USER" >/dev/null 2>&1 || die "LATPRUNE_PG_USER=$LATPRUNE_PG_USER: no such user"
        PG_USER=$LATPRUNE_PG_USER
    elif id -u postgres >/dev/null 2>&1; then
        PG_USER=postgres
    else
        if ! id -u latprune-pg >/dev/null 2>&1; then
            useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
                latprune-pg || die "cannot create the system user latprune-pg"
        fi
        PG_USER=latprune-pg
    fi
}

# Run a command as the PostgreSQL user (plain when not root), from a directory it can read.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        (cd / && runuser -u "$PG_USER" -- "$@")
    else
        (cd / && "$@")
    fi
}

check_port() {
    case "$1" in
        ''|*[!0-9]*) die "PORT must be a number, got '$1'" ;;
    esac
    [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "PORT out of range: $1"
}

pg_running() { as_pg "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

cmd_start_postgres() {
    [ $# -eq 2 ] || usage
    local dir=$1 port=$2
    check_port "$port"
    BIN=$(pg_bindir) || die "PostgreSQL not found (no initdb in \$PG_BINDIR or" \
        "/usr/lib/postgresql/*/bin; run: $0 install)"
    pg_user
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    DATA=$dir/data
    local sock=$dir/sock log=$dir/postgres.log
    if [ "$(id -u)" = 0 ]; then
        chown "$PG_USER": "$dir"
        chmod 700 "$dir"
        runuser -u "$PG_USER" -- test -w "$dir" -a -x "$dir" \
            || die "$dir is not reachable by user $PG_USER (a parent directory is private?)"
    fi
    as_pg mkdir -p "$sock"

    if [ ! -s "$DATA/PG_VERSION" ]; then
        if [ -d "$DATA" ] && [ -n "$(ls -A "$DATA" 2>/dev/null)" ]; then
            die "$DATA is neither empty nor a PostgreSQL data directory"
        fi
        as_pg "$BIN/initdb" -D "$DATA" -U "$PG_USER" -E UTF8 --no-locale \
            --auth-local=trust --auth-host=trust >"$dir/initdb.log" 2>&1 \
            || { tail -n 20 "$dir/initdb.log" >&2; die "initdb $DATA failed (log: $dir/initdb.log)"; }
        # Trust: the socket directory is private to $PG_USER; TCP only from 127.0.0.1.
        as_pg tee "$DATA/pg_hba.conf" >/dev/null <<'EOF'
# latprune test server (scripts/servers.sh): no passwords, loopback IPv4 only.
local   all   all                  trust
host    all   all   127.0.0.1/32   trust
EOF
        as_pg tee -a "$DATA/postgresql.conf" >/dev/null <<EOF

# latprune test server (scripts/servers.sh)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sock'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    fi

    if pg_running; then
        local running_port
        running_port=$(sed -n 4p "$DATA/postmaster.pid" 2>/dev/null || true)
        if [ -n "$running_port" ] && [ "$running_port" != "$port" ]; then
            say "PostgreSQL in $DATA already runs on port $running_port (not $port)"
            port=$running_port
        else
            say "PostgreSQL in $DATA already running"
        fi
    else
        as_pg "$BIN/pg_ctl" start -w -t 60 -D "$DATA" -l "$log" -o "-p $port" >/dev/null 2>&1 \
            || { tail -n 20 "$log" >&2 2>/dev/null || true
                 die "PostgreSQL did not start on 127.0.0.1:$port (log: $log)"; }
    fi

    local exists
    exists=$(as_pg "$BIN/psql" -X -q -h "$sock" -p "$port" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'latprune'") \
        || die "cannot connect to PostgreSQL on port $port through $sock"
    if [ "$exists" != 1 ]; then
        as_pg "$BIN/createdb" -h "$sock" -p "$port" -U "$PG_USER" latprune \
            || die "createdb latprune failed"
    fi
    echo "postgresql+psycopg://$PG_USER@127.0.0.1:$port/latprune"
}

cmd_stop_postgres() {
    [ $# -eq 1 ] || usage
    local dir=$1
    DATA=$dir/data
    if [ ! -d "$DATA" ]; then say "no PostgreSQL data directory $DATA; nothing to stop"; return 0; fi
    DATA=$(cd "$DATA" && pwd)
    BIN=$(pg_bindir) || die "PostgreSQL binaries not found"
    pg_user
    if ! pg_running; then say "PostgreSQL in $DATA not running"; return 0; fi
    as_pg "$BIN/pg_ctl" stop -w -t 60 -m fast -D "$DATA" >/dev/null \
        || die "pg_ctl stop -D $DATA failed"
}

# --- Redis --------------------------------------------------------------------------------

# Send one inline command to 127.0.0.1:PORT; print the first reply line.
redis_cmd() {
    local port=$1; shift
    if command -v redis-cli >/dev/null 2>&1; then
        timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
    else
        (
            exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
            printf '%s\r\n' "$*" >&3
            IFS= read -r -t 5 line <&3 || exit 1
            line=${line%$'\r'}
            echo "${line#+}"
        ) 2>/dev/null
    fi
}

redis_up() { [ "$(redis_cmd "$1" PING || true)" = PONG ]; }

cmd_start_redis() {
    [ $# -eq 2 ] || usage
    local dir=$1 port=$2
    check_port "$port"
    have_redis || die "redis-server not found (run: $0 install)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if redis_up "$port"; then
        say "Redis already answering on 127.0.0.1:$port"
    else
        redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
            --save "" --appendonly no --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
            >/dev/null || die "redis-server failed to launch (log: $dir/redis.log)"
        local i
        for i in $(seq 1 100); do
            redis_up "$port" && break
            sleep 0.1
        done
        redis_up "$port" || { tail -n 20 "$dir/redis.log" >&2 2>/dev/null || true
                              die "Redis did not answer PING on 127.0.0.1:$port (log: $dir/redis.log)"; }
    fi
    echo "redis://127.0.0.1:$port/0"
}

cmd_stop_redis() {
    [ $# -eq 1 ] || usage
    local port=$1
    check_port "$port"
    if ! redis_up "$port"; then say "no Redis answering on 127.0.0.1:$port"; return 0; fi
    redis_cmd "$port" SHUTDOWN NOSAVE >/dev/null || true
    local i
    for i in $(seq 1 50); do
        redis_up "$port" || return 0
        sleep 0.1
    done
    die "Redis on 127.0.0.1:$port still answers after SHUTDOWN"
}

# --- main ---------------------------------------------------------------------------------

[ $# -ge 1 ] || usage
cmd=$1; shift
case "$cmd" in
    install)        [ $# -eq 0 ] || usage; cmd_install ;;
    start-postgres) cmd_start_postgres "$@" ;;
    stop-postgres)  cmd_stop_postgres "$@" ;;
    start-redis)    cmd_start_redis "$@" ;;
    stop-redis)     cmd_stop_redis "$@" ;;
    -h|--help|help) usage ;;
    *)              say "unknown command '$cmd'"; usage ;;
esac
