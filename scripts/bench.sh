#!/usr/bin/env bash
# Benchmark scenarios for BENCHMARKS.md (issue: performance). Run from the repository:
#
#   scripts/bench.sh [SECONDS] [CONNECTIONS...]      e.g. scripts/bench.sh 5 1 8 64 256
#
# The daemon under test runs on core 0, the load generator on core 1 (taskset), both in
# release builds; MariaDB scenarios use the local server (root, no password) and a
# database of their own. Prints one markdown table row per scenario and connection count,
# and a correctness row per module (limit L: how many of N were admitted).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
shift || true
CONNS=${*:-1 8 64 256}
# BENCH_BUILD=DIR measures the binaries and modules in DIR (another version's release
# build, for before/after rows in one run) instead of building this tree.
if [ -z "${BENCH_BUILD:-}" ]; then
    cargo build --release --locked -p valvula-bench -p valvulad -p mod-ticket -p mod-ratelimit >&2
fi
REL=${BENCH_BUILD:-$PWD/target/release}
B=$PWD/target/release/valvula-bench
[ -x "$B" ] || B=$REL/valvula-bench
V=$REL/valvulad
MODS=$REL
W=$(mktemp -d)
trap 'pkill -f "$W" 2>/dev/null || true; pkill -f "valvula-bench serve-dunno" 2>/dev/null || true; rm -rf "$W"' EXIT

# The shipped defaults: nothing below tunes the daemon or the modules (thread pools,
# pool sizes and accounting as packaged); TUNED rows are extras, never the headline.
config() { # name port modules storage module-sections [extra server settings]
    cat > "$W/$1.toml" <<CFG
[server]
module_dirs = ["$MODS"]
admin_socket = ""
${6:-}
[log]
level = "warn"
$4
[[listener]]
name = "main"
address = "127.0.0.1:$2"
modules = [$3]
max_connections = 5000
$5
CFG
}
RATELIMIT='[module.mod-ratelimit]
[[module.mod-ratelimit.policy]]
name = "users"
key = "sasl_user"
metric = "recipients"
default = { limits = [["hour", 1000000000], ["day", 1000000000]] }'
TICKET='[module.mod-ticket]
charge_states = []'

start() { # name
    taskset -c 0 "$V" -c "$W/$1.toml" 2>"$W/$1.log" &
    local master=$!  # taskset execs valvulad: the same process, the master
    # Ready when every listener answers valvula's checkserver probe. The figures are the
    # worker's (the master only holds the sockets; it does no work per request).
    for _ in $(seq 1 100); do
        if "$V" -c "$W/$1.toml" -p >/dev/null 2>&1; then SERVER_PID=$(pgrep -P "$master" | head -1); return; fi
        sleep 0.1
    done
    cat "$W/$1.log" >&2; exit 1
}
stop() { pkill -f "$W/$1.toml" || true; sleep 0.5; }
# BENCH_ONLY="rl tkm" runs only those scenarios (ceiling ready empty rl tuned scale tk newconn rlm rlm64 tkm exact memory).
want() { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]; }
row() { # scenario port conns [extra bench options]
    local j
    j=$(taskset -c 1 "$B" run --target "127.0.0.1:$2" --connections "$3" --duration "$SECS" --warmup 1 --threads 1 --identities "${IDENTITIES:-1000}" --stage eod --server-pid "$SERVER_PID" --json "${@:4}")
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); s=d['server']; print('| %s | %d | %.0f | %.3f | %.3f | %.3f | %.3f | %.2f | %.1f | %s | %d |' % (sys.argv[2], d['connections'], d['requests_per_second'], d['latency_ms']['p50'], d['latency_ms']['p99'], d['latency_ms']['p99_9'], d['latency_ms']['max'], s['switches_per_request'], s['cpu_us_per_request'], ' '.join('%s=%d' % kv for kv in d['actions'].items()), d['errors']))" "$j" "$1"
}
tickets() { # sql-runner: 1000 users on one plan
    { echo "INSERT INTO ticket_plan (id, name, total_limit, day_limit, month_limit) VALUES (1, 'bench', -1, -1, -1);"
      for i in $(seq 0 999); do echo "INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('user$i@example.com', -1, 1);"; done; } | "$@"
}

echo "| scenario | connections | requests/s | p50 ms | p99 ms | p99.9 ms | max ms | switches/request | µs CPU/request | actions | errors |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
taskset -c 0 "$B" serve-dunno --listen 127.0.0.1:3690 --threads 1 2>/dev/null &
SERVER_PID=$!
sleep 0.5
if want ceiling; then for c in $CONNS; do row "ceiling (parse, answer dunno)" 3690 "$c"; done; fi
pkill -f "valvula-bench serve-dunno" || true

# The configuration the package ships (etc/valvulad.toml: mod-ticket, log level info),
# only moved to this run's port, database and module directory; its users have no
# ticket, so a request is a lookup and no write.
sed -e "s|^module_dirs = .*|module_dirs = [\"$MODS\"]|" -e "s|^path = .*|path = \"$W/ready.db\"|" \
    -e "s|^address = .*|address = \"127.0.0.1:3702\"|" etc/valvulad.toml > "$W/ready.toml"
if want ready; then start ready; for c in $CONNS; do row "shipped configuration (mod-ticket, SQLite, no ticket: lookup only)" 3702 "$c"; done; stop ready; fi

config empty 3691 "" "[storage]
path = \"$W/empty.db\"" ""
if want empty; then start empty; for c in $CONNS; do row "valvulad, empty chain" 3691 "$c"; done; stop empty; fi

config rl 3692 '"mod-ratelimit"' "[storage]
path = \"$W/rl.db\"" "$RATELIMIT"
if want rl; then start rl; for c in $CONNS; do row "mod-ratelimit, SQLite" 3692 "$c"; done; stop rl; fi
# Extra: the tuned configuration earlier tables used (not what a user who changes
# nothing gets).
config rlt 3701 '"mod-ratelimit"' "[storage]
path = \"$W/rlt.db\"" "${RATELIMIT/\[module.mod-ratelimit\]/[module.mod-ratelimit]
accounting = false}" "module_threads = 64"
if want tuned; then start rlt; for c in $CONNS; do row "mod-ratelimit, SQLite, tuned (module_threads 64, accounting off)" 3701 "$c"; done; stop rlt; fi

# Cost does not grow with the work: the same charging load over 1,000,000 identities,
# each already with its counter rows, accounting row and a token (as after a busy hour),
# against the 1,000 of the row above.
config scale 3703 '"mod-ratelimit"' "[storage]
path = \"$W/scale.db\"" "$RATELIMIT"
if want scale; then
    start scale
    taskset -c 1 "$B" run --target 127.0.0.1:3703 --connections 1 --duration 1 --warmup 0 --threads 1 --identities 1 --stage eod >/dev/null
    stop scale
    sqlite3 "$W/scale.db" "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 999999)
        INSERT OR IGNORE INTO vlv_counter (ns, ckey, win, period, used)
            SELECT c.ns, 'users:user' || n.i || '@example.com', c.win, c.period, 1 FROM n, vlv_counter c;
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 999999)
        INSERT OR IGNORE INTO ratelimit_accounting (policy, identity, period, messages, recipients, bytes, bytes_rcpt)
            SELECT a.policy, 'user' || n.i || '@example.com', a.period, 1, 1, 1, 1 FROM n, (SELECT * FROM ratelimit_accounting LIMIT 1) a;
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 999999)
        INSERT OR IGNORE INTO vlv_once (ns, token, at) SELECT o.ns, o.token || n.i, o.at FROM n, (SELECT * FROM vlv_once LIMIT 1) o;"
    start scale
    for c in $CONNS; do IDENTITIES=1000000 row "mod-ratelimit, SQLite, 1,000,000 identities ($(du -m "$W/scale.db" | cut -f1) MB database)" 3703 "$c"; done
    stop scale
fi

config tk 3693 '"mod-ticket"' "[storage]
path = \"$W/tk.db\"" "$TICKET"
if want tk; then start tk; tickets sqlite3 "$W/tk.db"; for c in $CONNS; do row "mod-ticket, SQLite" 3693 "$c"; done; stop tk; fi
# One connection per request (a Postfix without policy connection caching), 64 at once.
if want newconn; then
    start rl; row "mod-ratelimit, SQLite, new connection per request" 3692 64 --new-connection; stop rl
    start tk
    [ "$(sqlite3 "$W/tk.db" "SELECT COUNT(*) FROM domain_ticket")" -gt 0 ] || tickets sqlite3 "$W/tk.db"
    row "mod-ticket, SQLite, new connection per request" 3693 64 --new-connection; stop tk
fi

if mariadb-admin ping >/dev/null 2>&1; then
    DB=vlvbench_$$
    mariadb -uroot -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
    config rlm 3694 '"mod-ratelimit"' "[storage]
backend = \"mysql\"
url = \"mysql://root@127.0.0.1:3306/$DB\"" "$RATELIMIT"
    if want rlm; then start rlm; for c in $CONNS; do row "mod-ratelimit, MariaDB" 3694 "$c"; done; stop rlm; fi
    # Extra: more module threads, which doubled MariaDB's figure before ABI 0.5.
    config rlm64 3704 '"mod-ratelimit"' "[storage]
backend = \"mysql\"
url = \"mysql://root@127.0.0.1:3306/$DB\"" "$RATELIMIT" "module_threads = 64"
    if want rlm64; then start rlm64; for c in $CONNS; do row "mod-ratelimit, MariaDB, module_threads 64" 3704 "$c"; done; stop rlm64; fi
    config tkm 3695 '"mod-ticket"' "[storage]
backend = \"mysql\"
url = \"mysql://root@127.0.0.1:3306/$DB\"" "$TICKET"
    if want tkm; then start tkm; tickets mariadb -uroot "$DB"; for c in $CONNS; do row "mod-ticket, MariaDB" 3695 "$c"; done; stop tkm; fi
    mariadb -uroot -e "DROP DATABASE $DB"
fi

# Correctness: one identity with a limit L, hammered from many connections; exactly L of
# the N requests must be admitted (dunno), every other one refused.
EXACT_RL='[module.mod-ratelimit]
accounting = false
[[module.mod-ratelimit.policy]]
name = "exact"
key = "sasl_user"
metric = "messages"
default = { limits = [["day", 1000]] }'
exact_row() { # scenario port conns
    local j
    j=$(taskset -c 1 "$B" run --target "127.0.0.1:$2" --connections "$3" --duration 3 --warmup 0 --threads 1 --identities 1 --json)
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); a=d['actions']; n=sum(a.values()); ok=a.get('dunno',0); print('| %s | %d | 1000 | %d | %d | %s | %d |' % (sys.argv[2], d['connections'], n, ok, 'yes' if ok == 1000 else '**NO**', d['errors']))" "$j" "$1"
}
exact_ticket() { # sql-runner: user0 on a plan of 1000 a day
    { echo "INSERT INTO ticket_plan (id, name, total_limit, day_limit, month_limit) VALUES (1, 'exact', -1, 1000, -1);"
      echo "INSERT INTO domain_ticket (sasl_user, valid_until, ticket_plan_id) VALUES ('user0@example.com', -1, 1);"; } | "$@"
}
if want exact; then
    echo
    echo "| correctness | connections | limit L | requests N | admitted | exactly L | errors |"
    echo "|---|---|---|---|---|---|---|"
    for c in 64 256; do
        config xrl$c 3696 '"mod-ratelimit"' "[storage]
path = \"$W/xrl$c.db\"" "$EXACT_RL"
        start xrl$c; exact_row "mod-ratelimit, SQLite" 3696 "$c"; stop xrl$c
        config xtk$c 3697 '"mod-ticket"' "[storage]
path = \"$W/xtk$c.db\"" "$TICKET"
        start xtk$c; exact_ticket sqlite3 "$W/xtk$c.db"; exact_row "mod-ticket, SQLite" 3697 "$c"; stop xtk$c
        if mariadb-admin ping >/dev/null 2>&1; then
            DB=vlvexact_$$_$c
            mariadb -uroot -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
            config xrlm$c 3698 '"mod-ratelimit"' "[storage]
backend = \"mysql\"
url = \"mysql://root@127.0.0.1:3306/$DB\"
pool_size = 64" "$EXACT_RL"
            start xrlm$c; exact_row "mod-ratelimit, MariaDB" 3698 "$c"; stop xrlm$c
            mariadb -uroot -e "DROP DATABASE $DB; CREATE DATABASE $DB"
            config xtkm$c 3699 '"mod-ticket"' "[storage]
backend = \"mysql\"
url = \"mysql://root@127.0.0.1:3306/$DB\"
pool_size = 64" "$TICKET"
            start xtkm$c; exact_ticket mariadb -uroot "$DB"; exact_row "mod-ticket, MariaDB" 3699 "$c"; stop xtkm$c
            mariadb -uroot -e "DROP DATABASE $DB"
        fi
    done
fi

# Memory: resident set of valvulad (mod-ratelimit on SQLite) idle, holding 10,000 idle
# connections, and after charging 1,000,000 distinct identities.
# The worker's: the child of the oldest process on that configuration (the master).
worker() { pgrep -P "$(pgrep -o -f "$W/$1.toml")" | head -1; }
rss() { awk '/^VmRSS/ {printf "%.1f MB", $2/1024}' "/proc/$(worker "$1")/status"; }
hwm() { awk '/^VmHWM/ {printf "%.1f MB", $2/1024}' "/proc/$(worker "$1")/status"; }
if want memory; then
    ulimit -n 20000 2>/dev/null || true  # 10,000 connections need more than 1024 descriptors
    config mem 3700 '"mod-ratelimit"' "[storage]
path = \"$W/mem.db\"" "$RATELIMIT"
    sed -i 's/^max_connections = .*/max_connections = 20000/' "$W/mem.toml"
    start mem
    echo
    echo "| memory (valvulad, mod-ratelimit on SQLite) | resident | detail |"
    echo "|---|---|---|"
    echo "| started, idle | $(rss mem) | |"
    taskset -c 1 "$B" hold --target 127.0.0.1:3700 --connections 10000 --seconds 8 > "$W/hold.json" 2>/dev/null &
    holder=$!
    sleep 6
    held=$(rss mem)
    wait $holder
    echo "| 10,000 idle connections open | $held | $(cat "$W/hold.json") |"
    taskset -c 1 "$B" run --target 127.0.0.1:3700 --connections 64 --requests 15625 --warmup 0 --threads 1 \
        --identities 1000000 --sequential --json > "$W/million.json"
    rows=$(sqlite3 "$W/mem.db" "SELECT COUNT(DISTINCT ckey) FROM vlv_counter WHERE ns = 'mod-ratelimit'")
    echo "| after 1,000,000 identities charged | $(rss mem) (peak $(hwm mem)) | $rows identities stored; $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('%.0f requests/s, errors %d' % (d['requests_per_second'], d['errors']))" "$W/million.json") |"
    stop mem
fi
