#!/usr/bin/env bash
# driver=luks side by side with qemu-storage-daemon 7.2's (issue 24): both
# daemons open the same LUKS1 volume (aes-256-xts-plain64, pbkdf2-sha256,
# made by qemu-img on /dev/shm, page cache on), driver=luks over a file
# node, exported over vhost-user-blk; vub-bench (libblkio) drives each
# export. Cases: 4k random reads and writes at QD32 on one queue. The
# report gives IOPS, ratios and the daemons' CPU per request; the crypto
# runs on the iothread in both (QSD with --object iothread).
#
# Usage: scripts/bench-luks.sh [bench.sh options, e.g. --repeats 5]
#   defaults: --file-size 256 --repeats 3 --runtime 3 --ramp 0.5 --placements split
#             --vub-variants default
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
(cd "$ROOT" && cargo build --release --quiet --bin vhost-user-blkd -p vhost-user-blkd)
exec bash "$ROOT/scripts/bench.sh" --backings luks \
    --cases 'randread-4k-qd32-q1,randwrite-4k-qd32-q1' \
    --file-size 256 --repeats 3 --runtime 3 --ramp 0.5 --placements split --vub-variants default "$@"
