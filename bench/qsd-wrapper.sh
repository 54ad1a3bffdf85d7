#!/usr/bin/env bash
# Stand-in for vhost-user-blkd while it is not ready: runs qemu-storage-daemon
# with the same arguments, so scripts/bench.sh can exercise its A/B path:
#   VUB_BIN=bench/qsd-wrapper.sh scripts/bench.sh --quick
# By default the export stays in QSD's main loop (differs from the qsd-iothread
# reference column). With QSD_WRAPPER_IOTHREAD=1 the wrapper adds an iothread
# too, making A and B identical: an A/A run that shows the method's noise.
set -euo pipefail
QSD_BIN=${QSD_BIN:-qemu-storage-daemon}
args=()
if [[ ${QSD_WRAPPER_IOTHREAD:-0} == 1 ]]; then
    args+=(--object 'iothread,id=iotw')
    while [[ $# -gt 0 ]]; do
        if [[ $1 == --export ]]; then
            args+=("$1" "$2,iothread=iotw")
            shift 2
        else
            args+=("$1")
            shift
        fi
    done
else
    args=("$@")
fi
exec "$QSD_BIN" "${args[@]}"
