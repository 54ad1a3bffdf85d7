#!/usr/bin/env bash
# A/B benchmark: vhost-user-blkd ("ours") vs qemu-storage-daemon ("theirs").
#
# Both daemons get identical --blockdev/--export arguments on the same backing;
# vub-bench (bench/) drives the vhost-user-blk socket. Every run starts a fresh
# daemon, waits for its socket, runs the client, and kills the daemon. Runs are
# interleaved A/B/C/A/B/C over --repeats (one run of every column per repeat);
# the report gives per cell the median, min-max and the spread (max/min - 1).
#
# Columns: vub (ours, default export: adaptive polling up to 32 us, which
# stops where it costs more than sleeping), vub-event (ours, poll-max-ns=0:
# event driven only), qsd-iothread (the reference), optionally
# qsd-main, and fio-host (fio straight on the image file, disk backing's 128k
# sequential cases only).
#
# Usage: scripts/bench.sh [options]
#   --only-qsd            run only the QSD column(s) (also automatic when VUB_BIN
#                         is not an executable)
#   --vub-variants LIST   comma list of our daemon's variants: default (label
#                         vub, the export's defaults), event (label vub-event,
#                         poll-max-ns=0), poll (label vub-poll,
#                         poll-max-ns=--poll-max-ns) and nosandbox (label
#                         vub-nosb: default with --sandbox off, to measure what
#                         the sandbox costs); default default,event. (Before
#                         adaptive polling became the export's default, label
#                         vub was poll-max-ns=0, the variant named event.)
#   --poll-max-ns N       the vub-poll variant's poll-max-ns (default 32768, as
#                         QEMU's iothreads); QSD's command line is not changed
#   --qsd VARIANT         QSD variant(s) to measure: iothread (default; export
#                         moved to --object iothread,id=iot0), main (export in
#                         the main loop) or both. The first one is the reference.
#   --quick               smoke run: 1 repeat, 2 s, 0.5 s ramp, fewer cases,
#                         backings null,shm
#   --repeats N           repeats per backend per case (default 3)
#   --runtime S           measured seconds per run (default 5)
#   --ramp S              warm-up seconds per run (default 1)
#   --backings LIST       comma list of null,shm,disk,qc2-pre,qc2-grow,nbd (default:
#                         the first five); "qcow2" stands for qc2-pre,qc2-grow, so
#                         `--backings qcow2` runs only the qcow2 cases; nbd = an
#                         nbd node (both daemons' nbd driver) on qemu-nbd serving
#                         a raw file on /dev/shm over a UNIX socket, qemu-nbd
#                         pinned to the client CPU (scripts/bench-nbd.sh);
#                         luks = a LUKS1 volume (aes-256-xts-plain64, made by
#                         qemu-img) on /dev/shm, driver=luks over a file node
#                         (scripts/bench-luks.sh)
#   --cases LIST          comma list of case-name globs, e.g. 'randread-*,read-128k*';
#                         cases: randread-4k-qd{1,8,32,128}-q1, randread-4k-qd32-q{2,4},
#                         the same for randwrite (but qd8), read-128k-qd32-q1,
#                         write-128k-qd32-q1. The q2 cases and randread qd8 run on
#                         the null backing only; the qcow2
#                         backings run only rand{read,write}-4k-qd32-q{1,4}.
#   --placements LIST     comma list of same,split,both (default split, where VMs
#                         run: the daemon's iothread and the vCPU on different CPUs):
#                         same = backend and client on CPU B; split = backend on
#                         B, client on C; both = backend and client each under
#                         taskset -c B,C (the kernel may spread their threads)
#   --disk-dir DIR        directory for the cache.direct=on images, raw and qcow2
#                         (default /var/tmp)
#   --file-size SIZE      size of the image files in MiB (default 1024; also the
#                         virtual size of the qc2-pre image)
#   --qcow2-prealloc MODE preallocation of the qc2-pre image: falloc (default),
#                         metadata or full (qemu-img create -o preallocation=MODE).
#                         With falloc or metadata, reads of never-written clusters
#                         get zeroes from the host filesystem without device I/O;
#                         full writes the zeroes (slower to create) so reads hit
#                         the device as in the raw disk case
#   --qcow2-grow-size GIB virtual size of the empty qc2-grow image (default 48;
#                         lowered to what --disk-dir can hold fully allocated)
#   --client-poll         run vub-bench with --poll (busy-polling poll queues)
#   --queue-size N        virtqueue size the client asks for (default 1024; each
#                         request takes 3 descriptors, so QD128 needs >= 384)
#   --cpus B,C            backend CPU and client CPU for "split" (default 0,1);
#                         "same-cpu" puts both on B, "both" lets each use B and C
#   --out DIR             output directory (default target/bench/<timestamp>):
#                         report.txt, results.jsonl, commands.txt, logs/
#   -h, --help
#
# qcow2 backings (qc2-pre: preallocated image of --file-size MiB; qc2-grow: empty
# image of --qcow2-grow-size GiB that grows as the run writes): the image is made
# with qemu-img in --disk-dir, and used through a file node with cache.direct=on
# (O_DIRECT) under a qcow2 node, by both daemons. Every run, reads included, gets a
# freshly created image, so each daemon starts from the same state. After each
# write run `qemu-img check` verifies the image and counts its clusters; the
# report lists how much of the qc2-grow image a run allocated (if a run fills a
# large share, its later writes were overwrites, not allocations).
#
# fio-host: for the disk backing's read-128k-qd32-q1 and write-128k-qd32-q1, each
# repeat also runs fio directly on the same image file (io_uring, O_DIRECT, the
# case's bs/iodepth/rw, numjobs=1, the same runtime and ramp), pinned like the
# backend of the placement: what the host itself gets from the image file with
# that I/O pattern, a yardstick for the daemons' MiB/s.
# Skipped with a note when fio is not installed.
#
# Report: per case a table of every column and the ratios of each vub variant
# to the reference; then the summary blocks: one per vub variant (IOPS or MiB/s
# and IOPS per backend CPU-second vs the reference), latency at QD1 (p50/p99
# ratios vub variant / reference, < 1 = ours lower), queue scaling (median IOPS
# of the q2 and q4 cases / the q1 case of the same rw, bs and iodepth, per
# backing, placement and daemon; vub runs one iothread per queue, qsd-iothread
# all queues in one iothread) and the host baseline (daemon MiB/s / fio-host).
#
# Use a quiet machine: the report's oCPU% column shows CPU used by other
# processes during each run and flags disturbed runs.
#
# Environment: VUB_BIN (default target/release/vhost-user-blkd; may point to a
# wrapper such as bench/qsd-wrapper.sh), QSD_BIN (default qemu-storage-daemon),
# VUB_BENCH (default: built with cargo into ${CARGO_TARGET_DIR:-target}), FIO_BIN
# (default fio). A VUB_BIN named qsd-wrapper* gets no poll-max-ns (QSD's export
# does not know it), so only its event variant runs.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VUB_BIN=${VUB_BIN:-$ROOT/target/release/vhost-user-blkd}
QSD_BIN=${QSD_BIN:-qemu-storage-daemon}
COMPARE="$ROOT/bench/compare.py"

ONLY_QSD=0
QSD_VARIANTS=iothread
VUB_VARIANTS=default,event
POLL_MAX_NS=32768
FIO_BIN=${FIO_BIN:-fio}
QUICK=0
REPEATS=
RUNTIME=
RAMP=
BACKINGS=
CASES=
PLACEMENTS=split
DISK_DIR=/var/tmp
FILE_MIB=1024
QCOW2_PREALLOC=falloc
QCOW2_GROW_GIB=48
CLIENT_POLL=0
QUEUE_SIZE=1024
CPUS=0,1
OUT=

die() { echo "bench.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --only-qsd) ONLY_QSD=1 ;;
        --qsd) QSD_VARIANTS=${2:?}; shift ;;
        --vub-variants) VUB_VARIANTS=${2:?}; shift ;;
        --poll-max-ns) POLL_MAX_NS=${2:?}; shift ;;
        --quick) QUICK=1 ;;
        --repeats) REPEATS=${2:?}; shift ;;
        --runtime) RUNTIME=${2:?}; shift ;;
        --ramp) RAMP=${2:?}; shift ;;
        --backings) BACKINGS=${2:?}; shift ;;
        --cases) CASES=${2:?}; shift ;;
        --placements) PLACEMENTS=${2:?}; shift ;;
        --disk-dir) DISK_DIR=${2:?}; shift ;;
        --file-size) FILE_MIB=${2:?}; shift ;;
        --qcow2-prealloc) QCOW2_PREALLOC=${2:?}; shift ;;
        --qcow2-grow-size) QCOW2_GROW_GIB=${2:?}; shift ;;
        --client-poll) CLIENT_POLL=1 ;;
        --queue-size) QUEUE_SIZE=${2:?}; shift ;;
        --cpus) CPUS=${2:?}; shift ;;
        --out) OUT=${2:?}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

if [[ $QUICK == 1 ]]; then
    : "${REPEATS:=1}" "${RUNTIME:=2}" "${RAMP:=0.5}" "${BACKINGS:=null,shm}"
    : "${CASES:=randread-4k-qd1-q1,randread-4k-qd32-q1,randwrite-4k-qd32-q1,read-128k-qd32-q1}"
fi
: "${REPEATS:=3}" "${RUNTIME:=5}" "${RAMP:=1}" "${BACKINGS:=null,shm,disk,qc2-pre,qc2-grow}" "${CASES:=*}"
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || die "--repeats must be a positive integer"
[[ $FILE_MIB =~ ^[1-9][0-9]*$ ]] || die "--file-size is in MiB (integer)"
[[ $QCOW2_GROW_GIB =~ ^[1-9][0-9]*$ ]] || die "--qcow2-grow-size is in GiB (integer)"
[[ $QCOW2_PREALLOC =~ ^(falloc|metadata|full)$ ]] || die "--qcow2-prealloc must be falloc, metadata or full"
case $QSD_VARIANTS in
    iothread) QSD_VARIANTS=(iothread) ;;
    main) QSD_VARIANTS=(main) ;;
    both) QSD_VARIANTS=(iothread main) ;;
    *) die "--qsd must be iothread, main or both" ;;
esac
[[ $POLL_MAX_NS =~ ^[1-9][0-9]*$ && $POLL_MAX_NS -le 1000000000 ]] ||
    die "--poll-max-ns must be an integer in 1..1000000000"
IFS=, read -ra vv <<<"$VUB_VARIANTS"
VUB_VARIANT_LIST=()
for v in "${vv[@]}"; do
    [[ $v =~ ^(default|event|poll|nosandbox)$ ]] || die "unknown --vub-variants entry '$v' (default, event, poll, nosandbox)"
    [[ " ${VUB_VARIANT_LIST[*]} " == *" $v "* ]] || VUB_VARIANT_LIST+=("$v")
done
[[ ${#VUB_VARIANT_LIST[@]} -gt 0 ]] || die "--vub-variants selects no variant"
[[ $CPUS =~ ^[0-9]+,[0-9]+$ ]] || die "--cpus must be B,C (two CPU numbers)"
BCPU=${CPUS%,*}
CCPU=${CPUS#*,}

command -v "$QSD_BIN" >/dev/null || die "$QSD_BIN not found (apt-get install qemu-system-common)"
command -v taskset >/dev/null || die "taskset not found (util-linux)"
command -v python3 >/dev/null || die "python3 not found"

if [[ $ONLY_QSD == 0 && ! -x $VUB_BIN ]]; then
    echo "bench.sh: VUB_BIN=$VUB_BIN is not executable; running the QSD column(s) only" >&2
    ONLY_QSD=1
fi
# The QSD stand-in (bench/qsd-wrapper.sh) passes our --export string to QSD,
# which rejects poll-max-ns: give it none, and run only the default variant.
VUB_POLL_OPT=1
if [[ $ONLY_QSD == 0 && $(basename "$VUB_BIN") == qsd-wrapper* ]]; then
    VUB_POLL_OPT=0
    if [[ " ${VUB_VARIANT_LIST[*]} " != " default " ]]; then
        echo "bench.sh: VUB_BIN is the QSD wrapper (no poll-max-ns): running only the default variant" >&2
        VUB_VARIANT_LIST=(default)
    fi
fi
FIO_NOTE=
if ! command -v "$FIO_BIN" >/dev/null; then
    FIO_NOTE="$FIO_BIN not found: no fio-host baseline (apt-get install fio)"
    FIO_BIN=
fi

if [[ -z ${VUB_BENCH:-} ]]; then
    echo "bench.sh: building vub-bench..." >&2
    (cd "$ROOT" && cargo build --release --quiet -p vub-bench) || die "building vub-bench failed"
    VUB_BENCH=${CARGO_TARGET_DIR:-$ROOT/target}/release/vub-bench
fi
[[ -x $VUB_BENCH ]] || die "vub-bench not found at $VUB_BENCH"

NCPU=$(nproc)
if [[ $NCPU -lt 2 && ( $PLACEMENTS == *split* || $PLACEMENTS == *both* ) ]]; then
    echo "bench.sh: only $NCPU CPU: skipping the split and both placements" >&2
    PLACEMENTS=same
fi

OUT=${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
RESULTS=$OUT/results.jsonl
COMMANDS=$OUT/commands.txt
: >"$RESULTS"
: >"$COMMANDS"
WORK=$(mktemp -d /tmp/vub-bench.XXXXXX)

DAEMON_PID=
SHM_IMG=
DISK_IMG=
QCOW2_IMG=
NBD_IMG=
NBD_PID=
LUKS_IMG=
# shellcheck disable=SC2317 # invoked via trap
cleanup() {
    if [[ -n $DAEMON_PID ]]; then
        kill -KILL "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    [[ -n $SHM_IMG ]] && rm -f "$SHM_IMG"
    [[ -n $DISK_IMG ]] && rm -f "$DISK_IMG"
    [[ -n $QCOW2_IMG ]] && rm -f "$QCOW2_IMG"
    if [[ -n $NBD_PID ]]; then
        kill "$NBD_PID" 2>/dev/null || true
        wait "$NBD_PID" 2>/dev/null || true
    fi
    [[ -n $NBD_IMG ]] && rm -f "$NBD_IMG"
    [[ -n $LUKS_IMG ]] && rm -f "$LUKS_IMG"
    return 0
}
trap cleanup EXIT
# bash defers traps while a foreground child runs, and a client killed by the
# same Ctrl-C looks like an ordinary failure: remember and check explicitly.
INTERRUPTED=0
trap 'INTERRUPTED=1' INT TERM

# ---------------------------------------------------------------- cases
# name rw bs iodepth queues
ALL_CASES=(
    "randread-4k-qd1-q1 randread 4k 1 1"
    "randread-4k-qd8-q1 randread 4k 8 1"
    "randread-4k-qd32-q1 randread 4k 32 1"
    "randread-4k-qd128-q1 randread 4k 128 1"
    "randread-4k-qd32-q2 randread 4k 32 2"
    "randread-4k-qd32-q4 randread 4k 32 4"
    "randwrite-4k-qd1-q1 randwrite 4k 1 1"
    "randwrite-4k-qd32-q1 randwrite 4k 32 1"
    "randwrite-4k-qd128-q1 randwrite 4k 128 1"
    "randwrite-4k-qd32-q2 randwrite 4k 32 2"
    "randwrite-4k-qd32-q4 randwrite 4k 32 4"
    "read-128k-qd32-q1 read 128k 32 1"
    "write-128k-qd32-q1 write 128k 32 1"
)

# The qcow2 backings run only these (4k random, QD32, 1 and 4 queues).
QCOW2_CASES=" randread-4k-qd32-q1 randread-4k-qd32-q4 randwrite-4k-qd32-q1 randwrite-4k-qd32-q4 "
# Only the null backing runs these (with q1 and q4: the queue-scaling view).
NULL_ONLY_CASES=" randread-4k-qd8-q1 randread-4k-qd32-q2 randwrite-4k-qd32-q2 "
# The fio-host baseline runs for these cases of the disk backing.
FIO_CASES=" read-128k-qd32-q1 write-128k-qd32-q1 "

case_applies() { # backing case-name
    case $1 in
        qc2-*) [[ $QCOW2_CASES == *" $2 "* ]] ;;
        null) return 0 ;;
        *) [[ $NULL_ONLY_CASES != *" $2 "* ]] ;;
    esac
}

fio_applies() { # backing case-name
    [[ -n $FIO_BIN && $1 == disk && $FIO_CASES == *" $2 "* ]]
}

case_selected() {
    local name=$1 pat
    IFS=, read -ra pats <<<"$CASES"
    for pat in "${pats[@]}"; do
        # shellcheck disable=SC2053 # glob match intended
        [[ $name == $pat ]] && return 0
    done
    return 1
}

SELECTED=()
for c in "${ALL_CASES[@]}"; do
    case_selected "${c%% *}" && SELECTED+=("$c")
done
[[ ${#SELECTED[@]} -gt 0 ]] || die "--cases '$CASES' selects no case"

IFS=, read -ra BACKING_LIST <<<"${BACKINGS//qcow2/qc2-pre,qc2-grow}"
IFS=, read -ra PLACEMENT_LIST <<<"$PLACEMENTS"
for b in "${BACKING_LIST[@]}"; do
    [[ $b =~ ^(null|shm|disk|qc2-pre|qc2-grow|nbd|luks)$ ]] || die "unknown backing '$b'"
done
# Cases per backing; a backing none of whose cases is selected is dropped.
declare -A BACKING_CASES
backings=()
for b in "${BACKING_LIST[@]}"; do
    [[ -n ${BACKING_CASES[$b]+x} ]] && continue # listed twice
    n=0
    for c in "${SELECTED[@]}"; do
        case_applies "$b" "${c%% *}" && n=$((n + 1))
    done
    if [[ $n == 0 ]]; then
        echo "bench.sh: no selected case applies to backing $b (qcow2 backings run only:${QCOW2_CASES% };" \
             "only null runs:${NULL_ONLY_CASES% }); skipping it" >&2
        continue
    fi
    BACKING_CASES[$b]=$n
    backings+=("$b")
done
BACKING_LIST=("${backings[@]}")
[[ ${#BACKING_LIST[@]} -gt 0 ]] || die "--backings '$BACKINGS' with --cases '$CASES' selects no run"
BACKINGS=$(IFS=,; echo "${BACKING_LIST[*]}")
QCOW2=0
[[ ,$BACKINGS, == *,qc2-* ]] && QCOW2=1
if [[ $QCOW2 == 1 ]]; then
    command -v qemu-img >/dev/null || die "qemu-img not found (apt-get install qemu-utils)"
    mkdir -p "$DISK_DIR"
fi
# The qc2-grow image must fit in --disk-dir even when fully allocated (plus the
# raw disk image and a reserve), so no run can meet ENOSPC; only one qcow2
# image exists at a time (each is deleted after its run).
QCOW2_GROW_NOTE=
if [[ ,$BACKINGS, == *,qc2-grow,* ]]; then
    avail_gib=$(df -Pk "$DISK_DIR" | awk 'NR == 2 { print int($4 / 1048576) }')
    max_gib=$(( avail_gib - 4 ))
    [[ ,$BACKINGS, == *,disk,* ]] && max_gib=$(( max_gib - (FILE_MIB + 1023) / 1024 ))
    if [[ $max_gib -lt $QCOW2_GROW_GIB ]]; then
        [[ $max_gib -ge 4 ]] || die "$DISK_DIR has ${avail_gib} GiB free: too little for the qc2-grow image"
        QCOW2_GROW_NOTE=" (lowered from $QCOW2_GROW_GIB GiB: $DISK_DIR has ${avail_gib} GiB free)"
        echo "bench.sh: qc2-grow image size lowered to $max_gib GiB$QCOW2_GROW_NOTE" >&2
        QCOW2_GROW_GIB=$max_gib
    fi
fi
for p in "${PLACEMENT_LIST[@]}"; do
    [[ $p =~ ^(same|split|both)$ ]] || die "unknown placement '$p'"
done
# Whether a selected case gets the fio-host baseline (if fio is there).
FIO_WANTED=0
if [[ ,$BACKINGS, == *,disk,* ]]; then
    for c in "${SELECTED[@]}"; do
        [[ $FIO_CASES == *" ${c%% *} "* ]] && FIO_WANTED=1
    done
fi

# Backends in run order: label role
BACKENDS=()
if [[ $ONLY_QSD == 0 ]]; then
    for v in "${VUB_VARIANT_LIST[@]}"; do
        case $v in
            default) BACKENDS+=("vub ours") ;;
            event) BACKENDS+=("vub-event ours") ;;
            poll) BACKENDS+=("vub-poll ours") ;;
            nosandbox) BACKENDS+=("vub-nosb ours") ;;
        esac
    done
fi
first=1
for v in "${QSD_VARIANTS[@]}"; do
    if [[ $first == 1 ]]; then BACKENDS+=("qsd-$v theirs"); first=0
    else BACKENDS+=("qsd-$v other"); fi
done

# ---------------------------------------------------------------- helpers
# Shell-quote a command line, leaving plain words (QEMU-style option lists) readable.
quote() {
    local out='' a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./=,:+@%-]+$ ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    echo "${out% }"
}

make_image() { # path direct(0/1)
    local flag=()
    [[ $2 == 1 ]] && flag=(oflag=direct)
    echo "bench.sh: writing ${FILE_MIB} MiB image $1" >&2
    dd if=/dev/zero of="$1" bs=1M count="$FILE_MIB" "${flag[@]}" conv=fsync status=none
}

# Sets BLOCKDEV_ARGS and NODE for a backing.
blockdev_args() {
    case $1 in
        null)
            BLOCKDEV_ARGS=(--blockdev "driver=null-co,node-name=n0,size=$((FILE_MIB << 20))")
            NODE=n0 ;;
        shm|disk)
            local img=$SHM_IMG direct=off
            [[ $1 == disk ]] && { img=$DISK_IMG; direct=on; }
            BLOCKDEV_ARGS=(--blockdev "driver=file,node-name=f0,filename=$img,cache.direct=$direct"
                           --blockdev "driver=raw,node-name=d0,file=f0")
            NODE=d0 ;;
        qc2-*)
            BLOCKDEV_ARGS=(--blockdev "driver=file,node-name=f0,filename=$QCOW2_IMG,cache.direct=on"
                           --blockdev "driver=qcow2,node-name=d0,file=f0")
            NODE=d0 ;;
        nbd)
            BLOCKDEV_ARGS=(--blockdev "driver=nbd,node-name=d0,server.type=unix,server.path=$NBD_SOCK")
            NODE=d0 ;;
        luks)
            BLOCKDEV_ARGS=(--object "secret,id=sec0,file=$WORK/luks.pw"
                           --blockdev "driver=file,node-name=f0,filename=$LUKS_IMG,cache.direct=off"
                           --blockdev "driver=luks,node-name=d0,file=f0,key-secret=sec0")
            NODE=d0 ;;
    esac
}

# Sets QCOW2_CREATE (the qemu-img command line) for a qcow2 backing.
qcow2_create_cmd() {
    case $1 in
        qc2-pre) QCOW2_CREATE=(qemu-img create -q -f qcow2 -o "preallocation=$QCOW2_PREALLOC"
                               "$QCOW2_IMG" "$((FILE_MIB << 20))") ;;
        qc2-grow) QCOW2_CREATE=(qemu-img create -q -f qcow2 "$QCOW2_IMG" "$((QCOW2_GROW_GIB << 30))") ;;
    esac
}

# A fresh qcow2 image for one run: created, flushed, and dropped from the page
# cache (the daemons use O_DIRECT), so no write-back of it falls in the run.
make_qcow2() { # backing
    rm -f "$QCOW2_IMG"
    qcow2_create_cmd "$1"
    "${QCOW2_CREATE[@]}" || die "creating the $1 image failed: ${QCOW2_CREATE[*]}"
    sync -f "$QCOW2_IMG"
    dd if=/dev/null of="$QCOW2_IMG" oflag=nocache conv=notrunc,fdatasync count=0 status=none
}

# After a write run: `qemu-img check` the image. Sets QCOW2_CHECK_META (for
# results.jsonl) and QCOW2_CHECK_ERR (non-empty if the image is corrupt).
check_qcow2() {
    local out rc=0
    QCOW2_CHECK_META=()
    QCOW2_CHECK_ERR=
    out=$(qemu-img check --output=json "$QCOW2_IMG" 2>"$WORK/check.err") || rc=$?
    # 0: clean; 3: leaked clusters only (harmless, e.g. after a SIGKILL);
    # 2: corruptions; 1: the check could not complete; 63: not supported.
    local fields
    fields=$(python3 -c '
import json, sys
try:
    d = json.loads(sys.stdin.read())
except ValueError:
    d = {}
print(d.get("allocated-clusters", "-"), d.get("total-clusters", "-"), d.get("leaks", 0),
      d.get("corruptions", 0), d.get("image-end-offset", "-"))' <<<"$out")
    local alloc total leaks corrupt end
    read -r alloc total leaks corrupt end <<<"$fields"
    QCOW2_CHECK_META=(qcow2_check_rc="$rc" qcow2_allocated_clusters="$alloc"
                      qcow2_total_clusters="$total" qcow2_leaks="$leaks"
                      qcow2_corruptions="$corrupt" qcow2_image_end="$end")
    if [[ $rc != 0 && $rc != 3 ]]; then
        QCOW2_CHECK_ERR="qemu-img check exit $rc (corruptions=$corrupt): $(tr '\n' ' ' <"$WORK/check.err")"
    fi
}

# Sets DAEMON_CMD for backend label, socket, queues.
daemon_cmd() {
    local label=$1 sock=$2 q=$3
    local export="type=vhost-user-blk,id=e0,node-name=$NODE,addr.type=unix,addr.path=$sock,num-queues=$q,writable=on"
    case $label in
        vub) DAEMON_CMD=("$VUB_BIN" "${BLOCKDEV_ARGS[@]}" --export "$export") ;;
        vub-event) DAEMON_CMD=("$VUB_BIN" "${BLOCKDEV_ARGS[@]}" --export "$export,poll-max-ns=0") ;;
        vub-poll) DAEMON_CMD=("$VUB_BIN" "${BLOCKDEV_ARGS[@]}" --export "$export,poll-max-ns=$POLL_MAX_NS") ;;
        vub-nosb) DAEMON_CMD=("$VUB_BIN" --sandbox off "${BLOCKDEV_ARGS[@]}" --export "$export") ;;
        qsd-main) DAEMON_CMD=("$QSD_BIN" "${BLOCKDEV_ARGS[@]}" --export "$export") ;;
        qsd-iothread) DAEMON_CMD=("$QSD_BIN" "${BLOCKDEV_ARGS[@]}" --object 'iothread,id=iot0'
                                  --export "$export,iothread=iot0") ;;
    esac
}

stop_daemon() {
    local pid=$DAEMON_PID i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    DAEMON_PID=
}

# Sets PB and PC, the CPU lists (taskset -c) of backend and client for a placement.
placement_cpus() {
    case $1 in
        same-cpu) PB=$BCPU PC=$BCPU ;;
        split) PB=$BCPU PC=$CCPU ;;
        both) PB=$BCPU,$CCPU PC=$BCPU,$CCPU ;;
    esac
}

RUN_NO=0
RUN_TOTAL=0
FAILED=0

run_one() { # backing case-spec placement repeat label role
    local backing=$1 spec=$2 placement=$3 rep=$4 label=$5 role=$6
    local name rw bs qd q
    read -r name rw bs qd q <<<"$spec"
    placement_cpus "$placement"
    local bcpu=$PB ccpu=$PC
    local sock=$WORK/vhost-user-blk.sock
    local log=$OUT/logs/$backing-$name-$placement-$rep-$label.log
    rm -f "$sock"
    if [[ $backing == qc2-* ]]; then
        make_qcow2 "$backing"
        printf 'image (%s): %s\n' "$backing" "$(quote "${QCOW2_CREATE[@]}")" >>"$COMMANDS"
    fi
    blockdev_args "$backing"
    daemon_cmd "$label" "$sock" "$q"
    local client=("$VUB_BENCH" --socket "$sock" --rw "$rw" --bs "$bs" --iodepth "$qd"
                  --queues "$q" --queue-size "$QUEUE_SIZE" --runtime "$RUNTIME" --ramp "$RAMP" --json)
    [[ $CLIENT_POLL == 1 ]] && client+=(--poll)
    local dcmd ccmd
    dcmd="taskset -c $bcpu $(quote "${DAEMON_CMD[@]}")"
    ccmd="taskset -c $ccpu $(quote "${client[@]}") --backend-pid PID"
    printf 'daemon (%s, %s, num-queues=%s): %s\n' "$backing" "$label" "$q" "$dcmd" >>"$COMMANDS"
    printf 'client (%s, %s): %s\n' "$name" "$placement" "$ccmd" >>"$COMMANDS"

    RUN_NO=$((RUN_NO + 1))
    printf '[%d/%d] %s %s %s rep %d %s: ' "$RUN_NO" "$RUN_TOTAL" "$backing" "$name" \
        "$placement" "$rep" "$label" >&2

    local err='' rc=0

    taskset -c "$bcpu" "${DAEMON_CMD[@]}" >"$log" 2>&1 &
    DAEMON_PID=$!
    local meta=(backing="$backing" case="$name" placement="$placement" repeat="$rep"
                backend="$label" role="$role" rw="$rw" bs="$bs" iodepth="$qd" queues="$q"
                backend_cpu="$bcpu" client_cpu="$ccpu" daemon_pid="$DAEMON_PID"
                daemon_cmd="$dcmd" client_cmd="${ccmd/%PID/$DAEMON_PID}")
    local i
    for ((i = 0; i < 200; i++)); do
        [[ -S $sock ]] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.05
    done
    if [[ ! -S $sock ]]; then
        err="daemon did not create $sock: $(tail -n 3 "$log" | tr '\n' ' ')"
    else
        local out limit
        limit=$(python3 -c "print(int($RAMP + $RUNTIME + 60))")
        out=$(taskset -c "$ccpu" timeout --foreground "$limit" "${client[@]}" --backend-pid "$DAEMON_PID" \
              2>"$WORK/client.err") || rc=$?
        if [[ $rc != 0 ]]; then
            err="vub-bench exit $rc: $(tr '\n' ' ' <"$WORK/client.err")"
        fi
    fi
    stop_daemon
    if [[ $INTERRUPTED == 1 || ${rc:-0} == 130 || ${rc:-0} == 143 ]]; then
        echo "interrupted" >&2
        exit 130
    fi
    if [[ $backing == qc2-* ]]; then
        meta+=(qcow2_image_cmd="$(quote "${QCOW2_CREATE[@]}")")
        if [[ $rw == *write* ]]; then
            check_qcow2
            meta+=("${QCOW2_CHECK_META[@]}")
            [[ -z $err && -n $QCOW2_CHECK_ERR ]] && err=$QCOW2_CHECK_ERR
        fi
        rm -f "$QCOW2_IMG"
    fi

    if [[ -n $err ]]; then
        FAILED=$((FAILED + 1))
        echo "FAILED: $err" >&2
        python3 "$COMPARE" wrap "${meta[@]}" --error "$err" >>"$RESULTS"
    else
        python3 "$COMPARE" wrap "${meta[@]}" <<<"$out" >>"$RESULTS"
        local iops mibs
        iops=$(grep -o '"iops":[0-9.]*' <<<"$out" | head -n1 | cut -d: -f2)
        mibs=$(grep -o '"mib_s":[0-9.]*' <<<"$out" | head -n1 | cut -d: -f2)
        printf '%.0f IOPS, %.0f MiB/s\n' "$iops" "$mibs" >&2
    fi
}

# fio directly on the disk image: the host's baseline for a sequential case.
# Pinned like the placement's backend; recorded as backend fio-host.
ms() { python3 -c "print(max(1, round($1 * 1000)))"; } # seconds -> integer ms

run_fio() { # backing case-spec placement repeat
    local backing=$1 spec=$2 placement=$3 rep=$4 label=fio-host
    local name rw bs qd q
    read -r name rw bs qd q <<<"$spec"
    placement_cpus "$placement"
    local bcpu=$PB
    # fio takes no fractional seconds ("0.5" is 0): give it milliseconds.
    local cmd=("$FIO_BIN" --name=fio-host "--filename=$DISK_IMG" --ioengine=io_uring --direct=1
               "--bs=$bs" "--iodepth=$qd" "--rw=$rw" --time_based "--runtime=$(ms "$RUNTIME")ms"
               "--ramp_time=$(ms "$RAMP")ms" --numjobs=1 --output-format=json)
    local fcmd
    fcmd="taskset -c $bcpu $(quote "${cmd[@]}")"
    printf 'fio (%s, %s): %s\n' "$name" "$placement" "$fcmd" >>"$COMMANDS"

    RUN_NO=$((RUN_NO + 1))
    printf '[%d/%d] %s %s %s rep %d %s: ' "$RUN_NO" "$RUN_TOTAL" "$backing" "$name" \
        "$placement" "$rep" "$label" >&2
    local meta=(backing="$backing" case="$name" placement="$placement" repeat="$rep"
                backend="$label" role=baseline rw="$rw" bs="$bs" iodepth="$qd" queues="$q"
                backend_cpu="$bcpu" client_cpu="$bcpu" fio_cmd="$fcmd")
    local out err='' rc=0 limit
    limit=$(python3 -c "print(int($RAMP + $RUNTIME + 60))")
    out=$(taskset -c "$bcpu" timeout --foreground "$limit" "${cmd[@]}" 2>"$WORK/fio.err") || rc=$?
    if [[ $INTERRUPTED == 1 || $rc == 130 || $rc == 143 ]]; then
        echo "interrupted" >&2
        exit 130
    fi
    [[ $rc == 0 ]] || err="fio exit $rc: $(tail -n 3 "$WORK/fio.err" | tr '\n' ' ')"
    if [[ -n $err ]]; then
        FAILED=$((FAILED + 1))
        echo "FAILED: $err" >&2
        python3 "$COMPARE" wrap "${meta[@]}" --error "$err" >>"$RESULTS"
        return
    fi
    local line
    line=$(python3 "$COMPARE" wrap --fio "${meta[@]}" <<<"$out")
    echo "$line" >>"$RESULTS"
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
res = r.get("result")
print("%.0f IOPS, %.0f MiB/s" % (res["iops"], res["mib_s"]) if res else "FAILED: " + r["error"])
sys.exit(0 if res else 1)' "$line" >&2 || FAILED=$((FAILED + 1))
}

# ---------------------------------------------------------------- header
# Busy CPU of the whole machine over one second, in % of one CPU.
machine_busy_pct() {
    local a b
    read -ra a </proc/stat
    sleep 1
    read -ra b </proc/stat
    # cpu user nice system idle iowait irq softirq steal
    local busy=$(( (b[1] + b[2] + b[3] + b[6] + b[7]) - (a[1] + a[2] + a[3] + a[6] + a[7]) ))
    echo $(( busy * 100 / $(getconf CLK_TCK) ))
}

print_header() {
cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1)
[[ -n $cpu_model ]] || cpu_model=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)
echo "== vhost-user-blk A/B benchmark, $(date -Is)"
echo "host:       $(uname -n), kernel $(uname -r), $NCPU CPUs, $cpu_model"
echo "qsd:        $("$QSD_BIN" --version | head -n1)"
echo "vub-bench:  $("$VUB_BENCH" --version)"
if [[ $ONLY_QSD == 0 ]]; then
    echo "ours:       $VUB_BIN ($(timeout 5 "$VUB_BIN" --version 2>/dev/null | head -n1 || true))"
else
    echo "ours:       not run (QSD only)"
fi
echo "git:        $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
qsd_desc=()
for v in "${QSD_VARIANTS[@]}"; do
    case $v in
        iothread) qsd_desc+=("qsd-iothread (--object iothread,id=iot0, export iothread=iot0)") ;;
        main) qsd_desc+=("qsd-main (export in the main loop, no iothread)") ;;
    esac
done
echo "qsd variants: $(printf '%s; ' "${qsd_desc[@]}")reference: qsd-${QSD_VARIANTS[0]}"
if [[ $ONLY_QSD == 0 ]]; then
    vub_desc=()
    for v in "${VUB_VARIANT_LIST[@]}"; do
        case $v in
            default) vub_desc+=("vub ($([[ $VUB_POLL_OPT == 1 ]] && echo "the export's defaults: adaptive polling" || echo "QSD wrapper, no poll-max-ns"))") ;;
            event) vub_desc+=("vub-event (poll-max-ns=0, event driven)") ;;
            poll) vub_desc+=("vub-poll (poll-max-ns=$POLL_MAX_NS, adaptive polling)") ;;
            nosandbox) vub_desc+=("vub-nosb (as vub, with --sandbox off)") ;;
        esac
    done
    vub_desc_s=$(printf '%s; ' "${vub_desc[@]}")
    echo "vub variants: ${vub_desc_s%; }"
fi
if [[ $FIO_WANTED == 1 && -n $FIO_BIN ]]; then
    echo "fio-host:   $("$FIO_BIN" --version) on the disk image (io_uring, direct=1, numjobs=1), pinned like the backend; cases:${FIO_CASES% }"
elif [[ $FIO_WANTED == 1 ]]; then
    echo "fio-host:   skipped: $FIO_NOTE"
fi
echo "runs:       repeats=$REPEATS runtime=${RUNTIME}s ramp=${RAMP}s client=$([[ $CLIENT_POLL == 1 ]] && echo poll || echo event) queue-size=$QUEUE_SIZE"
echo "placement:  same = backend+client on CPU $BCPU; split = backend on CPU $BCPU, client on CPU $CCPU; both = backend and client each on CPUs $BCPU,$CCPU"
echo "backings:   ${BACKINGS} (null = null-co $FILE_MIB MiB; shm = raw file on /dev/shm, cache.direct=off; disk = raw file in $DISK_DIR, cache.direct=on)"
if [[ $QCOW2 == 1 ]]; then
    echo "qcow2:      file node cache.direct=on in $DISK_DIR under a qcow2 node (default options), a fresh image per run made by $(qemu-img --version | head -n1 | cut -d' ' -f1-3);"
    echo "            qc2-pre = preallocation=$QCOW2_PREALLOC, $FILE_MIB MiB; qc2-grow = empty, ${QCOW2_GROW_GIB} GiB virtual$QCOW2_GROW_NOTE;"
    echo "            cases:${QCOW2_CASES% }"
fi
echo "output:     $OUT"
local busy
busy=$(machine_busy_pct)
if [[ $busy -gt 10 ]]; then
    echo "WARNING:    the machine was ${busy}% busy (of one CPU) before the start: other work disturbs the numbers"
fi
}
print_header | tee "$OUT/report.txt"

for b in "${BACKING_LIST[@]}"; do
    case $b in
        shm) SHM_IMG=/dev/shm/vub-bench-$$.img; make_image "$SHM_IMG" 0 ;;
        disk) mkdir -p "$DISK_DIR"; DISK_IMG=$DISK_DIR/vub-bench-$$.img; make_image "$DISK_IMG" 1 ;;
        qc2-*) QCOW2_IMG=$DISK_DIR/vub-bench-$$.qcow2 ;; # made afresh for every run
        nbd)
            # One qemu-nbd for every run (persistent, 2 clients at once),
            # pinned to the client CPU: the daemons' CPU is theirs alone.
            NBD_IMG=/dev/shm/vub-bench-nbd-$$.img; make_image "$NBD_IMG" 0
            NBD_SOCK=$WORK/nbd.sock
            taskset -c "$CCPU" qemu-nbd -f raw -t -e 2 --cache=writeback --aio=threads \
                -k "$NBD_SOCK" "$NBD_IMG" 2>"$WORK/qemu-nbd.log" &
            NBD_PID=$!
            for ((i = 0; i < 100; i++)); do [[ -S $NBD_SOCK ]] && break; sleep 0.05; done
            [[ -S $NBD_SOCK ]] || die "qemu-nbd did not start: $(cat "$WORK/qemu-nbd.log")"
            printf 'server (nbd): taskset -c %s qemu-nbd -f raw -t -e 2 --cache=writeback --aio=threads -k SOCK %s\n' \
                "$CCPU" "$NBD_IMG" >>"$COMMANDS"
            ;;
        luks)
            # Both daemons open the same volume; its payload is filled
            # once so that reads decrypt written sectors.
            LUKS_IMG=/dev/shm/vub-bench-luks-$$.img
            printf 'bench-passphrase' >"$WORK/luks.pw"
            qemu-img create -q -f luks --object "secret,id=sec0,file=$WORK/luks.pw" \
                -o key-secret=sec0,iter-time=50 "$LUKS_IMG" "$((FILE_MIB << 20))" ||
                die "qemu-img create -f luks failed"
            qemu-io --object "secret,id=sec0,file=$WORK/luks.pw" --image-opts \
                    -c "write -P 0x5a 0 $((FILE_MIB << 20))" \
                    "driver=luks,key-secret=sec0,file.filename=$LUKS_IMG" >/dev/null ||
                die "filling the luks volume failed"
            printf 'image (luks): qemu-img create -f luks -o key-secret=sec0,iter-time=50 %s %s MiB\n' \
                "$LUKS_IMG" "$FILE_MIB" >>"$COMMANDS"
            ;;
    esac
done

RUN_TOTAL=0
for b in "${BACKING_LIST[@]}"; do
    RUN_TOTAL=$(( RUN_TOTAL + BACKING_CASES[$b] * ${#PLACEMENT_LIST[@]} * REPEATS * ${#BACKENDS[@]} ))
    for c in "${SELECTED[@]}"; do
        fio_applies "$b" "${c%% *}" && RUN_TOTAL=$(( RUN_TOTAL + ${#PLACEMENT_LIST[@]} * REPEATS ))
    done
done

# ---------------------------------------------------------------- runs
for backing in "${BACKING_LIST[@]}"; do
    for spec in "${SELECTED[@]}"; do
        case_applies "$backing" "${spec%% *}" || continue
        for p in "${PLACEMENT_LIST[@]}"; do
            placement=$p
            [[ $p == same ]] && placement=same-cpu
            for ((rep = 1; rep <= REPEATS; rep++)); do
                for be in "${BACKENDS[@]}"; do
                    read -r label role <<<"$be"
                    run_one "$backing" "$spec" "$placement" "$rep" "$label" "$role"
                done
                if fio_applies "$backing" "${spec%% *}"; then
                    run_fio "$backing" "$spec" "$placement" "$rep"
                fi
            done
        done
    done
done

# ---------------------------------------------------------------- report
# The qcow2 images after the write runs: allocation and `qemu-img check`.
QCOW2_GROW_WARN_PCT=10
qcow2_report() {
    python3 - "$RESULTS" "$QCOW2_GROW_WARN_PCT" <<'PY'
import json, statistics, sys
from collections import OrderedDict
path, warn_pct = sys.argv[1], float(sys.argv[2])
groups = OrderedDict()
for line in open(path):
    if not line.strip():
        continue
    r = json.loads(line)
    if "qcow2_check_rc" not in r:
        continue
    groups.setdefault((r["backing"], r["case"], r["placement"], r["backend"]), []).append(r)
if not groups:
    sys.exit(0)
def num(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
print("\n== qcow2 images after the write runs (qemu-img check; alloc % = allocated clusters"
      " / clusters of the virtual size)")
print(f"  {'backing':<8} {'case':<24} {'placement':<9} {'backend':<14} "
      f"{'clusters':>9} {'alloc %':>8} {'max %':>7} {'leaks':>5} {'check':>7}")
over = leaky = 0
for (backing, case, placement, backend), rs in groups.items():
    pcts, allocs = [], []
    leaks = sum(num(r.get("qcow2_leaks")) or 0 for r in rs)
    bad = [r for r in rs if r.get("qcow2_check_rc") not in ("0", "3")]
    for r in rs:
        a, t = num(r.get("qcow2_allocated_clusters")), num(r.get("qcow2_total_clusters"))
        if a is not None and t:
            allocs.append(a)
            pcts.append(100.0 * a / t)
    if backing == "qc2-grow":
        over += sum(1 for p in pcts if p > warn_pct)
    leaky += sum(1 for r in rs if r.get("qcow2_check_rc") == "3")
    med = lambda v, f: f.format(statistics.median(v)) if v else "-"
    check = "ok" if not bad else f"{len(bad)} BAD"
    print(f"  {backing:<8} {case:<24} {placement:<9} {backend:<14} "
          f"{med(allocs, '{:.0f}'):>9} {med(pcts, '{:.2f}'):>8} "
          f"{(f'{max(pcts):.2f}' if pcts else '-'):>7} {leaks:>5} {check:>7}")
if over:
    print(f"\nWARNING: {over} qc2-grow run(s) allocated more than {warn_pct:.0f}% of the image: late in"
          " such a run a noticeable share of the writes hit clusters allocated earlier in the run"
          " (cheaper overwrites), more so for the faster daemon; use a larger --qcow2-grow-size"
          " or a shorter --runtime")
if leaky:
    print(f"\nnote: {leaky} write run(s) left leaked clusters (harmless; e.g. a daemon killed"
          " before it flushed)")
PY
}

print_report() {
    local rc=0
    python3 "$COMPARE" report "$RESULTS" || rc=$?
    qcow2_report || true
    echo
    echo "== command lines (PID = the daemon's pid; every run's exact lines are in results.jsonl)"
    grep '^image' "$COMMANDS" | awk '!seen[$0]++'
    grep '^server' "$COMMANDS" | awk '!seen[$0]++' || true
    grep '^daemon' "$COMMANDS" | awk '!seen[$0]++'
    grep '^client' "$COMMANDS" | awk '!seen[$0]++'
    grep '^fio' "$COMMANDS" | awk '!seen[$0]++' || true
    echo
    echo "raw results: $RESULTS"
    echo "report:      $OUT/report.txt"
    [[ $FAILED == 0 ]] || echo "$FAILED run(s) failed; daemon logs in $OUT/logs"
    return $rc
}
rc=0
print_report | tee -a "$OUT/report.txt" || rc=$?
exit $rc
