# shellcheck shell=bash
# Shared helpers for the guest tooling. Sourced, never executed.

GUEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$GUEST_DIR/../.." && pwd)"
GUEST_CACHE="${GUEST_CACHE:-$REPO/.cache/guest}"
case "$GUEST_CACHE" in /*) ;; *) GUEST_CACHE="$PWD/$GUEST_CACHE" ;; esac
export GUEST_CACHE

log() { printf '[%s] %s\n' "${LOG_TAG:-guest}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${LOG_TAG:-guest}" "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root: directly when we are root, through non-interactive
# sudo otherwise (CI runs as root; developers may not).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif have sudo; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

# apt-get update at most once per process tree.
apt_update_once() {
    if [ -z "${GUEST_APT_UPDATED:-}" ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            || die "apt-get update failed"
        export GUEST_APT_UPDATED=1
    fi
}

apt_install() {
    apt_update_once
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed"
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}
