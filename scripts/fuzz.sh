#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer; fuzz/, docs/FUZZING.md):
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# runs each target (default: all five) for SECONDS (default 30), one after
# another, from its seed corpus in fuzz/corpus/<target> (inputs it finds
# go to a scratch copy, so the repository's corpus stays as committed).
# Fails on any crash, leak, timeout or out-of-memory; the input is kept in
# fuzz/artifacts/<target>/. Prints, per target, libFuzzer's final figures:
# executions, executions per second, coverage (cov: edges, ft: features),
# corpus size, peak RSS.
# FUZZ_TARGET_DIR=DIR builds there instead of fuzz/target: a directory kept
# across fresh clones (CI) saves the full instrumented build (5-10 min on
# 2 cores; 2-3 min after a change to the daemon).
# FUZZ_LOG_DIR=DIR keeps each target's libFuzzer log there.
# FUZZ_KEEP_CORPUS=1 merges what a run found back into fuzz/corpus.
# Needs the nightly toolchain; installs cargo-fuzz when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] ||
    targets=(virtio_blk_request vhost_user_messages qcow2_image qmp config)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# -a: debug assertions and overflow checks on, as in the debug build the
# tests run: an overflow on guest or image input is a crash here.
build=(-a)
[ -z "${FUZZ_TARGET_DIR:-}" ] || build+=(--target-dir "$(realpath -m "$FUZZ_TARGET_DIR")")
(cd fuzz && cargo +nightly fuzz build "${build[@]}")

# The targets' scratch files (qcow2 images, config files, sockets) and the
# inputs found go to a directory on tmpfs where there is one, removed at
# the end.
scratch=$(mktemp -d -p /dev/shm vub-fuzz.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
    log="$scratch/$t.log"
    echo "== $t: ${secs}s"
    set +e
    (cd fuzz && cargo +nightly fuzz run "${build[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/") >"$log" 2>&1
    rc=$?
    set -e
    [ -z "${FUZZ_LOG_DIR:-}" ] || { mkdir -p "$FUZZ_LOG_DIR"; cp "$log" "$FUZZ_LOG_DIR/"; }
    grep -E '^#[0-9]+.*(DONE|INITED)' "$log" | tail -2 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb|new_units_added)' "$log" || true
    if [ $rc -ne 0 ]; then
        echo "FAILED: $t (exit $rc); the last lines of its log:"
        grep -vE '^#[0-9]+' "$log" | tail -40
        failed+=("$t")
    elif [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
        cp -n "$scratch/$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${secs}s each: no crash"
