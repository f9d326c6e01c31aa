#!/usr/bin/env bash
# MariaDB Galera beside a single MariaDB, in one run: mod-ratelimit charging (bench.sh's
# `rlm` scenario: 1,000 identities, limits never reached) against a private mariadbd,
# then against a private three-node Galera cluster (Debian's galera-4) on loopback, with
# one daemon and with two daemons (each on its own node, or both on one). Run as bench.sh is:
#
#   scripts/galera-bench.sh [SECONDS] [CONNECTIONS]        e.g. scripts/galera-bench.sh 5 64
#
# Daemons on core 0, load generators on core 1 (taskset), databases unpinned; every
# mariadbd with its defaults (as bench.sh's server) plus, for Galera, the wsrep settings.
# On two cores the three nodes share the machine with everything else: a node per host
# is what production has. Rows as bench.sh prints them; a two-daemon row sums both
# generators' requests/s and shows the worse latency of the two.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
C=${2:-64}
if [ -z "${BENCH_BUILD:-}" ]; then
    cargo build --release --locked -p valvula-bench -p valvulad -p mod-ratelimit >&2
fi
REL=${BENCH_BUILD:-${CARGO_TARGET_DIR:-$PWD/target}/release}
B=$REL/valvula-bench
V=$REL/valvulad
W=$(mktemp -d)
chmod 755 "$W"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
# As root the servers run as mysql, as packaged ones do (a joiner's rsync state transfer,
# started by root, would run as nobody and could not write the data directory).
U=$(id -un)
[ "$(id -u)" = 0 ] && U=mysql
mariadb-install-db --no-defaults --datadir="$W/seed" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >/dev/null

server() { # name port [mariadbd options...]: a server on a copy of the seed
    local d=$W/$1 port=$2
    shift 2
    mkdir -p "$d/tmp"
    cp -a "$W/seed" "$d/data"
    [ "$U" = mysql ] && chown -R mysql:mysql "$d"
    mariadbd --no-defaults --datadir="$d/data" --socket="$d/sock" --pid-file="$d/pid" \
        --tmpdir="$d/tmp" --port="$port" --bind-address=127.0.0.1 --user="$U" --skip-log-bin "$@" \
        >"$d/log" 2>&1 &
    PIDS+=($!)
}
sql() { mariadb -N -B -uroot -h127.0.0.1 -P"$1" -e "$2"; }
wait_for() { # what command...
    local what=$1
    shift
    for _ in $(seq 1 600); do "$@" >/dev/null 2>&1 && return; sleep 0.2; done
    echo "galera-bench: $what did not happen" >&2
    exit 1
}
synced() { # port size
    [ "$(sql "$1" "SHOW STATUS LIKE 'wsrep_local_state_comment'" | cut -f2)" = Synced ] &&
        [ "$(sql "$1" "SHOW STATUS LIKE 'wsrep_cluster_size'" | cut -f2)" = "$2" ]
}
GCOMM=(14567 14568 14569)
node() { # i: node i of three, node 0 bootstraps
    local i=$1 new=()
    [ "$i" = 0 ] && new=(--wsrep-new-cluster)
    server "n$i" "$((13310 + i))" --wsrep-on=ON --wsrep-provider=/usr/lib/galera/libgalera_smm.so \
        --wsrep-cluster-name=bench --wsrep-cluster-address="gcomm://127.0.0.1:14567,127.0.0.1:14568,127.0.0.1:14569" \
        --wsrep-node-address="127.0.0.1:${GCOMM[$i]}" --wsrep-node-name="n$i" \
        --wsrep-provider-options="gmcast.listen_addr=tcp://127.0.0.1:${GCOMM[$i]};ist.recv_addr=127.0.0.1:$((14577 + i))" \
        --wsrep-sst-method=rsync --wsrep-sst-receive-address="127.0.0.1:$((14587 + i))" \
        --binlog-format=ROW --innodb-autoinc-lock-mode=2 "${new[@]}"
}

daemon() { # name listen-port database-port database
    cat >"$W/$1.toml" <<CFG
[server]
module_dirs = ["$REL"]
admin_socket = ""
[log]
level = "warn"
[storage]
backend = "mysql"
url = "mysql://root@127.0.0.1:$3/$4"
[[listener]]
name = "main"
address = "127.0.0.1:$2"
modules = ["mod-ratelimit"]
max_connections = 5000
[module.mod-ratelimit]
[[module.mod-ratelimit.policy]]
name = "users"
key = "sasl_user"
metric = "recipients"
default = { limits = [["hour", 1000000000], ["day", 1000000000]] }
CFG
    sql "$3" "CREATE DATABASE IF NOT EXISTS $4"
    taskset -c 0 "$V" -c "$W/$1.toml" 2>"$W/$1.log" &
    PIDS+=($!)
    eval "PID_$1=$!"
    wait_for "valvulad $1 ready" "$V" -c "$W/$1.toml" -p
}
stop_daemon() { local p="PID_$1"; kill "${!p}"; wait "${!p}" 2>/dev/null || true; }
bench() { # port pid output
    taskset -c 1 "$B" run --target "127.0.0.1:$1" --connections "$C" --duration "$SECS" --warmup 1 \
        --threads 1 --identities 1000 --stage eod --server-pid "$2" --json >"$3"
}
row() { # scenario json...
    python3 - "$@" <<'PY'
import json, sys
ds = [json.load(open(f)) for f in sys.argv[2:]]
lat = lambda k: max(d['latency_ms'][k] for d in ds)
acts = {}
for d in ds:
    for k, v in d['actions'].items():
        acts[k] = acts.get(k, 0) + v
print('| %s | %s | %.0f | %.3f | %.3f | %.3f | %.3f | %s | %d |' % (
    sys.argv[1], '+'.join(str(d['connections']) for d in ds), sum(d['requests_per_second'] for d in ds),
    lat('p50'), lat('p99'), lat('p99_9'), lat('max'),
    ' '.join('%s=%d' % kv for kv in acts.items()), sum(d['errors'] for d in ds)))
PY
}
one() { # scenario name db-port (database: name)
    daemon "$2" 3720 "$3" "$2"
    bench 3720 "$(eval echo "\$PID_$2")" "$W/$2.json"
    row "$1" "$W/$2.json"
    stop_daemon "$2"
}
two() { # scenario name db-port-a db-port-b (one database: name)
    daemon "$2a" 3721 "$3" "$2"
    daemon "$2b" 3722 "$4" "$2"
    bench 3721 "$(eval echo "\$PID_$2a")" "$W/$2a.json" &
    local g=$!
    bench 3722 "$(eval echo "\$PID_$2b")" "$W/$2b.json"
    wait "$g"
    row "$1" "$W/$2a.json" "$W/$2b.json"
    stop_daemon "$2a"
    stop_daemon "$2b"
}

echo "| scenario | connections | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | actions | errors |"
echo "|---|---|---|---|---|---|---|---|---|"
# The machine's own server, as bench.sh's `rlm` row measures it (when there is one).
if mariadb-admin -uroot ping >/dev/null 2>&1; then
    one "mod-ratelimit, the machine's MariaDB (bench.sh rlm)" "vgb$$" 3306
    sql 3306 "DROP DATABASE vgb$$"
fi
server single 13309
SINGLE=${PIDS[-1]}
wait_for "single mariadbd up" sql 13309 "SELECT 1"
one "mod-ratelimit, single MariaDB" single 13309
two "mod-ratelimit, two daemons, single MariaDB" single2 13309 13309
kill "$SINGLE"
wait "$SINGLE" 2>/dev/null || true
for i in 0 1 2; do
    node "$i"
    wait_for "Galera node $i synced" synced "$((13310 + i))" "$((i + 1))"
done
one "mod-ratelimit, Galera (daemon on node 0 of 3)" galera 13310
two "mod-ratelimit, Galera, two daemons (nodes 0 and 1 of 3)" galera2 13310 13311
two "mod-ratelimit, Galera, two daemons (both on node 0 of 3)" galera3 13310 13310
