#!/usr/bin/env bash
# Installs valvula: binaries, modules, the C header, man pages, example configuration
# and the systemd unit. DESTDIR installs into a staging root (packages use it); PREFIX
# defaults to /usr. Builds in release mode unless BUILD=no.
#
#   sudo scripts/install.sh
#   DESTDIR=/tmp/stage scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
PROFILE=${PROFILE:-release}
if [ "${BUILD:-yes}" != no ]; then
    cargo build --workspace --locked --profile "$PROFILE"
fi
T=target/$PROFILE
[ "$PROFILE" = dev ] && T=target/debug
d() { install -d -m "$1" "$DESTDIR$2"; }
d 0755 "$PREFIX/sbin"
d 0755 "$PREFIX/lib/valvulad/modules"
d 0755 "$PREFIX/include/valvula"
d 0755 "$PREFIX/share/man/man3"
d 0755 "$PREFIX/share/man/man5"
d 0755 "$PREFIX/share/man/man8"
d 0755 "$PREFIX/share/doc/valvula"
d 0755 /etc/valvula
d 0755 /lib/systemd/system
d 0750 /var/lib/valvula
install -m 0755 "$T/valvulad" "$T/valvula-ctl" "$DESTDIR$PREFIX/sbin/"
for m in mod-ticket mod-ratelimit; do
    install -m 0644 "$T/lib${m//-/_}.so" "$DESTDIR$PREFIX/lib/valvulad/modules/$m.so"
done
install -m 0644 include/valvula/module.h "$DESTDIR$PREFIX/include/valvula/"
install -m 0644 man/valvula-module.3 "$DESTDIR$PREFIX/share/man/man3/"
install -m 0644 man/valvulad.toml.5 "$DESTDIR$PREFIX/share/man/man5/"
install -m 0644 man/valvulad.8 man/valvula-ctl.8 "$DESTDIR$PREFIX/share/man/man8/"
install -m 0644 README.md CHANGELOG.md ARCHITECTURE.md examples/c/mod_example.c "$DESTDIR$PREFIX/share/doc/valvula/"
install -m 0644 etc/valvulad.toml "$DESTDIR$PREFIX/share/doc/valvula/valvulad.toml.development"
# Monitoring: Prometheus alerting rules (with their unit tests) and a Grafana dashboard.
d 0755 "$PREFIX/share/doc/valvula/prometheus"
d 0755 "$PREFIX/share/doc/valvula/grafana"
install -m 0644 dist/prometheus/valvulad-alerts.yml dist/prometheus/valvulad-alerts.test.yml "$DESTDIR$PREFIX/share/doc/valvula/prometheus/"
install -m 0644 dist/grafana/valvulad-dashboard.json "$DESTDIR$PREFIX/share/doc/valvula/grafana/"
if [ ! -e "$DESTDIR/etc/valvula/valvulad.toml" ]; then
    install -m 0640 dist/valvulad.toml "$DESTDIR/etc/valvula/valvulad.toml"
fi
install -m 0644 dist/valvulad.service "$DESTDIR/lib/systemd/system/"
echo "installed into ${DESTDIR:-/}"
