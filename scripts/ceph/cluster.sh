#!/usr/bin/env bash
# A single-node Ceph cluster for the rbd driver's tests: one monitor, one
# OSD, pool size 1, cephx on, no mgr (rbd needs none). Everything lives
# under one directory and every command gets `-c DIR/ceph.conf`: nothing
# is read from or written to /etc/ceph.
#
#   bash scripts/ceph/cluster.sh start DIR [memstore|bluestore]
#   bash scripts/ceph/cluster.sh env DIR      # CEPH_CONF=... lines to eval
#   bash scripts/ceph/cluster.sh stop DIR     # kills what start started
#
# start creates pool `rbd` and prints the `env` lines. memstore (the
# default) is fastest but loses everything on SIGKILL; bluestore puts the
# OSD on a sparse 4 GiB file in DIR and survives crashes (the failure
# tests). Without a mgr `ceph pg stat`, `ceph osd df` and the like hang:
# every ceph CLI call here runs under `timeout`. Monitor and OSD are
# started with setsid and their pids kept in DIR/pids; stop sends SIGTERM
# (then SIGKILL after 5 s) to exactly those, after SIGCONT in case a test
# left one stopped. Ports: the monitor on 127.0.0.1:3300 (v2) and 6789
# (v1), the OSD in 6800-7568: one cluster per machine at a time.
set -euo pipefail

die() { printf '[ceph] ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf '[ceph] %s\n' "$*" >&2; }

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start|stop|env DIR [memstore|bluestore]"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf=$dir/ceph.conf

cli() { timeout 20 ceph -c "$conf" "$@"; }

print_env() {
    echo "export CEPH_CONF=$conf"
    echo "export CEPH_KEYRING=$dir/keyring"
    echo "export CEPH_ADMIN_KEY=$(ceph-authtool -p -n client.admin "$dir/keyring")"
    echo "export CEPH_OSD_PID=$(sed -n 's/^osd //p' "$dir/pids")"
    echo "export CEPH_MON_PID=$(sed -n 's/^mon //p' "$dir/pids")"
}

# Alive and not a zombie (the daemons' parent, the shell that ran start,
# is gone: whoever inherited them may reap late).
running() {
    [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop() {
    [ -f "$dir/pids" ] || return 0
    local pids
    pids=$(awk '{print $2}' "$dir/pids")
    for p in $pids; do kill -CONT "$p" 2>/dev/null || true; kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for p in $pids; do running "$p" && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    rm -f "$dir/pids"
}

start() {
    local store=${1:-memstore}
    case "$store" in memstore | bluestore) ;; *) die "object store '$store' is not memstore or bluestore" ;; esac
    for c in ceph-mon ceph-osd ceph ceph-authtool monmaptool uuidgen; do
        command -v "$c" >/dev/null || die "missing $c (bash scripts/guest/install-deps.sh installs Ceph)"
    done
    [ -f "$dir/pids" ] && die "$dir has a running cluster (stop it first)"
    local t0 fsid
    t0=$(date +%s.%N)
    rm -rf "${dir:?}"/{mon,osd,run,log} "$dir/osd-block.img"
    mkdir -p "$dir"/{mon,osd,run,log}
    fsid=$(uuidgen)
    cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
mon initial members = a
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
paxos propose interval = 0.1
mon data avail warn = 1
mon data avail crit = 0
mon mgr mkfs grace = 100000000
mon osd full ratio = 0.99
mon osd nearfull ratio = 0.98
mon osd backfillfull ratio = 0.985
osd failsafe full ratio = 0.995
osd objectstore = $store
osd fast shutdown = false
osd data = $dir/osd
memstore device bytes = 4294967296
bluestore block path = $dir/osd-block.img
bluestore block create = true
bluestore block size = 4294967296
bluestore fsck on mkfs = false
bluestore fsck on mount = false
bluestore block db create = false
bluestore block wal create = false
osd max object name len = 256
osd max object namespace len = 64

[mon]
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid

[osd]
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid

[mon.a]
mon data = $dir/mon
EOF
    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/keyring" >/dev/null
    monmaptool --create --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' --fsid "$fsid" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" \
        >"$dir/log/mkfs-mon.out" 2>&1 || die "ceph-mon --mkfs failed: $(cat "$dir/log/mkfs-mon.out")"
    setsid ceph-mon -c "$conf" -i a -f </dev/null >"$dir/log/mon.out" 2>&1 &
    echo "mon $!" > "$dir/pids"

    local uuid secret id
    uuid=$(uuidgen)
    secret=$(ceph-authtool --gen-print-key)
    id=$(echo "{\"cephx_secret\": \"$secret\"}" | cli osd new "$uuid" -i - -n client.admin) \
        || { stop; die "ceph osd new failed (monitor log: $dir/log/mon.a.log)"; }
    [ "$id" = 0 ] || { stop; die "ceph osd new gave id '$id'"; }
    ceph-authtool --create-keyring "$dir/osd/keyring" --name osd.0 --add-key "$secret" >/dev/null
    {
        echo "[osd.0]"
        echo "keyring = $dir/osd/keyring"
    } >> "$conf"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >"$dir/log/mkfs-osd.out" 2>&1 \
        || { stop; die "ceph-osd --mkfs failed: $(tail -5 "$dir/log/mkfs-osd.out")"; }
    setsid ceph-osd -c "$conf" -i 0 -f </dev/null >"$dir/log/osd.out" 2>&1 &
    echo "osd $!" >> "$dir/pids"

    local up=0
    for _ in $(seq 300); do
        if cli osd dump 2>/dev/null | grep -q '^osd.0 up'; then up=1; break; fi
        sleep 0.1
    done
    [ "$up" = 1 ] || { stop; die "osd.0 did not come up in 30 s (log: $dir/log/osd.0.log)"; }
    cli osd pool create rbd 8 8 >/dev/null 2>&1 || { stop; die "cannot create pool rbd"; }
    cli osd pool application enable rbd rbd >/dev/null 2>&1 || { stop; die "cannot tag pool rbd"; }
    local t1
    t1=$(date +%s.%N)
    log "cluster up in $(echo "$t1 - $t0" | bc) s ($store, $dir)"
    print_env
}

case "$cmd" in
    start) start "${3:-memstore}" ;;
    stop) stop ;;
    env) print_env ;;
    *) die "unknown command '$cmd' (start, stop, env)" ;;
esac
