#!/bin/sh
# In the guest: fio verify on /dev/vda, an rbd-backed export.
. /e2e/lib.sh
check "vda capacity (the rbd image's 128 MiB)" eq "$(cat /sys/block/vda/size)" $((128 * 1024 * 1024 / 512))
check "fio verified random writes on the rbd disk (two queues)" fio --output=/tmp/fio.out /e2e/verify.fio
grep -E "err=|IOPS" /tmp/fio.out | head -4
yes VUBRBD | head -c 1048576 > /tmp/marker
check "marker written at 120 MiB" dd if=/tmp/marker of=/dev/vda bs=1M seek=120 count=1 oflag=direct conv=fsync
check "blkdiscard -z (write zeroes)" blkdiscard -z -o $((121 << 20)) -l $((1 << 20)) /dev/vda
check "zeroed range reads as zeroes" zeroes_at /dev/vda 121 1
finish
