#!/usr/bin/env bash
# QEMU guest (TCG) on an rbd-backed export: a single-node Ceph cluster
# (scripts/ceph/cluster.sh, bluestore on a sparse file), a 128 MiB image,
# the daemon serving it (the node and the key secret on the command line,
# sandbox on), and the guest running fio verify on two queues
# (tests/guest/verify.fio). The host then reads the guest's marker back
# through the rbd CLI. About a minute; the cluster is stopped at the end.
#
# Usage: tests/guest/rbd.sh [path/to/vhost-user-blkd]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=${1:-$repo/target/debug/vhost-user-blkd}
guest=$repo/scripts/guest

[[ -x $bin ]] || { echo "ERROR: daemon binary $bin not found (cargo build first)" >&2; exit 1; }
"$guest/install-deps.sh"
"$guest/build-guest.sh"

work=$(mktemp -d /tmp/vub-rbd.XXXXXX)
daemon_pid=
cleanup() {
    [[ -n $daemon_pid ]] && kill -9 "$daemon_pid" 2>/dev/null || true
    bash "$repo/scripts/ceph/cluster.sh" stop "$work/ceph" || true
    rm -rf "$work"
}
trap cleanup EXIT

t0=$(date +%s.%N)
cluster_env=$(bash "$repo/scripts/ceph/cluster.sh" start "$work/ceph" bluestore) || exit 1
eval "$cluster_env"
rbdc() { timeout 60 rbd -c "$CEPH_CONF" "$@"; }
rbdc create --size 128M rbd/guest
printf '%s' "$CEPH_ADMIN_KEY" > "$work/key"
"$bin" \
    --object "secret,id=sec0,file=$work/key,format=base64" \
    --blockdev "driver=rbd,node-name=r0,pool=rbd,image=guest,conf=$CEPH_CONF,user=admin,key-secret=sec0,discard=unmap" \
    --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$work/r.sock,writable=on,num-queues=2" \
    --allow-path "$work" --pidfile "$work/pid" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 200); do [[ -e $work/pid ]] && break; sleep 0.05; done
[[ -e $work/pid ]] || { cat "$work/daemon.log"; echo "ERROR: daemon did not start" >&2; exit 1; }

status=0
"$guest/run-guest.sh" --socket "$work/r.sock" --num-queues 2 --smp 2 --mem 512M --timeout 300 \
    --file "$here/lib.sh:/e2e/lib.sh" --file "$here/verify.fio:/e2e/verify.fio" \
    --script "$here/rbd-guest.sh" || status=$?

fail=0
kill -TERM "$daemon_pid"
wait "$daemon_pid" || { echo "FAIL: host: daemon exit status $?"; fail=1; }
daemon_pid=
rbdc export --no-progress rbd/guest "$work/out.img" >/dev/null
if cmp -s <(yes VUBRBD | head -c 1048576) <(dd if="$work/out.img" bs=1M skip=120 count=1 2>/dev/null); then
    echo "ok: host: the guest's marker is in the rbd image at 120 MiB"
else
    echo "FAIL: host: marker missing from the rbd image"; fail=1
fi
if grep -q "$CEPH_ADMIN_KEY" "$work/daemon.log"; then
    echo "FAIL: host: the daemon's log shows the key"; fail=1
fi
t1=$(date +%s.%N)
echo "rbd guest test: $(echo "$t1 - $t0" | bc) s"
[[ $status -eq 0 && $fail -eq 0 ]] || { cat "$work/daemon.log"; exit 1; }
echo "PASS"
