"""Throttle groups over QMP: objects, limits read and changed live, the
throttle filter under real I/O (vub-bench), drains that never wait behind
a limit. Accuracy is measured by scripts/bench-throttle.sh, not here."""

import asyncio
import json

import pytest
from qemu.qmp import ExecuteError

from conftest import run
from test_qmp import connect, export, wait_log
from test_qmp_io import bench, bench_cmd


async def throttled_export(c, workdir, name="e0", limits=None):
    await c.execute("object-add", {"qom-type": "throttle-group", "id": f"tg-{name}",
                                   "limits": limits or {"iops-total": 200}})
    await c.execute("blockdev-add", {"driver": "null-co", "node-name": f"n-{name}",
                                     "read-zeroes": True})
    await c.execute("blockdev-add", {"driver": "throttle", "node-name": f"t-{name}",
                                     "throttle-group": f"tg-{name}", "file": f"n-{name}"})
    sock = workdir / f"{name}.sock"
    await c.execute("block-export-add", export(name, f"t-{name}", sock, writable=True,
                                               **{"num-queues": 2}))
    return sock


def test_throttle_group_objects_and_limits(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        await c.execute("object-add", {"qom-type": "throttle-group", "id": "tg0",
                                       "limits": {"iops-total": 1000, "bps-read": 10485760}})
        limits = await c.execute("qom-get", {"path": "tg0", "property": "limits"})
        assert limits["iops-total"] == 1000 and limits["bps-read"] == 10485760
        assert limits["iops-write"] == 0 and limits["bps-total-max-length"] == 1
        same = await c.execute("qom-get", {"path": "/objects/tg0", "property": "limits"})
        assert same == limits
        await c.execute("qom-set", {"path": "tg0", "property": "limits",
                                    "value": {"iops-total": 500, "iops-total-max": 1000,
                                              "iops-total-max-length": 3}})
        limits = await c.execute("qom-get", {"path": "tg0", "property": "limits"})
        assert limits["iops-total"] == 500 and limits["bps-read"] == 0
        assert limits["iops-total-max-length"] == 3
        # QEMU's validation rules and messages.
        cases = [
            ({"iops-total": 1, "iops-read": 1}, "cannot be used at the same time"),
            ({"bps-total": 10, "bps-total-max": 5}, "cannot be lower"),
            ({"iops-total-max": 5}, "require corresponding"),
            ({"iops-total": 1, "iops-total-max-length": 5}, "without burst rate"),
            ({"iops-total": 10 ** 16}, "must be within"),
            ({"iops-size": 4096}, "iops size requires"),
            ({"iops-totl": 5}, "unknown field"),
        ]
        for bad, needle in cases:
            with pytest.raises(ExecuteError) as e:
                await c.execute("qom-set", {"path": "tg0", "property": "limits", "value": bad})
            assert needle in str(e.value), (bad, str(e.value))
            with pytest.raises(ExecuteError) as e:
                await c.execute("object-add", {"qom-type": "throttle-group", "id": "tgx",
                                               "limits": bad})
            assert needle in str(e.value)
        # Still the last good limits.
        assert (await c.execute("qom-get", {"path": "tg0", "property": "limits"}))["iops-total"] == 500
        with pytest.raises(ExecuteError):
            await c.execute("object-add", {"qom-type": "throttle-group", "id": "tg0"})
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-add", {"driver": "throttle", "node-name": "t",
                                             "throttle-group": "nope", "file": "x"})
        assert "nope" in str(e.value)
        # In use: object-del refused until the node is gone.
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        await c.execute("blockdev-add", {"driver": "throttle", "node-name": "t0",
                                         "throttle-group": "tg0", "file": "n0"})
        with pytest.raises(ExecuteError) as e:
            await c.execute("object-del", {"id": "tg0"})
        assert "in use" in str(e.value)
        await c.execute("blockdev-del", {"node-name": "t0"})
        await c.execute("object-del", {"id": "tg0"})
        with pytest.raises(ExecuteError):
            await c.execute("qom-get", {"path": "tg0", "property": "limits"})
        await c.disconnect()
    run(go())


def test_throttled_io_completes_and_limits_change_live(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        sock = await throttled_export(c, workdir, limits={"iops-total": 300})
        proc = await asyncio.create_subprocess_exec(
            *bench_cmd(sock, rw="randrw", runtime="3", extra=("--queues", "2")),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_log(daemon, "frontend connected")
        # Change the limits several times under load: nothing fails.
        for limits in [{"iops-total": 100}, {"iops-read": 400, "iops-write": 50},
                       {"bps-total": 1 << 20}, {"iops-total": 1000}]:
            await asyncio.sleep(0.5)
            await c.execute("qom-set", {"path": "tg-e0", "property": "limits", "value": limits})
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["iops"] > 0
        await wait_log(daemon, "frontend disconnected")
        [entry] = await c.execute("query-blockstats")
        st = entry["stats"]
        assert st["failed_rd_operations"] == st["failed_wr_operations"] == 0
        assert st["x-throttled-rd-time-ns"] > 0 and st["x-throttled-wr-time-ns"] > 0
        await c.disconnect()
    run(go())


def test_drains_do_not_wait_behind_a_limit(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        # 1 IOPS: the 8 queued requests would hold a drain for 8 s.
        sock = await throttled_export(c, workdir, limits={"iops-total": 1})
        proc = await asyncio.create_subprocess_exec(
            *bench_cmd(sock, rw="randread", runtime="4"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_log(daemon, "frontend connected")
        await asyncio.sleep(0.5)
        # A drained section (reopen of the null node) lets queued requests go.
        for _ in range(3):
            await asyncio.wait_for(
                c.execute("blockdev-reopen", {"options": [
                    {"driver": "null-co", "node-name": "n-e0", "read-zeroes": True}]}), 5)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        await c.disconnect()
    run(go())
