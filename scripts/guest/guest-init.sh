#!/bin/sh
# /init of the test guest's initramfs (runs under busybox ash as PID 1).
#
# 1. mount proc, sysfs, devtmpfs
# 2. insmod the virtio modules listed (dependency-ordered) in /lib/modules/load-order
# 3. wait until the expected number of virtio disks (guest.ndisks=N on the
#    kernel command line) show up
# 4. run /test.sh (supplied per boot by run-guest.sh as an appended cpio)
# 5. print "GUEST-EXIT-CODE=<rc>" on the console and power off.
#
# PID 1 must never exit (that panics the kernel), so nothing here uses set -e.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp

# The initramfs ships a /dev/console node so the kernel could give us stdio;
# if it could not (e.g. the archive was built without root), fix it up now.
if [ ! -t 1 ]; then
    exec </dev/console >/dev/console 2>&1
fi

ndisks=0
debug=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        guest.ndisks=*) ndisks="${arg#guest.ndisks=}" ;;
        guest.debug=1) debug=1 ;;
    esac
done

dbg() { [ "$debug" = 1 ] && echo "init: $*"; }

load_failed=0
while read -r mod; do
    [ -n "$mod" ] || continue
    dbg "insmod $mod"
    if ! insmod "/lib/modules/$mod.ko"; then
        echo "init: insmod $mod failed"
        load_failed=1
    fi
done </lib/modules/load-order

# virtio-blk probing normally finishes inside insmod, but don't rely on it:
# wait (max 10 s) for all disks and their /dev nodes.
count_disks() {
    n=0
    for d in /sys/block/vd*; do
        [ -e "$d" ] && [ -b "/dev/${d##*/}" ] && n=$((n + 1))
    done
    echo "$n"
}
i=0
while [ "$(count_disks)" -lt "$ndisks" ] && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
found=$(count_disks)
if [ "$found" -lt "$ndisks" ]; then
    echo "init: WARNING: expected $ndisks virtio disk(s), found $found"
fi
dbg "disks: $(ls /sys/block | tr '\n' ' ')"

if [ "$load_failed" = 1 ]; then
    rc=126
elif [ -f /test.sh ]; then
    cd /tmp || true
    # Run through sh (dash; see build-guest.sh) so a #!/bin/bash line (there
    # is no bash here) does not matter.
    /bin/sh /test.sh
    rc=$?
    cd /
else
    echo "init: no /test.sh in the initramfs"
    rc=127
fi

sync
echo "GUEST-EXIT-CODE=$rc"
# Wait until the UART has actually sent everything: tcsetattr(TCSADRAIN),
# which busybox stty issues when it applies settings, blocks until the tty
# output queue is empty. Without this the tail of the output (including the
# marker) can be lost when we power off right away.
stty -F /dev/console "$(stty -F /dev/console -g)" 2>/dev/null || sleep 0.5
poweroff -f
# Not reached unless ACPI power-off is unavailable; with -no-reboot a reset
# also makes QEMU exit.
reboot -f
sleep 3600
