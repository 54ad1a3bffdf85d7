#!/bin/sh
# Second boot against the same daemon (QEMU restarted and reconnected):
# what the first boot wrote is still there.
. /e2e/lib.sh
check "vda capacity after reconnect" eq "$(cat /sys/block/vda/size)" $((256 * 1024 * 1024 / 512))
check "fio verify-only of the first boot's data" fio --verify_only --output=/tmp/fio.out /e2e/verify.fio
grep -E "err=" /tmp/fio.out | head -2
check "fio verify-only of the qcow2 disk" fio --verify_only --output=/tmp/fioc.out /e2e/verify-qcow2.fio
grep -E "err=" /tmp/fioc.out | head -2
yes VUBMARK | head -c 1048576 > /tmp/marker
dd if=/dev/vda of=/tmp/back bs=1M skip=150 count=1 iflag=direct 2>/dev/null
check "marker at 150 MiB survived the reboot" cmp -s /tmp/marker /tmp/back

# The host grows vda to 320 MiB over QMP once it sees this line; the daemon
# sends a config-change notice and the guest's driver picks up the size.
echo "RESIZE-ME"
want=$((320 * 1024 * 1024 / 512))
i=0
while [ "$(cat /sys/block/vda/size)" != "$want" ] && [ $i -lt 300 ]; do
    sleep 0.2
    i=$((i + 1))
done
check "vda grew to 320 MiB while the guest ran" eq "$(cat /sys/block/vda/size)" "$want"
check "write at the new end" dd if=/tmp/marker of=/dev/vda bs=1M seek=319 count=1 oflag=direct

# The host measures the daemon's CPU time while the guest stays connected
# and idle (no disk I/O) for a while.
echo "IDLE-START"
sleep 12
finish
