#!/bin/sh
# Guest side of tests/guest/inflight.sh: fio verify runs, one after the
# other, for RUN_SECS seconds while the host kills and restarts the daemon.
. /e2e/lib.sh
RUN_SECS=$(sed -n 's/.*inflight.secs=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$RUN_SECS" ] || RUN_SECS=60
start=$(cut -d. -f1 /proc/uptime)
runs=0
bad=0
echo FIO-START
while [ $(($(cut -d. -f1 /proc/uptime) - start)) -lt "$RUN_SECS" ]; do
    runs=$((runs + 1))
    if ! fio /e2e/verify-inflight.fio >/tmp/fio.out 2>&1; then
        bad=$((bad + 1))
        cat /tmp/fio.out
    elif grep -q 'err= *[1-9]' /tmp/fio.out; then
        bad=$((bad + 1))
        cat /tmp/fio.out
    fi
done
echo FIO-DONE
echo "fio runs: $runs, failed: $bad"
check "every fio verify run passed (err=0)" eq "$bad" 0
check "fio ran at least twice" [ "$runs" -ge 2 ]
errs=$(dmesg | grep -ci 'i/o error\|blk_update_request\|critical medium\|timed out')
check "no I/O error in the guest's kernel log" eq "$errs" 0
[ "$errs" -eq 0 ] || dmesg | grep -i 'i/o error\|blk_update_request\|critical medium\|timed out' | head
finish
