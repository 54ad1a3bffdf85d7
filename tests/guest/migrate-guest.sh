#!/bin/sh
# Guest side of tests/guest/migrate.sh: for RUN_SECS seconds, fio verify
# runs (random writes, then their verify) each followed by VERIFY_ONLY
# runs that only read the same data back and verify it. Reads are in
# flight most of the time, so the migration's last stop most likely finds
# some: their data lands in guest pages after the guest is paused, and
# reaches the destination only if the daemon logs those pages.
. /e2e/lib.sh
RUN_SECS=$(sed -n 's/.*migrate.secs=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$RUN_SECS" ] || RUN_SECS=40
VERIFY_ONLY=$(sed -n 's/.*migrate.verify_only=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$VERIFY_ONLY" ] || VERIFY_ONLY=3
awk '{ print } /^\[global\]/ { print "verify_only=1" }' /e2e/verify-inflight.fio >/tmp/verify-only.fio
start=$(cut -d. -f1 /proc/uptime)
runs=0
reads=0
bad=0
# run_fio JOBFILE: one fio run, counted bad if it fails or reports an error.
run_fio() {
    if ! fio "$1" >/tmp/fio.out 2>&1 || grep -q 'err= *[1-9]' /tmp/fio.out; then
        bad=$((bad + 1))
        cat /tmp/fio.out
    fi
}
echo FIO-START
while [ $(($(cut -d. -f1 /proc/uptime) - start)) -lt "$RUN_SECS" ]; do
    runs=$((runs + 1))
    run_fio /e2e/verify-inflight.fio
    i=0
    while [ "$i" -lt "$VERIFY_ONLY" ]; do
        reads=$((reads + 1))
        run_fio /tmp/verify-only.fio
        i=$((i + 1))
    done
done
echo FIO-DONE
echo "fio write+verify runs: $runs, verify-only runs: $reads, failed: $bad"
check "every fio run passed (err=0)" eq "$bad" 0
check "fio ran at least twice" [ $((runs + reads)) -ge 2 ]
errs=$(dmesg | grep -ci 'i/o error\|blk_update_request\|critical medium\|timed out')
check "no I/O error in the guest's kernel log" eq "$errs" 0
[ "$errs" -eq 0 ] || dmesg | grep -i 'i/o error\|blk_update_request\|critical medium\|timed out' | head
finish
