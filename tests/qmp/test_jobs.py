"""Jobs over QMP (qemu.qmp client): blockdev-create as a job for file,
qcow2 and raw, its JOB_STATUS_CHANGE events and query-jobs, job-pause /
job-resume / job-cancel / job-dismiss, and the errors QEMU gives, judged by
qemu-img."""

import asyncio
import json
import os
import subprocess

import pytest
from qemu.qmp import ExecuteError, QMPClient

from conftest import run


async def connect(path):
    c = QMPClient("test")
    await c.connect(path)
    return c


def img_info(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


async def job_events(c, job_id, until, timeout=30):
    """JOB_STATUS_CHANGE statuses of `job_id` up to and including `until`."""
    seen = []
    async with asyncio.timeout(timeout):
        async for ev in c.events:
            if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == job_id:
                seen.append(ev["data"]["status"])
                if ev["data"]["status"] == until:
                    return seen
    return seen


def test_blockdev_create_file_then_qcow2_on_it(daemon, workdir):
    img = workdir / "new.qcow2"

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-create", {"job-id": "c1", "options": {
            "driver": "file", "filename": str(img), "size": 0}})
        assert await job_events(c, "c1", "concluded") == [
            "created", "running", "waiting", "pending", "concluded"]
        jobs = await c.execute("query-jobs")
        assert jobs == [{"id": "c1", "type": "create", "status": "concluded",
                         "current-progress": 0, "total-progress": 0}]
        await c.execute("job-dismiss", {"id": "c1"})
        assert await c.execute("query-jobs") == []

        await c.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        await c.execute("blockdev-create", {"job-id": "c2", "options": {
            "driver": "qcow2", "file": "f", "size": 64 << 20, "cluster-size": 65536,
            "lazy-refcounts": True}})
        assert (await job_events(c, "c2", "concluded"))[-1] == "concluded"
        info = (await c.execute("query-jobs"))[0]
        assert info["status"] == "concluded" and "error" not in info, info
        await c.execute("job-dismiss", {"id": "c2"})
        # The node now holds a qcow2 image: open it through the node.
        await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["q"]["image"]["virtual-size"] == 64 << 20
        await c.execute("blockdev-del", {"node-name": "q"})
        await c.execute("blockdev-del", {"node-name": "f"})
        await c.disconnect()

    run(go())
    info = img_info(img)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    out = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_blockdev_create_raw_resizes_the_file_node(daemon, workdir):
    img = workdir / "r.img"
    img.write_bytes(b"")

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        await c.execute("blockdev-create", {"job-id": "r", "options": {
            "driver": "raw", "file": "f", "size": 3 << 20}})
        await job_events(c, "r", "concluded")
        await c.execute("job-dismiss", {"id": "r"})
        await c.disconnect()

    run(go())
    assert os.path.getsize(img) == 3 << 20


def test_pause_resume_and_cancel_of_a_full_preallocation(daemon, workdir):
    img = workdir / "big.img"

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-create", {"job-id": "big", "options": {
            "driver": "file", "filename": str(img), "size": 256 << 20,
            "preallocation": "full"}})
        # The job may already be past its first steps; pausing is accepted
        # while it runs and takes effect at its next pause point.
        try:
            await c.execute("job-pause", {"id": "big"})
            paused = True
        except ExecuteError as e:
            paused = False
            assert "cannot accept command verb 'pause'" in str(e)
        if paused:
            with pytest.raises(ExecuteError, match="Job is already paused"):
                await c.execute("job-pause", {"id": "big"})
            await c.execute("job-resume", {"id": "big"})
            with pytest.raises(ExecuteError, match="Can't resume a job that was not paused"):
                await c.execute("job-resume", {"id": "big"})
        try:
            await c.execute("job-cancel", {"id": "big"})
        except ExecuteError as e:
            assert "cannot accept command verb 'cancel'" in str(e)  # finished first
        seen = await job_events(c, "big", "concluded")
        info = (await c.execute("query-jobs"))[0]
        if "aborting" in seen:
            assert info["error"] == "Operation canceled", info
        else:
            assert "error" not in info
        assert info["total-progress"] in (0, 256 << 20)
        with pytest.raises(ExecuteError, match="in state 'concluded' cannot accept command verb 'cancel'"):
            await c.execute("job-cancel", {"id": "big"})
        await c.execute("job-dismiss", {"id": "big"})
        await c.disconnect()

    run(go())


def test_create_errors(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        with pytest.raises(ExecuteError, match="node 'nope'"):
            await c.execute("blockdev-create", {"job-id": "e1", "options": {
                "driver": "qcow2", "file": "nope", "size": 1 << 20}})
        with pytest.raises(ExecuteError, match="size"):
            await c.execute("blockdev-create", {"job-id": "e1", "options": {
                "driver": "file", "filename": str(workdir / "x")}})
        with pytest.raises(ExecuteError, match="Invalid job ID"):
            await c.execute("blockdev-create", {"job-id": "9x", "options": {
                "driver": "file", "filename": str(workdir / "x"), "size": 0}})
        # A node in use may not be overwritten.
        (workdir / "used.img").write_bytes(b"\0" * 4096)
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "r",
                                         "file": {"driver": "file", "node-name": "uf",
                                                  "filename": str(workdir / "used.img")}})
        with pytest.raises(ExecuteError, match="in use"):
            await c.execute("blockdev-create", {"job-id": "e2", "options": {
                "driver": "qcow2", "file": "uf", "size": 1 << 20}})
        # A failure inside the job: the job ends with the error.
        await c.execute("blockdev-create", {"job-id": "e3", "options": {
            "driver": "file", "filename": str(workdir / "no-such-dir" / "x"), "size": 0}})
        assert await job_events(c, "e3", "concluded") == [
            "created", "running", "aborting", "concluded"]
        info = (await c.execute("query-jobs"))[0]
        assert "Could not create" in info["error"], info
        await c.execute("job-dismiss", {"id": "e3"})
        with pytest.raises(ExecuteError, match="Job 'e3' not found"):
            await c.execute("job-dismiss", {"id": "e3"})
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()

    run(go())


def test_sigterm_cancels_running_block_jobs_and_leaves_clean_images(daemon, workdir):
    """A mirror and a backup still copying (speed-limited) when SIGTERM
    arrives: both are cancelled before the nodes are flushed and closed,
    the daemon exits 0, and qemu-img finds every image clean, the sources
    unchanged."""
    src, src2 = workdir / "src.qcow2", workdir / "src2.qcow2"
    ref = workdir / "ref.raw"
    for s in (src, src2):
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(s), "32M"], check=True,
                       capture_output=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x3c 0 32M", str(s)], check=True,
                       capture_output=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(ref)], check=True)
    targets = [workdir / "m.qcow2", workdir / "b.qcow2"]
    for t in targets:
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(t), "32M"], check=True,
                       capture_output=True)

    async def go():
        c = await connect(daemon.monitor)
        for name, path in [("src", src), ("src2", src2), ("m", targets[0]),
                           ("b", targets[1])]:
            await c.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                             "file": {"driver": "file", "filename": str(path)}})
        await c.execute("blockdev-mirror", {"job-id": "j-m", "device": "src", "target": "m",
                                            "sync": "full", "speed": 1 << 20})
        await c.execute("blockdev-backup", {"job-id": "j-b", "device": "src2", "target": "b",
                                            "sync": "full", "speed": 1 << 20})
        for _ in range(100):
            jobs = await c.execute("query-block-jobs")
            if all(j["offset"] > 0 for j in jobs) and len(jobs) == 2:
                break
            await asyncio.sleep(0.05)
        assert {j["device"]: j["status"] for j in jobs} == {"j-m": "running", "j-b": "running"}
        await c.disconnect()

    run(go())
    rc = daemon.stop()
    log = (workdir / "daemon.log").read_text()
    assert rc == 0, log
    assert "still running at shutdown" not in log, log
    for img in [src, src2, *targets]:
        out = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert out.returncode == 0 and "No errors were found" in out.stdout, out.stdout
    for s in (src, src2):
        out = subprocess.run(["qemu-img", "compare", str(s), str(ref)], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_mirror_pivot_keeps_the_throttle_filter_in_the_exports_path(daemon, workdir):
    """export -> throttle t0 -> d0: a mirror of the export (device = export
    id) copies d0, below the filter, and the pivot moves the filter's edge
    to the target: the export still goes through t0 and its group."""
    src = workdir / "src.qcow2"
    tgt = workdir / "tgt.qcow2"
    for p in (src, tgt):
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(p), "16M"], check=True,
                       capture_output=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x61 1M 3M", str(src)], check=True,
                   capture_output=True)

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("object-add", {"qom-type": "throttle-group", "id": "tg0",
                                       "limits": {"iops-total": 100000}})
        await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "d0",
                                         "file": {"driver": "file", "filename": str(src)}})
        await c.execute("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                         "throttle-group": "tg0", "file": "d0"})
        await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                         "file": {"driver": "file", "filename": str(tgt)}})
        await c.execute("block-export-add", {"type": "vhost-user-blk", "id": "e0",
                                             "node-name": "t0", "writable": True,
                                             "addr": {"type": "unix",
                                                      "path": str(workdir / "e0.sock")}})
        await c.execute("blockdev-mirror", {"job-id": "m", "device": "e0", "target": "tgt",
                                            "sync": "full"})
        for _ in range(200):
            jobs = await c.execute("query-block-jobs")
            if jobs and jobs[0]["ready"]:
                break
            await asyncio.sleep(0.02)
        assert jobs[0]["ready"], jobs
        await c.execute("block-job-complete", {"device": "m"})
        for _ in range(200):
            if not await c.execute("query-block-jobs"):
                break
            await asyncio.sleep(0.02)
        exports = await c.execute("query-block-exports")
        assert [e["node-name"] for e in exports] == ["t0"], exports
        g = await c.execute("x-debug-query-block-graph")
        name = {n["id"]: n["name"] for n in g["nodes"]}
        edges = {(name[e["parent"]], e["name"]): name[e["child"]] for e in g["edges"]}
        assert edges[("t0", "filtered")] == "tgt", edges
        assert ("d0", "root") not in {(v, k[1]) for k, v in edges.items() if k[0] == "e0"}
        # The source is free now: nobody uses it.
        await c.execute("blockdev-del", {"node-name": "d0"})
        await c.disconnect()

    run(go())
    assert daemon.stop() == 0
    out = subprocess.run(["qemu-img", "compare", str(src), str(tgt)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------
# Sync modes and bitmap modes the other tests do not reach. The guest is
# vub-bench (libblkio); its write buffers hold 0xa5.

from conftest import BENCH_BIN  # noqa: E402

MiB = 1 << 20


def sh(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


def guest_writes(sock, size, runtime="0.3"):
    out = subprocess.run([BENCH_BIN, "--socket", str(sock), "--rw", "randwrite", "--bs", "64k",
                          "--iodepth", "4", "--runtime", runtime, "--ramp", "0", "--size",
                          str(size), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def vhost_export(eid, node, sock):
    return {"type": "vhost-user-blk", "id": eid, "node-name": node, "writable": True,
            "addr": {"type": "unix", "path": str(sock)}}


def qcow2(name, path, **extra):
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}, **extra}


async def until_gone(c, job, timeout=30):
    async with asyncio.timeout(timeout):
        while any(j["device"] == job for j in await c.execute("query-block-jobs")):
            await asyncio.sleep(0.02)


async def until_ready(c, job, timeout=30):
    async with asyncio.timeout(timeout):
        while True:
            jobs = {j["device"]: j for j in await c.execute("query-block-jobs")}
            if jobs[job]["ready"]:
                return
            await asyncio.sleep(0.02)


def map_of(img):
    return json.loads(sh("qemu-img", "map", "--output=json", img))


def test_mirror_sync_none_copies_only_new_writes(daemon, workdir):
    """Source and target are both fresh overlays of one base: a mirror with
    sync=none copies only what the guest writes meanwhile, and after the
    pivot the target, read through the base, is the source's disk."""
    base, src, tgt = workdir / "base.qcow2", workdir / "src.qcow2", workdir / "tgt.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", base, "16M")
    sh("qemu-io", "-c", "write -P 0x17 0 16M", base)
    for o in (src, tgt):
        sh("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", o)
    sock = workdir / "e0.sock"

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("src", src))
        await c.execute("blockdev-add", qcow2("tgt", tgt))
        await c.execute("block-export-add", vhost_export("e0", "src", sock))
        await c.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                            "sync": "none"})
        await until_ready(c, "m")
        guest_writes(sock, 4 * MiB)
        await c.execute("block-job-complete", {"device": "m"})
        await until_gone(c, "m")
        exports = await c.execute("query-block-exports")
        assert exports[0]["node-name"] == "tgt", exports
        await c.disconnect()

    run(go())
    assert daemon.stop() == 0
    for img in (src, tgt):
        out = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
    assert subprocess.run(["qemu-img", "compare", str(src), str(tgt)]).returncode == 0
    # Only the guest's 4 MiB were copied: the target holds no more than that.
    held = sum(e["length"] for e in map_of(tgt) if e["depth"] == 0 and e["data"])
    assert 0 < held <= 4 * MiB, map_of(tgt)


def test_backup_sync_none_copies_old_data_of_what_the_guest_overwrites(daemon, workdir):
    """sync=none: nothing is copied but the old data of clusters the guest
    overwrites, until the job is cancelled (BLOCK_JOB_CANCELLED)."""
    src, tgt = workdir / "src.qcow2", workdir / "tgt.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", src, "16M")
    sh("qemu-io", "-c", "write -P 0x29 0 16M", src)
    sh("qemu-img", "create", "-f", "qcow2", tgt, "16M")
    sock = workdir / "e0.sock"

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("src", src))
        await c.execute("blockdev-add", qcow2("tgt", tgt))
        await c.execute("block-export-add", vhost_export("e0", "src", sock))
        await c.execute("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                            "sync": "none"})
        guest_writes(sock, 2 * MiB)
        [j] = await c.execute("query-block-jobs")
        assert j["status"] == "running" and 0 < j["offset"] <= 2 * MiB, j
        await c.execute("block-job-cancel", {"device": "b"})
        await until_gone(c, "b")
        await c.disconnect()

    run(go())
    assert daemon.stop() == 0
    out = subprocess.run(["qemu-img", "check", str(tgt)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    copied = [e for e in map_of(tgt) if e["data"]]
    assert copied and all(e["start"] + e["length"] <= 2 * MiB for e in copied), copied
    # What was copied is the data from before the guest's writes.
    for e in copied:
        sh("qemu-io", "-r", "-c", f"read -P 0x29 {e['start']} {e['length']}", tgt)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_bitmap_modes_keep_the_bits_a_backup_did_not_settle(daemon, workdir, mode):
    """sync=bitmap with bitmap-mode=never keeps every bit after a
    successful backup (and adds the writes made meanwhile); with
    bitmap-mode=always, a backup cancelled midway clears only what it
    copied."""
    src, tgt = workdir / "src.qcow2", workdir / "tgt.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", src, "32M")
    sh("qemu-img", "create", "-f", "qcow2", tgt, "32M")
    sock = workdir / "e0.sock"

    async def bitmap_count(c):
        n = {x["node-name"]: x for x in await c.execute("query-named-block-nodes")}
        return {b["name"]: b["count"] for b in n["src"].get("dirty-bitmaps", [])}["b0"]

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("src", src))
        await c.execute("blockdev-add", qcow2("tgt", tgt))
        await c.execute("block-export-add", vhost_export("e0", "src", sock))
        await c.execute("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        guest_writes(sock, 32 * MiB, runtime="0.5")
        dirty = await bitmap_count(c)
        assert dirty > 4 * MiB, dirty
        args = {"job-id": "b", "device": "src", "target": "tgt", "sync": "bitmap",
                "bitmap": "b0", "bitmap-mode": mode}
        if mode == "never":
            await c.execute("blockdev-backup", args)
            await until_gone(c, "b")
            assert await bitmap_count(c) == dirty
        else:
            # Slow enough to be cancelled midway: 1 MiB/s.
            await c.execute("blockdev-backup", {**args, "speed": MiB})
            async with asyncio.timeout(30):
                while True:
                    [j] = await c.execute("query-block-jobs")
                    if j["offset"] > 0:
                        break
                    await asyncio.sleep(0.02)
            await c.execute("block-job-cancel", {"device": "b", "force": True})
            await until_gone(c, "b")
            left = await bitmap_count(c)
            assert 0 < left < dirty, (left, dirty)
        await c.disconnect()

    run(go())
    assert daemon.stop() == 0


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_sigkill_during_stream_and_commit_loses_nothing(workdir, delay):
    """The daemon killed (SIGKILL) while a stream flattens one chain and a
    commit merges another, at different moments: every image passes
    qemu-img check (leaked clusters at worst) and each chain still reads as
    it did, whether the kill came before, during or after the header
    changes."""
    from conftest import VUB_BIN, start_daemon

    def chain(d):
        d.mkdir()
        base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
        sh("qemu-img", "create", "-f", "qcow2", base, "32M")
        sh("qemu-io", "-c", "write -P 0x11 0 12M", base)
        sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
        sh("qemu-io", "-c", "write -P 0x22 8M 12M", mid)
        sh("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
        sh("qemu-io", "-c", "write -P 0x33 16M 2M", top)
        ref = d / "ref.raw"
        sh("qemu-img", "convert", "-O", "raw", top, ref)
        return base, mid, top, ref

    s_chain, c_chain = chain(workdir / "s"), chain(workdir / "c")
    d = start_daemon(VUB_BIN, workdir)

    async def go():
        c = await connect(d.monitor)
        await c.execute("blockdev-add", qcow2("s", s_chain[2]))
        await c.execute("blockdev-add", qcow2("c", c_chain[2]))
        await c.execute("block-stream", {"job-id": "js", "device": "s", "speed": 16 * MiB})
        await c.execute("block-commit", {"job-id": "jc", "device": "c", "top-node": "c-backing",
                                         "speed": 16 * MiB})
        await asyncio.sleep(delay)
        await c.disconnect()

    run(go())
    d.proc.kill()
    d.proc.wait()
    d.log.close()
    for base, mid, top, ref in (s_chain, c_chain):
        for img in (base, mid, top):
            out = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
            assert out.returncode in (0, 3), (img, out.stdout, out.stderr)
        out = subprocess.run(["qemu-img", "compare", "-F", "raw", str(top), str(ref)],
                             capture_output=True, text=True)
        assert out.returncode == 0, (top, out.stdout, out.stderr)


def test_mirror_refuses_targets_and_replacements_that_would_harm_other_disks(daemon, workdir):
    """drive-mirror onto a file an open image uses (absolute-paths would
    replace it), and blockdev-mirror replacing a node that is not the
    source or a filter above it: refused, and nothing changes."""
    src, other, tgt = workdir / "src.qcow2", workdir / "other.qcow2", workdir / "tgt.qcow2"
    for p in (src, other, tgt):
        sh("qemu-img", "create", "-f", "qcow2", p, "16M")
    sh("qemu-io", "-c", "write -P 0x44 0 1M", src)
    before = src.read_bytes()

    async def go():
        c = await connect(daemon.monitor)
        for name, p in (("src", src), ("other", other), ("tgt", tgt)):
            await c.execute("blockdev-add", qcow2(name, p))
        await c.execute("block-export-add", vhost_export("eo", "other", workdir / "eo.sock"))
        with pytest.raises(ExecuteError) as e:
            await c.execute("drive-mirror", {"device": "src", "target": str(src),
                                             "sync": "full", "format": "qcow2"})
        assert "is in use by node 'src-file'" in str(e.value), str(e.value)
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                                "sync": "full", "replaces": "other"})
        assert str(e.value).startswith("Cannot replace 'other' by a node mirrored from 'src'")
        assert await c.execute("query-block-jobs") == []
        exports = await c.execute("query-block-exports")
        assert [e["node-name"] for e in exports] == ["other"], exports
        await c.disconnect()

    run(go())
    assert daemon.stop() == 0
    assert src.read_bytes() == before


def test_snapshots_of_a_node_a_job_works_on_are_refused(daemon, workdir):
    """An external or internal snapshot would move the node's writes away
    from the job that follows them: refused while the job runs."""
    src, tgt = workdir / "src.qcow2", workdir / "tgt.qcow2"
    for p in (src, tgt):
        sh("qemu-img", "create", "-f", "qcow2", p, "16M")

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("src", src))
        await c.execute("blockdev-add", qcow2("tgt", tgt))
        await c.execute("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                            "sync": "full"})
        busy = "Node 'src' is busy: block device is in use by block job: mirror"
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-snapshot-sync", {
                "node-name": "src", "snapshot-file": str(workdir / "o.qcow2"),
                "snapshot-node-name": "o"})
        assert str(e.value) == busy
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-snapshot-internal-sync", {"device": "src", "name": "s"})
        assert str(e.value) == busy
        assert not (workdir / "o.qcow2").exists()
        await c.execute("block-job-cancel", {"device": "m", "force": True})
        await until_gone(c, "m")
        await c.execute("blockdev-snapshot-internal-sync", {"device": "src", "name": "s"})
        await c.disconnect()

    run(go())
    assert daemon.stop() == 0
