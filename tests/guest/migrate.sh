#!/usr/bin/env bash
# QEMU live-migration test (issue 20): a Linux guest (TCG) runs fio verify
# on a vhost-user-blk disk while it is live-migrated, on this machine, from
# one QEMU to another; each QEMU's disk is served by its own daemon on the
# same image. The order: daemon A, source QEMU, daemon B, destination QEMU
# (-S -incoming unix:..., it connects to B at start); `migrate` on the
# source; when it completes, the source QEMU quits and the destination is
# continued (`cont`); the guest finishes its fio runs there.
#
# Passes when the migration completes, the guest's fio runs started on the
# source finish on the destination with every verify clean (err=0) and no
# I/O error in the guest's kernel log.
#
# Backends (--backend, or VUB_MIGRATE_BACKEND):
#   qsd  two qemu-storage-daemon instances (QSD, default
#        /usr/bin/qemu-storage-daemon); they share all permissions on an
#        export's image, so no lock handoff is needed.
#   vub  two vhost-user-blkd instances (dirty logging: LOG_ALL and
#        LOG_SHMFD). Until issue 20's handoff (blockdev-set-active) exists,
#        B opens the image with locking=off (A holds QEMU's write lock).
#        A daemon without dirty logging makes QEMU refuse the migration
#        ("Migration disabled: vhost-user backend lacks
#        VHOST_USER_PROTOCOL_F_LOG_SHMFD feature."): the script prints
#        that and fails (exit 1), the source guest going on.
#   --break-dirty-log (vub only): the daemons run with
#        VUB_DEBUG_BREAK_DIRTY_LOG=1, accepting the log but never marking
#        it, to show that the test fails without dirty logging.
#
# Usage: tests/guest/migrate.sh [--backend qsd|vub] [--bin path/to/vhost-user-blkd]
#          [--break-dirty-log]
# Environment: VUB_MIGRATE_SECS (guest fio time, default 40),
#   VUB_MIGRATE_AFTER (seconds of fio on the source before `migrate`,
#   default 8), VUB_MIGRATE_READ_IOPS (the daemons' read limit; default
#   50 with vub, none with qsd: qemu-storage-daemon 7.2 answers
#   GET_VRING_BASE without waiting for requests it holds, and with reads
#   queued in its throttle at the stop it logged "vu_panic: Error writing
#   eventfd: Bad file descriptor" and the destination guest hung), QSD,
#   QEMU, GUEST_CACHE.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=$repo/target/debug/vhost-user-blkd
backend=${VUB_MIGRATE_BACKEND:-qsd}
secs=${VUB_MIGRATE_SECS:-40}
after=${VUB_MIGRATE_AFTER:-8}
read_iops=${VUB_MIGRATE_READ_IOPS:-}
QSD=${QSD:-/usr/bin/qemu-storage-daemon}
break_log=0
guest=$repo/scripts/guest
qmp=$here/qmp.py

while [[ $# -gt 0 ]]; do
    case $1 in
        --backend) backend=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --break-dirty-log) break_log=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "ERROR: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $backend in
    qsd) [[ -x $QSD ]] || { echo "ERROR: $QSD not found" >&2; exit 1; } ;;
    vub) [[ -x $bin ]] || { echo "ERROR: daemon binary $bin not found (cargo build first)" >&2; exit 1; } ;;
    *) echo "ERROR: --backend must be qsd or vub, got '$backend'" >&2; exit 2 ;;
esac
if [[ -z $read_iops ]]; then
    if [[ $backend == vub ]]; then read_iops=50; else read_iops=0; fi
fi
"$guest/install-deps.sh"
"$guest/build-guest.sh"

work=$(mktemp -d /tmp/vub-migrate.XXXXXX)
pids=()
cleanup() {
    local p
    for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
    # run-guest.sh kills its QEMU on TERM; give it the time.
    for _ in $(seq 50); do
        alive=0
        for p in ${pids[@]+"${pids[@]}"}; do kill -0 "$p" 2>/dev/null && alive=1; done
        [[ $alive == 0 ]] && break
        sleep 0.1
    done
    for p in ${pids[@]+"${pids[@]}"}; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 64M "$work/d.img"

# start_daemon NAME LOCKING: a daemon serving $work/d.img on $work/NAME.sock.
start_daemon() {
    local name=$1 locking=$2 pid
    # Reads are throttled so that some are queued in the daemon when the
    # migration stops the guest: they complete in the stop's drain, into
    # pages only the dirty log can get to the destination.
    local args=(--blockdev "driver=raw,node-name=d0,file.driver=file,file.filename=$work/d.img,file.locking=$locking")
    local top=d0
    if [[ $read_iops != 0 ]]; then
        args+=(--object "throttle-group,id=tg0,limits.iops-read=$read_iops"
            --blockdev "driver=throttle,node-name=t0,throttle-group=tg0,file=d0")
        top=t0
    fi
    args+=(--export "type=vhost-user-blk,id=e0,node-name=$top,addr.type=unix,addr.path=$work/$name.sock,writable=on,num-queues=2"
        --pidfile "$work/$name.pid")
    if [[ $backend == qsd ]]; then
        "$QSD" "${args[@]}" >"$work/$name.log" 2>&1 &
    elif [[ $break_log == 1 ]]; then
        VUB_DEBUG_BREAK_DIRTY_LOG=1 "$bin" "${args[@]}" >"$work/$name.log" 2>&1 &
    else
        "$bin" "${args[@]}" >"$work/$name.log" 2>&1 &
    fi
    pid=$!
    pids+=("$pid")
    for _ in $(seq 200); do
        [[ -S $work/$name.sock ]] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    cat "$work/$name.log" >&2
    echo "ERROR: daemon $name did not start" >&2
    return 1
}

# q SOCKET JSON: one QMP command; its reply on stdout.
q() { python3 "$qmp" "$1" "$2" 2>&1 | tail -n1 || true; }
# field JSON-REPLY PYTHON-EXPR: a value from a reply ('r' is the reply).
field() { python3 -c "import json,sys; r=json.loads(sys.argv[1]); print($2)" "$1"; }
wait_qmp() {
    for _ in $(seq 300); do
        [[ -S $1 ]] && python3 "$qmp" "$1" '{"execute":"query-status"}' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "ERROR: no QMP on $1" >&2
    return 1
}

run_guest=("$guest/run-guest.sh" --num-queues 2 --smp 2 --mem 512M
    --timeout $((secs + 200)) --append "migrate.secs=$secs"
    --file "$here/lib.sh:/e2e/lib.sh" --file "$here/verify-inflight.fio:/e2e/verify-inflight.fio"
    --script "$here/migrate-guest.sh")

# 1. Daemon A and the source QEMU; wait for the guest's fio.
start_daemon a on
"${run_guest[@]}" --socket "$work/a.sock" --qmp "$work/qmp-src.sock" >"$work/src.log" 2>&1 &
src_pid=$!
pids+=("$src_pid")
for _ in $(seq 1800); do
    grep -q FIO-START "$work/src.log" 2>/dev/null && break
    kill -0 "$src_pid" 2>/dev/null || break
    sleep 0.1
done
grep -q FIO-START "$work/src.log" || { cat "$work/src.log"; echo "ERROR: the guest never started fio" >&2; exit 1; }
echo "source guest runs fio; migrating in ${after}s"

# 2. Daemon B on the same image and the destination QEMU, waiting for the
#    source's state (-S: it stays paused until `cont`).
if [[ $backend == qsd ]]; then start_daemon b on; else start_daemon b off; fi
"${run_guest[@]}" --socket "$work/b.sock" --qmp "$work/qmp-dst.sock" \
    --incoming "unix:$work/mig.sock" --qemu-arg -S >"$work/dst.log" 2>&1 &
dst_pid=$!
pids+=("$dst_pid")
wait_qmp "$work/qmp-src.sock"
wait_qmp "$work/qmp-dst.sock"
echo "destination: $(q "$work/qmp-dst.sock" '{"execute":"query-status"}')"
sleep "$after"

# 3. Migrate.
reply=$(q "$work/qmp-src.sock" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$work/mig.sock\"}}")
echo "migrate: $reply"
if [[ $reply == *'"error"'* ]]; then
    echo "FAIL: QEMU refused the migration: $(field "$reply" "r['error']['desc']")"
    echo "source: $(q "$work/qmp-src.sock" '{"execute":"query-status"}')"
    exit 1
fi
status=
for _ in $(seq 1200); do
    info=$(q "$work/qmp-src.sock" '{"execute":"query-migrate"}')
    status=$(field "$info" "r['return'].get('status', '')")
    case $status in completed|failed|cancelled) break ;; esac
    sleep 0.1
done
echo "query-migrate: $info"
if [[ $status != completed ]]; then
    echo "FAIL: migration ended '$status'"
    exit 1
fi
echo "migration: total $(field "$info" "r['return'].get('total-time')") ms, downtime $(field "$info" "r['return'].get('downtime')") ms, RAM transferred $(field "$info" "r['return']['ram']['transferred'] // 1048576") MiB, dirty-sync-count $(field "$info" "r['return']['ram'].get('dirty-sync-count')")"

# 4. The switch: the source QEMU (paused, postmigrate) quits, the
#    destination goes on. (The source's run-guest.sh then says "no
#    GUEST-EXIT-CODE marker": expected, the guest ends on the destination.)
echo "source: $(q "$work/qmp-src.sock" '{"execute":"query-status"}')"
q "$work/qmp-src.sock" '{"execute":"quit"}' >/dev/null || true
wait "$src_pid" 2>/dev/null || true
echo "cont: $(q "$work/qmp-dst.sock" '{"execute":"cont"}')"
echo "destination: $(q "$work/qmp-dst.sock" '{"execute":"query-status"}')"

guest_rc=0
wait "$dst_pid" || guest_rc=$?
echo "--- source console"; cat "$work/src.log"
echo "--- destination console"; cat "$work/dst.log"

pass=0
fail=0
host_check() {
    if eval "$2"; then echo "ok: host: $1"; pass=$((pass + 1));
    else echo "FAIL: host: $1"; fail=$((fail + 1)); fi
}
host_check "fio was still running when the source stopped (no FIO-DONE on the source console)" "! grep -q FIO-DONE '$work/src.log'"
host_check "the guest finished on the destination (FIO-DONE there)" "grep -q FIO-DONE '$work/dst.log'"
host_check "guest checks passed on the destination (fio err=0, no I/O error)" "[[ $guest_rc -eq 0 ]]"
for f in a b; do echo "--- daemon $f log"; cat "$work/$f.log"; done
echo "guest migrate ($backend): $pass passed, $fail failed"
[[ $fail -eq 0 ]]
