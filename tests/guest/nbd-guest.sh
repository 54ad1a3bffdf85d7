#!/bin/sh
# Guest side of tests/guest/nbd.sh: fio verify runs on /dev/vda, whose
# node is an nbd client of qemu-nbd, one after the other for 10 s; the
# host kills and restarts qemu-nbd meanwhile.
. /e2e/lib.sh
start=$(cut -d. -f1 /proc/uptime)
runs=0
bad=0
echo FIO-START
while [ $(($(cut -d. -f1 /proc/uptime) - start)) -lt 10 ]; do
    runs=$((runs + 1))
    if ! fio /e2e/nbd.fio >/tmp/fio.out 2>&1 || grep -q 'err= *[1-9]' /tmp/fio.out; then
        bad=$((bad + 1))
        cat /tmp/fio.out
    fi
done
echo FIO-DONE
grep -E 'READ:|WRITE:' /tmp/fio.out
echo "fio runs: $runs, failed: $bad"
check "every fio verify run passed (err=0)" eq "$bad" 0
check "fio ran at least twice" [ "$runs" -ge 2 ]
errs=$(dmesg | grep -ci 'i/o error\|blk_update_request\|critical medium\|timed out')
check "no I/O error in the guest's kernel log" eq "$errs" 0
[ "$errs" -eq 0 ] || dmesg | grep -i 'i/o error\|blk_update_request\|critical medium\|timed out' | head
finish
