#!/usr/bin/env bash
# Builds the Debian package target/debian/valvula_VERSION_ARCH.deb (release build).
# Needs cargo-deb: cargo install --locked cargo-deb
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --release --locked
cargo deb -p valvulad --no-build -o target/debian/
