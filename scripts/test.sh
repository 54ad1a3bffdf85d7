#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine:
#   1. system packages the tests need (QEMU, qemu-storage-daemon, qemu-img,
#      fio, busybox) -- installed only when missing;
#   2. formatting and lints;
#   3. unit and integration tests (frontend harness, hostile input, limits,
#      sandbox, crash recovery, blkdebug fault injection, libblkio);
#   4. the QMP monitor tests, driven by the qemu.qmp Python client;
#   5. the soak's 60-second version (scripts/soak.py; 10 minutes in
#      docs/SOAK.md) and the instructions-per-request check
#      (scripts/callgrind-check.sh);
#   6. the QEMU guest tests (Linux guest under TCG running fio): end to end,
#      crash recovery with the daemon killed 10 times under fio verify, and
#      live migration between two daemons;
#   7. the fuzz targets, each for a bounded time (scripts/fuzz.sh).
# Every daemon runs sandboxed (the default).
# Nothing is skipped: a missing tool is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# A CI build is built once: incremental compilation's caches would only
# take disk (about a quarter of target/; a CI machine ran out of space).
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

scripts/guest/install-deps.sh
for t in qemu-img qemu-io; do
    command -v $t >/dev/null || { echo "ERROR: $t is missing (qemu-utils)" >&2; exit 1; }
done
python3 -c "import qemu.qmp, pytest" 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "qemu.qmp==0.0.6" "pytest>=7"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets
cargo test --workspace
python3 -m pytest -q tests/qmp
python3 scripts/soak.py --duration 60
# Instructions per request on the null-co path against the baseline in
# docs/PERFORMANCE.md (fails above +10 %).
bash scripts/callgrind-check.sh

bash tests/guest/e2e.sh target/debug/vhost-user-blkd
bash tests/guest/inflight.sh target/debug/vhost-user-blkd
# Network storage: a guest on an rbd-backed export (single-node Ceph
# cluster) and on an nbd node whose server is killed and restarted.
bash tests/guest/rbd.sh target/debug/vhost-user-blkd
bash tests/guest/nbd.sh target/debug/vhost-user-blkd
# Live migration between two daemons and two QEMUs (docs/MIGRATION.md):
# qcow2 with a cancelled migration first, a resize, a write-through guest
# and postcopy refused; raw with a completed migration abandoned first.
bash tests/guest/migrate.sh --backend vub --format qcow2 --cancel-first --resize --writethrough --postcopy-refused
bash tests/guest/migrate.sh --backend vub --format raw --fallback-first
# Each fuzz target for 10 s (the nightly build of fuzz/ takes longer than
# the fuzzing; docs/FUZZING.md has the long runs).
bash scripts/fuzz.sh 10
