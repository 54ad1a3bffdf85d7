"""drive-backup over QMP (issue 24): the target is a file that the command
creates (mode absolute-paths, over the source's backing image for
sync=top, over the source for sync=none) or opens (mode existing), as a
node with no user-given name that goes when the job ends; then the job is
blockdev-backup's. Every sync mode, both modes, a guest (vub-bench) writing
while the backups run, drive-backup inside a transaction, and QEMU's
errors.

As tests/qmp/test_block_jobs.py, every test runs against our daemon ("vub")
and against qemu-storage-daemon 7.2 ("qsd") with the same expectations, and
the images are judged afterwards by qemu-img (check, compare, map, info).
"""
import asyncio
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from test_block_jobs import (  # noqa: F401 (dm is a fixture)
    MiB, Events, allocated, assert_identical, backup_history_ok, bench, check_clean,
    compare, connect, dm, export, exports, filled_image, guest_overwrites, img_info,
    job_info, make_chain, nodes, open_chain, qcow2_node, run, sh, with_guest_data, within,
)


async def nodes_on(c, path):
    """The names of the format nodes (and of protocol nodes with no format
    node above them) that have `path` open."""
    found = [n for n in await c.execute("query-named-block-nodes")
             if Path(n["file"]).resolve() == Path(path).resolve()]
    fmt = [n["node-name"] for n in found if n["drv"] != "file"]
    return fmt or [n["node-name"] for n in found]


async def finished(ev, job):
    done = await ev.wait("BLOCK_JOB_COMPLETED", device=job)
    await ev.status(job, "null")
    d = done["data"]
    assert d["type"] == "backup" and "error" not in d and d["len"] == d["offset"], d
    assert backup_history_ok(ev.of(job)), ev.dump(job)
    return d


def test_drive_backup_full_creates_the_target_while_the_guest_writes(dm, workdir):
    base, mid, top, ref = make_chain(workdir)
    tgt = workdir / "tgt.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        # Slow, so that the guest's writes land while the copy runs.
        await c.execute("drive-backup", {"job-id": "b1", "device": "top", "target": str(tgt),
                                         "format": "qcow2", "sync": "full", "speed": MiB})
        await ev.status("b1", "running")
        # The target is a node of its own, with a name no user gave.
        [name] = await nodes_on(c, tgt)
        assert name.startswith("#"), name
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", 4 * MiB)
        info = await job_info(c, "b1")
        assert info["type"] == "backup" and info["status"] == "running", info
        await c.execute("block-job-set-speed", {"device": "b1", "speed": 0})
        d = await finished(ev, "b1")
        assert d["len"] == 16 * MiB, d
        # The job took its target with it.
        assert await nodes_on(c, tgt) == []
        assert (await exports(c))["e0"] == "top"
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(tgt)
    check_clean(top)
    assert "backing-filename" not in img_info(tgt)
    assert_identical(tgt, ref)
    rc, out = compare(top, ref)
    assert rc == 1, "the guest's writes are in the source: " + out


def test_drive_backup_sync_top_creates_the_target_over_the_backing_image(dm, workdir):
    base, mid, top, ref = make_chain(workdir)
    tgt = workdir / "tgt.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        # No format: the source's (qcow2).
        await c.execute("drive-backup", {"job-id": "b1", "device": "top", "target": str(tgt),
                                         "sync": "top"})
        await finished(ev, "b1")
        assert await nodes_on(c, tgt) == []
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(tgt)
    info = img_info(tgt)
    assert info["format"] == "qcow2", info
    assert (workdir / info["backing-filename"]).resolve() == mid.resolve(), info
    assert allocated(tgt) == [(5 * MiB, 7 * MiB)]
    # Over mid, as its header says: the whole chain.
    assert_identical(tgt, ref)


def test_drive_backup_sync_top_of_an_image_without_backing_is_a_full_copy(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 4, 0x11)
    tgt = workdir / "tgt.raw"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        await c.execute("drive-backup", {"job-id": "b1", "device": "src", "target": str(tgt),
                                         "format": "raw", "sync": "top"})
        d = await finished(ev, "b1")
        assert d["len"] == 4 * MiB, d
        await c.disconnect()

    run(go())
    dm.stop()
    assert img_info(tgt)["format"] == "raw"
    assert_identical(tgt, src)


def test_drive_backup_sync_none_keeps_the_old_data_of_overwritten_clusters(dm, workdir):
    """Fleecing with a created target: its header names the source's file,
    its node's backing is the source, and it keeps what the guest
    overwrites; the job runs until cancelled."""
    base, mid, top, ref = make_chain(workdir)
    want = with_guest_data(workdir, ref)
    fl = workdir / "fleece.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await open_chain(c, base, mid, top)
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "top", sock))
        await c.execute("drive-backup", {"job-id": "f1", "device": "top", "target": str(fl),
                                         "format": "qcow2", "sync": "none"})
        await ev.status("f1", "running")
        await guest_overwrites(sock)
        info = await job_info(c, "f1")
        assert info["status"] == "running" and info["type"] == "backup", info
        await c.execute("block-job-cancel", {"device": "f1"})
        await ev.wait("BLOCK_JOB_CANCELLED", device="f1")
        await ev.status("f1", "null")
        assert await nodes_on(c, fl) == []
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(fl)
    check_clean(top)
    assert (workdir / img_info(fl)["backing-filename"]).resolve() == top.resolve()
    assert_identical(top, want)
    assert within(allocated(fl), 0, 4 * MiB), allocated(fl)
    assert_identical(fl, ref)


def test_drive_backup_incremental_into_an_existing_image_after_a_full_one_in_a_transaction(
        dm, workdir):
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
        # The bitmap and the full backup at one instant.
        await c.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "src", "name": "bm0", "granularity": 65536}},
            {"type": "drive-backup",
             "data": {"job-id": "f1", "device": "src", "target": str(full), "format": "qcow2",
                      "sync": "full"}},
        ]})
        await finished(ev, "f1")
        # The guest writes within the first MiB only.
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", MiB)
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert 0 < bm["count"] <= MiB and bm["count"] % 65536 == 0, bm
        dirty = bm["count"]
        # An existing target over the full one; its format is probed.
        sh("qemu-img", "create", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
        await c.execute("drive-backup", {"job-id": "i1", "device": "src", "target": str(inc),
                                         "mode": "existing", "sync": "incremental",
                                         "bitmap": "bm0"})
        d = await finished(ev, "i1")
        assert d["len"] == dirty, d
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["count"] == 0 and bm["recording"] is True, bm
        assert await nodes_on(c, inc) == [] and await nodes_on(c, full) == []
        await c.disconnect()
        return dirty

    dirty = run(go())
    dm.stop()
    for p in (src, full, inc):
        check_clean(p)
    assert_identical(full, before)
    assert_identical(inc, src)
    own = allocated(inc)
    assert within(own, 0, MiB), own
    assert sum(t - s for s, t in own) == dirty, own


def test_drive_backup_sync_bitmap_into_a_raw_file_holds_only_the_dirty_clusters(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 8, 0x11)
    tgt = workdir / "inc.raw"
    now = workdir / "now.raw"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        sock = workdir / "e0.sock"
        await c.execute("block-export-add", export("e0", "src", sock))
        await c.execute("block-dirty-bitmap-add",
                        {"node": "src", "name": "bm0", "granularity": 65536})
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", 2 * MiB)
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        dirty = bm["count"]
        assert 0 < dirty <= 2 * MiB, bm
        await c.execute("drive-backup", {"job-id": "i1", "device": "src", "target": str(tgt),
                                         "format": "raw", "sync": "bitmap", "bitmap": "bm0",
                                         "bitmap-mode": "always"})
        d = await finished(ev, "i1")
        assert d["len"] == dirty, d
        [bm] = (await nodes(c))["src"]["dirty-bitmaps"]
        assert bm["count"] == 0, bm
        await c.disconnect()
        return dirty

    dirty = run(go())
    dm.stop()
    sh("qemu-img", "convert", "-O", "raw", src, now)
    t, s = tgt.read_bytes(), now.read_bytes()
    assert len(t) == len(s) == 8 * MiB
    cs = 65536
    copied = 0
    for off in range(0, len(t), cs):
        if t[off:off + cs] == s[off:off + cs]:
            copied += 1
        else:
            assert t[off:off + cs] == bytes(cs), f"cluster at {off} is neither copied nor zero"
    assert copied * cs == dirty, (copied, dirty)


def test_drive_backup_in_a_transaction_that_fails_leaves_no_job_and_no_node(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 4, 0x11)
    tgt = workdir / "tgt.qcow2"

    async def go():
        c = await connect(dm.monitor)
        await c.execute("blockdev-add", qcow2_node("src", src))
        with pytest.raises(ExecuteError):
            await c.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm0"}},
                {"type": "drive-backup",
                 "data": {"job-id": "f1", "device": "src", "target": str(tgt), "sync": "full"}},
                {"type": "abort", "data": {}},
            ]})
        assert "dirty-bitmaps" not in (await nodes(c))["src"]
        assert await c.execute("query-block-jobs") == []
        assert await nodes_on(c, tgt) == []
        await c.disconnect()

    run(go())


# QEMU 7.2's replies (qemu-storage-daemon 7.2 gave each of them).
ERRORS = [
    ({"device": "nope", "target": "T", "sync": "full"},
     "Cannot find device='nope' nor node-name='nope'"),
    ({"device": "src", "target": "T", "sync": "full", "format": "foo"},
     "Unknown file format 'foo'"),
    ({"device": "src", "target": "M", "sync": "full", "mode": "existing"},
     "Could not open 'M': No such file or directory"),
    ({"device": "src", "target": "M", "sync": "full", "mode": "existing", "format": "qcow2"},
     "Could not open 'M': No such file or directory"),
    ({"device": "src", "target": "T", "sync": "none", "format": "raw"},
     "Backing file not supported for file format 'raw'"),
    ({"device": "src", "target": "R", "sync": "none", "format": "raw", "mode": "existing"},
     re.compile(r"Driver 'raw' of node '#block[-a-z]*\d+' does not support backing files")),
    ({"device": "src", "target": "T", "sync": "incremental"},
     "must provide a valid bitmap name for 'incremental' sync mode"),
    ({"device": "src", "target": "T", "sync": "full", "x-perf": {"max-workers": 0}},
     "max-workers must be between 1 and 2147483647"),
    ({"device": "src", "target": "T", "sync": "full", "x-perf": {"max-chunk": -1}},
     "max-chunk must be zero (which means no limit) or positive"),
    ({"device": "src", "target": "/nonexistent-dir/x.qcow2", "sync": "full"},
     "Could not create '/nonexistent-dir/x.qcow2': No such file or directory"),
]


def test_drive_backup_errors_are_qemus(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 4, 0x11)
    raw = workdir / "raw.img"
    sh("qemu-img", "create", "-f", "raw", raw, "4M")
    paths = {"T": str(workdir / "new.qcow2"), "M": str(workdir / "missing.qcow2"),
             "R": str(raw)}

    async def go():
        c = await connect(dm.monitor)
        await c.execute("blockdev-add", qcow2_node("src", src))
        for args, want in ERRORS:
            a = {"job-id": "j1", **{k: paths.get(v, v) if k == "target" else v
                                    for k, v in args.items()}}
            with pytest.raises(ExecuteError) as e:
                await c.execute("drive-backup", a)
            err = e.value.error.error
            desc = err.desc.replace(paths["M"], "M")
            assert err.class_ == "GenericError", (a, err.class_, err.desc)
            if isinstance(want, str):
                assert desc == want, (a, err.desc)
            else:
                assert want.fullmatch(desc), (a, err.desc)
            assert await c.execute("query-block-jobs") == []
            assert [n for n in await nodes(c) if n.startswith("#block") and
                    Path((await nodes(c))[n]["file"]).name in ("new.qcow2", "raw.img")] == []
            if dm.kind == "vub":
                # Ours removes a file it made for a backup that did not
                # start (QEMU leaves it).
                assert not Path(paths["T"]).exists(), a
        await c.disconnect()

    run(go())


def test_drive_backup_to_a_path_outside_the_sandbox_is_refused(dm, workdir):
    """Ours only: Landlock lets the daemon create files only under the
    paths it was given; a target elsewhere is a QMP error naming the
    option, and the daemon goes on."""
    if dm.kind != "vub":
        pytest.skip("qemu-storage-daemon has no sandbox")
    outside = Path(tempfile.mkdtemp(prefix="vub-outside-"))
    try:
        src = workdir / "src.qcow2"
        filled_image(src, 4, 0x11)

        async def go():
            c = await connect(dm.monitor)
            await c.execute("blockdev-add", qcow2_node("src", src))
            for mode in ("absolute-paths", "existing"):
                t = outside / "t.qcow2"
                if mode == "existing":
                    sh("qemu-img", "create", "-f", "qcow2", t, "4M")
                with pytest.raises(ExecuteError) as e:
                    await c.execute("drive-backup", {"job-id": "j1", "device": "src",
                                                     "target": str(t), "sync": "full",
                                                     "mode": mode, "format": "qcow2"})
                assert "--allow-path" in e.value.error.error.desc, e.value.error.error.desc
            assert await c.execute("query-block-jobs") == []
            assert [n for n in await nodes(c) if n.startswith("#")] == []
            await c.disconnect()

        run(go())
        assert dm.alive()
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_drive_backup_with_manual_finalize_keeps_its_target_until_finalized(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 4, 0x11)
    tgt = workdir / "tgt.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        await c.execute("drive-backup", {"job-id": "b1", "device": "src", "target": str(tgt),
                                         "sync": "full", "auto-finalize": False,
                                         "auto-dismiss": False})
        await ev.status("b1", "pending")
        # The job holds its target until it is finalized.
        assert len(await nodes_on(c, tgt)) == 1
        await c.execute("job-finalize", {"id": "b1"})
        await ev.status("b1", "concluded")
        assert await nodes_on(c, tgt) == []
        await c.execute("job-dismiss", {"id": "b1"})
        await ev.status("b1", "null")
        await c.disconnect()

    run(go())
    dm.stop()
    check_clean(tgt)
    assert_identical(tgt, src)


def test_stopping_the_daemon_during_a_drive_backup_leaves_clean_images(dm, workdir):
    src = workdir / "src.qcow2"
    filled_image(src, 16, 0x11)
    tgt = workdir / "tgt.qcow2"

    async def go():
        c = await connect(dm.monitor)
        ev = Events(c)
        await c.execute("blockdev-add", qcow2_node("src", src))
        await c.execute("drive-backup", {"job-id": "b1", "device": "src", "target": str(tgt),
                                         "sync": "full", "speed": 65536})
        await ev.status("b1", "running")
        await c.disconnect()

    run(go())
    assert dm.stop() == 0
    check_clean(src)
    check_clean(tgt)
