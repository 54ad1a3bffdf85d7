#!/usr/bin/env bash
# Where the wakeups and system calls go per request in the split placement
# (issue 23's "understand before tuning"): the daemon on CPU 0, the client
# (vub-bench, libblkio) on CPU 1, null-co, 4 KiB random reads, one queue.
# For each daemon (ours, qemu-storage-daemon with an iothread) and each
# client mode and depth, perf stat counts over the measurement window, on
# the daemon's process and on the client's: context switches, all system
# calls, the CPU time (task-clock, µs per request), and the ones the data path makes (read/write of eventfds,
# io_uring_enter, epoll/ppoll waits), each divided by the requests served.
# Needs perf (linux-perf). Not part of the suite; the findings go in
# docs/PERFORMANCE.md.
#   usage: scripts/perf-split.sh [runtime-seconds] [depths] [modes]
#   e.g.   scripts/perf-split.sh 4 "1 32 128" "event poll"
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
runtime=${1:-4}
depths=${2:-"1 32 128"}
modes=${3:-"event poll"}
QSD=${QSD:-/usr/bin/qemu-storage-daemon}
cargo build --release -q -p vhost-user-blkd -p vub-bench
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT

events=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_ppoll

start_daemon() { # name -> sets DPID
    local sock=$dir/s.sock
    rm -f "$sock"
    case $1 in
        vub)
            taskset -c 0 "${VUB:-target/release/vhost-user-blkd}" \
                --blockdev driver=null-co,node-name=n0,size=1073741824 \
                --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",num-queues=1,writable=on \
                2>"$dir/vub.log" &
            ;;
        qsd)
            taskset -c 0 "$QSD" --object iothread,id=iot0 \
                --blockdev driver=null-co,node-name=n0,size=1073741824 \
                --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",num-queues=1,writable=on,iothread=iot0 \
                2>"$dir/qsd.log" &
            ;;
    esac
    DPID=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    sleep 0.3
}

# perf stat output (-x,) -> "event=count" lines
counts() { awk -F, '$1 ~ /^[0-9.]+$/ {print $3"="$1}' "$1"; }

printf '%-4s %-5s %4s %9s | %-60s | %s\n' daemon mode qd kIOPS \
    "daemon per request: CPU-us csw syscalls read write uring epoll+ppoll" \
    "client per request: csw syscalls"
for qd in $depths; do
    for mode in $modes; do
        for d in vub qsd; do
            start_daemon "$d"
            pollarg=()
            [ "$mode" = poll ] && pollarg=(--poll)
            taskset -c 1 target/release/vub-bench --socket "$dir/s.sock" --rw randread --bs 4k \
                --iodepth "$qd" --queue-size 1024 "${pollarg[@]}" --runtime "$runtime" --ramp 0.5 \
                --json >"$dir/bench.json" 2>"$dir/bench.err" &
            bpid=$!
            sleep 0.7
            win=$(python3 -c "print(max(1.0, $runtime - 1.0))")
            perf stat -x, -e "$events" -p "$DPID" -o "$dir/d.perf" -- sleep "$win" &
            p1=$!
            perf stat -x, -e context-switches,raw_syscalls:sys_enter -p "$bpid" -o "$dir/c.perf" -- sleep "$win" &
            p2=$!
            wait "$p1" "$p2" "$bpid" || { cat "$dir/bench.err" "$dir/$d.log" >&2; exit 1; }
            kill -TERM "$DPID"; wait "$DPID" 2>/dev/null || true
            python3 - "$dir/bench.json" "$win" "$runtime" "$d" "$mode" "$qd" <(counts "$dir/d.perf") <(counts "$dir/c.perf") <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
win, runtime, d, mode, qd = float(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:7]
ios = b.get("ios") or b.get("requests") or b.get("total_ios")
iops = ios / runtime
reqs = iops * win
def load(p):
    out = {}
    for l in open(p):
        k, v = l.strip().split("=")
        out[k] = float(v)
    return out
dc, cc = load(sys.argv[7]), load(sys.argv[8])
per = lambda c, k: c.get(k, 0) / reqs
waits = sum(per(dc, k) for k in ("syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait", "syscalls:sys_enter_ppoll"))
print(f"{d:<4} {mode:<5} {qd:>4} {iops/1000:9.0f} | "
      f"{per(dc,'task-clock') * 1000:6.3f} {per(dc,'context-switches'):6.3f} {per(dc,'raw_syscalls:sys_enter'):8.3f} {per(dc,'syscalls:sys_enter_read'):6.3f} "
      f"{per(dc,'syscalls:sys_enter_write'):6.3f} {per(dc,'syscalls:sys_enter_io_uring_enter'):6.3f} {waits:6.3f}     | "
      f"{per(cc,'context-switches'):6.3f} {per(cc,'raw_syscalls:sys_enter'):8.3f}")
EOF
        done
    done
done
