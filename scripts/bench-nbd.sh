#!/usr/bin/env bash
# The nbd driver side by side with qemu-storage-daemon's (issue 21): both
# daemons export an nbd node whose server is one qemu-nbd serving a raw
# file on /dev/shm over a UNIX socket (scripts/bench.sh --backings nbd);
# vub-bench drives each export. Cases: 4k random reads at QD32 and QD128, 128k
# sequential reads and writes at QD32; the report gives IOPS, MiB/s,
# ratios and the daemons' CPU per request (qemu-nbd's CPU is not counted:
# it is pinned to the client CPU).
#
# Usage: scripts/bench-nbd.sh [bench.sh options, e.g. --repeats 5]
#   defaults: --repeats 3 --runtime 3 --ramp 0.5 --placements split
#             --vub-variants default
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# qemu-nbd (qemu-utils) and QSD's nbd driver (qemu-system-common;
# qemu-block-extra for the other network drivers), fio for the guest test.
bash "$ROOT/scripts/guest/install-deps.sh"
command -v qemu-nbd >/dev/null || { echo "bench-nbd.sh: qemu-nbd missing" >&2; exit 1; }
(cd "$ROOT" && cargo build --release --quiet --bin vhost-user-blkd -p vhost-user-blkd)
exec bash "$ROOT/scripts/bench.sh" --backings nbd \
    --cases 'randread-4k-qd32-q1,randread-4k-qd128-q1,read-128k-qd32-q1,write-128k-qd32-q1' \
    --repeats 3 --runtime 3 --ramp 0.5 --placements split --vub-variants default "$@"
