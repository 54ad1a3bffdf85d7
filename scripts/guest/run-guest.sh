#!/usr/bin/env bash
# Boot the test guest under QEMU (TCG) against one or more vhost-user-blk
# sockets, run a shell script inside it and exit with that script's exit code.
#
# Usage:
#   scripts/guest/run-guest.sh --socket PATH [--socket PATH2 ...] \
#       --script GUEST_SCRIPT.sh [options]
#
# Options:
#   --socket PATH      vhost-user-blk socket; one virtio-blk disk per socket,
#                      in order: /dev/vda, /dev/vdb, ... (repeatable; zero
#                      sockets boots a guest without disks)
#   --script FILE      script run in the guest as /test.sh by /bin/sh (dash;
#                      no bash in the guest), cwd /tmp (a tmpfs)
#   --num-queues N     virtqueues per disk (default: QEMU's, = vCPUs)
#   --reconnect SECS   reconnect= on the vhost-user chardevs: QEMU retries
#                      every SECS when the backend goes away, and the guest
#                      waits for it (default: none; the device then stays
#                      without a backend)
#   --mem SIZE         guest RAM, e.g. 512M, 1G (default 512M)
#   --smp N            vCPUs (default 2)
#   --timeout SECS     kill QEMU and fail after SECS (default 300)
#   --file SRC[:DEST]  also put host file SRC into the guest at DEST
#                      (default /SRC's basename) (repeatable)
#   --append ARGS      extra kernel command line arguments
#   --qemu-arg ARG     extra QEMU argument (repeatable), e.g.
#                      --qemu-arg -device --qemu-arg ...
#   --log FILE         also save the raw serial console log to FILE
#   --qmp PATH         QMP monitor on unix socket PATH (server, no wait)
#   --incoming URI     start as a live-migration destination (-incoming URI,
#                      e.g. unix:/tmp/mig.sock): the guest runs once the
#                      source's state has arrived; the script run and the
#                      exit marker are the migrated guest's
#   --kernel FILE / --initrd FILE
#                      boot these instead of the cached build (no build step
#                      when both are given)
#
# Environment: QEMU (binary, default qemu-system-x86_64), GUEST_CACHE.
#
# Exit status: the guest script's exit code, taken from the
# "GUEST-EXIT-CODE=<n>" line the guest's /init prints after the script;
# 124 if the timeout was hit; 125 if the guest never printed the marker
# (QEMU failed to start, kernel panic, ...). The guest's console goes to
# stdout (CRs stripped); our own messages go to stderr.
set -euo pipefail
LOG_TAG=run-guest
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

sockets=()
files=()
qemu_extra=()
script=""
num_queues=""
reconnect=""
mem=512M
smp=2
timeout=300
append=""
logfile=""
qmp=""
incoming=""
kernel=""
initrd=""

need_arg() { [ "$#" -ge 2 ] || die "option $1 needs an argument (see --help)"; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --socket) need_arg "$@"; sockets+=("$2"); shift 2 ;;
        --script) need_arg "$@"; script=$2; shift 2 ;;
        --num-queues) need_arg "$@"; num_queues=$2; shift 2 ;;
        --reconnect) need_arg "$@"; reconnect=$2; shift 2 ;;
        --mem) need_arg "$@"; mem=$2; shift 2 ;;
        --smp) need_arg "$@"; smp=$2; shift 2 ;;
        --timeout) need_arg "$@"; timeout=$2; shift 2 ;;
        --file) need_arg "$@"; files+=("$2"); shift 2 ;;
        --append) need_arg "$@"; append="$append $2"; shift 2 ;;
        --qemu-arg) need_arg "$@"; qemu_extra+=("$2"); shift 2 ;;
        --log) need_arg "$@"; logfile=$2; shift 2 ;;
        --qmp) need_arg "$@"; qmp=$2; shift 2 ;;
        --incoming) need_arg "$@"; incoming=$2; shift 2 ;;
        --kernel) need_arg "$@"; kernel=$2; shift 2 ;;
        --initrd) need_arg "$@"; initrd=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[ -n "$script" ] || die "--script is required (see --help)"
[ -f "$script" ] || die "guest script not found: $script"
[[ "$timeout" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer, got '$timeout'"
[[ "$smp" =~ ^[0-9]+$ ]] || die "--smp must be an integer, got '$smp'"
[ -z "$num_queues" ] || [[ "$num_queues" =~ ^[0-9]+$ ]] || die "--num-queues must be an integer, got '$num_queues'"
[ -z "$reconnect" ] || [[ "$reconnect" =~ ^[1-9][0-9]*$ ]] || die "--reconnect must be a positive integer, got '$reconnect'"
[[ "$mem" =~ ^([0-9]+)([MGmg]?)$ ]] || die "--mem must look like 512M or 1G, got '$mem'"
mem_mib=${BASH_REMATCH[1]}
[[ "${BASH_REMATCH[2]}" == [Gg] ]] && mem_mib=$((mem_mib * 1024))
# The initramfs is ~85 MiB unpacked (fio drags in ceph/gluster/ICU libraries)
# and lives in RAM next to the initrd image during unpacking; at 256M the
# kernel fails with "Initramfs unpacking failed: write error".
[ "$mem_mib" -ge 320 ] || die "--mem $mem is too small: the guest needs at least 320M"
for s in ${sockets[@]+"${sockets[@]}"}; do
    [ -S "$s" ] || die "vhost-user socket not found (is the backend running?): $s"
done

QEMU=${QEMU:-qemu-system-x86_64}
if [ -z "$kernel" ] || [ -z "$initrd" ]; then
    "$GUEST_DIR/build-guest.sh"   # no-op (~0.2 s) when the cache is current
    if [ -z "$kernel" ]; then
        # Prefer the decompressed ELF (PVH boot): saves ~5 s of in-guest
        # bzImage decompression under TCG.
        kernel="$GUEST_CACHE/vmlinux"
        [ -f "$kernel" ] || kernel="$GUEST_CACHE/vmlinuz"
    fi
    if [ -z "$initrd" ]; then
        # Uncompressed: the kernel copies it instead of gunzipping (~2 s saved).
        initrd="$GUEST_CACHE/initramfs.cpio"
        [ -f "$initrd" ] || initrd="$GUEST_CACHE/initramfs.cpio.gz"
    fi
else
    "$GUEST_DIR/install-deps.sh"
fi
[ -f "$kernel" ] || die "kernel not found: $kernel"
[ -f "$initrd" ] || die "initrd not found: $initrd"
have "$QEMU" || [ -x "$QEMU" ] || die "QEMU binary not found: $QEMU"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/run-guest.XXXXXX")
qpid=""
spid=""
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
        kill -TERM "$qpid" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$qpid" 2>/dev/null || true
    fi
    [ -z "$spid" ] || kill "$spid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Per-boot cpio with /test.sh (and --file extras) ------------------------
# The kernel unpacks concatenated cpio archives (compressed or not) in order,
# later entries overriding earlier ones, so appending a second small archive
# to the cached initramfs is all it takes; no rebuild.
stage="$tmp/stage"
mkdir -p "$stage"
install -m 755 "$script" "$stage/test.sh"
for spec in ${files[@]+"${files[@]}"}; do
    src=${spec%%:*}
    if [ "$src" = "$spec" ]; then dest="/$(basename "$src")"; else dest=${spec#*:}; fi
    [ -f "$src" ] || die "--file source not found: $src"
    case "$dest" in /*) ;; *) dest="/$dest" ;; esac
    mkdir -p "$stage$(dirname "$dest")"
    cp -L "$src" "$stage$dest"
done
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$tmp/extra.cpio"
cat "$initrd" "$tmp/extra.cpio" >"$tmp/initrd"

# --- QEMU command line --------------------------------------------------------
console_log="$tmp/console.log"
args=(
    -accel tcg
    # No default devices (NIC, VGA, floppy, CD-ROM, parallel port, monitor):
    # fewer devices to probe means a faster boot, and no network at all.
    -nodefaults -display none -no-reboot
    -m "$mem" -smp "$smp"
    # vhost-user needs guest RAM in a shareable fd the backend can mmap.
    -object "memory-backend-memfd,id=mem,size=$mem,share=on"
    -numa "node,memdev=mem"
    -kernel "$kernel" -initrd "$tmp/initrd"
    -append "console=ttyS0 quiet panic=-1 guest.ndisks=${#sockets[@]}$append"
    # Serial console on stdio, with a copy in a log file we parse for the
    # exit marker. stdin is /dev/null (the tests are non-interactive, and it
    # keeps QEMU from putting a terminal into raw mode); signal=off is moot
    # then, Ctrl-C reaches QEMU as a plain SIGINT.
    -chardev "stdio,id=con0,signal=off,logfile=$console_log"
    -serial chardev:con0
)
i=0
for s in ${sockets[@]+"${sockets[@]}"}; do
    dev="vhost-user-blk-pci,chardev=vub$i"
    [ -z "$num_queues" ] || dev="$dev,num-queues=$num_queues"
    chardev="socket,id=vub$i,path=$s"
    [ -z "$reconnect" ] || chardev="$chardev,reconnect=$reconnect"
    args+=(-chardev "$chardev" -device "$dev")
    i=$((i + 1))
done
[ -z "$qmp" ] || args+=(-qmp "unix:$qmp,server=on,wait=off")
[ -z "$incoming" ] || args+=(-incoming "$incoming")
args+=(${qemu_extra[@]+"${qemu_extra[@]}"})

log "booting: $QEMU ${args[*]}"

# --- Run with a watchdog ---------------------------------------------------------
mkfifo "$tmp/out"
# Serial output has CRLF line ends; strip the CR for readable CI logs.
sed -u 's/\r$//' <"$tmp/out" &
spid=$!
start=$SECONDS
t0=$(date +%s.%N)
"$QEMU" "${args[@]}" </dev/null >"$tmp/out" &
qpid=$!

timed_out=0
# Poll rather than 'wait' so the deadline is enforced without a separate
# watchdog process (which could outlive us and hold our stdout open).
while kill -0 "$qpid" 2>/dev/null; do
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
        timed_out=1
        log "timeout after ${timeout}s: killing QEMU (pid $qpid)"
        kill -TERM "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$qpid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$qpid" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
qrc=0
wait "$qpid" || qrc=$?
qpid=""
wait "$spid" || true
spid=""
elapsed=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

[ -z "$logfile" ] || cp "$console_log" "$logfile" 2>/dev/null || true

if [ "$timed_out" = 1 ]; then
    log "FAILED: guest did not finish within ${timeout}s"
    exit 124
fi
code=$(tr -d '\r' <"$console_log" 2>/dev/null | sed -n 's/^GUEST-EXIT-CODE=\([0-9]\{1,3\}\)$/\1/p' | tail -n1)
if [ -z "$code" ]; then
    log "FAILED: no GUEST-EXIT-CODE marker from the guest (QEMU exit status $qrc, ${elapsed}s); see the output above"
    exit 125
fi
[ "$qrc" = 0 ] || log "warning: QEMU exited with status $qrc after the guest finished"
log "guest script exited with $code (${elapsed}s)"
exit "$code"
