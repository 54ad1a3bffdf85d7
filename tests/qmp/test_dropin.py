"""qemu-storage-daemon drop-in over QMP: iothread objects, exports on them
(one name, or a list as QEMU 9's multiqueue export), legacy x- throttle
limits and libvirt-style blockdev-add, run the same against
qemu-storage-daemon 7.2 where it has the feature."""

import pytest
from qemu.qmp import ExecuteError

from conftest import run
from test_qmp import connect


async def iothread_export(c, workdir):
    await c.execute("object-add", {"qom-type": "iothread", "id": "io0",
                                   "poll-max-ns": 0, "poll-grow": 0, "poll-shrink": 0})
    await c.execute("object-add", {"qom-type": "throttle-group", "id": "tg0",
                                   "x-iops-total": 1000, "x-bps-total": 1 << 29,
                                   "x-bps-total-max": 1 << 30})
    await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n0",
                                     "read-zeroes": True, "detect-zeroes": "on"})
    await c.execute("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                     "throttle-group": "tg0", "file": "n0"})
    await c.execute("block-export-add", {"type": "vhost-user-blk", "id": "e0",
                                         "node-name": "t0", "iothread": "io0",
                                         "fixed-iothread": True,
                                         "addr": {"type": "unix",
                                                  "path": str(workdir / "e0.sock")}})
    with pytest.raises(ExecuteError) as e:
        await c.execute("block-export-add", {"type": "vhost-user-blk", "id": "e1",
                                             "node-name": "t0", "iothread": "nope",
                                             "addr": {"type": "unix",
                                                      "path": str(workdir / "e1.sock")}})
    assert 'iothread "nope" not found' in str(e.value)
    with pytest.raises(ExecuteError) as e:
        await c.execute("object-add", {"qom-type": "iothread", "id": "io0"})
    assert "duplicate" in str(e.value)
    exports = await c.execute("query-block-exports")
    assert [x["id"] for x in exports] == ["e0"]
    assert await c.execute("qom-get", {"path": "/objects/io0",
                                       "property": "poll-max-ns"}) == 0
    limits = await c.execute("qom-get", {"path": "/objects/tg0", "property": "limits"})
    assert limits["iops-total"] == 1000
    nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
    assert nodes["n0"]["detect_zeroes"] == "on"
    assert nodes["t0"]["detect_zeroes"] == "off"


def test_iothread_objects_and_exports(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        await iothread_export(c, workdir)
        # A list of iothreads: one worker thread each.
        await c.execute("object-add", {"qom-type": "iothread", "id": "io1"})
        await c.execute("block-export-add", {"type": "vhost-user-blk", "id": "e2",
                                             "node-name": "n0", "num-queues": 4,
                                             "iothread": ["io0", "io1"],
                                             "addr": {"type": "unix",
                                                      "path": str(workdir / "e2.sock")}})
        await c.execute("object-del", {"id": "io1"})
        await c.disconnect()
    run(go())
    assert "4 queues, 2 iothreads (iothread io0,io1, poll-max-ns 0)" in daemon.read_log()


def test_iothread_objects_and_exports_qsd(qsd, workdir):
    async def go():
        c = await connect(qsd.monitor)
        await iothread_export(c, workdir / "qsd")
        await c.disconnect()
    run(go())
