#!/usr/bin/env bash
# The long variant of tests/blkdebug.rs: every debug event our qcow2 raises,
# with EIO and ENOSPC, under on-*-error=report with a `once` rule and with a
# rule that stays active (every request after the event fails; only
# flushed writes must survive), and under `stop` (the hit request parks,
# `cont` retries it). Each case: qemu-img check clean (leaks allowed),
# snapshot s1 intact, acknowledged data reads back.
#
#   bash scripts/blkdebug-matrix.sh                       # 31 events x 2 x 3
#   BLKDEBUG_EVENTS=l2_update,cow_read bash scripts/blkdebug-matrix.sh
#
# The bounded version (report + once, and stop for six events) runs in the
# suite: cargo test --test blkdebug.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --test blkdebug -- --ignored full_matrix --nocapture "$@"
