"""Inactive nodes over QMP (issue 20; QEMU 10's `active` blockdev option and
blockdev-set-active), with qemu-storage-daemon 7.2 as the other process.
qemu-storage-daemon 7.2 has no `active` itself, so it plays the side that
owns the image: it writes it through a vhost-user-blk export and keeps a
persistent bitmap; our daemon opens the same image inactive beside it, fails
to take it over while it runs, and takes it over once it has exited,
seeing the bitmap qemu-storage-daemon stored (same hash)."""

import asyncio

import pytest
from qemu.qmp import ExecuteError

from conftest import run
from test_jobs import connect, guest_writes, qcow2, sh, vhost_export

MiB = 1 << 20


def node(nodes, name):
    [n] = [n for n in nodes if n["node-name"] == name]
    return n


def test_inactive_node_beside_qemu_storage_daemon_then_handoff(daemon, qsd, workdir):
    img = workdir / "disk.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", str(img), "16M")
    qsock = workdir / "qsd.sock"

    async def go():
        q = await connect(qsd.monitor)
        await q.execute("blockdev-add", qcow2("disk", img))
        await q.execute("block-dirty-bitmap-add",
                        {"node": "disk", "name": "bm0", "persistent": True})
        await q.execute("block-export-add", vhost_export("x0", "disk", qsock))

        c = await connect(daemon.monitor)
        # JSON `active: false` on blockdev-add; the inline file child
        # inherits it. No lock conflict with qemu-storage-daemon writing.
        await c.execute("blockdev-add", qcow2("b", img, active=False))
        nodes = await c.execute("query-named-block-nodes")
        assert node(nodes, "b")["active"] is False
        assert node(nodes, "b-file")["active"] is False

        # qemu-storage-daemon's guest writes while we hold the image inactive.
        await asyncio.to_thread(guest_writes, qsock, 8 * MiB)
        want = await q.execute("x-debug-block-dirty-bitmap-sha256",
                               {"node": "disk", "name": "bm0"})
        [bm] = [b for b in (await q.execute("query-named-block-nodes"))[0]["dirty-bitmaps"]
                if b["name"] == "bm0"]
        assert bm["count"] > 0

        # It still holds the image: activation fails with QEMU's lock error,
        # and the node stays inactive.
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-set-active", {"node-name": "b", "active": True})
        assert 'Failed to get "write" lock' in str(e.value)
        nodes = await c.execute("query-named-block-nodes")
        assert node(nodes, "b")["active"] is False
        await q.disconnect()
        # SIGTERM: it writes its metadata and the bitmap, and lets go.
        assert qsd.stop() == 0

        await c.execute("blockdev-set-active", {"active": True})
        nodes = await c.execute("query-named-block-nodes")
        assert node(nodes, "b")["active"] is True
        assert node(nodes, "b-file")["active"] is True
        [ours] = [b for b in node(nodes, "b")["dirty-bitmaps"] if b["name"] == "bm0"]
        assert ours["count"] == bm["count"]
        got = await c.execute("x-debug-block-dirty-bitmap-sha256",
                              {"node": "b", "name": "bm0"})
        assert got["sha256"] == want["sha256"]
        # Ours now: writable, and clean when handed back.
        await c.execute("block-export-add", {**vhost_export("e0", "b", workdir / "e0.sock"),
                                             "allow-inactive": True})
        await asyncio.to_thread(guest_writes, workdir / "e0.sock", 4 * MiB)
        await c.execute("blockdev-set-active", {"node-name": "b", "active": False})
        await c.disconnect()

    run(go())
    out = sh("qemu-img", "check", "-U", str(img))
    assert "No errors were found" in out, out
