#!/bin/sh
# Second boot against the same daemon (QEMU restarted and reconnected):
# what the first boot wrote is still there.
. /e2e/lib.sh
check "vda capacity after reconnect" eq "$(cat /sys/block/vda/size)" $((256 * 1024 * 1024 / 512))
check "fio verify-only of the first boot's data" fio --verify_only --output=/tmp/fio.out /e2e/verify.fio
grep -E "err=" /tmp/fio.out | head -2
yes VUBMARK | head -c 1048576 > /tmp/marker
dd if=/dev/vda of=/tmp/back bs=1M skip=150 count=1 iflag=direct 2>/dev/null
check "marker at 150 MiB survived the reboot" cmp -s /tmp/marker /tmp/back
finish
