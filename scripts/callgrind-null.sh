#!/usr/bin/env bash
# Instructions per request on the null-co path, as docs/PERFORMANCE.md
# counts them: the release daemon runs under callgrind serving null-co
# (one queue, one iothread) to vub-bench (QD32, 4 KiB random reads, event
# mode). Two runs of different lengths; the difference of their instruction
# counts over the difference of their requests removes start-up and
# shutdown. Needs valgrind (apt-get install valgrind). Not part of the
# suite: callgrind is slow and the figure goes into docs/PERFORMANCE.md.
#   usage: [QD=32] scripts/callgrind-null.sh [short-seconds long-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
short=${1:-2}
long=${2:-6}
cargo build --release -q -p vhost-user-blkd -p vub-bench
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

run() { # $1 = seconds; prints "instructions requests"
    local sock=$dir/s.sock out=$dir/cg.$1
    rm -f "$sock"
    # --sandbox off: valgrind's own machinery runs inside the daemon's
    # process and makes system calls the filters refuse; the sandbox's
    # cost is in the kernel anyway, which callgrind does not count (see
    # docs/PERFORMANCE.md, "The sandbox's cost"). poll-max-ns=0: the
    # figure is the work per request; time spun waiting for the client
    # (adaptive polling, on by default) depends on how fast the client
    # answers a daemon slowed down fifty times, not on the request path.
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        target/release/vhost-user-blkd --sandbox off \
        --blockdev driver=null-co,node-name=n0,size=1G \
        --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$sock",num-queues=1,writable=on,poll-max-ns=0 \
        2>"$dir/daemon.$1.log" &
    local pid=$!
    for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.1; done
    sleep 1
    local reqs
    reqs=$(target/release/vub-bench --socket "$sock" --rw randread --bs 4k --iodepth "${QD:-32}" \
        --runtime "$1" --ramp 0 --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("ios") or d.get("requests") or d["total_ios"])')
    kill -TERM "$pid"
    wait "$pid" || true
    local ir
    ir=$(grep -m1 '^summary:' "$out" | awk '{print $2}')
    echo "$ir $reqs"
}

read -r ir1 n1 < <(run "$short")
read -r ir2 n2 < <(run "$long")
python3 - "$ir1" "$n1" "$ir2" "$n2" <<'PY'
import sys
ir1, n1, ir2, n2 = map(int, sys.argv[1:])
print(f"short run: {ir1} instructions, {n1} requests")
print(f"long run:  {ir2} instructions, {n2} requests")
print(f"instructions per request: {(ir2 - ir1) / (n2 - n1):.0f}")
PY
