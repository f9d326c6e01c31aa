#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20) from the seed corpus in
# fuzz/corpus/ (new inputs found go to a scratch copy, so the repository stays as it is).
# scripts/test.sh calls it with a short bound; run it longer by hand:
#
#   scripts/fuzz.sh 600
#
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the machine's stable
# toolchain provide them. A crash leaves its input in fuzz/artifacts/ and fails.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -O --debug-assertions
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in policy_decode maincf_edit config_toml valvula_conf; do
    mkdir -p "$scratch/$t"
    cp -r "corpus/$t/." "$scratch/$t/"
    echo "fuzz: $t for ${SECS}s"
    if ! cargo fuzz run -O --debug-assertions "$t" "$scratch/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=1024 -malloc_limit_mb=512 -max_len=65536 \
        -print_final_stats=1 > "$scratch/$t.log" 2>&1; then
        tail -40 "$scratch/$t.log" >&2
        echo "fuzz: $t failed; the input is in fuzz/artifacts/$t" >&2
        exit 1
    fi
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$scratch/$t.log"
done
