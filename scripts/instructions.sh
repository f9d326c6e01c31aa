#!/usr/bin/env bash
# User-space instructions per request (valgrind --tool=callgrind), for BENCHMARKS.md:
# a figure that does not depend on a noisy machine. Run from the repository:
#
#   scripts/instructions.sh [SECONDS]          e.g. scripts/instructions.sh 15
#
# Each scenario runs the release valvulad under callgrind with the configuration
# scripts/bench.sh uses (the shipped defaults), warms it up, zeroes the counters, sends
# Postfix's END-OF-MESSAGE requests from 16 connections (1000 SASL users, a new
# `instance` each) for SECONDS, and divides the instructions counted by the requests
# answered. BENCH_BUILD=DIR measures another version's release build (before/after).
# BENCH_ONLY="empty rl" runs only those scenarios (empty ready rl tk).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
if [ -z "${BENCH_BUILD:-}" ]; then
    cargo build --release --locked -p valvula-bench -p valvulad -p mod-ticket -p mod-ratelimit >&2
fi
REL=${BENCH_BUILD:-$PWD/target/release}
B=$PWD/target/release/valvula-bench
[ -x "$B" ] || B=$REL/valvula-bench
V=$REL/valvulad
# Not under /tmp: the daemon refuses modules below a world-writable directory, and the
# configuration names this directory's database.
W=$(mktemp -d "$PWD/target/instructions.XXXXXX")
trap 'pkill -f "$W" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT
want() { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]; }

config() { # name port modules module-sections
    cat > "$W/$1.toml" <<CFG
[server]
module_dirs = ["$REL"]
admin_socket = ""
[log]
level = "warn"
[storage]
path = "$W/$1.db"
[[listener]]
name = "main"
address = "127.0.0.1:$2"
modules = [$3]
max_connections = 5000
$4
CFG
}

measure() { # name port scenario
    local pid j n ir
    # One process: the master does no work per request, and callgrind follows one
    # (builds before the master have no such flag, and need none).
    local one=()
    "$V" --help | grep -q -- --single-process && one=(--single-process)
    valgrind --tool=callgrind --callgrind-out-file="$W/$1.out" "$V" "${one[@]}" -c "$W/$1.toml" 2>"$W/$1.vg" &
    pid=$!
    for _ in $(seq 1 120); do "$V" -c "$W/$1.toml" -p >/dev/null 2>&1 && break; sleep 0.5; done
    if [ "$1" = tk ]; then
        { echo "INSERT INTO ticket_plan (id, name, total_limit, day_limit, month_limit) VALUES (1, 'bench', -1, -1, -1);"
          for i in $(seq 0 999); do echo "INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('user$i@example.com', -1, 1);"; done; } | sqlite3 "$W/tk.db"
    fi
    # Warm-up (first use of each identity, schema, caches), then count from zero.
    "$B" run --target "127.0.0.1:$2" --connections 16 --duration 2 --warmup 0 --threads 1 --identities 1000 --stage eod --json >/dev/null
    callgrind_control --zero "$pid" >/dev/null
    j=$("$B" run --target "127.0.0.1:$2" --connections 16 --duration "$SECS" --warmup 0 --threads 1 --identities 1000 --stage eod --json)
    callgrind_control --dump=measured "$pid" >/dev/null
    n=$(python3 -c "import json,sys; print(sum(json.loads(sys.argv[1])['actions'].values()))" "$j")
    kill -INT "$pid"; wait "$pid" 2>/dev/null || true
    # The dump asked for above: the instructions since the counters were zeroed.
    ir=$(awk '/^desc: Trigger: dump measured/{m=1} m && /^summary:/{print $2; exit}' "$W/$1".out.*)
    python3 -c "import sys; ir,n=int(sys.argv[1]),int(sys.argv[2]); print('| %s | %d | %s |' % (sys.argv[3], n, format(ir//max(n,1), ',')))" "$ir" "$n" "$3"
}

RATELIMIT='[module.mod-ratelimit]
[[module.mod-ratelimit.policy]]
name = "users"
key = "sasl_user"
metric = "recipients"
default = { limits = [["hour", 1000000000], ["day", 1000000000]] }'

echo "| scenario | requests | instructions/request |"
echo "|---|---|---|"
config empty 3781 "" ""
if want empty; then measure empty 3781 "valvulad, empty chain"; fi
config ready 3782 '"mod-ticket"' '[module.mod-ticket]
charge_states = []'
if want ready; then measure ready 3782 "mod-ticket, SQLite, no ticket (lookup only)"; fi
config rl 3783 '"mod-ratelimit"' "$RATELIMIT"
if want rl; then measure rl 3783 "mod-ratelimit, SQLite, charging"; fi
config tk 3784 '"mod-ticket"' '[module.mod-ticket]
charge_states = []'
if want tk; then measure tk 3784 "mod-ticket, SQLite, charging"; fi
