"""Block jobs over QMP (qemu.qmp client): block-stream, block-commit (an
intermediate layer and the active one), blockdev-mirror and drive-mirror,
blockdev-backup (full, in a transaction with a dirty bitmap, incremental),
manual finalize / dismiss, pause / resume / set-speed / cancel, error
policies on a target that runs out of space, and the errors QEMU gives.

Every test runs against our daemon ("vub") and against qemu-storage-daemon
7.2 ("qsd"), with the same expectations: QEMU's (qapi/block-core.json,
job.c, blockjob.c, block/{stream,commit,mirror,backup}.c), as QSD showed
them. Images are judged afterwards by qemu-img (check, compare, map, info)
and qemu-io. Where QEMU's behaviour is an artifact of its implementation
(filter nodes, drained sections), the tests accept either that or the plain
model, and say so.

Nodes are opened from the top image's header (the backing chain follows
the header), and are then found by file name: QSD names the backing nodes
"#blockNNN", ours gives them other names; the tests never depend on either.
"""
import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

import conftest
from conftest import BENCH_BIN, QSD_BIN, VUB_BIN, start_daemon

MiB = 1 << 20


def run(coro, timeout=120):
    """conftest.run with a bound: a command that never answers fails the
    test instead of hanging the suite."""
    return conftest.run(asyncio.wait_for(coro, timeout))


# --------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(params=["vub", "qsd"])
def dm(request, workdir):
    """The daemon under test: ours ("vub") or qemu-storage-daemon ("qsd")."""
    if request.param == "vub":
        if not os.access(VUB_BIN, os.X_OK):
            pytest.fail(f"daemon binary {VUB_BIN} not built")
        binary = VUB_BIN
    else:
        if shutil.which(QSD_BIN) is None:
            pytest.fail("qemu-storage-daemon is not installed")
        binary = QSD_BIN
    ddir = workdir / request.param
    ddir.mkdir()
    d = start_daemon(binary, ddir, allow=workdir)
    d.kind = request.param
    yield d
    d.stop()


async def connect(path):
    c = QMPClient("test")
    await c.connect(path)
    return c


def sh(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def img_info(path):
    return json.loads(sh("qemu-img", "info", "--output=json", path))


def check_clean(path):
    out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "No errors were found" in out.stdout, out.stdout + out.stderr


def compare(a, b):
    """qemu-img compare (formats probed): (returncode, output)."""
    out = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def assert_identical(a, b):
    rc, out = compare(a, b)
    assert rc == 0 and "Images are identical" in out, f"{a} vs {b}: {out}"


def allocated(img, depth=0):
    """[start, end) ranges that `img` itself (depth 0) or the layer `depth`
    below it holds, from qemu-img map, merged."""
    m = json.loads(sh("qemu-img", "map", "--output=json", img))
    out = []
    for e in m:
        if e["depth"] == depth and e["present"]:
            s, t = e["start"], e["start"] + e["length"]
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], t)
            else:
                out.append((s, t))
    return out


def covers(ranges, start, end):
    return any(s <= start and end <= t for s, t in ranges)


def within(ranges, start, end):
    return all(start <= s and t <= end for s, t in ranges)


def read_pattern(img, pattern, off, length, fmt="qcow2"):
    """qemu-io on `img` alone (no backing file): the range reads `pattern`."""
    opts = {"driver": fmt, "file": {"driver": "file", "filename": str(img)}}
    if fmt == "qcow2":
        opts["backing"] = None
    out = subprocess.run(["qemu-io", "-r", "json:" + json.dumps(opts), "-c",
                          f"read -P 0x{pattern:x} {off} {length}"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout \
        and "read " in out.stdout, out.stdout + out.stderr


def with_guest_data(workdir, ref, length=4 * MiB):
    """ref.raw with [0, length) as the guest's sequential writes leave it
    (vub-bench writes 0xa5)."""
    want = workdir / "want.raw"
    data = bytearray(Path(ref).read_bytes())
    data[:length] = b"\xa5" * length
    want.write_bytes(bytes(data))
    return want


async def guest_overwrites(sock, length=4 * MiB):
    """Sequential 64 KiB writes over [0, length), at least once over all.
    A run is time-bound: a loaded machine may need a longer one (no timing
    assertion: the run grows until it covers the range)."""
    runtime = 0.3
    while True:
        r = await asyncio.to_thread(bench, sock, "write", str(runtime), length, "64k")
        if r["write"]["bytes"] >= length or runtime > 20:
            break
        runtime *= 2
    assert r["write"]["bytes"] >= length, r["write"]


def make_chain(workdir, size="16M"):
    """base <- mid <- top, each with its own pattern at its own offsets:
    base 0x11 [0, 4M), mid 0x22 [2M, 6M), top 0x33 [5M, 7M); plus ref.raw,
    the whole chain's content."""
    base, mid, top = (workdir / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    sh("qemu-img", "create", "-f", "qcow2", base, size)
    sh("qemu-io", "-c", "write -P 0x11 0 4M", base)
    sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    sh("qemu-io", "-c", "write -P 0x22 2M 4M", mid)
    sh("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    sh("qemu-io", "-c", "write -P 0x33 5M 2M", top)
    ref = workdir / "ref.raw"
    sh("qemu-img", "convert", "-O", "raw", top, ref)
    return base, mid, top, ref


def filled_image(path, size_mib, pattern=0x5a):
    sh("qemu-img", "create", "-f", "qcow2", path, f"{size_mib}M")
    sh("qemu-io", "-c", f"write -P 0x{pattern:x} 0 {size_mib}M", path)


def qcow2_node(name, path):
    return {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": str(path)}}


def export(eid, node, sock):
    return {"type": "vhost-user-blk", "id": eid, "node-name": node, "writable": True,
            "addr": {"type": "unix", "path": str(sock)}}


async def nodes(c):
    return {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}


async def node_of(c, path, drv="qcow2"):
    """The name of the `drv` node that opened `path`."""
    found = [n["node-name"] for n in await c.execute("query-named-block-nodes")
             if n["drv"] == drv and Path(n["file"]).resolve() == Path(path).resolve()]
    assert len(found) == 1, (path, found)
    return found[0]


async def open_chain(c, base, mid, top):
    """blockdev-add of top only: its backing chain comes from the headers."""
    await c.execute("blockdev-add", qcow2_node("top", top))
    return {"top": "top", "mid": await node_of(c, mid), "base": await node_of(c, base)}


async def add_target(c, workdir, name="tgt", size="16M"):
    """A new empty qcow2 image (qemu-img create), added as node `name`."""
    path = workdir / f"{name}.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", path, size)
    await c.execute("blockdev-add", qcow2_node(name, path))
    return path


async def exports(c):
    return {e["id"]: e["node-name"] for e in await c.execute("query-block-exports")}


async def exported_file(c, eid):
    """The image file behind export `eid`'s node. While a job runs, QEMU
    serves the export through the job's filter node (drv mirror_top for
    mirror and active commit, copy-before-write for backup, named
    "#blockNNN"), whose "file" is still the source image's."""
    node = (await exports(c))[eid]
    return Path((await nodes(c))[node]["file"])


class Events:
    """Every event of one client, in arrival order."""

    def __init__(self, c):
        self.c = c
        self.log = []

    async def wait(self, name, timeout=30, **match):
        """The next event `name` whose data has `match`; the ones before it
        are kept in the log."""
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.c.events.get()
                self.log.append(ev)
                if ev["event"] == name and all(ev["data"].get(k) == v for k, v in match.items()):
                    return ev

    async def status(self, job, status, timeout=30):
        return await self.wait("JOB_STATUS_CHANGE", timeout, id=job, status=status)

    async def seen(self, job, what, timeout=30):
        """Until the job's history has `what` (a status or a BLOCK_JOB_*
        event name), whether it came already or is still to come."""
        async with asyncio.timeout(timeout):
            while what not in self.of(job):
                self.log.append(await self.c.events.get())

    def of(self, job):
        """The job's history: JOB_STATUS_CHANGE statuses and the BLOCK_JOB_*
        event names, in order."""
        out = []
        for ev in self.log:
            d = ev["data"]
            if ev["event"] == "JOB_STATUS_CHANGE" and d["id"] == job:
                out.append(d["status"])
            elif ev["event"].startswith("BLOCK_JOB_") and d.get("device", d.get("id")) == job:
                out.append(ev["event"])
        return out

    def dump(self, job):
        """The job's events with their data, for assertion messages."""
        return [(ev["event"], ev["data"]) for ev in self.log
                if job in (ev["data"].get("id"), ev["data"].get("device"))]

    def named(self, name, job=None):
        return [ev["data"] for ev in self.log
                if ev["event"] == name and (job is None or ev["data"].get("device") == job)]


async def job_info(c, job):
    jobs = {j["device"]: j for j in await c.execute("query-block-jobs")}
    return jobs.get(job)


async def reach(c, ev, job, status, timeout=30):
    """Wait until query-block-jobs has `job` in `status`, one
    JOB_STATUS_CHANGE to it at a time: an internal pause (a drain) may have
    emitted the same status before."""
    async with asyncio.timeout(timeout):
        while True:
            info = await job_info(c, job)
            if info is not None and info["status"] == status:
                return info
            await ev.status(job, status)


def bench(sock, rw, runtime="0.3", size=None, bs="4k"):
    """vub-bench (libblkio) as the guest. Its write buffers hold 0xa5."""
    argv = [BENCH_BIN, "--socket", str(sock), "--rw", rw, "--bs", bs, "--iodepth", "8",
            "--runtime", runtime, "--ramp", "0", "--json"]
    if size is not None:
        argv += ["--size", str(size)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# The history of a job that ran to its end by itself (auto-finalize and
# auto-dismiss on): QEMU emits BLOCK_JOB_COMPLETED between 'pending' and
# 'concluded'.
DONE = ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
# QEMU starts a backup job inside a drained section of its source
# (qmp_blockdev_backup / transaction), so a backup's history has an
# internal pause right after it starts: 'running', 'paused', 'running'.
# Either history is QEMU's model; ours need not drain there.
BACKUP_DONE = DONE[:2] + ["paused", "running"] + DONE[2:]


def backup_history_ok(hist):
    return hist in (DONE, BACKUP_DONE)


def without_pauses(hist):
    """The history less its 'paused', 'running' (and 'standby', 'ready')
    pairs: QEMU pauses every job on a node that a graph change drains, such
    as another job's start."""
    out = []
    for h in hist:
        if out and (out[-1], h) in (("paused", "running"), ("standby", "ready")):
            out.pop()
        else:
            out.append(h)
    return out


# --------------------------------------------------------------------------
# stream


def test_stream_flattens_mid_into_top_and_keeps_base(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        assert (await nodes(c))["top"]["backing_file_depth"] == 2
        await c.execute("block-stream", {"job-id": "s1", "device": "top", "base-node": n["base"]})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="s1")
        await ev.status("s1", "null")
        assert ev.of("s1") == DONE, ev.dump("s1")
        d = done["data"]
        assert set(d) == {"type", "device", "len", "offset", "speed"}, d
        assert d["type"] == "stream" and d["device"] == "s1", d
        assert d["len"] == d["offset"] == 16 * MiB, d
        assert d["speed"] == 0
        assert all(set(e["data"]) == {"id", "status"}
                   for e in ev.log if e["event"] == "JOB_STATUS_CHANGE")
        assert await c.execute("query-block-jobs") == []
        got = await nodes(c)
        assert got["top"]["backing_file_depth"] == 1
        assert got["top"]["image"]["backing-image"]["filename"] == str(base)
        assert n["mid"] not in got, "mid is no longer in the graph"
        # The job let go of the node.
        await c.execute("blockdev-del", {"node-name": "top"})
        assert await c.execute("query-named-block-nodes") == []
        await c.disconnect()

    run(go())
    dm.stop()
    info = img_info(top)
    assert info["backing-filename"] == str(base), info
    assert info["backing-filename-format"] == "qcow2"
    for p in (top, base):
        check_clean(p)
    assert_identical(top, ref)
    own = allocated(top)
    assert covers(own, 2 * MiB, 7 * MiB), own      # mid's data, and top's own
    assert not covers(own, 0, 2 * MiB), own        # base's data stays in base
    assert covers(allocated(top, depth=1), 0, 2 * MiB)


def test_stream_writes_the_given_backing_file_name(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-stream", {"job-id": "s1", "device": "top", "base-node": n["base"],
                                         "backing-file": "base.qcow2"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="s1")
        assert "error" not in done["data"], done
        await ev.status("s1", "null")
        assert (await nodes(c))["top"]["image"]["backing-filename"] == "base.qcow2"
        await c.disconnect()

    run(go())
    dm.stop()
    info = img_info(top)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    assert info["full-backing-filename"] == str(base), info
    assert_identical(top, ref)


def test_stream_keeps_the_guest_writes_made_while_it_copies(dm, workdir):
    """A full stream (no base) at 1 MiB/s while the guest overwrites the
    first 4 MiB: the copy must never put old backing data over them."""
    base, mid, top, ref = make_chain(workdir)
    want = with_guest_data(workdir, ref)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("block-stream", {"job-id": "s1", "device": "top", "speed": MiB})
        await ev.status("s1", "running")
        await guest_overwrites(sock)
        info = await job_info(c, "s1")
        assert info is not None and info["status"] == "running", info
        await c.execute("block-job-set-speed", {"device": "s1", "speed": 0})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="s1")
        await ev.status("s1", "null")
        assert "error" not in done["data"], done
        assert (await nodes(c))["top"]["backing_file_depth"] == 0
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(top)
    assert "backing-filename" not in img_info(top)
    assert_identical(top, want)


def test_stream_into_an_intermediate_image_under_an_active_export(dm, workdir):
    """block-stream on mid (not the root): base's data goes into mid, mid
    loses its backing; top, exported above, keeps reading the same disk."""
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("block-stream", {"job-id": "s1", "device": n["mid"]})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="s1")
        await ev.status("s1", "null")
        assert "error" not in done["data"], done
        got = await nodes(c)
        assert got["top"]["backing_file_depth"] == 1 and got[n["mid"]]["backing_file_depth"] == 0
        assert n["base"] not in got
        assert (await exports(c))["e0"] == "top"
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(mid)
    check_clean(top)
    assert "backing-filename" not in img_info(mid)
    assert_identical(top, ref)
    read_pattern(mid, 0x11, 0, 2 * MiB)
    read_pattern(mid, 0x22, 2 * MiB, 4 * MiB)


def test_stream_with_manual_finalize_and_dismiss(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-stream", {"job-id": "s1", "device": "top", "base-node": n["base"],
                                         "auto-finalize": False, "auto-dismiss": False})
        await ev.status("s1", "pending")
        assert ev.of("s1") == ["created", "running", "waiting", "pending"], ev.dump("s1")
        info = await job_info(c, "s1")
        assert info["status"] == "pending" and info["auto-finalize"] is False \
            and info["auto-dismiss"] is False, info
        # The graph changes only when the job is finalized.
        assert (await nodes(c))["top"]["backing_file_depth"] == 2
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-dismiss", {"id": "s1"})
        assert str(e.value) == "Job 's1' in state 'pending' cannot accept command verb 'dismiss'"
        await c.execute("block-job-finalize", {"id": "s1"})
        await ev.status("s1", "concluded")
        # With auto-finalize off, QEMU emits BLOCK_JOB_PENDING {type, id}.
        assert ev.of("s1") == ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING",
                               "BLOCK_JOB_COMPLETED", "concluded"], ev.dump("s1")
        [pend] = [e["data"] for e in ev.log if e["event"] == "BLOCK_JOB_PENDING"]
        assert pend == {"type": "stream", "id": "s1"}, pend
        # (No query-named-block-nodes here: QSD 7.2 segfaults on it while a
        # finalized stream job is concluded and not yet dismissed.)
        info = await job_info(c, "s1")
        assert info["status"] == "concluded", info
        [j] = await c.execute("query-jobs")
        assert j["id"] == "s1" and j["type"] == "stream" and j["status"] == "concluded", j
        assert "error" not in j
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-cancel", {"device": "s1"})
        assert str(e.value) == "Job 's1' in state 'concluded' cannot accept command verb 'cancel'"
        await c.execute("block-job-dismiss", {"id": "s1"})
        await ev.status("s1", "null")
        assert await c.execute("query-block-jobs") == []
        assert await c.execute("query-jobs") == []
        assert (await nodes(c))["top"]["backing_file_depth"] == 1
        # A dismissed job's id is free again.
        await c.execute("block-stream", {"job-id": "s1", "device": "top"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="s1")
        assert "error" not in done["data"], done
        await ev.status("s1", "null")
        assert (await nodes(c))["top"]["backing_file_depth"] == 0
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(top)
    assert_identical(top, ref)


# --------------------------------------------------------------------------
# commit of an intermediate layer


def test_commit_of_mid_into_base(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-commit", {"job-id": "c1", "device": "top",
                                         "top-node": n["mid"], "base-node": n["base"]})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="c1")
        await ev.status("c1", "null")
        assert ev.of("c1") == DONE, ev.dump("c1")
        d = done["data"]
        assert d["type"] == "commit" and "error" not in d, d
        assert d["len"] == d["offset"], d
        assert ev.named("BLOCK_JOB_READY") == []
        got = await nodes(c)
        assert got["top"]["backing_file_depth"] == 1
        assert got["top"]["image"]["backing-image"]["filename"] == str(base)
        assert got[n["base"]]["ro"] is True
        await c.disconnect()

    run(go())
    dm.stop()
    assert img_info(top)["backing-filename"] == str(base)
    for p in (top, base):
        check_clean(p)
    assert_identical(top, ref)
    # base alone now holds mid's data over its own.
    read_pattern(base, 0x11, 0, 2 * MiB)
    read_pattern(base, 0x22, 2 * MiB, 4 * MiB)
    read_pattern(base, 0x00, 6 * MiB, 10 * MiB)
    # top is untouched: only its own 2 MiB.
    assert allocated(top) == [(5 * MiB, 7 * MiB)]


def test_commit_with_manual_finalize_changes_the_chain_at_finalize(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-commit", {"job-id": "c1", "device": "top", "top-node": n["mid"],
                                         "base-node": n["base"], "auto-finalize": False})
        await ev.wait("BLOCK_JOB_PENDING", id="c1")
        assert (await job_info(c, "c1"))["status"] == "pending"
        # mid is still in the chain (QEMU's depth is 3 here: its commit_top
        # filter sits between top and mid while the job lives).
        got = await nodes(c)
        assert got["top"]["backing_file_depth"] in (2, 3) and n["mid"] in got, got["top"]
        await c.execute("block-job-finalize", {"id": "c1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="c1")
        await ev.status("c1", "null")
        assert "error" not in done["data"], done
        assert ev.of("c1") == ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING",
                               "BLOCK_JOB_COMPLETED", "concluded", "null"], ev.dump("c1")
        got = await nodes(c)
        assert got["top"]["backing_file_depth"] == 1 and n["mid"] not in got
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(top)
    check_clean(base)
    assert img_info(top)["backing-filename"] == str(base)
    assert_identical(top, ref)


def test_commit_writes_the_given_backing_file_name(dm, workdir):
    """backing-file is the name written into the overlay of top-node; it
    is refused for an active commit (there is no overlay)."""
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-commit", {"job-id": "c0", "device": "top",
                                             "base-node": n["base"], "backing-file": "x.qcow2"})
        assert str(e.value) == "'backing-file' specified, but 'top' is the active layer"
        assert await c.execute("query-block-jobs") == []
        await c.execute("block-commit", {"job-id": "c1", "device": "top", "top-node": n["mid"],
                                         "base-node": n["base"], "backing-file": "base.qcow2"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="c1")
        await ev.status("c1", "null")
        assert "error" not in done["data"], done
        assert (await nodes(c))["top"]["image"]["backing-filename"] == "base.qcow2"
        await c.disconnect()

    run(go())
    dm.stop()
    info = img_info(top)
    assert info["backing-filename"] == "base.qcow2" and info["full-backing-filename"] == str(base)
    check_clean(top)
    check_clean(base)
    assert_identical(top, ref)


def test_commit_of_mid_while_the_guest_writes_top(dm, workdir):
    base, mid, top, ref = make_chain(workdir)
    want = with_guest_data(workdir, ref)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("block-commit", {"job-id": "c1", "device": "top", "top-node": n["mid"],
                                         "base-node": n["base"], "speed": MiB})
        await ev.status("c1", "running")
        await guest_overwrites(sock)
        info = await job_info(c, "c1")
        assert info is not None and info["status"] == "running", info
        await c.execute("block-job-set-speed", {"device": "c1", "speed": 0})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="c1")
        await ev.status("c1", "null")
        assert "error" not in done["data"], done
        assert (await nodes(c))["top"]["backing_file_depth"] == 1
        await c.disconnect()

    run(go())
    dm.stop()
    for p in (top, base):
        check_clean(p)
    assert_identical(top, want)
    # base has mid's data; the guest's writes stayed in top.
    read_pattern(base, 0x11, 0, 2 * MiB)
    read_pattern(base, 0x22, 2 * MiB, 4 * MiB)
    read_pattern(top, 0xa5, 0, 4 * MiB)


# --------------------------------------------------------------------------
# active commit


def test_active_commit_reaches_ready_and_pivots_the_export_to_base(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("block-commit", {"job-id": "ac", "device": "top", "base-node": n["base"]})
        ready = await ev.wait("BLOCK_JOB_READY", device="ac")
        assert ready["data"]["type"] == "commit", ready
        assert ready["data"]["len"] == ready["data"]["offset"], ready
        assert ev.of("ac") == ["created", "running", "ready", "BLOCK_JOB_READY"], ev.dump("ac")
        info = await job_info(c, "ac")
        assert info["type"] == "commit" and info["ready"] is True and info["status"] == "ready", info
        assert info["len"] == info["offset"] and info["io-status"] == "ok", info
        # Ready, not done: the export still writes to top until complete.
        assert await exported_file(c, "e0") == top
        await c.execute("block-job-complete", {"device": "ac"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="ac")
        await ev.status("ac", "null")
        assert "error" not in done["data"], done
        assert done["data"]["type"] == "commit"
        assert ev.of("ac") == ["created", "running", "ready", "BLOCK_JOB_READY",
                               "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"], \
            ev.dump("ac")
        assert (await exports(c))["e0"] == n["base"]
        assert await c.execute("query-block-jobs") == []
        got = await nodes(c)
        assert got[n["base"]]["ro"] is False
        # The old top can go now; base stays, the export's.
        await c.execute("blockdev-del", {"node-name": "top"})
        got = await nodes(c)
        assert "top" not in got and n["mid"] not in got and n["base"] in got, list(got)
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(base)
    check_clean(top)
    assert_identical(base, ref)
    read_pattern(base, 0x33, 5 * MiB, 2 * MiB)


def test_commit_with_top_node_the_active_layer_into_mid(dm, workdir):
    """top-node naming the active layer makes it an active commit too; the
    base may be an intermediate image: top goes into mid, base stays."""
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("block-commit", {"job-id": "ac", "device": "top", "top-node": "top",
                                         "base-node": n["mid"]})
        ready = await ev.wait("BLOCK_JOB_READY", device="ac")
        assert ready["data"]["type"] == "commit"
        await c.execute("block-job-complete", {"device": "ac"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="ac")
        await ev.status("ac", "null")
        assert "error" not in done["data"], done
        assert (await exports(c))["e0"] == n["mid"]
        got = await nodes(c)
        assert got[n["mid"]]["backing_file_depth"] == 1 and got[n["mid"]]["ro"] is False
        await c.disconnect()

    run(go())
    dm.stop()
    for p in (mid, base):
        check_clean(p)
    assert_identical(mid, ref)
    read_pattern(mid, 0x33, 5 * MiB, 2 * MiB)
    # base is untouched.
    read_pattern(base, 0x11, 0, 4 * MiB)
    read_pattern(base, 0x00, 4 * MiB, 12 * MiB)


def test_active_commit_copies_guest_writes_made_while_ready(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("block-commit", {"job-id": "ac", "device": "top", "base-node": n["base"]})
        await ev.wait("BLOCK_JOB_READY", device="ac")
        await asyncio.to_thread(bench, sock, "randwrite", "0.3")
        info = await job_info(c, "ac")
        assert info["status"] == "ready" and info["ready"] is True, info
        await c.execute("block-job-complete", {"device": "ac"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="ac")
        await ev.status("ac", "null")
        assert "error" not in done["data"], done
        assert (await exports(c))["e0"] == n["base"]
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(base)
    check_clean(top)
    # Every write went to top and was copied to base before the pivot.
    assert_identical(base, top)
    rc, out = compare(base, ref)
    assert rc == 1, out


def test_active_commit_copies_guest_writes_made_before_ready(dm, workdir):
    """Writes while the active commit still copies (at 1 MiB/s): base ends
    with them."""
    base, mid, top, ref = make_chain(workdir)
    want = with_guest_data(workdir, ref)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("block-commit", {"job-id": "ac", "device": "top", "base-node": n["base"],
                                         "speed": MiB})
        await ev.status("ac", "running")
        await guest_overwrites(sock)
        info = await job_info(c, "ac")
        assert info["status"] == "running" and info["ready"] is False, info
        await c.execute("block-job-set-speed", {"device": "ac", "speed": 0})
        await ev.wait("BLOCK_JOB_READY", device="ac")
        await c.execute("block-job-complete", {"device": "ac"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="ac")
        await ev.status("ac", "null")
        assert "error" not in done["data"], done
        assert (await exports(c))["e0"] == n["base"]
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(base)
    assert_identical(base, want)
    assert_identical(top, want)


# --------------------------------------------------------------------------
# mirror


def test_mirror_full_pivots_the_export_to_the_target(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        tgt = await add_target(c, workdir)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "top", "target": "tgt",
                                            "sync": "full"})
        ready = await ev.wait("BLOCK_JOB_READY", device="m1")
        assert ready["data"]["type"] == "mirror" and ready["data"]["len"] == ready["data"]["offset"]
        info = await job_info(c, "m1")
        assert info["ready"] is True and info["status"] == "ready" and info["type"] == "mirror", info
        assert await exported_file(c, "e0") == top
        await c.execute("block-job-complete", {"device": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        assert "error" not in done["data"], done
        assert ev.of("m1") == ["created", "running", "ready", "BLOCK_JOB_READY",
                               "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"], \
            ev.dump("m1")
        assert (await exports(c))["e0"] == "tgt"
        assert (await nodes(c))["tgt"]["backing_file_depth"] == 0
        # The job let go of its nodes: the old source can be deleted now;
        # the target is the export's.
        await c.execute("blockdev-del", {"node-name": "top"})
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-del", {"node-name": "tgt"})
        assert "tgt" in str(e.value) and "in use" in str(e.value), str(e.value)
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(tgt)
    assert "backing-filename" not in img_info(tgt)
    assert_identical(tgt, ref)
    for p in (top, mid, base):
        check_clean(p)
    assert_identical(top, ref)


def test_mirror_copies_guest_writes_made_during_the_bulk_copy(dm, workdir):
    """Writes while the mirror is still copying (at 1 MiB/s, 32 MiB): the
    dirty clusters are copied again, the target ends equal to the source."""
    src = workdir / "src.qcow2"
    filled_image(src, 32)
    ref = workdir / "ref.raw"
    sh("qemu-img", "convert", "-O", "raw", src, ref)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        tgt = await add_target(c, workdir, size="32M")
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "tgt",
                                            "sync": "full", "speed": MiB})
        await ev.status("m1", "running")
        await asyncio.to_thread(bench, sock, "randwrite", "0.3")
        info = await job_info(c, "m1")
        assert info["status"] == "running" and info["ready"] is False, info
        assert ev.named("BLOCK_JOB_READY") == []
        await c.execute("block-job-set-speed", {"device": "m1", "speed": 0})
        await ev.wait("BLOCK_JOB_READY", device="m1")
        await c.execute("block-job-complete", {"device": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        assert "error" not in done["data"], done
        assert (await exports(c))["e0"] == "tgt"
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(tgt)
    check_clean(src)
    assert_identical(tgt, src)
    rc, out = compare(src, ref)
    assert rc == 1, out


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_mirror_keeps_copying_guest_writes_while_ready(dm, workdir, copy_mode):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        tgt = await add_target(c, workdir)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "top", "target": "tgt",
                                            "sync": "full", "copy-mode": copy_mode})
        await ev.wait("BLOCK_JOB_READY", device="m1")
        await asyncio.to_thread(bench, sock, "randwrite", "0.3")
        info = await job_info(c, "m1")
        assert info["status"] == "ready" and info["ready"] is True, info
        await c.execute("block-job-complete", {"device": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        assert "error" not in done["data"], done
        assert done["data"]["len"] == done["data"]["offset"], done
        assert (await exports(c))["e0"] == "tgt"
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(tgt)
    check_clean(top)
    assert_identical(tgt, top)
    rc, out = compare(tgt, ref)
    assert rc == 1, "the guest's writes reached the target: " + out


@pytest.mark.parametrize("kind", ["mirror", "active-commit"])
def test_the_guest_keeps_writing_across_the_pivot(dm, workdir, kind):
    """block-job-complete while the guest writes: the pivot drains and
    moves the export without failing a request; the new image has every
    write."""
    base, mid, top, ref = make_chain(workdir)
    want = with_guest_data(workdir, ref)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        if kind == "mirror":
            final = await add_target(c, workdir)
            await c.execute("blockdev-mirror", {"job-id": "j", "device": "top", "target": "tgt",
                                                "sync": "full"})
        else:
            final = base
            await c.execute("block-commit", {"job-id": "j", "device": "top",
                                             "base-node": n["base"]})
        await ev.wait("BLOCK_JOB_READY", device="j")
        guest = await asyncio.create_subprocess_exec(
            BENCH_BIN, "--socket", str(sock), "--rw", "write", "--bs", "64k", "--iodepth", "8",
            "--runtime", "1.5", "--ramp", "0", "--json", "--size", str(4 * MiB),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await asyncio.sleep(0.5)
        await c.execute("block-job-complete", {"device": "j"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="j")
        assert "error" not in done["data"], done
        out, err = await asyncio.wait_for(guest.communicate(), 60)
        assert guest.returncode == 0, err.decode()
        assert json.loads(out)["write"]["bytes"] >= 4 * MiB
        await ev.status("j", "null")
        assert (await exports(c))["e0"] == ("tgt" if kind == "mirror" else n["base"])
        await c.disconnect()
        return final

    final = run(go())
    dm.stop()
    check_clean(final)
    assert_identical(final, want)


def test_drive_mirror_sync_top_creates_the_target_on_the_same_backing(dm, workdir):
    base, mid, top, ref = make_chain(workdir)
    new = workdir / "new.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("drive-mirror", {"job-id": "d1", "device": "top", "target": str(new),
                                         "format": "qcow2", "sync": "top",
                                         "mode": "absolute-paths", "node-name": "new"})
        await ev.wait("BLOCK_JOB_READY", device="d1")
        got = await nodes(c)
        assert got["new"]["image"]["virtual-size"] == 16 * MiB
        # QEMU opens the new target without its backing chain while it
        # mirrors (backing_file_depth 0 here) and attaches the source's
        # backing (mid) to it at completion.
        await c.execute("block-job-complete", {"device": "d1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="d1")
        await ev.status("d1", "null")
        assert done["data"]["type"] == "mirror" and "error" not in done["data"], done
        assert (await exports(c))["e0"] == "new"
        got = await nodes(c)
        assert got["new"]["backing_file_depth"] == 2, got["new"]
        assert got["new"]["image"]["backing-image"]["filename"] == str(mid)
        await c.disconnect()

    run(go())
    dm.stop()
    info = img_info(new)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(mid), info
    check_clean(new)
    assert_identical(new, ref)
    # sync=top: only what top itself held was copied.
    assert allocated(new) == [(5 * MiB, 7 * MiB)]


def test_mirror_sync_top_onto_a_target_that_shares_the_backing_node(dm, workdir):
    """libvirt's way: the target is added with "backing" naming the source's
    backing node; sync=top copies top's own data; after the pivot the
    chain is tgt <- mid <- base."""
    base, mid, top, ref = make_chain(workdir)
    tgt = workdir / "tgt.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", mid, "-F", "qcow2", tgt)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("blockdev-add", {**qcow2_node("tgt", tgt), "backing": n["mid"]})
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "top", "target": "tgt",
                                            "sync": "top"})
        await ev.wait("BLOCK_JOB_READY", device="m1")
        await c.execute("block-job-complete", {"device": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        d = done["data"]
        assert "error" not in d and d["len"] == d["offset"] == 2 * MiB, d
        assert (await exports(c))["e0"] == "tgt"
        got = await nodes(c)
        assert got["tgt"]["backing_file_depth"] == 2
        assert got["tgt"]["image"]["backing-image"]["filename"] == str(mid)
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(tgt)
    assert allocated(tgt) == [(5 * MiB, 7 * MiB)]
    assert_identical(tgt, ref)


def test_drive_mirror_to_an_existing_image(dm, workdir):
    """mode=existing: the target file is made beforehand (here on mid, as
    for sync=top) and opened with its own backing chain from its header."""
    base, mid, top, ref = make_chain(workdir)
    new = workdir / "new.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", mid, "-F", "qcow2", new)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("drive-mirror", {"job-id": "d1", "device": "top", "target": str(new),
                                         "format": "qcow2", "sync": "top", "mode": "existing",
                                         "node-name": "new"})
        await ev.wait("BLOCK_JOB_READY", device="d1")
        await c.execute("block-job-complete", {"device": "d1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="d1")
        await ev.status("d1", "null")
        assert "error" not in done["data"], done
        assert (await exports(c))["e0"] == "new"
        assert (await nodes(c))["new"]["backing_file_depth"] == 2
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(new)
    assert img_info(new)["backing-filename"] == str(mid)
    assert allocated(new) == [(5 * MiB, 7 * MiB)]
    assert_identical(new, ref)


def test_mirror_with_manual_finalize_pivots_at_finalize(dm, workdir):
    """auto-finalize off: after block-job-complete the mirror waits in
    'pending' still serving the source; the export moves at finalize."""
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        await add_target(c, workdir)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "top", "target": "tgt",
                                            "sync": "full", "auto-finalize": False})
        await ev.wait("BLOCK_JOB_READY", device="m1")
        await c.execute("block-job-complete", {"device": "m1"})
        await ev.wait("BLOCK_JOB_PENDING", id="m1")
        assert (await job_info(c, "m1"))["status"] == "pending"
        assert await exported_file(c, "e0") == top
        await c.execute("block-job-finalize", {"id": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        assert "error" not in done["data"], done
        assert ev.of("m1") == ["created", "running", "ready", "BLOCK_JOB_READY", "waiting",
                               "pending", "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED",
                               "concluded", "null"], ev.dump("m1")
        assert (await exports(c))["e0"] == "tgt"
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(workdir / "tgt.qcow2")
    assert_identical(workdir / "tgt.qcow2", ref)


def test_drive_mirror_sync_none_copies_only_new_writes(dm, workdir):
    """sync=none: a new overlay of the source, ready at once; only the
    guest's writes are copied, and at completion the source becomes the
    target's backing."""
    base, mid, top, ref = make_chain(workdir)
    want = with_guest_data(workdir, ref)
    new = workdir / "new.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("drive-mirror", {"job-id": "m1", "device": "top", "target": str(new),
                                         "format": "qcow2", "sync": "none",
                                         "node-name": "new"})
        ready = await ev.wait("BLOCK_JOB_READY", device="m1")
        assert ready["data"]["len"] == ready["data"]["offset"] == 0, ready
        await guest_overwrites(sock)
        await c.execute("block-job-complete", {"device": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        assert "error" not in done["data"], done
        assert done["data"]["len"] == done["data"]["offset"] >= 4 * MiB, done
        assert (await exports(c))["e0"] == "new"
        assert (await nodes(c))["new"]["backing_file_depth"] == 3
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(new)
    check_clean(top)
    assert img_info(new)["backing-filename"] == str(top)
    assert within(allocated(new), 0, 4 * MiB), allocated(new)
    assert_identical(new, want)
    assert_identical(top, want)


def test_mirror_to_a_target_of_another_size_fails(dm, workdir):
    base, mid, top, ref = make_chain(workdir)
    text = "Source and target image have different sizes"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        await add_target(c, workdir, "small", size="8M")
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        # QEMU accepts the command and fails the job at its start; refusing
        # the command outright with the same text is as good.
        try:
            await c.execute("blockdev-mirror", {"job-id": "m1", "device": "top",
                                                "target": "small", "sync": "full"})
        except ExecuteError as e:
            assert str(e) == text, str(e)
        else:
            done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
            await ev.status("m1", "null")
            assert done["data"]["error"] == text, done
            assert ev.of("m1") == ["created", "running", "aborting", "BLOCK_JOB_COMPLETED",
                                   "concluded", "null"], ev.dump("m1")
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-backup", {"job-id": "b1", "device": "top",
                                                "target": "small", "sync": "full"})
        assert str(e.value) == text
        assert await c.execute("query-block-jobs") == []
        assert (await exports(c))["e0"] == "top"
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(top)
    check_clean(workdir / "small.qcow2")
    assert_identical(top, ref)


# --------------------------------------------------------------------------
# mirror: cancel before and after ready, pause when ready


def test_mirror_cancel_after_ready_completes_without_pivot(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        tgt = await add_target(c, workdir)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "top", "target": "tgt",
                                            "sync": "full"})
        await ev.wait("BLOCK_JOB_READY", device="m1")
        await c.execute("block-job-cancel", {"device": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        assert "error" not in done["data"], done
        assert ev.named("BLOCK_JOB_CANCELLED") == []
        assert ev.of("m1") == ["created", "running", "ready", "BLOCK_JOB_READY",
                               "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"], \
            ev.dump("m1")
        assert (await exports(c))["e0"] == "top"
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(tgt)
    check_clean(top)
    assert_identical(tgt, top)
    assert_identical(tgt, ref)


def test_mirror_force_cancel_after_ready_is_cancelled(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        tgt = await add_target(c, workdir)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "top", "target": "tgt",
                                            "sync": "full"})
        await ev.wait("BLOCK_JOB_READY", device="m1")
        await c.execute("block-job-cancel", {"device": "m1", "force": True})
        cancelled = await ev.wait("BLOCK_JOB_CANCELLED", device="m1")
        await ev.status("m1", "null")
        assert cancelled["data"]["type"] == "mirror"
        assert ev.named("BLOCK_JOB_COMPLETED") == []
        assert ev.of("m1") == ["created", "running", "ready", "BLOCK_JOB_READY",
                               "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"], \
            ev.dump("m1")
        assert (await exports(c))["e0"] == "top"
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(tgt)
    check_clean(top)
    assert_identical(top, ref)


def test_mirror_cancelled_before_ready_is_cancelled(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 32)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        tgt = await add_target(c, workdir, size="32M")
        await c.execute("block-export-add", export("e0", "src", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "tgt",
                                            "sync": "full", "speed": MiB})
        await ev.status("m1", "running")
        await c.execute("block-job-cancel", {"device": "m1"})
        cancelled = await ev.wait("BLOCK_JOB_CANCELLED", device="m1")
        await ev.status("m1", "null")
        d = cancelled["data"]
        assert d["type"] == "mirror" and d["len"] == 32 * MiB and d["speed"] == MiB, d
        assert ev.of("m1") == ["created", "running", "aborting", "BLOCK_JOB_CANCELLED",
                               "concluded", "null"], ev.dump("m1")
        assert (await exports(c))["e0"] == "src"
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(src)
    check_clean(tgt)


def test_pausing_a_ready_mirror_is_standby_and_job_commands_steer_it(dm, workdir):
    """The generic job-* commands on a block job; a paused ready job is in
    'standby' and may be completed there (QEMU's verb table)."""
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        await add_target(c, workdir)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt",
                                            "sync": "full"})
        await ev.wait("BLOCK_JOB_READY", device="m")
        await c.execute("job-pause", {"id": "m"})
        info = await reach(c, ev, "m", "standby")
        assert info["paused"] is True and info["ready"] is True, info
        [j] = await c.execute("query-jobs")
        assert j["status"] == "standby" and j["type"] == "mirror", j
        with pytest.raises(ExecuteError) as e:
            await c.execute("job-finalize", {"id": "m"})
        assert str(e.value) == "Job 'm' in state 'standby' cannot accept command verb 'finalize'"
        await c.execute("job-complete", {"id": "m"})
        await c.execute("job-resume", {"id": "m"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m")
        await ev.status("m", "null")
        assert "error" not in done["data"], done
        assert ev.of("m") == ["created", "running", "ready", "BLOCK_JOB_READY", "standby",
                              "ready", "waiting", "pending", "BLOCK_JOB_COMPLETED",
                              "concluded", "null"], ev.dump("m")
        assert (await exports(c))["e0"] == "tgt"
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(workdir / "tgt.qcow2")
    assert_identical(workdir / "tgt.qcow2", ref)


# --------------------------------------------------------------------------
# backup


def test_backup_full_is_a_point_in_time_copy(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        tgt = await add_target(c, workdir)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        # Slow, so that the guest's writes land while the copy runs: each
        # must first copy the old data to the target.
        await c.execute("blockdev-backup", {"job-id": "b1", "device": "top", "target": "tgt",
                                            "sync": "full", "speed": MiB})
        await ev.status("b1", "running")
        # The guest writes over the first 4 MiB only: the other 12 MiB still
        # take the job seconds at 1 MiB/s.
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", 4 * MiB)
        info = await job_info(c, "b1")
        # Still running (the guest's writes copied their clusters first, so
        # the offset may already be at the end).
        assert info["type"] == "backup" and info["status"] == "running", info
        assert info["len"] == 16 * MiB, info
        assert await exported_file(c, "e0") == top
        await c.execute("block-job-set-speed", {"device": "b1", "speed": 0})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="b1")
        await ev.status("b1", "null")
        d = done["data"]
        assert d["type"] == "backup" and "error" not in d, d
        assert d["len"] == d["offset"] == 16 * MiB, d
        assert backup_history_ok(ev.of("b1")), ev.dump("b1")
        # The export never moved.
        assert (await exports(c))["e0"] == "top"
        # The job let go of its target.
        await c.execute("blockdev-del", {"node-name": "tgt"})
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(tgt)
    check_clean(top)
    assert_identical(tgt, ref)
    rc, out = compare(top, ref)
    assert rc == 1, "the guest's writes are in the source: " + out


def test_backup_sync_top_copies_only_the_top_layer(dm, workdir):
    base, mid, top, ref = make_chain(workdir)
    tgt = workdir / "tgt.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", tgt, "16M")

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        await c.execute("blockdev-add", qcow2_node("tgt", tgt))
        await c.execute("blockdev-backup", {"job-id": "b1", "device": "top", "target": "tgt",
                                            "sync": "top"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="b1")
        await ev.status("b1", "null")
        d = done["data"]
        assert d["type"] == "backup" and "error" not in d, d
        assert d["len"] == d["offset"], d
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(tgt)
    assert allocated(tgt) == [(5 * MiB, 7 * MiB)]
    # Put on mid, it is the whole chain again.
    sh("qemu-img", "rebase", "-u", "-b", mid, "-F", "qcow2", tgt)
    assert_identical(tgt, ref)


def test_backup_sync_none_keeps_the_old_data_of_overwritten_clusters(dm, workdir):
    """Fleecing: a sync=none backup into an overlay of the source copies
    only what the guest is about to overwrite, so the overlay keeps showing
    the disk as it was; the job runs until cancelled."""
    base, mid, top, ref = make_chain(workdir)
    want = with_guest_data(workdir, ref)
    fl = workdir / "fleece.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", top, "-F", "qcow2", fl)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        await c.execute("blockdev-add", {**qcow2_node("fl", fl), "backing": "top"})
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("blockdev-backup", {"job-id": "f1", "device": "top", "target": "fl",
                                            "sync": "none"})
        await ev.status("f1", "running")
        await guest_overwrites(sock)
        info = await job_info(c, "f1")
        assert info["status"] == "running" and info["type"] == "backup", info
        await c.execute("block-job-cancel", {"device": "f1"})
        await ev.wait("BLOCK_JOB_CANCELLED", device="f1")
        await ev.status("f1", "null")
        await c.execute("blockdev-del", {"node-name": "fl"})
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(fl)
    check_clean(top)
    assert_identical(top, want)
    # fleece.qcow2 holds the old [0, 4 MiB); the rest reads through top.
    assert within(allocated(fl), 0, 4 * MiB), allocated(fl)
    assert_identical(fl, ref)


# --------------------------------------------------------------------------
# incremental backup


def test_incremental_backup_copies_only_dirty_clusters_and_clears_the_bitmap(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x11)
    before = workdir / "before.raw"
    sh("qemu-img", "convert", "-O", "raw", src, before)
    full = workdir / "full.qcow2"
    inc = workdir / "inc.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        sh("qemu-img", "create", "-f", "qcow2", full, "16M")
        await c.execute("blockdev-add", qcow2_node("full", full))
        # The bitmap starts at the instant of the full backup (nothing
        # writes in between here; test_transaction_starts_a_backup_and_its_bitmap_at_once
        # does the two in one transaction).
        await c.execute("block-dirty-bitmap-add",
                        {"node": "src", "name": "bm0", "granularity": 65536})
        await c.execute("blockdev-backup",
                        {"job-id": "f1", "device": "src", "target": "full", "sync": "full"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="f1")
        assert "error" not in done["data"], done
        await ev.status("f1", "null")
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["name"] == "bm0" and bm["count"] == 0, bm
        # The guest writes within the first MiB only.
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", MiB)
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert 0 < bm["count"] <= MiB and bm["count"] % 65536 == 0, bm
        dirty = bm["count"]
        # The incremental target sits on the full one.
        await c.execute("blockdev-del", {"node-name": "full"})
        sh("qemu-img", "create", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
        await c.execute("blockdev-add", qcow2_node("inc", inc))
        await c.execute("blockdev-backup", {"job-id": "i1", "device": "src", "target": "inc",
                                            "sync": "bitmap", "bitmap": "bm0",
                                            "bitmap-mode": "on-success"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="i1")
        await ev.status("i1", "null")
        d = done["data"]
        assert d["type"] == "backup" and "error" not in d, d
        assert d["len"] == d["offset"] == dirty, d
        assert backup_history_ok(ev.of("i1")), ev.dump("i1")
        assert backup_history_ok(ev.of("f1")), ev.dump("f1")
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["name"] == "bm0" and bm["count"] == 0 and bm["recording"] is True, bm
        await c.disconnect()
        return dirty

    dirty = run(go())
    dm.stop()
    for p in (src, full, inc):
        check_clean(p)
    assert_identical(full, before)
    assert_identical(inc, src)
    rc, out = compare(src, before)
    assert rc == 1, out
    own = allocated(inc)
    assert within(own, 0, MiB), own
    assert sum(t - s for s, t in own) == dirty, own


def test_writes_during_an_incremental_backup_stay_dirty_for_the_next(dm, workdir):
    """The bitmap's successor: what the guest writes while the incremental
    backup runs is in the bitmap afterwards (on-success); the target holds
    the dirty clusters."""
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x11)
    inc = workdir / "inc.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", inc, "16M")
    snap = workdir / "snap.raw"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("blockdev-add", qcow2_node("inc", inc))
        await c.execute("block-dirty-bitmap-add",
                        {"node": "src", "name": "bm0", "granularity": 65536})
        # 4 MiB of the guest's own data (0xa5) before the backup.
        await guest_overwrites(sock, 4 * MiB)
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["count"] == 4 * MiB, bm
        # Slow: 4 MiB at 64 KiB/s (QEMU copies up to 1 MiB before its rate
        # limit first sleeps).
        await c.execute("blockdev-backup", {"job-id": "i1", "device": "src", "target": "inc",
                                            "sync": "bitmap", "bitmap": "bm0",
                                            "bitmap-mode": "on-success", "speed": 65536})
        await ev.status("i1", "running")
        # The guest writes the first 512 KiB again (the same 0xa5: the data
        # does not change, but the writes are recorded).
        await guest_overwrites(sock, 512 * 1024)
        info = await job_info(c, "i1")
        assert info is not None and info["status"] == "running", info
        await c.execute("block-job-set-speed", {"device": "i1", "speed": 0})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="i1")
        await ev.status("i1", "null")
        assert "error" not in done["data"] and done["data"]["len"] == 4 * MiB, done
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["count"] == 512 * 1024 and bm["recording"] is True, bm
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(inc)
    assert allocated(inc) == [(0, 4 * MiB)]
    read_pattern(inc, 0xa5, 0, 4 * MiB)
    sh("qemu-img", "convert", "-O", "raw", src, snap)
    assert snap.read_bytes()[:4 * MiB] == b"\xa5" * (4 * MiB)


def test_full_backup_with_a_bitmap_starts_a_new_incremental_chain(dm, workdir):
    """QEMU's "new incremental backup anchor point" (docs/interop/bitmaps):
    sync=full with bitmap + bitmap-mode=on-success copies everything and
    clears the bitmap when it succeeds."""
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x11)
    full = workdir / "full.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", full, "16M")

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("blockdev-add", qcow2_node("full", full))
        await c.execute("block-dirty-bitmap-add", {"node": "src", "name": "bm0"})
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", MiB)
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["count"] > 0, bm
        await c.execute("blockdev-backup", {"job-id": "f1", "device": "src", "target": "full",
                                            "sync": "full", "bitmap": "bm0",
                                            "bitmap-mode": "on-success"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="f1")
        await ev.status("f1", "null")
        d = done["data"]
        assert "error" not in d and d["len"] == d["offset"] == 16 * MiB, d
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["name"] == "bm0" and bm["count"] == 0 and bm["recording"] is True, bm
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(full)
    assert_identical(full, src)


def test_transaction_starts_a_backup_and_its_bitmap_at_once(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x11)
    full = workdir / "full.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", full, "16M")

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        await c.execute("blockdev-add", qcow2_node("full", full))
        # A failing action: neither the bitmap nor the job is left.
        with pytest.raises(ExecuteError) as e:
            await c.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm0"}},
                {"type": "blockdev-backup",
                 "data": {"job-id": "f1", "device": "src", "target": "nope", "sync": "full"}},
            ]})
        assert "nope" in str(e.value), str(e.value)
        assert "dirty-bitmaps" not in (await nodes(c))["src"]
        assert await c.execute("query-block-jobs") == []
        await c.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "bm0", "granularity": 65536}},
            {"type": "blockdev-backup",
             "data": {"job-id": "f1", "device": "src", "target": "full", "sync": "full"}},
        ]})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="f1")
        await ev.status("f1", "null")
        d = done["data"]
        assert d["type"] == "backup" and "error" not in d and d["len"] == d["offset"] == 16 * MiB, d
        assert backup_history_ok(ev.of("f1")), ev.dump("f1")
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["name"] == "bm0" and bm["count"] == 0 and bm["recording"] is True, bm
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(full)
    assert_identical(full, src)


# --------------------------------------------------------------------------
# pause, resume, set-speed, cancel, and the verbs a state refuses


def test_pause_resume_set_speed_and_cancel_a_running_stream(dm, workdir):
    """A stream at 1 MiB/s of 32 MiB (it copies 512 KiB steps and sleeps
    between them): it is certainly still running while it is steered."""
    back = workdir / "back.qcow2"
    filled_image(back, 32)
    over = workdir / "over.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", back, "-F", "qcow2", over)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("over", over))
        await c.execute("block-stream", {"job-id": "s", "device": "over", "speed": MiB})
        info = await reach(c, ev, "s", "running")
        # query-block-jobs' BlockJobInfo, as QSD 7.2 fills it.
        assert set(info) == {"type", "device", "len", "offset", "busy", "paused", "speed",
                             "io-status", "ready", "status", "auto-finalize", "auto-dismiss"}, info
        assert info["type"] == "stream" and info["speed"] == MiB and info["paused"] is False, info
        assert info["len"] == 32 * MiB and info["ready"] is False and info["io-status"] == "ok", info

        await c.execute("block-job-pause", {"device": "s"})
        info = await reach(c, ev, "s", "paused")
        assert info["paused"] is True and info["busy"] is False, info
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-pause", {"device": "s"})
        assert str(e.value) == "Job is already paused"
        o1 = (await job_info(c, "s"))["offset"]
        await asyncio.sleep(0.5)
        o2 = (await job_info(c, "s"))["offset"]
        assert o1 == o2 < 32 * MiB
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-complete", {"device": "s"})
        assert str(e.value) == "Job 's' in state 'paused' cannot accept command verb 'complete'"

        await c.execute("block-job-resume", {"device": "s"})
        info = await reach(c, ev, "s", "running")
        assert info["paused"] is False, info
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-resume", {"device": "s"})
        assert str(e.value) == "Can't resume a job that was not paused"
        for cmd, args, verb in [("block-job-complete", {"device": "s"}, "complete"),
                                ("block-job-finalize", {"id": "s"}, "finalize"),
                                ("block-job-dismiss", {"id": "s"}, "dismiss")]:
            with pytest.raises(ExecuteError) as e:
                await c.execute(cmd, args)
            assert str(e.value) == f"Job 's' in state 'running' cannot accept command verb '{verb}'"
            assert e.value.error_class == "GenericError"
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-set-speed", {"device": "s", "speed": -1})
        assert str(e.value) == "Parameter 'speed' expects a non-negative value", str(e.value)

        await c.execute("block-job-set-speed", {"device": "s", "speed": 2 * MiB})
        info = await job_info(c, "s")
        assert info["speed"] == 2 * MiB and info["offset"] < 32 * MiB, info
        # query-jobs has the same job, in the generic shape.
        [j] = await c.execute("query-jobs")
        assert j["id"] == "s" and j["type"] == "stream" and j["status"] == "running", j
        assert j["total-progress"] == 32 * MiB and j["current-progress"] < 32 * MiB, j

        await c.execute("block-job-cancel", {"device": "s"})
        cancelled = await ev.wait("BLOCK_JOB_CANCELLED", device="s")
        await ev.status("s", "null")
        d = cancelled["data"]
        assert d["type"] == "stream" and d["speed"] == 2 * MiB and d["len"] == 32 * MiB, d
        assert 0 < d["offset"] < 32 * MiB, d
        assert ev.named("BLOCK_JOB_COMPLETED") == []
        hist = ev.of("s")
        assert hist[:2] == ["created", "running"], ev.dump("s")
        assert hist[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"], ev.dump("s")
        assert await c.execute("query-block-jobs") == []
        # A cancelled stream leaves the chain as it was.
        assert (await nodes(c))["over"]["backing_file_depth"] == 1
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(over)
    assert img_info(over)["backing-filename"] == str(back)
    assert_identical(over, back)


def test_cancel_of_a_paused_job(dm, workdir):
    """A user-paused job is cancelled without being resumed first."""
    back = workdir / "back.qcow2"
    filled_image(back, 32)
    over = workdir / "over.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", back, "-F", "qcow2", over)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("over", over))
        await c.execute("block-stream", {"job-id": "s", "device": "over", "speed": MiB})
        await reach(c, ev, "s", "running")
        await c.execute("block-job-pause", {"device": "s"})
        await reach(c, ev, "s", "paused")
        # set-speed is accepted while paused.
        await c.execute("block-job-set-speed", {"device": "s", "speed": 2 * MiB})
        assert (await job_info(c, "s"))["speed"] == 2 * MiB
        # QEMU: block-job-cancel of a user-paused job needs force.
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-cancel", {"device": "s"})
        assert str(e.value) == "The block job for device 's' is currently paused"
        assert (await job_info(c, "s"))["status"] == "paused"
        await c.execute("block-job-cancel", {"device": "s", "force": True})
        cancelled = await ev.wait("BLOCK_JOB_CANCELLED", device="s")
        await ev.status("s", "null")
        assert cancelled["data"]["speed"] == 2 * MiB, cancelled
        hist = ev.of("s")
        assert hist[-5:] == ["running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"], \
            ev.dump("s")
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(over)
    assert_identical(over, back)


def test_block_job_commands_on_an_unknown_job(dm, workdir):
    async def go():
        c = await connect(dm.monitor)
        for cmd, args in [("block-job-pause", {"device": "nope"}),
                          ("block-job-resume", {"device": "nope"}),
                          ("block-job-cancel", {"device": "nope"}),
                          ("block-job-complete", {"device": "nope"}),
                          ("block-job-set-speed", {"device": "nope", "speed": 1}),
                          ("block-job-finalize", {"id": "nope"}),
                          ("block-job-dismiss", {"id": "nope"})]:
            with pytest.raises(ExecuteError) as e:
                await c.execute(cmd, args)
            # QEMU: find_block_job_locked(), class DeviceNotActive.
            got = (e.value.error_class, str(e.value))
            assert got == ("DeviceNotActive", "Block job 'nope' not found"), (cmd, got)
        # The job-* commands: QEMU 7.2 says just "Job not found" (job-qmp.c);
        # ours names the job ("Job 'nope' not found", tests/qmp/test_jobs.py).
        with pytest.raises(ExecuteError) as e:
            await c.execute("job-pause", {"id": "nope"})
        assert e.value.error_class == "GenericError", e.value.error_class
        assert str(e.value) in ("Job not found", "Job 'nope' not found"), str(e.value)
        await c.disconnect()

    run(go())


# --------------------------------------------------------------------------
# a target that runs out of space


@pytest.fixture
def tmpfs(workdir):
    """mount(size) mounts a tmpfs of that size and gives its path; all are
    unmounted at the end."""
    mounted = []

    def mount(size):
        mnt = workdir / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs (the test needs root): {r.stderr}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)])


def raw_file(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def test_mirror_to_a_full_target_reports_enospc(dm, workdir, tmpfs):
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x77)
    small = tmpfs("2M")
    tgt = small / "tgt.raw"
    raw_file(tgt, 16 * MiB)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": str(tgt)}})
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "tgt",
                                            "sync": "full", "on-target-error": "report"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        errors = ev.named("BLOCK_JOB_ERROR", "m1")
        assert errors, ev.log
        assert all(e == {"device": "m1", "operation": "write", "action": "report"}
                   for e in errors), errors
        d = done["data"]
        assert d["type"] == "mirror" and "No space left on device" in d.get("error", ""), d
        assert d["offset"] < d["len"] == 16 * MiB, d
        hist = ev.of("m1")
        assert hist[:2] == ["created", "running"], ev.dump("m1")
        assert hist[-5:] == ["BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED",
                             "concluded", "null"], ev.dump("m1")
        assert "ready" not in hist
        assert await c.execute("query-block-jobs") == []
        # The source and its export are unharmed.
        assert (await exports(c))["e0"] == "src"
        r = await asyncio.to_thread(bench, sock, "randread", "0.3")
        assert r["iops"] > 0
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(src)


@pytest.mark.parametrize("policy", ["stop", "enospc"])
@pytest.mark.parametrize("kind", ["backup", "mirror"])
def test_a_full_target_stops_the_job_until_space_is_freed(dm, workdir, tmpfs, kind, policy):
    """on-target-error stop (or enospc, which stops on ENOSPC): the job
    pauses with io-status nospace; resumed after room is made, it ends
    well."""
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x77)
    mnt = tmpfs("20M")
    filler = mnt / "filler"
    filler.write_bytes(b"\xff" * (10 * MiB))
    tgt = mnt / "tgt.raw"
    raw_file(tgt, 16 * MiB)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": str(tgt)}})
        await c.execute(f"blockdev-{kind}", {"job-id": "j1", "device": "src", "target": "tgt",
                                             "sync": "full", "on-target-error": policy})
        err = await ev.wait("BLOCK_JOB_ERROR", device="j1")
        assert err["data"] == {"device": "j1", "operation": "write", "action": "stop"}, err
        info = await reach(c, ev, "j1", "paused")
        assert info["paused"] is True and info["io-status"] == "nospace", info
        assert info["offset"] < 16 * MiB and info["ready"] is False, info
        assert all(e["action"] == "stop" for e in ev.named("BLOCK_JOB_ERROR")), ev.dump("j1")
        # The guest still reads the source.
        r = await asyncio.to_thread(bench, sock, "randread", "0.3")
        assert r["iops"] > 0
        filler.unlink()
        await c.execute("block-job-resume", {"device": "j1"})
        if kind == "mirror":
            await ev.wait("BLOCK_JOB_READY", device="j1")
            assert (await job_info(c, "j1"))["io-status"] == "ok"
            await c.execute("block-job-complete", {"device": "j1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="j1")
        await ev.status("j1", "null")
        d = done["data"]
        assert "error" not in d and d["len"] == d["offset"] == 16 * MiB, d
        hist = ev.of("j1")
        assert hist[:2] == ["created", "running"], ev.dump("j1")
        assert hist[-5:] == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"], \
            ev.dump("j1")
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(src)
    assert_identical(tgt, src)


@pytest.mark.parametrize("kind", ["backup", "mirror"])
def test_a_job_stopped_on_a_full_target_can_be_cancelled(dm, workdir, tmpfs, kind):
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x77)
    small = tmpfs("2M")
    tgt = small / "tgt.raw"
    raw_file(tgt, 16 * MiB)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": str(tgt)}})
        await c.execute(f"blockdev-{kind}", {"job-id": "j1", "device": "src", "target": "tgt",
                                             "sync": "full", "on-target-error": "stop"})
        await ev.wait("BLOCK_JOB_ERROR", device="j1")
        await reach(c, ev, "j1", "paused")
        # Stopped on an error, the job counts as user-paused: cancel needs
        # force (block-job-cancel) or the generic job-cancel.
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-cancel", {"device": "j1"})
        assert str(e.value) == "The block job for device 'j1' is currently paused"
        await c.execute("job-cancel", {"id": "j1"})
        await ev.wait("BLOCK_JOB_CANCELLED", device="j1")
        await ev.status("j1", "null")
        hist = ev.of("j1")
        assert hist[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"], \
            ev.dump("j1")
        assert "BLOCK_JOB_COMPLETED" not in hist
        assert await c.execute("query-block-jobs") == []
        assert (await exports(c))["e0"] == "src"
        r = await asyncio.to_thread(bench, sock, "randread", "0.3")
        assert r["iops"] > 0
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(src)


@pytest.mark.parametrize("mode", ["on-success", "always"])
def test_a_failed_incremental_backup_and_its_bitmap(dm, workdir, tmpfs, mode):
    """An incremental backup that fails (its target fills up): with
    on-success the bitmap keeps every dirty cluster for the next try; with
    always it loses only the clusters that were copied."""
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x11)
    small = tmpfs("2M")
    tgt = small / "inc.raw"
    raw_file(tgt, 16 * MiB)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": str(tgt)}})
        await c.execute("block-dirty-bitmap-add",
                        {"node": "src", "name": "bm0", "granularity": 65536})
        await guest_overwrites(sock, 8 * MiB)
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["count"] == 8 * MiB, bm
        await c.execute("blockdev-backup", {"job-id": "i1", "device": "src", "target": "tgt",
                                            "sync": "bitmap", "bitmap": "bm0",
                                            "bitmap-mode": mode})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="i1")
        await ev.status("i1", "null")
        assert "No space left on device" in done["data"].get("error", ""), done
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["name"] == "bm0" and bm["recording"] is True and bm["busy"] is False, bm
        if mode == "on-success":
            assert bm["count"] == 8 * MiB, bm
        else:
            assert 0 < bm["count"] < 8 * MiB, bm
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(src)


def test_grouped_backups_fail_together(dm, workdir, tmpfs):
    """transaction with completion-mode grouped: when one backup fails (its
    target fills up), the other, still running, is cancelled with it."""
    a, b = workdir / "a.qcow2", workdir / "b.qcow2"
    filled_image(a, 16, 0x0a)
    filled_image(b, 16, 0x0b)
    small = tmpfs("2M")
    tb = small / "tb.raw"
    raw_file(tb, 16 * MiB)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("a", a))
        await c.execute("blockdev-add", qcow2_node("b", b))
        ta = await add_target(c, workdir, "ta")
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "tb",
                                         "file": {"driver": "file", "filename": str(tb)}})
        await c.execute("transaction", {
            "actions": [
                {"type": "blockdev-backup",
                 "data": {"job-id": "ja", "device": "a", "target": "ta", "sync": "full",
                          "speed": MiB}},
                {"type": "blockdev-backup",
                 "data": {"job-id": "jb", "device": "b", "target": "tb", "sync": "full"}}],
            "properties": {"completion-mode": "grouped"}})
        await ev.seen("ja", "null")
        await ev.seen("jb", "null")
        [eb] = ev.named("BLOCK_JOB_COMPLETED", "jb")
        assert "No space left on device" in eb.get("error", ""), eb
        assert ev.named("BLOCK_JOB_COMPLETED", "ja") == [], ev.dump("ja")
        [ea] = ev.named("BLOCK_JOB_CANCELLED", "ja")
        assert ea["offset"] < ea["len"] == 16 * MiB, ea
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()
        return ta

    ta = run(go())
    dm.stop()
    for p in (a, b, ta):
        check_clean(p)


def test_a_failed_job_kept_by_auto_dismiss_off_shows_its_error(dm, workdir, tmpfs):
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x77)
    small = tmpfs("2M")
    tgt = small / "tgt.raw"
    raw_file(tgt, 16 * MiB)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": str(tgt)}})
        await c.execute("blockdev-backup", {"job-id": "b1", "device": "src", "target": "tgt",
                                            "sync": "full", "auto-dismiss": False})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="b1")
        await ev.status("b1", "concluded")
        assert "No space left on device" in done["data"]["error"], done
        # on-target-error defaults to report.
        errors = ev.named("BLOCK_JOB_ERROR", "b1")
        assert errors and all(e["action"] == "report" and e["operation"] == "write"
                              for e in errors), errors
        info = await job_info(c, "b1")
        assert info["status"] == "concluded" and "No space left on device" in info["error"], info
        [j] = await c.execute("query-jobs")
        assert j["status"] == "concluded" and "No space left on device" in j["error"], j
        await c.execute("block-job-dismiss", {"id": "b1"})
        await ev.status("b1", "null")
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(src)


# --------------------------------------------------------------------------
# jobs outlive their export; the daemon stops with jobs running


def test_job_goes_on_after_the_export_is_deleted(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("block-export-add", export("e0", "top", workdir / "e0.sock"))
        # 4 MiB to copy at 1 MiB/s: seconds, while the export goes.
        await c.execute("block-stream", {"job-id": "s1", "device": "top", "base-node": n["base"],
                                         "speed": MiB})
        await ev.status("s1", "running")
        await c.execute("block-export-del", {"id": "e0"})
        await ev.wait("BLOCK_EXPORT_DELETED", id="e0")
        assert await exports(c) == {}
        info = await job_info(c, "s1")
        assert info is not None and info["status"] in ("running", "paused"), info
        await c.execute("block-job-set-speed", {"device": "s1", "speed": 0})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="s1")
        await ev.status("s1", "null")
        assert "error" not in done["data"], done
        assert done["data"]["len"] == done["data"]["offset"]
        assert (await nodes(c))["top"]["backing_file_depth"] == 1
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(top)
    check_clean(base)
    assert img_info(top)["backing-filename"] == str(base)
    assert_identical(top, ref)


def test_three_jobs_at_once(dm, workdir):
    """A stream, a mirror and a backup on three disks at the same time.
    (One monitor: QSD serves one client per --monitor chardev; a second
    client on the same socket gets no greeting.)"""
    da, db, dc = (workdir / d for d in ("a", "b", "c"))
    for d in (da, db, dc):
        d.mkdir()
    base, mid, top, ref = make_chain(da)
    msrc, bsrc = db / "m.qcow2", dc / "b.qcow2"
    filled_image(msrc, 16, 0x3c)
    filled_image(bsrc, 16, 0x4d)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("blockdev-add", qcow2_node("m", msrc))
        await c.execute("blockdev-add", qcow2_node("b", bsrc))
        mtgt = await add_target(c, db, "mt")
        btgt = await add_target(c, dc, "bt")
        await c.execute("block-stream", {"job-id": "js", "device": "top", "base-node": n["base"]})
        await c.execute("blockdev-mirror", {"job-id": "jm", "device": "m", "target": "mt",
                                            "sync": "full"})
        await c.execute("blockdev-backup", {"job-id": "jb", "device": "b", "target": "bt",
                                            "sync": "full"})
        await ev.seen("jm", "BLOCK_JOB_READY")
        await c.execute("block-job-complete", {"device": "jm"})
        for job in ("js", "jm", "jb"):
            await ev.seen(job, "null")
            assert ev.of(job)[-3:] == ["BLOCK_JOB_COMPLETED", "concluded", "null"], ev.dump(job)
            [done] = ev.named("BLOCK_JOB_COMPLETED", job)
            assert "error" not in done and done["len"] == done["offset"], done
        assert without_pauses(ev.of("js")) == DONE, ev.dump("js")
        assert without_pauses(ev.of("jb")) == DONE, ev.dump("jb")
        assert without_pauses(ev.of("jm")) == [
            "created", "running", "ready", "BLOCK_JOB_READY", "waiting", "pending",
            "BLOCK_JOB_COMPLETED", "concluded", "null"], ev.dump("jm")
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()
        return mtgt, btgt

    mtgt, btgt = run(go())
    dm.stop()
    for p in (top, base, msrc, bsrc, mtgt, btgt):
        check_clean(p)
    assert_identical(top, ref)
    assert_identical(mtgt, msrc)
    assert_identical(btgt, bsrc)


def test_mirror_completes_after_its_export_is_deleted(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 32)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        tgt = await add_target(c, workdir, size="32M")
        await c.execute("block-export-add", export("e0", "src", workdir / "e0.sock"))
        await c.execute("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "tgt",
                                            "sync": "full", "speed": MiB})
        await ev.status("m1", "running")
        await c.execute("block-export-del", {"id": "e0"})
        await ev.wait("BLOCK_EXPORT_DELETED", id="e0")
        info = await job_info(c, "m1")
        assert info is not None and info["status"] == "running", info
        await c.execute("block-job-set-speed", {"device": "m1", "speed": 0})
        await ev.wait("BLOCK_JOB_READY", device="m1")
        await c.execute("block-job-complete", {"device": "m1"})
        done = await ev.wait("BLOCK_JOB_COMPLETED", device="m1")
        await ev.status("m1", "null")
        assert "error" not in done["data"], done
        assert await exports(c) == {}
        # Nothing used the source: after the pivot both nodes are free.
        await c.execute("blockdev-del", {"node-name": "src"})
        await c.execute("blockdev-del", {"node-name": "tgt"})
        await c.disconnect()
        return tgt

    tgt = run(go())
    dm.stop()
    check_clean(tgt)
    check_clean(src)
    assert_identical(tgt, src)


def test_stopping_the_daemon_with_running_jobs_leaves_clean_images(dm, workdir):
    base, mid, top, ref = make_chain(workdir)
    src = workdir / "src.qcow2"
    filled_image(src, 16)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await c.execute("blockdev-add", qcow2_node("src", src))
        tgt = await add_target(c, workdir)
        await c.execute("block-stream", {"job-id": "s1", "device": "top", "base-node": n["base"],
                                         "speed": MiB})
        await c.execute("blockdev-backup", {"job-id": "b1", "device": "src", "target": "tgt",
                                            "sync": "full", "speed": MiB})
        await ev.status("s1", "running")
        await ev.status("b1", "running")
        assert {j["device"] for j in await c.execute("query-block-jobs")} == {"s1", "b1"}
        await c.disconnect()
        return tgt

    tgt = run(go())
    # SIGTERM: the daemon cancels its jobs and closes the images.
    assert dm.stop() == 0, (dm.workdir / "daemon.log").read_text()
    for p in (top, mid, base, src, tgt):
        check_clean(p)
    assert_identical(top, ref)
    assert img_info(top)["backing-filename"] in ("mid.qcow2", str(mid), str(base))


# --------------------------------------------------------------------------
# bad arguments


def test_bad_job_arguments_name_the_problem_and_leave_nothing_behind(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        n = await open_chain(c, base, mid, top)
        await add_target(c, workdir)
        await add_target(c, workdir, "other")
        await add_target(c, workdir, "t3")
        await add_target(c, workdir, "small", size="8M")
        await c.execute("block-export-add", export("eo", "other", workdir / "eo.sock"))
        before = set(await nodes(c))

        # Each refusal is checked; all mismatches are reported together.
        wrong = []

        async def refused(cmd, args, text, cls="GenericError", exact=True):
            try:
                await c.execute(cmd, args)
                wrong.append(f"{cmd} {args}: accepted")
                # Accepted by mistake: take the job away again.
                if "job-id" in args:
                    await c.execute("block-job-cancel", {"device": args["job-id"], "force": True})
                    await ev.status(args["job-id"], "null")
                return
            except ExecuteError as e:
                msg, got_cls = str(e), e.error_class
            if callable(text):
                if not text(msg):
                    wrong.append(f"{cmd} {args}: {msg!r}")
            elif (msg != text) if exact else (text not in msg):
                wrong.append(f"{cmd} {args}: {msg!r}, want {text!r}")
            if got_cls != cls:
                wrong.append(f"{cmd} {args}: class {got_cls}, want {cls}")
            if await c.execute("query-block-jobs") != []:
                wrong.append(f"{cmd} {args}: left a job behind")
            if set(await nodes(c)) != before:
                wrong.append(f"{cmd} {args}: nodes {set(await nodes(c)) ^ before} changed")

        nf = "Cannot find device='nope' nor node-name='nope'"
        # unknown nodes
        await refused("block-stream", {"job-id": "e", "device": "nope"}, nf)
        await refused("block-commit", {"job-id": "e", "device": "nope"},
                      "Device 'nope' not found", "DeviceNotFound")
        await refused("blockdev-mirror", {"job-id": "e", "device": "nope", "target": "tgt",
                                          "sync": "full"}, nf)
        await refused("blockdev-mirror", {"job-id": "e", "device": "top", "target": "nope",
                                          "sync": "full"}, nf)
        await refused("blockdev-backup", {"job-id": "e", "device": "nope", "target": "tgt",
                                          "sync": "full"}, nf)
        await refused("blockdev-backup", {"job-id": "e", "device": "top", "target": "nope",
                                          "sync": "full"}, nf)
        await refused("block-stream", {"job-id": "e", "device": "top", "base-node": "nope"},
                      "Cannot find device='' nor node-name='nope'")
        # the source as its own target
        await refused("blockdev-mirror", {"job-id": "e", "device": "top", "target": "top",
                                          "sync": "full"}, "Can't mirror node into itself")
        await refused("blockdev-backup", {"job-id": "e", "device": "top", "target": "top",
                                          "sync": "full"}, "Source and target cannot be the same")
        await refused("blockdev-backup", {"job-id": "e", "device": "top", "target": "small",
                                          "sync": "full"},
                      "Source and target image have different sizes")
        # a mirror target that an export writes: QEMU 7.2 refuses it as a
        # permission conflict ("Permission conflict on node 'other':
        # permissions 'consistent read, write' are both required by an
        # unnamed block device (uses node 'other' as 'root' child) and
        # unshared by an unnamed block device (...)").
        await refused("blockdev-mirror", {"job-id": "e", "device": "top", "target": "other",
                                          "sync": "full"}, "node 'other'", exact=False)
        # bad enum values and missing bitmaps. QEMU: "Parameter 'sync' does
        # not accept value 'bogus'"; our daemon words every argument error
        # its own way ("Invalid arguments for 'blockdev-mirror': parameter
        # 'sync': unknown variant `bogus`, ..."), naming the parameter and
        # the value too: either is accepted.
        def bad_sync(msg):
            return msg == "Parameter 'sync' does not accept value 'bogus'" or \
                ("'sync'" in msg and "bogus" in msg)
        for cmd in ("blockdev-mirror", "blockdev-backup"):
            await refused(cmd, {"job-id": "e", "device": "top", "target": "tgt", "sync": "bogus"},
                          bad_sync)
        await refused("blockdev-backup", {"job-id": "e", "device": "top", "target": "tgt",
                                          "sync": "incremental"},
                      "must provide a valid bitmap name for 'incremental' sync mode")
        await refused("blockdev-backup", {"job-id": "e", "device": "top", "target": "tgt",
                                          "sync": "bitmap", "bitmap": "nob"},
                      "Bitmap 'nob' could not be found")
        # bases that are not in the chain
        await refused("block-stream", {"job-id": "e", "device": "top", "base-node": "other"},
                      "Node 'other' is not a backing image of 'top'")
        await refused("block-stream", {"job-id": "e", "device": "top", "base-node": "top"},
                      "Node 'top' is not a backing image of 'top'")
        await refused("block-commit", {"job-id": "e", "device": "top", "base-node": "other"},
                      "'other' is not in this backing file chain")
        await refused("block-commit", {"job-id": "e", "device": "top", "top-node": "other"},
                      "'other' is not in this backing file chain")
        await refused("block-commit", {"job-id": "e", "device": "top", "top-node": n["base"],
                                       "base-node": n["mid"]},
                      f"'{n['mid']}' is not in this backing file chain")
        await refused("block-commit", {"job-id": "e", "device": "top", "top-node": "top",
                                       "base-node": "top"}, "cannot commit an image into itself")
        await refused("block-commit", {"job-id": "e", "device": "tgt"},
                      "cannot commit an image into itself")
        # job ids
        await refused("block-stream", {"job-id": "9x", "device": "top"}, "Invalid job ID '9x'")
        await refused("block-stream", {"job-id": "", "device": "top"}, "Invalid job ID ''")
        await refused("block-stream", {"job-id": "e", "device": "top", "speed": -5},
                      "Parameter 'speed' expects a non-negative value")

        # A job that stays running: the ids and nodes it holds are taken.
        await c.execute("blockdev-backup", {"job-id": "j1", "device": "top", "target": "tgt",
                                            "sync": "full", "speed": 1})
        await ev.status("j1", "running")
        [j] = await c.execute("query-block-jobs")
        assert j["device"] == "j1" and j["type"] == "backup" and j["speed"] == 1, j
        during = set(await nodes(c))

        async def busy(cmd, args, text):
            try:
                await c.execute(cmd, args)
                wrong.append(f"{cmd} {args}: accepted")
                if args.get("job-id", "j1") != "j1":
                    await c.execute("block-job-cancel", {"device": args["job-id"], "force": True})
                    await ev.status(args["job-id"], "null")
                return
            except ExecuteError as e:
                if not text(str(e)) if callable(text) else str(e) != text:
                    wrong.append(f"{cmd} {args}: {str(e)!r}, want {text!r}")
            if [j["device"] for j in await c.execute("query-block-jobs")] != ["j1"]:
                wrong.append(f"{cmd} {args}: jobs changed")
            if set(await nodes(c)) != during:
                wrong.append(f"{cmd} {args}: nodes changed")

        await busy("blockdev-backup", {"job-id": "j1", "device": "other", "target": "t3",
                                       "sync": "full"}, "Job ID 'j1' already in use")
        await busy("block-stream", {"job-id": "j1", "device": "other"},
                   "Job ID 'j1' already in use")
        await busy("blockdev-mirror", {"job-id": "j2", "device": "other", "target": "tgt",
                                       "sync": "full"},
                   "Node 'tgt' is busy: block device is in use by block job: backup")
        await busy("blockdev-backup", {"job-id": "j2", "device": "tgt", "target": "t3",
                                       "sync": "full"},
                   "Node 'tgt' is busy: block device is in use by block job: backup")
        # The job's nodes cannot be deleted under it. QEMU words these
        # differently each ("Node 'tgt' is busy: block device is in use by
        # block job: backup", "Block device top is in use"): the node's name
        # and "busy" or "in use" are what count.
        for node in ("tgt", "top"):
            await busy("blockdev-del", {"node-name": node},
                       lambda m, node=node: node in m and ("busy" in m or "in use" in m))
        await c.execute("block-job-cancel", {"device": "j1", "force": True})
        await ev.wait("BLOCK_JOB_CANCELLED", device="j1")
        await ev.status("j1", "null")
        # Block jobs and other jobs share one namespace: a concluded
        # blockdev-create job keeps its id until it is dismissed.
        await c.execute("blockdev-create", {"job-id": "mk", "options": {
            "driver": "file", "filename": str(workdir / "new.img"), "size": 0}})
        await ev.status("mk", "concluded")
        await refused("block-stream", {"job-id": "mk", "device": "top"},
                      "Job ID 'mk' already in use")
        await c.execute("job-dismiss", {"id": "mk"})
        await ev.status("mk", "null")
        assert not wrong, "\n".join(wrong)
        assert await c.execute("query-block-jobs") == []
        assert set(await nodes(c)) == before
        await c.disconnect()

    run(go())
    dm.stop()
    for p in (top, mid, base):
        check_clean(p)
    assert_identical(top, ref)


def test_bad_mirror_and_backup_options_are_refused_with_qemus_words(dm, workdir):
    base, mid, top, ref = make_chain(workdir)

    async def go():
        c = await connect(dm.monitor)
        await open_chain(c, base, mid, top)
        await add_target(c, workdir)
        await c.execute("block-dirty-bitmap-add", {"node": "top", "name": "bm"})
        before = set(await nodes(c))
        m = {"job-id": "e", "device": "top", "target": "tgt"}
        cases = [
            ("blockdev-mirror", {**m, "sync": "full", "granularity": 1000},
             "Parameter 'granularity' expects a power of 2"),
            ("blockdev-mirror", {**m, "sync": "full", "granularity": 256},
             "Parameter 'granularity' expects a value in range [512B, 64MB]"),
            ("blockdev-mirror", {**m, "sync": "full", "granularity": 128 * MiB},
             "Parameter 'granularity' expects a value in range [512B, 64MB]"),
            ("blockdev-mirror", {**m, "sync": "incremental"},
             "Sync mode 'incremental' not supported"),
            ("blockdev-mirror", {**m, "sync": "bitmap"}, "Sync mode 'bitmap' not supported"),
            ("blockdev-backup", {**m, "sync": "full", "bitmap-mode": "always"},
             "Cannot specify bitmap sync mode without a bitmap"),
            ("blockdev-backup", {**m, "sync": "incremental", "bitmap": "bm",
                                 "bitmap-mode": "always"},
             "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
            ("blockdev-backup", {**m, "sync": "bitmap", "bitmap": "bm"},
             "Bitmap sync mode must be given when providing a bitmap"),
            ("blockdev-backup", {**m, "sync": "top", "bitmap": "bm"},
             "Bitmap sync mode must be given when providing a bitmap"),
            ("blockdev-backup", {**m, "sync": "full", "bitmap": "bm", "bitmap-mode": "never"},
             "Bitmap sync mode 'never' has no meaningful effect"
             " when combined with sync mode 'full'"),
        ]
        wrong = []
        for cmd, args, text in cases:
            try:
                await c.execute(cmd, args)
                wrong.append(f"{cmd} {args}: accepted")
                await c.execute("block-job-cancel", {"device": "e", "force": True})
                await Events(c).status("e", "null")
                continue
            except ExecuteError as e:
                if str(e) != text:
                    wrong.append(f"{cmd} {args}: {str(e)!r}, want {text!r}")
            if await c.execute("query-block-jobs") != [] or set(await nodes(c)) != before:
                wrong.append(f"{cmd} {args}: left something behind")
        assert not wrong, "\n".join(wrong)
        [bm] = (await nodes(c))["top"]["dirty-bitmaps"]
        assert bm["name"] == "bm" and bm["busy"] is False, bm
        await c.disconnect()

    run(go())
