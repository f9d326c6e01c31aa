#!/usr/bin/env bash
# Installs and starts what the tests need when it is missing: a C compiler, Postfix,
# Dovecot (SASL for Postfix), MariaDB with Galera, promtool (Prometheus). Idempotent; needs root (apt-get) only when
# something is missing.
set -euo pipefail

missing=()
command -v cc >/dev/null || missing+=(gcc libc6-dev)
command -v c++ >/dev/null || missing+=(g++)
command -v postfix >/dev/null || missing+=(postfix)
command -v dovecot >/dev/null || missing+=(dovecot-core)
command -v mariadbd >/dev/null || command -v mysqld >/dev/null || missing+=(mariadb-server)
command -v mariadb >/dev/null || command -v mysql >/dev/null || missing+=(mariadb-client)
# The Galera tests start a three-node cluster; a joining node copies its data with rsync,
# whose SST script needs ss or lsof.
[ -e /usr/lib/galera/libgalera_smm.so ] || missing+=(galera-4)
command -v rsync >/dev/null || missing+=(rsync)
command -v ss >/dev/null || command -v lsof >/dev/null || missing+=(iproute2)
command -v cargo-nextest >/dev/null || cargo nextest --version >/dev/null 2>&1 || need_nextest=1
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v curl >/dev/null || missing+=(curl)
command -v tmux >/dev/null || missing+=(tmux)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
# promtool checks the alerting rules and the dashboard's queries in dist/.
command -v promtool >/dev/null || missing+=(prometheus)

if [ ${#missing[@]} -gt 0 ]; then
    echo "test-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix asks how to configure the system's own mail; the tests bring their own
    # configuration, so the system's stays unconfigured.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ "${need_nextest:-0}" = 1 ]; then
    cargo install --locked cargo-nextest
fi
# The package test builds a .deb from the test build; pinned so its options stay put.
if ! cargo deb --version >/dev/null 2>&1; then
    cargo install --locked cargo-deb --version 3.8.0
fi

# The Debian package's own instances are not used: tests start their own Postfix and
# Dovecot in temporary directories. MariaDB is shared: each test makes its own database.
if ! mariadb-admin ping >/dev/null 2>&1 && ! mysqladmin ping >/dev/null 2>&1; then
    echo "test-deps: starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    if [ ! -d /var/lib/mysql/mysql ]; then
        mariadb-install-db --user=mysql >/dev/null
    fi
    start-stop-daemon --start --oknodo --background --exec "$(command -v mariadbd || command -v mysqld)" -- --user=mysql
    for _ in $(seq 1 60); do
        mariadb-admin ping >/dev/null 2>&1 && break
        sleep 0.5
    done
    mariadb-admin ping >/dev/null
fi
