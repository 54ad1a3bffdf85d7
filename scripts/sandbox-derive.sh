#!/usr/bin/env bash
# Derives the seccomp allow-lists: runs a command (default: the whole test
# suite) with every daemon it starts under `--sandbox log`, then prints,
# per thread class, the system calls the kernel logged as outside the
# lists (src/sandbox/syscalls.rs). An empty report means the lists cover
# everything the run did.
#
#   sudo bash scripts/sandbox-derive.sh                 # the whole suite
#   sudo bash scripts/sandbox-derive.sh cargo test --test qcow2
#
# Needs root (reads and clears the kernel log, lifts printk's rate limit so
# that no report is dropped; the old limit is put back).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -eq 0 ]; then
    set -- bash scripts/test.sh
fi

old_limit=$(sysctl -n kernel.printk_ratelimit)
trap 'sysctl -qw kernel.printk_ratelimit="$old_limit"' EXIT
sysctl -qw kernel.printk_ratelimit=0
dmesg -C

status=0
VHOST_USER_BLKD_SANDBOX=log "$@" || status=$?

kernel_log=$(mktemp)
dmesg > "$kernel_log"
python3 - "$(uname -m)" "$kernel_log" <<'EOF'
import re, sys, collections

# Thread names (comm, 15 characters at most) to classes: src/sandbox/mod.rs.
CLASSES = [
    (r"^(vub-qmp|vub-export-del)", "monitor"),
    (r"^vub-accept-", "vhost-user"),
    (r"^vring_worker", "iothread (or vhost-user before its first event)"),
    (r"^job-", "job"),
    (r"^(vub-events|vub-throttle|syslog|vub-watchdog)", "helper"),
    (r"^vhost-user-blk", "main"),
    (r"^vub-rbd", "cluster"),
    (r"^vub-", "vhost-user (protocol thread)"),
    # librados's own threads (messenger, finisher, timers): the cluster
    # class, inherited.
    (r"^(msgr-worker|ms_|safe_timer|fn_|io_context|taskfin|admin_socket|service|log|signal_handler|ceph_|rbd_)", "cluster (librados thread)"),
]

def names():
    table = {}
    path = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
            "aarch64": "/usr/include/asm-generic/unistd.h"}.get(sys.argv[1])
    try:
        for line in open(path):
            m = re.match(r"#define __NR_(\w+)\s+(\d+)", line)
            if m:
                table[int(m.group(2))] = m.group(1)
    except (OSError, TypeError):
        pass
    return table

table = names()
seen = collections.defaultdict(collections.Counter)
for line in open(sys.argv[2], errors="replace"):
    if "type=1326" not in line or "vhost-user-blk" not in line:
        continue
    comm = re.search(r'comm="([^"]*)"', line)
    nr = re.search(r" syscall=(\d+)", line)
    if not comm or not nr:
        continue
    cls = next((c for p, c in CLASSES if re.search(p, comm.group(1))), "?")
    seen[cls][table.get(int(nr.group(1)), nr.group(1))] += 1

if not seen:
    print("sandbox-derive: no call outside the lists")
for cls, calls in sorted(seen.items()):
    print(f"{cls}:")
    for name, n in calls.most_common():
        print(f"    {name:24} {n}")
EOF
rm -f "$kernel_log"
exit "$status"
