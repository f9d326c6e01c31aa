#!/usr/bin/env bash
# How long the service is away when a module crashes the worker: the release valvulad
# with a C module that dereferences NULL for one sender (tests/fixtures/c/crash.c) on
# one listener and mod-test on another; each crash is followed by requests to the
# healthy listener until one is answered. Six daemons, four crashes each (a fifth
# within a minute would be spaced by the master's backoff, by design). For BENCHMARKS.md:
#
#   scripts/crash-restart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p valvulad -p mod-test >&2
W=$(mktemp -d "$PWD/target/crash-restart.XXXXXX")
trap 'pkill -f "$W" 2>/dev/null || true; rm -rf "$W"' EXIT
cc -std=c99 -shared -fPIC -O2 -I include -o "$W/crash.so" tests/fixtures/c/crash.c
# Ports below the ephemeral range: a client's connect loop to a closed port in that
# range can connect the port to itself and take it.
cat > "$W/r.toml" <<CFG
[server]
modules = ["$W/crash.so", "mod-test"]
module_dirs = ["$PWD/target/release"]
admin_socket = ""
crash_limit = 1000
[log]
level = "warn"
[storage]
path = "$W/v.db"
[[listener]]
name = "crashy"
address = "127.0.0.1:9301"
modules = ["crash"]
[[listener]]
name = "healthy"
address = "127.0.0.1:9302"
modules = ["mod-test"]
CFG
python3 - "$PWD/target/release/valvulad" "$W/r.toml" <<'PY'
import socket, statistics, subprocess, sys, time
def ask(port, sender):
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.sendall(("request=smtpd_access_policy\nprotocol_state=RCPT\nsender=%s\ninstance=x\n\n" % sender).encode())
    d = c.recv(200)
    c.close()
    return d
lat = []
for run in range(6):
    p = subprocess.Popen([sys.argv[1], "-c", sys.argv[2]], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            ask(9302, "a@b")
            break
        except OSError:
            time.sleep(0.1)
    for _ in range(4):
        try:
            ask(9301, "crash@example.com")
        except OSError:
            pass
        t = time.monotonic()
        while True:
            try:
                if ask(9302, "a@b").startswith(b"action="):
                    break
            except OSError:
                time.sleep(0.002)
        lat.append((time.monotonic() - t) * 1000)
        time.sleep(0.2)
    p.terminate()
    p.wait()
lat.sort()
print("| crashes | median ms | p90 ms | max ms |\n|---|---|---|---|\n| %d | %.1f | %.1f | %.1f |"
      % (len(lat), statistics.median(lat), lat[int(len(lat) * 0.9) - 1], lat[-1]))
PY
