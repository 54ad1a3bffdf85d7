"""blockdev-reopen of qcow2 nodes (issue 24), against our daemon ("vub") and
qemu-storage-daemon 7.2 ("qsd") with the same expectations: read-only and
back (the write lock goes and comes back: qemu-img check runs between, and
finds the image clean with its dirty bit cleared), lazy refcounts switched
off on a writable image, and QEMU's errors. tests/jobs.rs
qcow2_reopen_changes_the_backing_under_the_guest changes `backing` under a
verified guest."""
import asyncio
import json
import subprocess

import pytest
from qemu.qmp import ExecuteError

from test_block_jobs import (  # noqa: F401 (dm is a fixture)
    MiB, bench, connect, dm, export, nodes, qcow2_node, run, sh,
)


async def add_qcow2(c, name, path, **extra):
    """A qcow2 node over a file node of its own name + '-file', added
    first (a node given by name: QEMU reopens it only when listed, and
    refuses to list the '#blockNNN' child it names itself)."""
    ro = {"read-only": True} if extra.get("read-only") else {}
    await c.execute("blockdev-add", {"driver": "file", "node-name": f"{name}-file",
                                     "filename": str(path), **ro})
    await c.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                     "file": f"{name}-file", **extra})
    return f"{name}-file"


def check(img):
    """qemu-img check without force-share: (returncode, output)."""
    out = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def dirty_flag(img):
    info = json.loads(sh("qemu-img", "info", "-U", "--output=json", img))
    return info["dirty-flag"]


async def del_export(c, eid):
    # The client (vub-bench) has exited, but the daemon may not have seen
    # its socket close yet: a safe-mode delete is refused until it has
    # (ours: "has a connected frontend", QEMU: "still in use"). Retry.
    async with asyncio.timeout(10):
        while True:
            try:
                await c.execute("block-export-del", {"id": eid})
                break
            except ExecuteError as e:
                if "connected frontend" not in str(e) and "in use" not in str(e):
                    raise
                await asyncio.sleep(0.05)
    async with asyncio.timeout(10):
        while (await c.events.get())["event"] != "BLOCK_EXPORT_DELETED":
            pass


def test_qcow2_reopen_read_only_releases_the_write_lock_and_back(dm, workdir):
    img = workdir / "img.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    sock = workdir / "e0.sock"

    async def go():
        c = await connect(dm.monitor)
        f = await add_qcow2(c, "img", img)
        await c.execute("block-export-add", export("e0", "img", sock))
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", 4 * MiB)
        # Read-only is refused while a writable export uses the node.
        with pytest.raises(ExecuteError):
            await c.execute("blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "img", "file": f, "read-only": True}]})
        await del_export(c, "e0")
        # Writable: the write lock is held (the dirty bit of lazy
        # refcounts: ours sets it at open, QEMU at a metadata write).
        rc, out = check(img)
        assert rc != 0 and "lock" in out, out
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": "img", "file": f, "read-only": True}]})
        assert (await nodes(c))["img"]["ro"] is True
        # Read-only: everything written, dirty bit cleared, lock released.
        rc, out = check(img)
        assert rc == 0 and "No errors were found" in out, out
        assert dirty_flag(img) is False
        # And back: the lock is taken again, the guest writes.
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": "img", "file": f}]})
        assert (await nodes(c))["img"]["ro"] is False
        rc, out = check(img)
        assert rc != 0 and "lock" in out, out
        await c.execute("block-export-add", export("e1", "img", workdir / "e1.sock"))
        r = await asyncio.to_thread(bench, workdir / "e1.sock", "randwrite", "0.3", 4 * MiB)
        assert r["write"]["bytes"] > 0, r
        await del_export(c, "e1")
        # Lazy refcounts off on the writable image: refcounts written,
        # the dirty bit cleared while it stays writable.
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": "img", "file": f, "lazy-refcounts": False}]})
        assert dirty_flag(img) is False
        rc, out = check(img)
        assert rc != 0 and "lock" in out, out
        sh("qemu-img", "check", "-U", img)
        await c.disconnect()

    run(go())
    dm.stop()
    rc, out = check(img)
    assert rc == 0 and "No errors were found" in out, out


def test_qcow2_reopen_makes_a_backing_image_writable_and_read_only_again(dm, workdir):
    """A node opened read-only over a read-only file node (a base image):
    writable by reopen, listing its file node too (a child given by name
    keeps its options, as in QEMU: the qcow2 node alone is refused), then
    read-only again; qemu-img check is clean between and after."""
    base = workdir / "base.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", base, "4M")
    sh("qemu-io", "-c", "write -P 0x11 0 4M", base)

    async def go():
        c = await connect(dm.monitor)
        f = await add_qcow2(c, "base", base, **{"read-only": True})
        rc, out = check(base)
        assert rc == 0, out
        fnode = {"driver": "file", "node-name": f, "filename": str(base)}
        with pytest.raises(ExecuteError):
            await c.execute("blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "base", "file": f}]})
        assert (await nodes(c))["base"]["ro"] is True
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": "base", "file": f}, fnode]})
        rc, out = check(base)
        assert rc != 0 and "lock" in out, out
        sock = workdir / "b.sock"
        await c.execute("block-export-add", export("b", "base", sock))
        await asyncio.to_thread(bench, sock, "randwrite", "0.3", MiB)
        await del_export(c, "b")
        await c.execute("blockdev-reopen", {"options": [
            {"driver": "qcow2", "node-name": "base", "file": f, "read-only": True},
            {**fnode, "read-only": True}]})
        assert (await nodes(c))["base"]["ro"] is True
        rc, out = check(base)
        assert rc == 0 and "No errors were found" in out, out
        await c.disconnect()

    run(go())
    dm.stop()
    rc, out = check(base)
    assert rc == 0 and "No errors were found" in out, out


# (options of node 'top' over 'top-file' and 'base', the error) as QSD 7.2
# answered each.
ERRORS = [
    ({}, "backing is missing for 'top'"),
    ({"backing": "nope"}, "Cannot find device='' nor node-name='nope'"),
    ({"backing": "top"}, "Making 'top' a backing child of 'top' would create a cycle"),
    ({"backing": "base", "data-file": "other-file"}, "Cannot change the option 'data-file'"),
]


def test_qcow2_reopen_errors_are_qemus(dm, workdir):
    d = workdir
    sh("qemu-img", "create", "-f", "qcow2", d / "base.qcow2", "4M")
    sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "4M")
    sh("qemu-img", "create", "-f", "qcow2", d / "other.qcow2", "4M")

    async def go():
        c = await connect(dm.monitor)
        for n in ("base", "top", "v2", "other"):
            await c.execute("blockdev-add", {"driver": "file", "node-name": f"{n}-file",
                                             "filename": str(d / f"{n}.qcow2")})
        await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                         "file": "base-file", "read-only": True})
        await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                         "file": "top-file", "backing": "base"})
        await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "v2",
                                         "file": "v2-file"})
        cases = [([{"driver": "qcow2", "node-name": "top", "file": "top-file", **o}], want)
                 for o, want in ERRORS]
        cases += [
            ([{"driver": "qcow2", "node-name": "base", "file": "base-file", "backing": "top",
               "read-only": True}],
             "Making 'top' a backing child of 'base' would create a cycle"),
            ([{"driver": "qcow2", "node-name": "v2", "file": "v2-file", "lazy-refcounts": True}],
             "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"),
        ]
        for opts, want in cases:
            with pytest.raises(ExecuteError) as e:
                await c.execute("blockdev-reopen", {"options": opts})
            err = e.value.error.error
            assert (err.class_, err.desc) == ("GenericError", want), opts
        # Nothing changed.
        n = await nodes(c)
        assert n["top"]["backing_file_depth"] == 1 and n["top"]["ro"] is False
        assert n["v2"]["ro"] is False
        await c.disconnect()

    run(go())


def test_a_qcow2_reopen_that_fails_on_one_node_changes_none(dm, workdir):
    """Two read-only nodes made writable in one blockdev-reopen while
    another process (qemu-io -r) reads the second image and shares no
    write: the reopen fails and the first node is read-only still (its
    write lock free: qemu-img check runs); once qemu-io has gone, the same
    reopen succeeds."""
    a, b = workdir / "a.qcow2", workdir / "b.qcow2"
    for p in (a, b):
        sh("qemu-img", "create", "-f", "qcow2", p, "4M")

    async def go():
        c = await connect(dm.monitor)
        files = {}
        for name, p in (("a", a), ("b", b)):
            files[name] = f"{name}-file"
            await c.execute("blockdev-add", {"driver": "file", "node-name": f"{name}-file",
                                             "filename": str(p)})
            await c.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                             "file": f"{name}-file", "read-only": True})
        holder = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", str(b)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            # qemu-io has the image open once it answers a command.
            holder.stdin.write("help\n")
            holder.stdin.flush()
            holder.stdout.readline()
            both = [{"driver": "qcow2", "node-name": n, "file": f} for n, f in files.items()]
            with pytest.raises(ExecuteError) as e:
                await c.execute("blockdev-reopen", {"options": both})
            assert "lock" in str(e.value), e.value
            n = await nodes(c)
            assert n["a"]["ro"] is True and n["b"]["ro"] is True, e.value
            rc, out = check(a)
            assert rc == 0, out
        finally:
            holder.communicate("quit\n", timeout=10)
        await c.execute("blockdev-reopen", {"options": both})
        n = await nodes(c)
        assert n["a"]["ro"] is False and n["b"]["ro"] is False
        rc, out = check(a)
        assert rc != 0 and "lock" in out, out
        await c.disconnect()

    run(go())
    dm.stop()
    for p in (a, b):
        rc, out = check(p)
        assert rc == 0 and "No errors were found" in out, out


def test_the_target_of_a_running_backup_cannot_be_made_read_only(dm, workdir):
    src, tgt = workdir / "src.qcow2", workdir / "tgt.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", src, "16M")
    sh("qemu-io", "-c", "write -P 0x11 0 16M", src)
    sh("qemu-img", "create", "-f", "qcow2", tgt, "16M")

    async def go():
        c = await connect(dm.monitor)
        await add_qcow2(c, "src", src)
        f = await add_qcow2(c, "tgt", tgt)
        await c.execute("blockdev-backup", {"job-id": "b1", "device": "src", "target": "tgt",
                                            "sync": "full", "speed": 65536})
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": "tgt", "file": f, "read-only": True}]})
        # Ours names the job; QEMU: "Block node is read-only".
        assert "job 'b1'" in str(e.value) or "read-only" in str(e.value).lower(), e.value
        assert (await nodes(c))["tgt"]["ro"] is False
        await c.execute("block-job-cancel", {"device": "b1", "force": True})
        async with asyncio.timeout(30):
            while await c.execute("query-block-jobs"):
                await asyncio.sleep(0.05)
        await c.disconnect()

    run(go())
    dm.stop()
    rc, out = check(tgt)
    assert rc == 0 and "No errors were found" in out, out
