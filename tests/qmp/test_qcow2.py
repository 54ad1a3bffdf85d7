"""qcow2 nodes over QMP: blockdev-add with backing chains from the image
header, what query-named-block-nodes reports (compared with
qemu-storage-daemon on the same images), implicit backing nodes going away
with blockdev-del, block_resize, and clear errors for bad images."""

import subprocess

import pytest
from qemu.qmp import ExecuteError, QMPClient

from conftest import run


async def connect(path, name="test"):
    c = QMPClient(name)
    await c.connect(path)
    return c


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def chain(workdir):
    """base <- mid <- top, made by qemu-img, with data in each."""
    base, mid, top = (workdir / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    sh("qemu-img", "create", "-f", "qcow2", str(base), "4M")
    sh("qemu-io", "-c", "write -P 0x11 0 2M", str(base))
    sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    sh("qemu-io", "-c", "write -P 0x22 1M 1M", str(mid))
    sh("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    return top


def qcow2_node(name, path, **extra):
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}, **extra}


def summary(node):
    """What both daemons must agree on."""
    img = node["image"]
    out = {"drv": node["drv"], "depth": node["backing_file_depth"],
           "format": img["format"], "size": img["virtual-size"],
           "cluster": img.get("cluster-size"), "chain": []}
    b = img.get("backing-image")
    while b:
        out["chain"].append((b["format"], b["filename"].split("/")[-1], b["virtual-size"]))
        b = b.get("backing-image")
    return out


def test_backing_chain_from_the_header_matches_qemu_storage_daemon(daemon, qsd, workdir):
    top = chain(workdir)

    async def query(d, ro):
        c = await connect(d.monitor)
        await c.execute("blockdev-add", qcow2_node("top", top, **{"read-only": ro}))
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes", {"flat": False})}
        await c.disconnect()
        return nodes

    # Both read-only: the two daemons open the same files at once.
    ours = run(query(daemon, True))
    theirs = run(query(qsd, True))
    assert summary(ours["top"]) == summary(theirs["top"])
    assert summary(ours["top"])["depth"] == 2
    assert summary(ours["top"])["chain"] == [
        ("qcow2", "mid.qcow2", 4 << 20), ("qcow2", "base.qcow2", 4 << 20)]
    assert ours["top"]["backing_file"].endswith("mid.qcow2")
    assert ours["top"]["ro"] is True


def test_implicit_backing_nodes_go_with_their_parent(daemon, workdir):
    top = chain(workdir)

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2_node("top", top))
        names = {n["node-name"] for n in await c.execute("query-named-block-nodes")}
        assert {"top", "top-file", "top-backing", "top-backing-backing"} <= names
        # A backing node in use cannot be deleted on its own.
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-del", {"node-name": "top-backing"})
        assert "in use" in str(e.value)
        await c.execute("blockdev-del", {"node-name": "top"})
        assert await c.execute("query-named-block-nodes") == []
        await c.disconnect()
    run(go())
    assert "No errors were found" in sh("qemu-img", "check", str(top))


def test_explicit_backing_node_and_null(daemon, workdir):
    top = chain(workdir)

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2_node("b", workdir / "base.qcow2", **{"read-only": True}))
        # backing given by name replaces the header's mid.qcow2.
        await c.execute("blockdev-add", qcow2_node("t", top, backing="b"))
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["t"]["backing_file_depth"] == 1
        assert nodes["t"]["backing_file"].endswith("base.qcow2")
        # A writer cannot take a node that is someone's backing file.
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-add", {"driver": "qcow2", "node-name": "w",
                                             "file": {"driver": "file", "filename": str(workdir / "base.qcow2")},
                                             "backing": None})
        assert "lock" in str(e.value) or "conflict" in str(e.value), str(e.value)
        await c.execute("blockdev-add", qcow2_node("n", workdir / "mid.qcow2", backing=None))
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["n"]["backing_file_depth"] == 0
        await c.disconnect()
    run(go())


def test_resize_and_errors(daemon, workdir):
    img = workdir / "r.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", str(img), "1M")
    bad = workdir / "corrupt.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", str(bad), "1M")
    with open(bad, "r+b") as f:
        f.seek(79)
        b = f.read(1)[0]
        f.seek(79)
        f.write(bytes([b | 2]))
    orphan = workdir / "orphan.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", str(workdir / "gone.qcow2"), "-F", "qcow2", "-u",
       str(orphan), "1M")

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", qcow2_node("r", img))
        await c.execute("block_resize", {"node-name": "r", "size": 3 << 30})
        with pytest.raises(ExecuteError) as e:
            await c.execute("block_resize", {"node-name": "r", "size": 1 << 20})
        assert "shrinking" in str(e.value)
        for node, want in [(qcow2_node("c", bad), "marked corrupt"),
                           (qcow2_node("o", orphan), "gone.qcow2"),
                           (qcow2_node("x", workdir / "nonexistent.qcow2"), "nonexistent.qcow2"),
                           (qcow2_node("y", img, **{"l2-cache-size": "lots"}), "l2-cache-size")]:
            with pytest.raises(ExecuteError) as e:
                await c.execute("blockdev-add", node)
            assert want in str(e.value), str(e.value)
        # The corrupt image opens read-only.
        await c.execute("blockdev-add", qcow2_node("c", bad, **{"read-only": True}))
        # Nothing that failed is left behind, and r still works.
        names = {n["node-name"] for n in await c.execute("query-named-block-nodes")}
        assert "o" not in names and "x" not in names and "y" not in names
        await c.execute("blockdev-del", {"node-name": "r"})
        await c.disconnect()
    run(go())
    info = sh("qemu-img", "info", "--output=json", str(img))
    assert '"virtual-size": 3221225472' in info
    assert "No errors were found" in sh("qemu-img", "check", str(img))
