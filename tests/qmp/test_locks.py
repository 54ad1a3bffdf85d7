"""Image creation respects image locks (issue 15, section 1): no QMP
command truncates, unlinks or replaces a file before it holds that file's
write lock, and none touches a file an open node of this daemon uses.
Each case is judged by the image bytes (unchanged, same inode) and, where
QEMU has the command, by the error qemu-storage-daemon gives for the same
request."""

import asyncio
import hashlib
import os

import pytest
from qemu.qmp import ExecuteError

from conftest import run
from test_jobs import connect, guest_writes, job_events, qcow2, sh, vhost_export

MiB = 1 << 20


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fingerprint(path):
    st = os.stat(path)
    return (st.st_dev, st.st_ino, digest(path))


def image(path, pattern=0x5A):
    sh("qemu-img", "create", "-f", "qcow2", path, "8M")
    sh("qemu-io", "-c", f"write -P {pattern:#x} 0 1M", path)
    return fingerprint(path)


async def create_job(c, job_id, options):
    """Runs blockdev-create; returns the job's error (None if it concluded
    without one)."""
    await c.execute("blockdev-create", {"job-id": job_id, "options": options})
    await job_events(c, job_id, "concluded")
    [job] = [j for j in await c.execute("query-jobs") if j["id"] == job_id]
    await c.execute("job-dismiss", {"id": job_id})
    return job.get("error")


async def hold_in_qsd(qsd, path, node="held"):
    """qemu-storage-daemon opens `path` read-write, as a running VM's disk."""
    q = await connect(qsd.monitor)
    await q.execute("blockdev-add", qcow2(node, path))
    return q


def test_snapshot_sync_onto_the_exported_image_is_refused_and_the_guest_keeps_its_disk(
        daemon, workdir):
    """blockdev-snapshot-sync whose snapshot-file is the image the export
    serves (by its name, then by another name of the same file): refused as
    QEMU refuses it; the image is not truncated nor unlinked, and the
    guest's later writes land in it."""
    img = workdir / "a.qcow2"
    before = image(img)
    alias = workdir / "alias.qcow2"
    os.symlink(img, alias)

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("a", img))
        await c.execute("block-export-add", vhost_export("ea", "a", workdir / "a.sock"))
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-snapshot-sync", {
                "node-name": "a", "snapshot-file": str(img), "snapshot-node-name": "s"})
        assert "Trying to create an image with the same filename as the backing file" \
            in str(e.value), str(e.value)
        assert fingerprint(img) == before
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-snapshot-sync", {
                "device": "ea", "snapshot-file": str(alias), "snapshot-node-name": "s"})
        assert "same filename as the backing file" in str(e.value) \
            or 'Failed to get "write" lock' in str(e.value), str(e.value)
        assert fingerprint(img) == before
        assert "s" not in {n["node-name"] for n in await c.execute("query-named-block-nodes")}
        # The export still serves the file at its path.
        await asyncio.to_thread(guest_writes, workdir / "a.sock", 4 * MiB)
        await c.disconnect()

    run(go())
    assert daemon.stop() == 0
    after = fingerprint(img)
    assert after[:2] == before[:2] and after[2] != before[2]
    sh("qemu-img", "check", img)


def test_snapshot_sync_onto_an_image_another_process_uses_is_refused(daemon, qsd, workdir):
    """snapshot-file = an image qemu-storage-daemon has open read-write:
    QEMU's lock error, and that image keeps its bytes and its inode."""
    mine, theirs = workdir / "mine.qcow2", workdir / "theirs.qcow2"
    mine2 = workdir / "mine2.qcow2"
    image(mine, 0x11)
    image(mine2, 0x11)
    before = image(theirs, 0x22)

    async def go():
        q = await hold_in_qsd(qsd, theirs)
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("m", mine))
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-snapshot-sync", {
                "node-name": "m", "snapshot-file": str(theirs), "snapshot-node-name": "s"})
        assert 'Failed to get "write" lock' in str(e.value), str(e.value)
        assert fingerprint(theirs) == before
        # qemu-storage-daemon gives the same error for the same request
        # (on an image of its own; ours holds `mine`).
        await q.execute("blockdev-add", qcow2("m", mine2))
        with pytest.raises(ExecuteError) as qe:
            await q.execute("blockdev-snapshot-sync", {
                "node-name": "m", "snapshot-file": str(theirs), "snapshot-node-name": "s"})
        assert 'Failed to get "write" lock' in str(qe.value), str(qe.value)
        assert fingerprint(theirs) == before
        await c.disconnect()
        await q.disconnect()

    run(go())


def test_snapshot_cleanup_removes_only_a_file_it_created(daemon, workdir):
    """A transaction that fails after its blockdev-snapshot-sync made the
    overlay: the overlay file goes if this call created it, and stays if
    it was there before (QEMU never removes it)."""
    img, new, old = workdir / "a.qcow2", workdir / "new.qcow2", workdir / "old.qcow2"
    image(img)
    old.write_bytes(b"precious")

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("a", img))
        for target in (new, old):
            with pytest.raises(ExecuteError):
                await c.execute("transaction", {"actions": [
                    {"type": "blockdev-snapshot-sync",
                     "data": {"node-name": "a", "snapshot-file": str(target),
                              "snapshot-node-name": "s"}},
                    {"type": "abort", "data": {}}]})
        await c.disconnect()

    run(go())
    assert not new.exists()
    assert old.exists()


def test_blockdev_create_file_on_a_locked_image_fails_the_job_as_qemu_does(
        daemon, qsd, workdir):
    """blockdev-create driver=file pointed at the exported image, and at an
    image qemu-storage-daemon has open: the job concludes with QEMU's
    'Failed to get "write" lock' and the file is left alone. A qcow2 create
    on a second file node of the exported image fails the same way."""
    ours, theirs = workdir / "ours.qcow2", workdir / "theirs.qcow2"
    unlocked = workdir / "unlocked.qcow2"
    b_ours, b_theirs = image(ours, 0x33), image(theirs, 0x44)
    b_unlocked = image(unlocked, 0x55)

    async def go():
        q = await hold_in_qsd(qsd, theirs)
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("o", ours))
        await c.execute("block-export-add", vhost_export("eo", "o", workdir / "o.sock"))
        # An image exported with locking=off takes no lock bytes: the
        # daemon still knows it has the file open.
        await c.execute("blockdev-add", {
            "driver": "qcow2", "node-name": "u",
            "file": {"driver": "file", "node-name": "u-file", "filename": str(unlocked),
                     "locking": "off"}})
        await c.execute("block-export-add", vhost_export("eu", "u", workdir / "u.sock"))
        for i, p in enumerate((ours, theirs, unlocked)):
            err = await create_job(c, f"c{i}", {"driver": "file", "filename": str(p),
                                                "size": MiB})
            assert err is not None and 'Failed to get "write" lock' in err, err
        assert "is in use by node 'u-file'" in err, err
        # The same request in qemu-storage-daemon, for the image it holds.
        qerr = await create_job(q, "qc", {"driver": "file", "filename": str(theirs), "size": MiB})
        assert qerr is not None and qerr.startswith('Failed to get "write" lock'), qerr
        # A second file node on the exported image, formatted as qcow2.
        await c.execute("blockdev-add", {"driver": "file", "node-name": "f2",
                                         "filename": str(ours)})
        err = await create_job(c, "c2", {"driver": "qcow2", "file": "f2", "size": MiB})
        assert err is not None and 'Failed to get "write" lock' in err, err
        err = await create_job(c, "c3", {"driver": "raw", "file": "f2", "size": MiB})
        assert err is not None and 'Failed to get "write" lock' in err, err
        assert fingerprint(ours) == b_ours and fingerprint(theirs) == b_theirs
        assert fingerprint(unlocked) == b_unlocked
        await asyncio.to_thread(guest_writes, workdir / "o.sock", 4 * MiB)
        await c.disconnect()
        await q.disconnect()

    run(go())
    assert daemon.stop() == 0
    assert fingerprint(theirs) == b_theirs
    assert fingerprint(ours)[:2] == b_ours[:2]
    sh("qemu-img", "check", ours)


def test_drive_mirror_does_not_replace_a_target_another_process_uses(daemon, qsd, workdir):
    """drive-mirror mode=absolute-paths onto an image qemu-storage-daemon
    has open: refused with QEMU's lock error; the image is neither
    unlinked nor replaced."""
    src, theirs = workdir / "src.qcow2", workdir / "theirs.qcow2"
    image(src, 0x55)
    before = image(theirs, 0x66)

    async def go():
        q = await hold_in_qsd(qsd, theirs)
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2("src", src))
        for fmt in ("qcow2", "raw"):
            with pytest.raises(ExecuteError) as e:
                await c.execute("drive-mirror", {"device": "src", "target": str(theirs),
                                                 "sync": "full", "format": fmt,
                                                 "mode": "absolute-paths"})
            assert 'Failed to get "write" lock' in str(e.value), str(e.value)
            assert fingerprint(theirs) == before
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()
        await q.disconnect()

    run(go())
    assert fingerprint(theirs) == before
