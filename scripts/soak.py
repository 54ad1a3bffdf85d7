#!/usr/bin/env python3
"""Soak: one daemon, a verifying guest on 4 queues, and every second a
change to the graph or the device, for --duration seconds (default 600).

    python3 scripts/soak.py                       # 10 minutes
    python3 scripts/soak.py --duration 60         # the suite's version
    python3 scripts/soak.py --out docs            # docs/soak.csv, soak-summary.json, soak.png
    SOAK_TRACE=1 python3 scripts/soak.py ...      # descriptors and threads after every change

The guest is tests/soak.rs (`soak_load`, a raw vhost-user frontend): reads,
writes, flushes, discards and write-zeroes of 512 B to 1 MiB on 4 queues,
8 requests in flight on each, every read compared with a model of what
was written. The daemon (target/debug/vhost-user-blkd, or $VUB_BIN) serves
a qcow2 image through a throttle node (group tg0) as export e0.

The changes, one a second, in a cycle of ten:
  1 blockdev-snapshot-sync      (a new overlay on top)
  2 blockdev-add + blockdev-snapshot   (another overlay, made by qemu-img)
  3 block-commit                (alternately the middle image into the
                                 bottom one, and the active image into the
                                 middle one: ready, block-job-complete)
  4 qom-set tg0 limits          (iops, bps, bursts, none, in turn)
  5 block_resize                (the top image grows by 1 MiB)
  6 block-stream                (everything into the top image)
  7 block-export-add + a reader + block-export-del   (a second export)
  8 frontend reconnect          (the guest drains, disconnects, connects)
  9 blockdev-mirror + block-job-complete   (to a new image; the nodes of
                                 the old chain that blockdev-add made are
                                 deleted, snapshot-sync's go by themselves)
 10 device reset               (requests in flight: rings
                                 disabled and stopped with GET_VRING_BASE,
                                 alternately followed by RESET_DEVICE; then
                                 features, memory table and fresh rings, as
                                 QEMU 7.2 on a guest reset)

At the end of each cycle (every 10 s when the changes are quick) the
daemon's open descriptors (/proc/PID/fd), threads (/proc/PID/task, the
kernel's io_uring workers "iou-wrk-*" counted apart: the kernel starts
and ends them) and VmRSS are sampled; the graph is then in the same state
each time (one image, no job, one export, the guest connected).

Pass: no guest I/O error, no mismatch (also: the final image read by
qemu-img equals the guest's model), every qcow2 image made during the run
`qemu-img check` clean, no failed change, the daemon exits 0, and the
samples are flat (see `flatness`). Exit status 0 on pass, 1 on failure.
"""

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

# Flatness: after the first cycle (warm-up), the median of the last third
# of the samples may exceed the median of the first third by at most this.
FD_SLACK = 2
THREAD_SLACK = 1
RSS_SLACK_PCT = 10
RSS_SLACK_KIB = 4096


class SoakError(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*args, check=True):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SoakError(f"{' '.join(map(str, args))}: {r.stdout}{r.stderr}")
    return r


def cargo(*args):
    r = subprocess.run(["cargo", *args], cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"cargo {' '.join(args)} failed:\n{r.stderr[-4000:]}")
    return r.stdout


def build():
    """The daemon binary and the guest's test executable."""
    daemon = os.environ.get("VUB_BIN")
    if not daemon:
        cargo("build", "--quiet", "--bin", "vhost-user-blkd")
        daemon = str(REPO / "target/debug/vhost-user-blkd")
    guest = None
    for line in cargo("test", "--quiet", "--test", "soak", "--no-run",
                      "--message-format=json").splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable") \
                and m["target"]["name"] == "soak":
            guest = m["executable"]
    if not guest:
        sys.exit("cargo did not name the soak test executable")
    bench = REPO / "target/debug/vub-bench"
    if not bench.exists():
        cargo("build", "--quiet", "-p", "vub-bench")
    return daemon, guest, str(bench)


def proc_sample(pid):
    """(descriptors, threads, io_uring workers, VmRSS KiB). The kernel
    starts io_uring's io-wq workers ("iou-wrk-N") in the process on
    demand and ends them after a while idle; they are counted apart."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = iou = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                comm = f.read()
        except OSError:
            continue  # exited meanwhile
        if comm.startswith("iou-"):
            iou += 1
        else:
            threads += 1
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return fds, threads, iou, rss


def thread_names(pid):
    names = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            n = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        except OSError:
            continue
        names[n] = names.get(n, 0) + 1
    return names


class Guest:
    """tests/soak.rs's soak_load, driven over its stdin/stdout."""

    def __init__(self, exe, socket, size, workdir, seed):
        env = dict(os.environ, SOAK_SOCKET=str(socket), SOAK_SIZE=str(size),
                   SOAK_SEED=str(seed), SOAK_MODEL_OUT=str(workdir / "model.raw"))
        self.errlog = open(workdir / "guest.log", "w")
        self.proc = subprocess.Popen(
            [exe, "--ignored", "--exact", "soak_load", "--nocapture", "--test-threads=1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errlog,
            text=True, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait("ok started", 120)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait(self, what, timeout):
        deadline = time.time() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                raise SoakError(f"guest: no '{what}' within {timeout} s")
            if line is None:
                raise SoakError(f"guest exited (status {self.proc.wait()}) while "
                                f"waiting for '{what}'; see guest.log")
            # libtest prints "test soak_load ... " before the test's output.
            at = line.find("SOAK " + what)
            if at >= 0:
                return line[at + len("SOAK " + what):].strip()

    def command(self, cmd, timeout=120):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        self.wait("ok " + cmd, timeout)

    def stop(self):
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        result = json.loads(self.wait("result", 600))
        status = self.proc.wait(120)
        self.errlog.close()
        return result, status


class Soak:
    def __init__(self, args, daemon_bin, guest_exe, bench):
        self.args = args
        self.bench = bench
        self.guest_exe = guest_exe
        self.w = Path(tempfile.mkdtemp(prefix="vub-soak-", dir=args.tmpdir))
        self.size = args.size * MiB
        self.vsize = self.size
        self.seq = 0
        self.counts = {}
        self.times = {}
        self.failures = []
        self.retries = {}
        self.samples = []
        img0 = self.w / "img0.qcow2"
        sh("qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={args.cluster_size}",
           img0, self.size)
        self.chain = [{"node": "img0", "file": img0, "owned": True}]
        self.qmp_path = self.w / "qmp.sock"
        self.sock = self.w / "vub.sock"
        blockdev = {"driver": "qcow2", "node-name": "img0", "discard": "unmap",
                    "file": {"driver": "file", "filename": str(img0), "discard": "unmap"}}
        argv = [daemon_bin,
                "--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=mon0",
                "--object", "throttle-group,id=tg0",
                "--blockdev", json.dumps(blockdev),
                "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=img0",
                "--export", "type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,"
                f"addr.path={self.sock},num-queues=4,writable=on",
                "--allow-path", str(self.w)]
        self.dlog = open(self.w / "daemon.log", "w")
        self.daemon = subprocess.Popen(argv, stdout=self.dlog, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
        deadline = time.time() + 30
        while not (self.qmp_path.exists() and self.sock.exists()):
            if self.daemon.poll() is not None or time.time() > deadline:
                raise SoakError("daemon did not start:\n" + (self.w / "daemon.log").read_text())
            time.sleep(0.05)
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp.connect()
        self.qmp.settimeout(300)

    # ---------------------------------------------------------------- QMP

    def cmd(self, name, **args):
        r = self.qmp.cmd_raw(name, args)
        if "error" in r:
            raise SoakError(f"{name} {json.dumps(args)}: {r['error']['desc']}")
        return r["return"]

    def event(self, names, job=None, timeout=300):
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise SoakError(f"no {names} event for {job} within {timeout} s")
            ev = self.qmp.pull_event(wait=left)
            if ev is None:
                continue
            if ev["event"] in names and (job is None or ev["data"].get("device") == job
                                         or ev["data"].get("id") == job):
                return ev

    def job(self, cmd, args, complete):
        """Runs a block job to its end; with `complete`, through ready."""
        self.seq += 1
        jid = f"j{self.seq}"
        self.qmp.clear_events()
        self.cmd(cmd, **{"job-id": jid, **args})
        if complete:
            self.event(["BLOCK_JOB_READY"], jid)
            self.cmd("block-job-complete", device=jid)
        ev = self.event(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"], jid)
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise SoakError(f"{cmd} {jid}: {ev}")

    def drop(self, entries):
        """Nodes that left the graph: delete those the monitor added."""
        for e in entries:
            if e["owned"]:
                self.cmd("blockdev-del", **{"node-name": e["node"]})

    def new_file(self, kind):
        self.seq += 1
        return f"{kind}{self.seq}", self.w / f"{kind}{self.seq}.qcow2"

    # ------------------------------------------------------------ changes

    def snapshot_sync(self):
        node, f = self.new_file("snap")
        self.cmd("blockdev-snapshot-sync", **{"node-name": self.chain[0]["node"],
                 "snapshot-file": str(f), "snapshot-node-name": node, "format": "qcow2",
                 "mode": "absolute-paths"})
        self.chain.insert(0, {"node": node, "file": f, "owned": False})

    def snapshot_add(self):
        node, f = self.new_file("ovl")
        sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", self.chain[0]["file"], "-F", "qcow2",
           "-o", f"cluster_size={self.args.cluster_size}", f, self.vsize)
        self.cmd("blockdev-add", driver="qcow2", **{"node-name": node}, backing=None,
                 discard="unmap", file={"driver": "file", "filename": str(f), "discard": "unmap"})
        self.cmd("blockdev-snapshot", node=self.chain[0]["node"], overlay=node)
        self.chain.insert(0, {"node": node, "file": f, "owned": True})

    def commit(self):
        if len(self.chain) < 2:
            return self.snapshot_sync()
        active = self.counts.get("commit", 0) % 2 == 1 or len(self.chain) < 3
        top = self.chain[0]["node"]
        if active:
            self.job("block-commit", {"device": top, "base-node": self.chain[1]["node"]}, True)
            gone = self.chain.pop(0)
        else:
            self.job("block-commit", {"device": top, "top-node": self.chain[1]["node"],
                                      "base-node": self.chain[2]["node"]}, False)
            gone = self.chain.pop(1)
        self.drop([gone])

    def throttle(self):
        limits = [{"iops-total": 2000},
                  {"bps-total": 64 * MiB, "iops-total": 4000, "iops-total-max": 8000},
                  {"iops-read": 1500, "iops-write": 1500, "bps-write": 32 * MiB},
                  {}][self.counts.get("throttle", 0) % 4]
        self.cmd("qom-set", path="tg0", property="limits", value=limits)

    def resize(self):
        self.vsize += MiB
        self.cmd("block_resize", **{"node-name": self.chain[0]["node"]}, size=self.vsize)

    def stream(self):
        if len(self.chain) < 2:
            return
        self.job("block-stream", {"device": self.chain[0]["node"]}, False)
        gone = self.chain[1:]
        self.chain = self.chain[:1]
        self.drop(gone)

    def export(self):
        path = self.w / "e1.sock"
        self.qmp.clear_events()
        self.cmd("block-export-add", type="vhost-user-blk", id="e1",
                 **{"node-name": self.chain[0]["node"], "num-queues": 2},
                 addr={"type": "unix", "path": str(path)}, writable=False)
        # A second frontend reads from it for a moment.
        r = subprocess.run([self.bench, "--socket", str(path), "--rw", "randread",
                            "--bs", "4k", "--iodepth", "4", "--runtime", "0.2", "--ramp", "0",
                            "--json"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SoakError(f"reader on e1: {r.stderr}")
        # The reader has exited, but the daemon may not have seen its
        # connection close yet (safe mode refuses an export with a
        # connected frontend, as QEMU's 'still in use'): retry, as a
        # management tool would, for up to 10 s.
        deadline = time.time() + 10
        while True:
            try:
                self.cmd("block-export-del", id="e1")
                break
            except SoakError as e:
                if "connected frontend" not in str(e) or time.time() > deadline:
                    raise
                self.retries["block-export-del"] = self.retries.get("block-export-del", 0) + 1
                time.sleep(0.05)
        self.event(["BLOCK_EXPORT_DELETED"], "e1", 60)

    def reconnect(self):
        self.guest.command("reconnect")

    def mirror(self):
        node, f = self.new_file("mirror")
        sh("qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={self.args.cluster_size}",
           f, self.vsize)
        self.cmd("blockdev-add", driver="qcow2", **{"node-name": node}, discard="unmap",
                 file={"driver": "file", "filename": str(f), "discard": "unmap"})
        self.job("blockdev-mirror", {"device": self.chain[0]["node"], "target": node,
                                     "sync": "full"}, True)
        gone = self.chain
        self.chain = [{"node": node, "file": f, "owned": True}]
        self.drop(gone)

    def reset(self):
        self.guest.command("reset" if self.counts.get("reset", 0) % 2 == 0 else "reset-device")

    CYCLE = ["snapshot_sync", "snapshot_add", "commit", "throttle", "resize",
             "stream", "export", "reconnect", "mirror", "reset"]

    # --------------------------------------------------------------- run

    def sample(self, t0):
        fds, threads, iou, rss = proc_sample(self.daemon.pid)
        nodes = len(self.cmd("query-named-block-nodes"))
        s = {"t": round(time.time() - t0, 1), "fds": fds, "threads": threads,
             "iou_workers": iou, "rss_kib": rss, "nodes": nodes, "chain": len(self.chain),
             "load1": os.getloadavg()[0]}
        self.samples.append(s)
        log(f"sample {s}")

    def run(self):
        self.guest = Guest(self.guest_exe, self.sock, self.size, self.w, self.args.seed)
        t0 = time.time()
        self.sample(t0)
        i = 0
        while time.time() - t0 < self.args.duration:
            name = self.CYCLE[i % len(self.CYCLE)]
            due = t0 + i + 1
            if time.time() < due:
                time.sleep(due - time.time())
            start = time.time()
            try:
                getattr(self, name)()
            except (SoakError, OSError, subprocess.TimeoutExpired) as e:
                # The first failure ends the run (the state it leaves is
                # kept for a look; later changes would only pile up on it).
                self.failures.append(f"{name} at {start - t0:.1f} s: {e}")
                log(f"FAILED {name}: {e}")
                break
            took = time.time() - start
            if os.environ.get("SOAK_TRACE"):
                log(f"{name}: {took:.3f} s, fds/threads/rss {proc_sample(self.daemon.pid)} "
                    f"{thread_names(self.daemon.pid)}")
            self.counts[name] = self.counts.get(name, 0) + 1
            self.times.setdefault(name, []).append(took)
            i += 1
            if i % len(self.CYCLE) == 0:
                self.sample(t0)
        self.elapsed = time.time() - t0

    def finish(self):
        result, gstatus = None, None
        try:
            result, gstatus = self.guest.stop()
        except SoakError as e:
            self.failures.append(f"guest: {e}")
        try:
            self.cmd("quit")
        except Exception:  # the daemon may be gone already
            pass
        try:
            dstatus = self.daemon.wait(120)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            dstatus = "hung at quit (killed)"
        self.dlog.close()
        checks = {}
        for img in sorted(self.w.glob("*.qcow2"), key=lambda p: p.stat().st_mtime):
            r = sh("qemu-img", "check", img, check=False)
            checks[img.name] = "clean" if r.returncode == 0 and "No errors" in r.stdout \
                else (r.stdout + r.stderr).strip()
        top = self.chain[0]["file"]
        raw = self.w / "final.raw"
        sh("qemu-img", "convert", "-O", "raw", top, raw)
        model = (self.w / "model.raw").read_bytes() if (self.w / "model.raw").exists() else b""
        with open(raw, "rb") as f:
            image = f.read()
        image_ok = len(model) == self.size and image[:self.size] == model \
            and image[self.size:] == bytes(len(image) - self.size) and len(image) == self.vsize
        raw.unlink()
        dlog = (self.w / "daemon.log").read_text(errors="replace")
        return {
            "duration_s": round(self.elapsed, 1),
            "changes": self.counts,
            "change_seconds": {k: {"mean": round(statistics.mean(v), 3), "max": round(max(v), 3)}
                               for k, v in self.times.items()},
            "failures": self.failures,
            "retries": self.retries,
            "guest": result,
            "guest_status": gstatus,
            "daemon_status": dstatus,
            "images_checked": len(checks),
            "images_unclean": {k: v for k, v in checks.items() if v != "clean"},
            "final_image_equals_model": image_ok,
            "final_chain": [e["file"].name for e in self.chain],
            "virtual_size": self.vsize,
            "daemon_log_warnings": sum(1 for l in dlog.splitlines() if " WARN " in l),
            "daemon_log_errors": sum(1 for l in dlog.splitlines() if " ERROR " in l or "panicked" in l),
            "samples": self.samples,
            "flatness": flatness(self.samples),
            "load": os.getloadavg(),
            "workdir": str(self.w),
        }


def flatness(samples):
    """After the warm-up (the sample before the first change), the median
    of the last third of the samples against the median of the first
    third: fds at most FD_SLACK more, threads THREAD_SLACK, RSS
    RSS_SLACK_PCT % + RSS_SLACK_KIB KiB."""
    post = samples[1:]
    if len(post) < 3:
        return {"ok": False, "why": f"only {len(post)} samples after warm-up (need 3)"}
    k = max(1, len(post) // 3)
    out = {"ok": True, "samples": len(post), "window": k}
    for key, slack in (("fds", lambda a: FD_SLACK), ("threads", lambda a: THREAD_SLACK),
                       ("rss_kib", lambda a: a * RSS_SLACK_PCT / 100 + RSS_SLACK_KIB)):
        first = statistics.median(s[key] for s in post[:k])
        last = statistics.median(s[key] for s in post[-k:])
        ok = last - first <= slack(first)
        out[key] = {"first": first, "last": last, "allowed": round(first + slack(first)),
                    "min": min(s[key] for s in post), "max": max(s[key] for s in post),
                    "ok": ok}
        out["ok"] &= ok
    return out


def write_csv(path, samples):
    keys = ["t", "fds", "threads", "iou_workers", "rss_kib", "nodes", "chain", "load1"]
    with open(path, "w") as f:
        f.write(",".join(keys) + "\n")
        for s in samples:
            f.write(",".join(str(s[k]) for k in keys) + "\n")


def plot(path, samples, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for a, key, label in ((ax[0], "fds", "open descriptors"), (ax[1], "threads", "threads (without\nio_uring workers)"),
                          (ax[2], "rss_kib", "VmRSS (MiB)")):
        v = [s[key] / 1024 if key == "rss_kib" else s[key] for s in samples]
        a.plot(t, v, marker=".")
        a.set_ylabel(label)
        lo, hi = min(v), max(v)
        a.set_ylim(0 if lo >= 0 else lo, hi * 1.25 + 1)
        a.grid(alpha=0.3)
    ax[2].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of changes (default 600)")
    p.add_argument("--size", type=int, default=64, help="disk size in MiB (default 64)")
    p.add_argument("--cluster-size", default="64k", help="qcow2 cluster size (default 64k)")
    p.add_argument("--seed", type=int, default=0x50a4)
    p.add_argument("--tmpdir", default=None, help="where the work directory goes")
    p.add_argument("--out", default=None, help="write soak.csv, soak-summary.json, soak.png here")
    p.add_argument("--keep", action="store_true", help="keep the work directory on success")
    args = p.parse_args()

    daemon_bin, guest_exe, bench = build()
    soak = Soak(args, daemon_bin, guest_exe, bench)
    log(f"soak: {args.duration:.0f} s, work directory {soak.w}")
    try:
        soak.run()
    finally:
        summary = soak.finish()
    g = summary["guest"] or {}
    ok = (not summary["failures"] and g.get("io_errors") == 0 and g.get("mismatches") == 0
          and summary["guest_status"] == 0 and summary["daemon_status"] == 0
          and not summary["images_unclean"] and summary["final_image_equals_model"]
          and summary["daemon_log_errors"] == 0 and summary["flatness"]["ok"])
    summary["pass"] = ok
    (soak.w / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_csv(soak.w / "samples.csv", summary["samples"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(soak.w / "summary.json", out / "soak-summary.json")
        shutil.copy(soak.w / "samples.csv", out / "soak.csv")
        if not plot(out / "soak.png", summary["samples"],
                    f"vhost-user-blkd soak, {summary['duration_s'] / 60:.0f} min"):
            log("matplotlib missing: no plot")
    brief = {k: v for k, v in summary.items() if k not in ("samples",)}
    if summary["guest"]:
        brief["guest"] = {k: v for k, v in summary["guest"].items() if k != "errors" or v}
    print(json.dumps(brief, indent=1))
    log("PASS" if ok else f"FAIL (work directory kept: {soak.w})")
    if ok and not args.keep:
        shutil.rmtree(soak.w, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
