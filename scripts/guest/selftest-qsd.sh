#!/usr/bin/env bash
# End-to-end self-test of the guest tooling, with qemu-storage-daemon (QSD)
# standing in for vhost-user-blkd as the vhost-user-blk backend:
#
#   1. create a 256 MiB raw image, export it with QSD over vhost-user-blk
#      (writable, 2 queues)
#   2. boot the guest (run-guest.sh) with a script that prints the disk's
#      sysfs attributes, runs a fio randwrite+crc32c verify job, writes a
#      known pattern with dd, and zeroes a range with blkdiscard -z
#   3. check the sysfs values, then check on the host that the pattern and
#      the zeroes are in the image file at the expected offsets
#
# Prints PASS or FAIL (with reasons) and exits 0 / 1.
# Environment: KEEP_TMP=1 keeps the temp dir (image, logs) for inspection;
# QEMU, QSD (qemu-storage-daemon binary), GUEST_CACHE as elsewhere.
set -euo pipefail
LOG_TAG=selftest-qsd
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$GUEST_DIR/install-deps.sh"
"$GUEST_DIR/build-guest.sh"

QSD=${QSD:-qemu-storage-daemon}
IMG_SIZE=$((256 * 1024 * 1024))
PAT_OFF=$((192 * 1024 * 1024))     # pattern: 64 KiB at 192 MiB
PAT_LEN=65536
ZERO_OFF=$((200 * 1024 * 1024))    # write-zeroes: 1 MiB at 200 MiB
ZERO_LEN=$((1024 * 1024))
# (fio uses the first 64 MiB: 2 jobs x 32 MiB, see offset_increment below.)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/selftest-qsd.XXXXXX")
img="$tmp/disk.img"
sock="$tmp/vub.sock"
qsd_pid=""
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    if [ -n "$qsd_pid" ] && kill -0 "$qsd_pid" 2>/dev/null; then
        kill -TERM "$qsd_pid" 2>/dev/null || true
        wait "$qsd_pid" 2>/dev/null || true
    fi
    if [ "${KEEP_TMP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

failures=()
fail() { failures+=("$*"); log "check failed: $*"; }

# --- Backend -------------------------------------------------------------------

qemu-img create -q -f raw "$img" "$IMG_SIZE"
log "starting $QSD"
"$QSD" \
    --blockdev "driver=file,node-name=file0,filename=$img" \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on,num-queues=2" \
    >"$tmp/qsd.log" 2>&1 &
qsd_pid=$!
for _ in $(seq 100); do
    [ -S "$sock" ] && break
    kill -0 "$qsd_pid" 2>/dev/null || { cat "$tmp/qsd.log" >&2; die "qemu-storage-daemon exited during startup"; }
    sleep 0.1
done
[ -S "$sock" ] || { cat "$tmp/qsd.log" >&2; die "qemu-storage-daemon did not create $sock within 10 s"; }

# --- Guest script -------------------------------------------------------------
# Pattern bytes: 'yes' output cut to PAT_LEN, identical from busybox (guest)
# and coreutils (host).
nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
pat_word="vhost-user-blkd-selftest-$nonce"
yes "$pat_word" | head -c "$PAT_LEN" >"$tmp/pattern" || true   # yes gets SIGPIPE

cat >"$tmp/guest.sh" <<EOF
set -e
echo "guest uptime at script start: \$(cut -d' ' -f1 /proc/uptime) s"
d=vda
[ -b /dev/\$d ] || { echo "no /dev/\$d"; ls /sys/block; exit 10; }
q=/sys/block/\$d/queue
echo "SYSFS size=\$(cat /sys/block/\$d/size)"
echo "SYSFS logical_block_size=\$(cat \$q/logical_block_size)"
echo "SYSFS nr_mq=\$(ls /sys/block/\$d/mq | wc -l)"
echo "SYSFS ro=\$(cat /sys/block/\$d/ro)"
echo "SYSFS discard_max_bytes=\$(cat \$q/discard_max_bytes)"
echo "SYSFS write_zeroes_max_bytes=\$(cat \$q/write_zeroes_max_bytes)"
echo "SYSFS write_cache=\$(cat \$q/write_cache | tr ' ' _)"
# Negotiated virtio feature bits, bit 0 first.
echo "SYSFS virtio_features=\$(cat /sys/block/\$d/device/features)"

# libaio is compiled into Debian's fio; fall back to psync if it ever isn't.
if fio --enghelp 2>/dev/null | grep -qw libaio; then eng=libaio; else eng=psync; fi
echo "fio ioengine: \$eng"
start=\$(cut -d' ' -f1 /proc/uptime)
# Two jobs on disjoint 32 MiB ranges (offset_increment): overlapping
# verify jobs would overwrite each other's blocks and fail verification.
fio --name=v --filename=/dev/\$d --direct=1 --ioengine=\$eng \\
    --rw=randwrite --bsrange=4k-256k --verify=crc32c --verify_fatal=1 \\
    --size=32M --offset_increment=32M --numjobs=2 --iodepth=8 \\
    --group_reporting
echo "fio took \$(awk -v s=\$start '{ printf "%.1f", \$1 - s }' /proc/uptime) s"

# Known pattern at a known offset; fsync so it reaches the backend.
yes "$pat_word" | head -c $PAT_LEN >/tmp/pattern || true
dd if=/tmp/pattern of=/dev/\$d bs=$PAT_LEN seek=$((PAT_OFF / PAT_LEN)) count=1 conv=fsync 2>/dev/null
# Read it back past the page cache.
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/\$d bs=$PAT_LEN skip=$((PAT_OFF / PAT_LEN)) count=1 2>/dev/null | cmp - /tmp/pattern
echo "pattern written and read back"

# Pattern, then write-zeroes over it (BLKZEROOUT; uses VIRTIO_BLK_T_WRITE_ZEROES
# when the device offers it, else the kernel writes zero pages). The host
# must see zeroes there afterwards.
yes "$pat_word" | head -c $ZERO_LEN | dd of=/dev/\$d bs=$PAT_LEN seek=$((ZERO_OFF / PAT_LEN)) conv=fsync 2>/dev/null
blkdiscard -z -o $ZERO_OFF -l $ZERO_LEN /dev/\$d
echo "write-zeroes done"
if [ "\$(cat \$q/discard_max_bytes)" -gt 0 ]; then
    blkdiscard -o $((ZERO_OFF + ZERO_LEN)) -l $ZERO_LEN /dev/\$d
    echo "discard done"
fi
sync
echo "GUEST-SELFTEST-OK"
EOF

# --- Boot -------------------------------------------------------------------------

t0=$SECONDS
set +e
"$GUEST_DIR/run-guest.sh" --socket "$sock" --num-queues 2 --script "$tmp/guest.sh" \
    --timeout "${SELFTEST_TIMEOUT:-600}" | tee "$tmp/guest.out"
grc=${PIPESTATUS[0]}
set -e
log "guest run took $((SECONDS - t0)) s"

# Stop QSD so everything it wrote is in the file (it is already, as QSD
# does no write caching of its own beyond the host page cache, but be tidy).
kill -TERM "$qsd_pid" 2>/dev/null || true
wait "$qsd_pid" 2>/dev/null || true
qsd_pid=""

# --- Checks -------------------------------------------------------------------------

[ "$grc" = 0 ] || fail "guest script exited with $grc"
grep -q '^GUEST-SELFTEST-OK$' "$tmp/guest.out" || fail "guest script did not complete"

sysfs() { sed -n "s/^SYSFS $1=//p" "$tmp/guest.out" | tail -n1; }
expect() {   # name expected
    local got
    got=$(sysfs "$1")
    [ "$got" = "$2" ] || fail "sysfs $1: expected '$2', got '${got:-<missing>}'"
}
expect size $((IMG_SIZE / 512))
expect logical_block_size 512
expect nr_mq 2
expect ro 0

if dd if="$img" bs="$PAT_LEN" skip=$((PAT_OFF / PAT_LEN)) count=1 status=none | cmp -s - "$tmp/pattern"; then
    log "pattern found in the image at offset $PAT_OFF"
else
    fail "pattern not found in the image at offset $PAT_OFF"
fi
if dd if="$img" bs="$PAT_LEN" skip=$((ZERO_OFF / PAT_LEN)) count=$((ZERO_LEN / PAT_LEN)) status=none \
        | cmp -s - <(head -c "$ZERO_LEN" /dev/zero); then
    log "write-zeroes range is zero in the image"
else
    fail "write-zeroes range at offset $ZERO_OFF is not zero in the image"
fi

echo
echo "selftest-qsd: sysfs as seen by the guest:"
sed -n 's/^SYSFS /  /p' "$tmp/guest.out"
if [ "${#failures[@]}" -eq 0 ]; then
    echo "selftest-qsd: PASS"
    exit 0
fi
echo "selftest-qsd: FAIL"
printf '  - %s\n' "${failures[@]}"
[ -z "${KEEP_TMP:-}" ] && echo "  (rerun with KEEP_TMP=1 to keep the image and logs)"
exit 1
