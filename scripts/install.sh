#!/usr/bin/env bash
# Installs vhost-user-blkd: the binary, the vhost-user description file that
# lets libvirt find the backend (QEMU docs/interop/vhost-user.json, searched
# in /usr/share/qemu/vhost-user, /etc/qemu/vhost-user and
# $XDG_CONFIG_HOME/qemu/vhost-user), and the systemd units under systemd/ if
# the repository has them.
#
# Usage: scripts/install.sh            (as root; PREFIX=/usr)
#   PREFIX=/usr/local DESTDIR=/tmp/pkg scripts/install.sh
# Variables:
#   PREFIX          install prefix (default /usr); the binary goes to
#                   $PREFIX/bin, and the description file and units name it
#   DESTDIR         staging root prepended to every path (packaging)
#   VHOST_USER_DIR  where the description file goes (default
#                   $PREFIX/share/qemu/vhost-user; with a PREFIX other than
#                   /usr, libvirt only finds it in /etc/qemu/vhost-user)
#   UNIT_DIR        systemd system unit directory (default $PREFIX/lib/systemd/system)
#   BIN             the binary to install (default target/release/vhost-user-blkd,
#                   built with `cargo build --release` if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr}
DESTDIR=${DESTDIR:-}
VHOST_USER_DIR=${VHOST_USER_DIR:-$PREFIX/share/qemu/vhost-user}
UNIT_DIR=${UNIT_DIR:-$PREFIX/lib/systemd/system}
BIN=${BIN:-target/release/vhost-user-blkd}

if [ ! -x "$BIN" ]; then
    cargo build --release
fi
installed_bin="$PREFIX/bin/vhost-user-blkd"

install -D -m 0755 "$BIN" "$DESTDIR$installed_bin"
echo "installed $DESTDIR$installed_bin"

# The shipped description file names /usr/bin/vhost-user-blkd; name the
# installed binary instead.
desc=share/qemu/vhost-user/50-vhost-user-blkd.json
install -d -m 0755 "$DESTDIR$VHOST_USER_DIR"
sed "s#\"/usr/bin/vhost-user-blkd\"#\"$installed_bin\"#" "$desc" \
    > "$DESTDIR$VHOST_USER_DIR/50-vhost-user-blkd.json"
chmod 0644 "$DESTDIR$VHOST_USER_DIR/50-vhost-user-blkd.json"
echo "installed $DESTDIR$VHOST_USER_DIR/50-vhost-user-blkd.json"

shopt -s nullglob
units=(systemd/*.service systemd/*.socket)
if [ ${#units[@]} -gt 0 ]; then
    install -d -m 0755 "$DESTDIR$UNIT_DIR"
    for u in "${units[@]}"; do
        sed "s#/usr/bin/vhost-user-blkd#$installed_bin#g" "$u" > "$DESTDIR$UNIT_DIR/$(basename "$u")"
        chmod 0644 "$DESTDIR$UNIT_DIR/$(basename "$u")"
        echo "installed $DESTDIR$UNIT_DIR/$(basename "$u")"
    done
    if [ -z "$DESTDIR" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
