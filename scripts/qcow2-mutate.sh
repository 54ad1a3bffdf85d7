#!/usr/bin/env bash
# The long version of the qcow2 mutation campaign (tests/qcow2_hostile.rs;
# the suite runs 3000 cases): more mutated images, several seeds, release
# build. Each case opens a mutated image in process read-only and
# read-write, reads, writes, closes; any panic, hang (60 s) or a peak RSS
# over 512 MiB fails. Also a larger sample at daemon start-up.
#   scripts/qcow2-mutate.sh [CASES_PER_SEED_RUN] [SEEDS...]
# e.g. scripts/qcow2-mutate.sh 50000 1 2 3
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-30000}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3)
cargo build --release --test qcow2_hostile --bin vhost-user-blkd
for s in "${seeds[@]}"; do
    echo "== seed $s: $cases cases"
    QCOW2_MUTATIONS=$cases QCOW2_MUTATION_SEED=$s \
        cargo test --release --test qcow2_hostile -- --nocapture --exact \
        mutated_images_never_panic_and_stay_bounded 2>&1 |
        grep -E "PANIC|HANG|mutated images|seed |highest|test result"
done
QCOW2_DAEMON_MUTATIONS=${DAEMON_CASES:-300} QCOW2_MUTATION_SEED=${seeds[0]} \
    cargo test --release --test qcow2_hostile -- --nocapture --exact \
    daemon_start_up_with_mutated_images_exits_cleanly 2>&1 |
    grep -E "daemon start-up|exit|test result"
