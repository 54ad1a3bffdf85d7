#!/usr/bin/env python3
"""Throttle accuracy: configured vs achieved, for vhost-user-blkd and
qemu-storage-daemon side by side, with the same throttle groups.

Each case starts a fresh daemon (null-co behind a throttle node per export,
all in one group), drives every export with vub-bench (libblkio) for the
window, and prints configured vs achieved. Targets: achieved within +-5 % of
the limit over the window; fair shares within +-10 % of equal.

Usage: scripts/bench-throttle.py [--window 10] [--only ours|qsd] [--json OUT]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = os.environ.get("VUB_BIN", str(REPO / "target/release/vhost-user-blkd"))
QSD = os.environ.get("QSD_BIN", "qemu-storage-daemon")
BENCH = os.environ.get("VUB_BENCH", str(REPO / "target/release/vub-bench"))
MIB = 1 << 20


def daemon_args(limits, exports, sockdir):
    lim = ",".join(f"limits.{k}={v}" for k, v in limits.items())
    args = [f"--object", f"throttle-group,id=tg0,{lim}"]
    for i in range(exports):
        args += ["--blockdev", f"driver=null-co,node-name=n{i},size=1073741824,read-zeroes=on",
                 "--blockdev", f"driver=throttle,node-name=t{i},throttle-group=tg0,file=n{i}",
                 "--export", f"type=vhost-user-blk,id=e{i},node-name=t{i},addr.type=unix,"
                             f"addr.path={sockdir}/e{i}.sock,writable=on,num-queues=1"]
    return args


def start(binary, args, sockdir, exports):
    log = open(Path(sockdir) / "daemon.log", "w")
    p = subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while not all((Path(sockdir) / f"e{i}.sock").exists() for i in range(exports)):
        if p.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{binary} did not start: {(Path(sockdir) / 'daemon.log').read_text()}")
        time.sleep(0.02)
    return p


def bench(sock, bs, runtime, iodepth=8):
    return subprocess.Popen([BENCH, "--socket", sock, "--rw", "randread", "--bs", bs,
                             "--iodepth", str(iodepth), "--runtime", str(runtime),
                             "--ramp", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(p):
    out, err = p.communicate(timeout=600)
    if p.returncode != 0:
        raise RuntimeError(err)
    return json.loads(out)


def case_single(binary, limits, bs, unit, window):
    with tempfile.TemporaryDirectory() as d:
        p = start(binary, daemon_args(limits, 1, d), d, 1)
        try:
            r = result(bench(f"{d}/e0.sock", bs, window))
        finally:
            p.terminate(); p.wait()
    return [r["iops"] if unit == "IOPS" else r["mib_s"]]


def case_burst(binary, window):
    limits = {"iops-total": 500, "iops-total-max": 2000, "iops-total-max-length": 5}
    with tempfile.TemporaryDirectory() as d:
        p = start(binary, daemon_args(limits, 1, d), d, 1)
        try:
            burst = result(bench(f"{d}/e0.sock", "4k", 4))["iops"]
            # Let the burst allowance run out, then measure the average.
            result(bench(f"{d}/e0.sock", "4k", 6))
            avg = result(bench(f"{d}/e0.sock", "4k", window))["iops"]
        finally:
            p.terminate(); p.wait()
    return [burst, avg]


def case_shared(binary, n, window):
    limits = {"iops-total": 2000}
    with tempfile.TemporaryDirectory() as d:
        p = start(binary, daemon_args(limits, n, d), d, n)
        try:
            procs = [bench(f"{d}/e{i}.sock", "4k", window) for i in range(n)]
            shares = [result(q)["iops"] for q in procs]
        finally:
            p.terminate(); p.wait()
    return shares


def parse_bs(bs):
    return int(bs[:-1]) * 1024 if bs.endswith("k") else int(bs)


def pct(achieved, configured):
    return 100.0 * (achieved - configured) / configured


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=10)
    ap.add_argument("--only", choices=["ours", "qsd"])
    ap.add_argument("--json")
    ap.add_argument("--cases", default="all", help="all, or 'single' for the single-limit cases only")
    a = ap.parse_args()
    for b in [BENCH] + ([OURS] if a.only != "qsd" else []):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} is not built: cargo build --release -p vhost-user-blkd -p vub-bench")
    daemons = []
    if a.only != "qsd":
        daemons.append(("ours", OURS))
    if a.only != "ours":
        if shutil.which(QSD) is None:
            sys.exit("qemu-storage-daemon is not installed")
        daemons.append(("qsd", QSD))
    qsd_version = subprocess.run([QSD, "--version"], capture_output=True, text=True).stdout.splitlines()[0] \
        if shutil.which(QSD) else "-"
    print(f"throttle accuracy, {time.strftime('%Y-%m-%d %H:%M')}, window {a.window:g} s, {qsd_version}")
    print(f"{'case':44} {'configured':>12} " + " ".join(f"{n + ' achieved':>15} {'err':>7}" for n, _ in daemons))
    rows = []

    def row(name, configured, values, unit):
        cells = " ".join(f"{v:15.1f} {pct(v, configured):+6.1f}%" for v in values)
        print(f"{name:44} {configured:12.1f} {cells}")
        rows.append({"case": name, "configured": configured, "unit": unit,
                     **{n: v for (n, _), v in zip(daemons, values)}})

    for name, limits, bs, unit, conf in [
        ("iops-total=1000 (4k, IOPS)", {"iops-total": 1000}, "4k", "IOPS", 1000),
        ("iops-total=5000 (4k, IOPS)", {"iops-total": 5000}, "4k", "IOPS", 5000),
        ("bps-total=10MiB/s (64k, MiB/s)", {"bps-total": 10 * MIB}, "64k", "MiB/s", 10),
        ("bps-total=50MiB/s (64k, MiB/s)", {"bps-total": 50 * MIB}, "64k", "MiB/s", 50),
    ]:
        vals = [case_single(b, limits, bs, unit, a.window)[0] for _, b in daemons]
        row(name, conf, vals, unit)
    if a.cases == "single":
        return
    bursts = [case_burst(b, a.window) for _, b in daemons]
    row("burst: iops-max=2000 first 4 s (IOPS)", 2000, [x[0] for x in bursts], "IOPS")
    row("burst: then iops-total=500 (IOPS)", 500, [x[1] for x in bursts], "IOPS")
    for n in (2, 4):
        shares = [case_shared(b, n, a.window) for _, b in daemons]
        row(f"{n} exports share iops-total=2000: sum", 2000, [sum(s) for s in shares], "IOPS")
        for i in range(n):
            row(f"  export {i} (fair share {2000 // n})", 2000 / n, [s[i] for s in shares], "IOPS")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
