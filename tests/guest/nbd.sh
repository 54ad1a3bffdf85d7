#!/usr/bin/env bash
# A Linux guest (TCG) whose disk is served by vhost-user-blkd from an nbd
# node, a client of qemu-nbd serving a raw file over a UNIX socket. The
# guest runs fio verify (tests/guest/nbd.fio) again and again for 10 s; 2 s
# into it the host kills qemu-nbd (SIGKILL) and starts it again 1 s later:
# with reconnect-delay=5 the guest must see no error. About 20 s.
#
# Usage: tests/guest/nbd.sh [path/to/vhost-user-blkd]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${1:-$repo/target/debug/vhost-user-blkd}
guest=$repo/scripts/guest

[[ -x $bin ]] || { echo "ERROR: daemon binary $bin not found (cargo build first)" >&2; exit 1; }
"$guest/install-deps.sh"
"$guest/build-guest.sh"

work=$(mktemp -d /tmp/vub-nbd.XXXXXX)
daemon_pid=
nbd_pid=
cleanup() {
    [[ -n $daemon_pid ]] && kill -9 "$daemon_pid" 2>/dev/null || true
    [[ -n $nbd_pid ]] && kill -9 "$nbd_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_nbd() {
    rm -f "$work/nbd.sock"
    qemu-nbd -f raw -t --cache=writeback -k "$work/nbd.sock" "$work/disk.img" 2>>"$work/qemu-nbd.log" &
    nbd_pid=$!
    for _ in $(seq 100); do [[ -S $work/nbd.sock ]] && break; sleep 0.05; done
    [[ -S $work/nbd.sock ]] || { cat "$work/qemu-nbd.log"; echo "ERROR: qemu-nbd did not start" >&2; exit 1; }
}

truncate -s 64M "$work/disk.img"
start_nbd
"$bin" \
    --blockdev "driver=nbd,node-name=n0,server.type=unix,server.path=$work/nbd.sock,reconnect-delay=5" \
    --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$work/vub.sock,writable=on,num-queues=2" \
    --pidfile "$work/pid" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 200); do [[ -e $work/pid ]] && break; sleep 0.05; done
[[ -e $work/pid ]] || { cat "$work/daemon.log"; echo "ERROR: daemon did not start" >&2; exit 1; }

host_pass=0
host_fail=0
host_check() {
    if eval "$2"; then echo "ok: host: $1"; host_pass=$((host_pass + 1));
    else echo "FAIL: host: $1"; host_fail=$((host_fail + 1)); fi
}

: >"$work/console.log"
(
    for _ in $(seq 900); do grep -q FIO-START "$work/console.log" 2>/dev/null && break; sleep 0.2; done
    sleep 2
    grep -q FIO-DONE "$work/console.log" || echo during >"$work/killed-during-fio"
    kill -9 "$nbd_pid"
    wait "$nbd_pid" 2>/dev/null || true
    echo "host: qemu-nbd killed"
    sleep 1
    start_nbd
    echo "host: qemu-nbd restarted"
    echo "$nbd_pid" >"$work/nbd.pid"
) &
restarter=$!
rc=0
"$guest/run-guest.sh" --socket "$work/vub.sock" --num-queues 2 --smp 2 --mem 512M --timeout 180 \
    --file "$here/lib.sh:/e2e/lib.sh" --file "$here/nbd.fio:/e2e/nbd.fio" \
    --script "$here/nbd-guest.sh" | tee "$work/console.log" || rc=$?
wait "$restarter" || true
nbd_pid=$(cat "$work/nbd.pid" 2>/dev/null || echo "$nbd_pid")

host_check "guest checks passed (fio verify, no I/O error)" "[[ $rc -eq 0 ]]"
for _ in $(seq 50); do grep -q reconnected "$work/daemon.log" && break; sleep 0.1; done
host_check "qemu-nbd was killed while fio ran" "[[ -e $work/killed-during-fio ]]"
host_check "the daemon lost the connection and reconnected" \
    "grep -q 'connection to .* lost' $work/daemon.log && grep -q reconnected $work/daemon.log"
host_check "daemon alive" "kill -0 $daemon_pid"
kill -TERM "$daemon_pid"
drc=0
wait "$daemon_pid" || drc=$?
daemon_pid=
host_check "daemon exits 0 on SIGTERM" "[[ $drc -eq 0 ]]"
echo "--- daemon log (nbd lines)"
grep -i nbd "$work/daemon.log" || true
echo "guest nbd: $host_pass passed, $host_fail failed"
[[ $host_fail -eq 0 ]]
