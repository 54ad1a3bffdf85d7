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
# migrate.wt=1: the guest turns the disk's write cache off first; the
# destination's daemon must honour that (the host checks it).
if grep -q 'migrate.wt=1' /proc/cmdline; then
    echo "write through" >/sys/block/vda/cache_type
    check "the write cache is off (cache_type: $(cat /sys/block/vda/cache_type))" \
        [ "$(cat /sys/block/vda/cache_type)" = "write through" ]
    echo WT-SET
fi
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
# migrate.serial=S: the disk's serial, read on the destination (GET_ID
# goes to the destination's daemon each time).
SERIAL=$(sed -n 's/.*migrate.serial=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$SERIAL" ]; then
    got=$(cat /sys/block/vda/serial)
    check "the destination's disk has the same serial ('$got')" [ "$got" = "$SERIAL" ]
fi
# migrate.resize=1: the host grew the disk from 64 to 96 MiB on the source
# before migrating; on the destination, data beyond the old end is written
# and verified.
if grep -q 'migrate.resize=1' /proc/cmdline; then
    sectors=$(cat /sys/block/vda/size)
    check "the disk has its new size (96 MiB: $sectors sectors)" eq "$sectors" 196608
    if fio --name=tail --filename=/dev/vda --offset=80m --size=8m --rw=write --bs=64k \
        --direct=1 --ioengine=libaio --iodepth=4 --verify=crc32c --verify_fatal=1 >/tmp/tail.out 2>&1 &&
        ! grep -q 'err= *[1-9]' /tmp/tail.out; then tail_ok=1; else tail_ok=0; cat /tmp/tail.out; fi
    check "data beyond the old end written and verified" eq "$tail_ok" 1
fi
check "every fio run passed (err=0)" eq "$bad" 0
check "fio ran at least twice" [ $((runs + reads)) -ge 2 ]
errs=$(dmesg | grep -ci 'i/o error\|blk_update_request\|critical medium\|timed out')
check "no I/O error in the guest's kernel log" eq "$errs" 0
[ "$errs" -eq 0 ] || dmesg | grep -i 'i/o error\|blk_update_request\|critical medium\|timed out' | head
finish
