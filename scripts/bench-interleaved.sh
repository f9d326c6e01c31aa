#!/usr/bin/env bash
# Before/after on a machine whose speed drifts within minutes (BENCHMARKS.md): each
# scenario of scripts/bench.sh runs with this tree's release build, then at once with
# another build's (BEFORE=DIR, a release target directory), for ROUNDS rounds. Rows are
# bench.sh's, prefixed with the round and the build.
#
#   BEFORE=/path/to/old/target/release scripts/bench-interleaved.sh [SECONDS] [CONNS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BEFORE:?BEFORE=DIR: the release build to compare with}"
SECS=${1:-5}
CONNS=${2:-64}
ROUNDS=${3:-2}
cargo build --release --locked -p valvula-bench -p valvulad -p mod-ticket -p mod-ratelimit >&2
for round in $(seq 1 "$ROUNDS"); do
    for s in ${SCENARIOS:-ceiling ready empty rl tk}; do
        for b in after before; do
            dir=$PWD/target/release
            [ "$b" = before ] && dir=$BEFORE
            BENCH_BUILD=$dir BENCH_ONLY="$s" scripts/bench.sh "$SECS" "$CONNS" 2>/dev/null |
                grep '^| [a-z]' | grep -v '^| scenario' | sed "s/^/$round $b /"
        done
    done
done
