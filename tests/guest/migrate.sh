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
#        export's image, so no lock handoff is needed (and 7.2 has none).
#   vub  two vhost-user-blkd instances: dirty logging (LOG_ALL, LOG_SHMFD)
#        and the handoff of docs/MIGRATION.md: B opens the image inactive
#        (active=off; both exports allow-inactive=on); when the migration has
#        completed, A inactivates (blockdev-set-active false: flush,
#        metadata written, write lock released), B gets the guest's write
#        cache from A (query-block-exports -> x-block-export-set-writethrough)
#        and activates (locks taken, metadata read again), and the
#        destination QEMU is continued.
#
# Options (vub):
#   --format raw|qcow2   the image (default raw); qcow2 ends with
#                        `qemu-img check` on it.
#   --cancel-first       first a migration that is cancelled midway
#                        (bandwidth capped): the destination QEMU exits,
#                        the source guest goes on, a new destination is
#                        started for the real one.
#   --fallback-first     first a migration that completes and is then
#                        abandoned (the destination QEMU quits before it
#                        runs): A is activated again, the source QEMU
#                        continued, the guest goes on there; then the real
#                        migration to a new destination.
#   --resize             block_resize on A (64 -> 96 MiB) after B opened the
#                        image: the guest writes and verifies data beyond
#                        the old end on the destination (B read the new
#                        size when it activated).
#   --writethrough       the guest turns its write cache off
#                        (/sys/block/vda/cache_type) before migrating; A
#                        must report it and B must end up write-through.
#   --break-dirty-log    the daemons run with VUB_DEBUG_BREAK_DIRTY_LOG=1,
#                        accepting the log but never marking it, to show
#                        that the test fails without dirty logging.
#   --postcopy-refused   checks that the destination QEMU refuses the
#                        postcopy-ram capability (the daemon does not offer
#                        VHOST_USER_PROTOCOL_F_PAGEFAULT; QEMU checks on
#                        the destination only), then migrates.
#
# Usage: tests/guest/migrate.sh [--backend qsd|vub] [--bin path/to/vhost-user-blkd]
#          [--format raw|qcow2] [--cancel-first] [--fallback-first] [--resize]
#          [--writethrough] [--break-dirty-log] [--postcopy-refused]
# Environment: VUB_MIGRATE_SECS (guest fio time, default 40, 70 with
#   --cancel-first or --fallback-first), VUB_MIGRATE_AFTER (seconds of fio
#   on the source before `migrate`, default 8), VUB_MIGRATE_READ_IOPS (the
#   daemons' read limit; default 50 with vub, none with qsd:
#   qemu-storage-daemon 7.2 answers GET_VRING_BASE without waiting for
#   requests it holds, and with reads queued in its throttle at the stop it
#   logged "vu_panic: Error writing eventfd: Bad file descriptor" and the
#   destination guest hung), QSD, QEMU, GUEST_CACHE.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=$repo/target/debug/vhost-user-blkd
backend=${VUB_MIGRATE_BACKEND:-qsd}
secs=${VUB_MIGRATE_SECS:-}
after=${VUB_MIGRATE_AFTER:-8}
read_iops=${VUB_MIGRATE_READ_IOPS:-}
QSD=${QSD:-/usr/bin/qemu-storage-daemon}
break_log=0
format=raw
cancel_first=0
fallback_first=0
resize=0
wt=0
postcopy=0
guest=$repo/scripts/guest
qmp=$here/qmp.py

while [[ $# -gt 0 ]]; do
    case $1 in
        --backend) backend=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --break-dirty-log) break_log=1; shift ;;
        --format) format=$2; shift 2 ;;
        --cancel-first) cancel_first=1; shift ;;
        --fallback-first) fallback_first=1; shift ;;
        --resize) resize=1; shift ;;
        --writethrough) wt=1; shift ;;
        --postcopy-refused) postcopy=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "ERROR: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $backend in
    qsd) [[ -x $QSD ]] || { echo "ERROR: $QSD not found" >&2; exit 1; } ;;
    vub) [[ -x $bin ]] || { echo "ERROR: daemon binary $bin not found (cargo build first)" >&2; exit 1; } ;;
    *) echo "ERROR: --backend must be qsd or vub, got '$backend'" >&2; exit 2 ;;
esac
case $format in raw|qcow2) ;; *) echo "ERROR: --format must be raw or qcow2" >&2; exit 2 ;; esac
if [[ $backend == qsd ]] && (( cancel_first + fallback_first + resize + wt + postcopy > 0 )) || [[ $backend == qsd && $format != raw ]]; then
    echo "ERROR: --format, --cancel-first, --fallback-first, --resize, --writethrough and --postcopy-refused need --backend vub" >&2
    exit 2
fi
if [[ -z $secs ]]; then
    if (( cancel_first + fallback_first > 0 )); then secs=70; else secs=40; fi
fi
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

if [[ $format == qcow2 ]]; then
    qemu-img create -q -f qcow2 "$work/d.img" 64M
else
    truncate -s 64M "$work/d.img"
fi

# start_daemon NAME ACTIVE: a daemon serving $work/d.img on $work/NAME.sock,
# its monitor on $work/NAME-qmp.sock; ACTIVE off opens the image inactive.
start_daemon() {
    local name=$1 active=$2 pid
    # Reads are throttled so that some are queued in the daemon when the
    # migration stops the guest: they complete in the stop's drain, into
    # pages only the dirty log can get to the destination.
    local act=""
    [[ $active == off ]] && act=",active=off"
    local args=(--blockdev "driver=file,node-name=f0,filename=$work/d.img$act"
        --blockdev "driver=$format,node-name=d0,file=f0$act")
    local top=d0
    if [[ $read_iops != 0 ]]; then
        args+=(--object "throttle-group,id=tg0,limits.iops-read=$read_iops"
            --blockdev "driver=throttle,node-name=t0,throttle-group=tg0,file=d0$act")
        top=t0
    fi
    # Both exports may sit on an inactive node: B's from the start, A's
    # once it hands the image over (QEMU 10's default refuses that).
    # The same device on both sides: queues above, serial here (the guest
    # reads it with GET_ID, so on the destination B answers).
    local inactive=""
    [[ $backend == vub ]] && inactive=",allow-inactive=on,serial=vub-migrate"
    args+=(--export "type=vhost-user-blk,id=e0,node-name=$top,addr.type=unix,addr.path=$work/$name.sock,writable=on,num-queues=2$inactive"
        --chardev "socket,id=m,path=$work/$name-qmp.sock,server=on,wait=off" --monitor chardev=m
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
    eval "${name}_pid=$pid"
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

pass=0
fail=0
host_check() {
    if eval "$2"; then echo "ok: host: $1"; pass=$((pass + 1));
    else echo "FAIL: host: $1"; fail=$((fail + 1)); fi
}
# expect_ok WHAT REPLY: the reply is a success, or the run fails now.
expect_ok() {
    echo "$1: $2"
    if [[ $2 != *'"return"'* ]]; then
        echo "FAIL: $1: $2"
        exit 1
    fi
}

append="migrate.secs=$secs"
[[ $backend == vub ]] && append+=" migrate.serial=vub-migrate"
[[ $wt == 1 ]] && append+=" migrate.wt=1"
[[ $resize == 1 ]] && append+=" migrate.resize=1"
run_guest=("$guest/run-guest.sh" --num-queues 2 --smp 2 --mem 512M
    --timeout $((secs + 240)) --append "$append"
    --file "$here/lib.sh:/e2e/lib.sh" --file "$here/verify-inflight.fio:/e2e/verify-inflight.fio"
    --script "$here/migrate-guest.sh")
A=$work/a-qmp.sock
B=$work/b-qmp.sock
SRC=$work/qmp-src.sock

# start_dst N: destination QEMU number N, connected to daemon B, waiting
# for the source's state on $work/migN.sock (-S: paused until `cont`).
start_dst() {
    dst=$work/qmp-dst$1.sock
    mig=unix:$work/mig$1.sock
    "${run_guest[@]}" --socket "$work/b.sock" --qmp "$dst" \
        --incoming "$mig" --qemu-arg -S >"$work/dst$1.log" 2>&1 &
    dst_pid=$!
    pids+=("$dst_pid")
    wait_qmp "$dst"
    echo "destination $1: $(q "$dst" '{"execute":"query-status"}')"
}

# migrate_and_wait: `migrate` to the current destination; sets $status
# and $info.
migrate_and_wait() {
    local reply
    reply=$(q "$SRC" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"$mig\"}}")
    echo "migrate: $reply"
    if [[ $reply == *'"error"'* ]]; then
        echo "FAIL: QEMU refused the migration: $(field "$reply" "r['error']['desc']")"
        echo "source: $(q "$SRC" '{"execute":"query-status"}')"
        exit 1
    fi
    status=
    for _ in $(seq 1200); do
        info=$(q "$SRC" '{"execute":"query-migrate"}')
        status=$(field "$info" "r['return'].get('status', '')")
        case $status in completed|failed|cancelled) break ;; esac
        sleep 0.1
    done
    echo "query-migrate: $info"
}

# source_runs: the source guest still runs fio (its console grows).
source_runs() {
    local before after
    before=$(wc -c <"$work/src.log")
    sleep 3
    after=$(wc -c <"$work/src.log")
    [[ $(field "$(q "$SRC" '{"execute":"query-status"}')" "r['return']['status']") == running ]] &&
        ! grep -q 'FAIL\|FIO-DONE' "$work/src.log" && [[ $after -ge $before ]]
}

# 1. Daemon A and the source QEMU; wait for the guest's fio.
start_daemon a on
"${run_guest[@]}" --socket "$work/a.sock" --qmp "$SRC" >"$work/src.log" 2>&1 &
src_pid=$!
pids+=("$src_pid")
for _ in $(seq 1800); do
    grep -q FIO-START "$work/src.log" 2>/dev/null && break
    kill -0 "$src_pid" 2>/dev/null || break
    sleep 0.1
done
grep -q FIO-START "$work/src.log" || { cat "$work/src.log"; echo "ERROR: the guest never started fio" >&2; exit 1; }
echo "source guest runs fio; migrating in ${after}s"
wait_qmp "$SRC"

# 2. Daemon B on the same image, inactive (vub), and the destination QEMU.
if [[ $backend == qsd ]]; then start_daemon b on; else start_daemon b off; fi
start_dst 1

if [[ $wt == 1 ]]; then
    host_check "the guest switched to write-through before the migration (WT-SET)" "grep -q WT-SET '$work/src.log'"
    host_check "A reports the guest's write-through" \
        "[[ \$(field \"\$(q $A '{\"execute\":\"query-block-exports\"}')\" \"r['return'][0]['writethrough']\") == True ]]"
fi
if [[ $resize == 1 ]]; then
    expect_ok "block_resize on A (64 -> 96 MiB)" \
        "$(q "$A" '{"execute":"block_resize","arguments":{"node-name":"d0","size":100663296}}')"
fi
if [[ $postcopy == 1 ]]; then
    # QEMU asks the backends of the destination (in migrate-set-capabilities
    # while it waits for the state): the daemon does not offer PAGEFAULT.
    reply=$(q "$dst" '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}')
    echo "postcopy-ram on the destination: $reply"
    # QMP says "Postcopy is not supported"; the reason goes to QEMU's log.
    host_check "the destination QEMU refuses postcopy with this daemon: '$(field "$reply" "r.get('error', {}).get('desc', 'accepted')")' ($(grep -o 'vhost-user backend not capable of postcopy' "$work/dst1.log" | head -n1))" \
        "[[ \$reply == *'\"error\"'* ]] && grep -q 'vhost-user backend not capable of postcopy' '$work/dst1.log'"
fi
sleep "$after"

# 3a. A migration cancelled midway: the source goes on.
if [[ $cancel_first == 1 ]]; then
    expect_ok "cap the bandwidth (4 MiB/s)" \
        "$(q "$SRC" '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":4194304}}')"
    reply=$(q "$SRC" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"$mig\"}}")
    expect_ok "migrate (to be cancelled)" "$reply"
    sleep 3
    echo "query-migrate: $(q "$SRC" '{"execute":"query-migrate"}')"
    expect_ok "migrate_cancel" "$(q "$SRC" '{"execute":"migrate_cancel"}')"
    for _ in $(seq 100); do
        status=$(field "$(q "$SRC" '{"execute":"query-migrate"}')" "r['return'].get('status', '')")
        [[ $status == cancelled ]] && break
        sleep 0.1
    done
    host_check "the migration was cancelled (status '$status')" "[[ $status == cancelled ]]"
    wait "$dst_pid" 2>/dev/null || true
    host_check "the source guest goes on with verified I/O after the cancel" source_runs
    host_check "B is still inactive and untouched" \
        "! grep -qi 'error\|panic' '$work/b.log'"
    expect_ok "uncap the bandwidth" \
        "$(q "$SRC" '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}')"
    start_dst 2
fi

# 3b. A migration that completes and is abandoned: A is activated again.
if [[ $fallback_first == 1 ]]; then
    migrate_and_wait
    host_check "the first migration completed ('$status')" "[[ $status == completed ]]"
    [[ $backend == vub ]] && expect_ok "A inactivates" \
        "$(q "$A" '{"execute":"blockdev-set-active","arguments":{"active":false}}')"
    # The destination goes away before it ran (a failed switch).
    q "$dst" '{"execute":"quit"}' >/dev/null || true
    wait "$dst_pid" 2>/dev/null || true
    expect_ok "A activates again" \
        "$(q "$A" '{"execute":"blockdev-set-active","arguments":{"active":true}}')"
    expect_ok "the source QEMU goes on (cont)" "$(q "$SRC" '{"execute":"cont"}')"
    host_check "the source guest goes on with verified I/O after the failed switch" source_runs
    start_dst 3
fi

# 4. The migration.
migrate_and_wait
if [[ $status != completed ]]; then
    echo "FAIL: migration ended '$status'"
    exit 1
fi
echo "migration: total $(field "$info" "r['return'].get('total-time')") ms, downtime $(field "$info" "r['return'].get('downtime')") ms, RAM transferred $(field "$info" "r['return']['ram']['transferred'] // 1048576") MiB, dirty-sync-count $(field "$info" "r['return']['ram'].get('dirty-sync-count')")"

# 5. The switch: A lets go of the image, B takes it with the guest's write
#    cache, the source QEMU (paused, postmigrate) quits, the destination
#    goes on. (The source's run-guest.sh then says "no GUEST-EXIT-CODE
#    marker": expected, the guest ends on the destination.)
echo "source: $(q "$SRC" '{"execute":"query-status"}')"
if [[ $backend == vub ]]; then
    expect_ok "A inactivates" "$(q "$A" '{"execute":"blockdev-set-active","arguments":{"active":false}}')"
    wt_now=$(field "$(q "$A" '{"execute":"query-block-exports"}')" "str(r['return'][0]['writethrough']).lower()")
    expect_ok "B takes the guest's write cache (writethrough=$wt_now)" \
        "$(q "$B" "{\"execute\":\"x-block-export-set-writethrough\",\"arguments\":{\"id\":\"e0\",\"writethrough\":$wt_now}}")"
    expect_ok "B activates" "$(q "$B" '{"execute":"blockdev-set-active","arguments":{"active":true}}')"
fi
q "$SRC" '{"execute":"quit"}' >/dev/null || true
wait "$src_pid" 2>/dev/null || true
echo "cont: $(q "$dst" '{"execute":"cont"}')"
echo "destination: $(q "$dst" '{"execute":"query-status"}')"

guest_rc=0
wait "$dst_pid" || guest_rc=$?
echo "--- source console"; cat "$work/src.log"
echo "--- destination console"; cat "$work/dst"*.log | tail -n 60
final_log=$(ls -t "$work"/dst*.log | head -n1)

host_check "fio was still running when the source stopped (no FIO-DONE on the source console)" "! grep -q FIO-DONE '$work/src.log'"
host_check "the guest finished on the destination (FIO-DONE there)" "grep -q FIO-DONE '$final_log'"
host_check "guest checks passed on the destination (fio err=0, no I/O error)" "[[ $guest_rc -eq 0 ]]"
if [[ $wt == 1 ]]; then
    host_check "B serves the guest write-through" \
        "[[ \$(field \"\$(q $B '{\"execute\":\"query-block-exports\"}')\" \"r['return'][0]['writethrough']\") == True ]]"
fi
if [[ $backend == vub ]]; then
    for f in a b; do
        q "$work/$f-qmp.sock" '{"execute":"quit"}' >/dev/null || true
    done
    for f in a b; do
        p=${f}_pid
        wait "${!p}" 2>/dev/null || true
    done
    if [[ $format == qcow2 ]]; then
        check_out=$(qemu-img check "$work/d.img" 2>&1) && check_rc=0 || check_rc=$?
        echo "$check_out"
        host_check "qemu-img check of the image after both daemons exited (rc $check_rc)" "[[ $check_rc -eq 0 ]]"
    fi
fi
for f in a b; do echo "--- daemon $f log"; cat "$work/$f.log"; done
echo "guest migrate ($backend, $format): $pass passed, $fail failed"
[[ $fail -eq 0 ]]
