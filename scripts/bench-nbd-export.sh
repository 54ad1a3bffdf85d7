#!/usr/bin/env bash
# Read throughput of a full backup from an NBD export: vhost-user-blkd's
# (--nbd-server + --export type=nbd) against qemu-storage-daemon's with the
# same arguments, on the same image, interleaved (vub, qsd, vub, qsd, ...),
# medians of --repeats runs. Clients: nbdcopy to null: (4 connections, as
# multi-conn allows on a read-only export) and qemu-img convert into a
# null-co target (one connection, 8 requests in flight). Also the servers' CPU time per GiB
# (utime + stime from /proc/PID/stat).
#
#   scripts/bench-nbd-export.sh [--size 1G] [--repeats 3] [--format raw|qcow2]
#                               [--dir DIR] [--cpus 0|0,1]
#
# Environment: VUB_BIN (default target/release/vhost-user-blkd), QSD_BIN.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VUB_BIN=${VUB_BIN:-$ROOT/target/release/vhost-user-blkd}
QSD_BIN=${QSD_BIN:-qemu-storage-daemon}
SIZE=1G
REPEATS=3
FORMAT=raw
DIR=${TMPDIR:-/tmp}
CPUS=
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --format) FORMAT=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        --cpus) CPUS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
for c in nbdcopy qemu-img "$QSD_BIN"; do
    command -v "$c" >/dev/null || { echo "missing $c" >&2; exit 1; }
done
[ -x "$VUB_BIN" ] || { echo "missing $VUB_BIN (cargo build --release)" >&2; exit 1; }

W=$(mktemp -d "$DIR/bench-nbd.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

# An image full of data (no holes: every byte is read and sent).
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$W/data.raw"
if [ "$FORMAT" = qcow2 ]; then
    qemu-img convert -f raw -O qcow2 "$W/data.raw" "$W/img"
    rm "$W/data.raw"
else
    mv "$W/data.raw" "$W/img"
fi
BYTES=$(stat -c %s "$W/img")
[ "$FORMAT" = qcow2 ] && BYTES=$(numfmt --from=iec "$SIZE")
cat "$W/img" > /dev/null   # in the page cache for both

PIN=()
[ -n "$CPUS" ] && PIN=(taskset -c "$CPUS")

start() { # name bin
    local args=(--blockdev "driver=file,node-name=f,filename=$W/img,read-only=on"
                --blockdev "driver=$FORMAT,node-name=d,file=f,read-only=on"
                --nbd-server "addr.type=unix,addr.path=$W/$1.sock"
                --export "type=nbd,id=e0,node-name=d,name=disk")
    [ "$1" = vub ] && args+=(--allow-path "$W")
    "${PIN[@]}" "$2" "${args[@]}" > "$W/$1.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$1=$!"
    for _ in $(seq 200); do [ -S "$W/$1.sock" ] && break; sleep 0.05; done
    sleep 0.2
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start vub "$VUB_BIN"
start qsd "$QSD_BIN"
HZ=$(getconf CLK_TCK)

declare -A RES CPU
for r in $(seq "$REPEATS"); do
    for client in nbdcopy qemu-img; do
        for srv in vub qsd; do
            pid_var=PID_$srv; pid=${!pid_var}
            uri="nbd+unix:///disk?socket=$W/$srv.sock"
            c0=$(cpu_ticks "$pid")
            t0=$(date +%s.%N)
            if [ "$client" = nbdcopy ]; then
                nbdcopy "$uri" null:
            else
                # Into a null-co node: nothing is written anywhere.
                qemu-img convert -n -f raw --target-image-opts "$uri" \
                    "driver=null-co,size=$BYTES"
            fi
            t1=$(date +%s.%N)
            c1=$(cpu_ticks "$pid")
            mibs=$(echo "$BYTES / 1048576 / ($t1 - $t0)" | bc -l)
            cpu=$(echo "($c1 - $c0) / $HZ / ($BYTES / 1073741824)" | bc -l)
            RES[$client,$srv]+="$(printf '%.0f' "$mibs") "
            CPU[$client,$srv]+="$(printf '%.2f' "$cpu") "
        done
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "== full-backup read, $SIZE $FORMAT in the page cache, $REPEATS repeats (medians; runs in MiB/s)"
printf '  %-10s %-6s %10s %12s   %s\n' client server MiB/s "CPU s/GiB" runs
for client in nbdcopy qemu-img; do
    for srv in vub qsd; do
        printf '  %-10s %-6s %10s %12s   %s\n' "$client" "$srv" \
            "$(echo "${RES[$client,$srv]}" | median)" \
            "$(echo "${CPU[$client,$srv]}" | median)" "${RES[$client,$srv]}"
    done
    v=$(echo "${RES[$client,vub]}" | median); q=$(echo "${RES[$client,qsd]}" | median)
    printf '  %-10s ratio vub/qsd %.2fx\n' "$client" "$(echo "$v / $q" | bc -l)"
done
