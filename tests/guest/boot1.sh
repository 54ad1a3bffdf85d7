#!/bin/sh
# First boot: the device as the guest sees it, then data through it.
. /e2e/lib.sh
A=/sys/block/vda
B=/sys/block/vdb

check "vda capacity" eq "$(cat $A/size)" $((256 * 1024 * 1024 / 512))
check "vda logical block size" eq "$(cat $A/queue/logical_block_size)" 512
check "vda has 2 queues" eq "$(ls $A/mq | wc -l)" 2
check "vda is writable" eq "$(cat $A/ro)" 0
check "vda discard limit (1 GiB)" eq "$(cat $A/queue/discard_max_hw_bytes)" 1073741824
check "vda discard segments" eq "$(cat $A/queue/max_discard_segments)" 32
check "vda write-zeroes limit (1 GiB)" eq "$(cat $A/queue/write_zeroes_max_bytes)" 1073741824
check "vda write cache on" eq "$(cat $A/queue/write_cache)" "write back"
check "vdb capacity" eq "$(cat $B/size)" $((64 * 1024 * 1024 / 512))
check "vdb logical block size" eq "$(cat $B/queue/logical_block_size)" 4096
check "vdb is read-only" eq "$(cat $B/ro)" 1
check "vdb serial" eq "$(cat $B/serial)" "vub-e2e-ro"
check "vdb write cache off (writethrough export)" eq "$(cat $B/queue/write_cache)" "write through"

# The guest turns the cache off and on: a config write to the device.
echo "write through" > $A/cache_type
check "vda write cache switched off" eq "$(cat $A/queue/write_cache)" "write through"
echo "write back" > $A/cache_type
check "vda write cache switched on" eq "$(cat $A/queue/write_cache)" "write back"

check "fio verified random writes on two queues" fio --output=/tmp/fio.out /e2e/verify.fio
grep -E "err=|IOPS" /tmp/fio.out | head -4

# A marker the host looks for at 150 MiB (past both fio ranges).
yes VUBMARK | head -c 1048576 > /tmp/marker
check "marker written at 150 MiB" dd if=/tmp/marker of=/dev/vda bs=1M seek=150 count=1 oflag=direct conv=fsync
sync

# Discard and write-zeroes read back as zeroes (the export passes discard on).
dd if=/tmp/marker of=/dev/vda bs=1M seek=200 count=1 oflag=direct 2>/dev/null
dd if=/tmp/marker of=/dev/vda bs=1M seek=210 count=1 oflag=direct 2>/dev/null
check "marker at 200 MiB before discard" eq "$(dd if=/dev/vda bs=1M skip=200 count=1 iflag=direct 2>/dev/null | head -c 7)" VUBMARK
check "blkdiscard" blkdiscard -o $((200 << 20)) -l $((1 << 20)) /dev/vda
check "discarded range reads as zeroes" zeroes_at /dev/vda 200 1
check "blkdiscard -z (write zeroes)" blkdiscard -z -o $((210 << 20)) -l $((1 << 20)) /dev/vda
check "zeroed range reads as zeroes" zeroes_at /dev/vda 210 1

# vdc: qcow2 overlay over a base with 0x5a at 80 MiB.
C=/sys/block/vdc
check "vdc capacity (the base's size)" eq "$(cat $C/size)" $((96 * 1024 * 1024 / 512))
check "vdc has 2 queues" eq "$(ls $C/mq | wc -l)" 2
check "vdc shows the base's data at 80 MiB" \
    eq "$(dd if=/dev/vdc bs=1M skip=80 count=1 iflag=direct 2>/dev/null | tr -d 'Z' | wc -c)" 0
# The host mirrors vdc to a new image and pivots the export to it while
# this fio writes and verifies (tests/guest/mirror.py).
echo "MIRROR-ME"
check "fio verified random writes on the qcow2 disk" fio --output=/tmp/fioc.out /e2e/verify-qcow2.fio
grep -E "err=|IOPS" /tmp/fioc.out | head -4
yes VUBQCOW | head -c 1048576 > /tmp/qmarker
check "qcow2 marker written at 64 MiB" dd if=/tmp/qmarker of=/dev/vdc bs=1M seek=64 count=1 oflag=direct conv=fsync
# Half a cluster into the base's data: the rest of the cluster comes from the base.
printf 'overlay' | dd of=/dev/vdc bs=512 seek=$((80 * 2048 + 64)) count=1 conv=notrunc,fsync 2>/dev/null
check "base data around a small overlay write" \
    eq "$(dd if=/dev/vdc bs=512 skip=$((80 * 2048 + 65)) count=63 iflag=direct 2>/dev/null | tr -d 'Z' | wc -c)" 0
check "qcow2 discard" blkdiscard -o $((72 << 20)) -l $((1 << 20)) /dev/vdc

# The read-only disk refuses writes and serves reads.
check "vdb read" dd if=/dev/vdb of=/dev/null bs=4096 count=16 iflag=direct
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then
    check "vdb refuses writes" false
else
    check "vdb refuses writes" true
fi
check "flush" sync
finish
