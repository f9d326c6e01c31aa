#!/usr/bin/env bash
# Runs every test of the workspace: the README's test command, and what .ci/run calls.
#
# Tests use real components: a C compiler for the ABI tests, Postfix and Dovecot for the
# end-to-end tests, MariaDB for the MySQL backend. scripts/test-deps.sh installs (as root,
# from Debian packages) and starts whatever of these is missing, then the workspace is
# built (module cdylibs included, the tests load them from target/debug) and tested.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
cargo build --workspace --all-targets --locked
# The Debian package of this build, for the package test (releases: scripts/build-deb.sh).
cargo deb -p valvulad --no-build --profile dev -o target/debian/ >/dev/null 2>&1
cargo nextest run --workspace --locked --no-fail-fast "$@"
# A short bounded fuzz run of every target from the seed corpus (longer: scripts/fuzz.sh N).
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
