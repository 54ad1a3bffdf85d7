#!/usr/bin/env bash
# rbd side by side: vhost-user-blkd and qemu-storage-daemon (Debian's
# qemu-block-extra gives it block-rbd) serve the same image of the same
# single-node Ceph cluster (scripts/ceph/cluster.sh) with identical
# --object secret / --blockdev driver=rbd / --export arguments; vub-bench
# (bench/) drives each, one daemon at a time, runs interleaved. The report
# gives IOPS, MiB/s and the daemon's CPU time per request (from
# /proc/PID/stat, vub-bench --backend-pid). The OSD's and monitor's CPU is
# not the daemons' and is left out.
#
# Usage: scripts/bench-rbd.sh [--store memstore|bluestore] [--repeats N]
#          [--runtime S] [--cases LIST] [--out DIR]
#   cases: randread-4k-qd32, randread-4k-qd128, randwrite-4k-qd32,
#          read-128k-qd32, write-128k-qd32 (default: all)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STORE=memstore
REPEATS=3
RUNTIME=5
CASES=randread-4k-qd32,randread-4k-qd128,randwrite-4k-qd32,read-128k-qd32,write-128k-qd32
OUT=
while [[ $# -gt 0 ]]; do
    case $1 in
        --store) STORE=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --cases) CASES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
VUB=${VUB_BIN:-$ROOT/target/release/vhost-user-blkd}
BENCH=$ROOT/target/release/vub-bench
if [[ ! -x $VUB || ! -x $BENCH ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin vhost-user-blkd &&
        cargo build --release --quiet -p vub-bench)
fi
bash "$ROOT/scripts/guest/install-deps.sh"
WORK=$(mktemp -d /tmp/vub-bench-rbd.XXXXXX)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
DPID=
cleanup() {
    [[ -n $DPID ]] && kill -9 "$DPID" 2>/dev/null || true
    bash "$ROOT/scripts/ceph/cluster.sh" stop "$WORK/ceph" || true
    rm -rf "$WORK/ceph"
}
trap cleanup EXIT
cluster_env=$(bash "$ROOT/scripts/ceph/cluster.sh" start "$WORK/ceph" "$STORE") || exit 1
eval "$cluster_env"
rbdc() { timeout 300 rbd -c "$CEPH_CONF" "$@"; }
# 512 MiB, written once in full (reads of objects that do not exist are
# answered by librbd from its object map, without the OSD).
rbdc create --size 512M rbd/bench
rbdc bench --io-type write --io-size 4M --io-threads 4 --io-total 512M --io-pattern seq rbd/bench >/dev/null
printf '%s' "$CEPH_ADMIN_KEY" > "$WORK/key"
ARGS=(--object "secret,id=sec0,file=$WORK/key,format=base64"
      --blockdev "driver=rbd,node-name=r0,pool=rbd,image=bench,conf=$CEPH_CONF,user=admin,key-secret=sec0,cache.direct=on"
      --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$WORK/s.sock,writable=on,num-queues=1")

run() { # label bin rw bs qd case rep
    local label=$1 bin=$2 rw=$3 bs=$4 qd=$5 name=$6 rep=$7
    rm -f "$WORK/s.sock"
    local extra=()
    [[ $label == vub ]] && extra=(--allow-path "$WORK")
    "$bin" "${ARGS[@]}" "${extra[@]}" >"$OUT/$name-$label-$rep.log" 2>&1 &
    DPID=$!
    for _ in $(seq 200); do [[ -S $WORK/s.sock ]] && break; sleep 0.05; done
    "$BENCH" --socket "$WORK/s.sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --queues 1 \
        --runtime "$RUNTIME" --ramp 1 --json --backend-pid "$DPID" >"$OUT/$name-$label-$rep.json"
    kill -TERM "$DPID"; wait "$DPID" || true; DPID=
}

IFS=, read -ra CASE_LIST <<<"$CASES"
for rep in $(seq "$REPEATS"); do
    for c in "${CASE_LIST[@]}"; do
        IFS=- read -r rw bs qd <<<"$c"
        qd=${qd#qd}
        for label in vub qsd; do
            bin=$VUB; [[ $label == qsd ]] && bin=/usr/bin/qemu-storage-daemon
            echo "rep $rep $c $label" >&2
            run "$label" "$bin" "$rw" "$bs" "$qd" "$c" "$rep"
        done
    done
done

python3 - "$OUT" "${CASE_LIST[@]}" <<'EOF'
import json, sys, glob, statistics
out, cases = sys.argv[1], sys.argv[2:]
print(f"{'case':20} {'vub IOPS':>10} {'qsd IOPS':>10} {'ratio':>6} {'vub MiB/s':>10} {'qsd MiB/s':>10} {'vub us/req':>10} {'qsd us/req':>10}")
for c in cases:
    row = {}
    for label in ("vub", "qsd"):
        rs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{c}-{label}-*.json"))]
        iops = statistics.median(r["iops"] for r in rs)
        mib = statistics.median(r["mib_s"] for r in rs)
        cpu = statistics.median(r["backend_cpu_s"] / r["ios"] * 1e6 for r in rs)
        row[label] = (iops, mib, cpu)
    v, q = row["vub"], row["qsd"]
    print(f"{c:20} {v[0]:10.0f} {q[0]:10.0f} {v[0] / q[0]:6.2f} {v[1]:10.1f} {q[1]:10.1f} {v[2]:10.1f} {q[2]:10.1f}")
EOF
echo "runs: $OUT" >&2
