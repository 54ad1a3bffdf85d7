"""QMP commands that act on I/O: statistics, histograms, write threshold,
resize and error policies, with libblkio (vub-bench) as the guest."""

import asyncio
import json
import os
import subprocess

import pytest
from qemu.qmp import ExecuteError

from conftest import BENCH_BIN, run
from test_qmp import connect, export, file_node, wait_log


def bench_cmd(sock, rw="randwrite", runtime="0.5", extra=()):
    return [BENCH_BIN, "--socket", str(sock), "--rw", rw, "--bs", "4k", "--iodepth", "8",
            "--runtime", runtime, "--ramp", "0", "--json", *extra]


def bench(sock, **kw):
    out = subprocess.run(bench_cmd(sock, **kw), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def setup_raw(c, workdir, name, size, exp_extra=None, node_extra=None):
    img = workdir / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    await c.execute("blockdev-add", file_node(f"f-{name}", img, **(node_extra or {})))
    await c.execute("blockdev-add", {"driver": "raw", "node-name": name, "file": f"f-{name}"})
    sock = workdir / f"{name}.sock"
    await c.execute("block-export-add", export(name, name, sock, writable=True,
                                               **{"num-queues": 2, **(exp_extra or {})}))
    return img, sock


def test_blockstats_count_every_request_and_histograms_bin_them(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        _, sock = await setup_raw(c, workdir, "s0", 32 << 20)
        await c.execute("block-latency-histogram-set",
                        {"id": "s0", "boundaries": [10000, 100000, 1000000]})
        w = await asyncio.to_thread(bench, sock, rw="randwrite")
        r = await asyncio.to_thread(bench, sock, rw="randread", extra=("--queues", "2"))
        await wait_log(daemon, "frontend disconnected")
        [entry] = await c.execute("query-blockstats")
        st = entry["stats"]
        assert entry["device"] == "s0" and entry["node-name"] == "s0"
        assert st["wr_operations"] >= w["ios"] if "ios" in w else st["wr_operations"] > 0
        assert st["wr_bytes"] == 4096 * st["wr_operations"]
        assert st["rd_bytes"] == 4096 * st["rd_operations"] and st["rd_operations"] > 0
        assert st["failed_rd_operations"] == st["failed_wr_operations"] == 0
        assert st["rd_total_time_ns"] > 0 and st["wr_total_time_ns"] > 0
        assert 0 < st["wr_highest_offset"] <= 32 << 20
        assert "idle_time_ns" in st
        h = st["rd_latency_histogram"]
        assert h["boundaries"] == [10000, 100000, 1000000]
        assert sum(h["bins"]) == st["rd_operations"]
        assert sum(st["wr_latency_histogram"]["bins"]) == st["wr_operations"]
        queues = entry["x-queues"]
        assert len(queues) == 2 and all(q["requests"] > 0 for q in queues)
        assert sum(q["requests"] for q in queues) >= st["rd_operations"] + st["wr_operations"]
        # Removing the histograms.
        await c.execute("block-latency-histogram-set", {"id": "s0"})
        [entry] = await c.execute("query-blockstats")
        assert "rd_latency_histogram" not in entry["stats"]
        with pytest.raises(ExecuteError):
            await c.execute("block-latency-histogram-set", {"id": "s0", "boundaries": [5, 5]})
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-latency-histogram-set", {"id": "nope", "boundaries": [5]})
        assert "nope" in str(e.value)
        await c.disconnect()
    run(go())


def test_write_threshold_fires_once(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        await setup_raw(c, workdir, "t0", 32 << 20)
        sock = workdir / "t0.sock"
        await c.execute("block-set-write-threshold", {"node-name": "f-t0", "write-threshold": 1 << 20})
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["f-t0"]["write_threshold"] == 1 << 20
        await asyncio.to_thread(bench, sock)
        ev = await asyncio.wait_for(c.events.get(), 10)
        assert ev["event"] == "BLOCK_WRITE_THRESHOLD"
        assert ev["data"]["node-name"] == "f-t0" and ev["data"]["write-threshold"] == 1 << 20
        assert ev["data"]["amount-exceeded"] > 0
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["f-t0"]["write_threshold"] == 0
        await c.disconnect()
    run(go())


def test_resize_grows_the_node_and_a_new_connection_sees_it(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        img, sock = await setup_raw(c, workdir, "r0", 32 << 20)
        before = await asyncio.to_thread(bench, sock)
        assert before["device"]["capacity"] == 32 << 20
        await wait_log(daemon, "frontend disconnected")
        await c.execute("block_resize", {"node-name": "r0", "size": 64 << 20})
        assert os.path.getsize(img) == 64 << 20
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["r0"]["image"]["virtual-size"] == 64 << 20
        after = await asyncio.to_thread(bench, sock)
        assert after["device"]["capacity"] == 64 << 20
        # By export id (QEMU's 'device'), shrinking.
        await c.execute("block_resize", {"device": "r0", "size": 48 << 20})
        assert os.path.getsize(img) == 48 << 20
        for bad, needle in [({"node-name": "r0", "size": 1000}, "512"),
                            ({"node-name": "nope", "size": 4096}, "nope"),
                            ({"size": 4096}, "exactly one")]:
            with pytest.raises(ExecuteError) as e:
                await c.execute("block_resize", bad)
            assert needle in str(e.value)
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n"})
        with pytest.raises(ExecuteError) as e:
            await c.execute("block_resize", {"node-name": "n", "size": 4096})
        assert "cannot be resized" in str(e.value)
        await c.disconnect()
    run(go())


@pytest.fixture
def small_tmpfs(workdir):
    """A 1 MiB tmpfs: writes to a sparse image on it run out of space."""
    mnt = workdir / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test needs root): {r.stderr}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_stop_policy_parks_writes_on_enospc_and_cont_retries_them(daemon, workdir, small_tmpfs):
    img = small_tmpfs / "full.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", file_node("ff", img))
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "fd", "file": "ff"})
        sock = workdir / "full.sock"
        await c.execute("block-export-add", export("full", "fd", sock, writable=True,
                                                   **{"on-write-error": "stop"}))
        # Sequential writes over the whole 16 MiB disk: the 1 MiB tmpfs fills.
        proc = await asyncio.create_subprocess_exec(
            *bench_cmd(sock, rw="write", runtime="2", extra=("--size", str(8 << 20))),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        ev = await asyncio.wait_for(c.events.get(), 30)
        assert ev["event"] == "BLOCK_IO_ERROR", ev
        d = ev["data"]
        assert d["device"] == "full" and d["operation"] == "write"
        assert d["action"] == "stop" and d["nospace"] is True
        # The guest sees nothing yet: its writes are parked. Free space, resume.
        subprocess.run(["mount", "-o", "remount,size=64M", str(small_tmpfs)], check=True)
        await asyncio.sleep(0.2)
        await c.execute("cont")
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        result = json.loads(out)
        assert result["iops"] > 0
        [entry] = await c.execute("query-blockstats")
        assert entry["stats"]["failed_wr_operations"] >= 1
        await c.disconnect()
    run(go())
    assert daemon.alive()


def test_report_and_ignore_policies(daemon, workdir, small_tmpfs):
    async def go():
        c = await connect(daemon.monitor)
        results = {}
        for policy in ["report", "ignore"]:
            img = small_tmpfs / f"{policy}.img"
            with open(img, "wb") as f:
                f.truncate(16 << 20)
            await c.execute("blockdev-add", file_node(f"f{policy}", img))
            await c.execute("blockdev-add", {"driver": "raw", "node-name": f"d{policy}",
                                             "file": f"f{policy}"})
            sock = workdir / f"{policy}.sock"
            await c.execute("block-export-add", export(policy, f"d{policy}", sock, writable=True,
                                                       **{"on-write-error": policy}))
            p = await asyncio.to_thread(subprocess.run,
                                        bench_cmd(sock, rw="write", runtime="1",
                                                  extra=("--size", str(8 << 20))),
                                        capture_output=True, text=True, timeout=60)
            results[policy] = p
            ev = await asyncio.wait_for(c.events.get(), 10)
            assert ev["event"] == "BLOCK_IO_ERROR" and ev["data"]["action"] == policy
            # Make room for the next image.
            await c.execute("block-export-del", {"id": policy, "mode": "hard"})
            while (await asyncio.wait_for(c.events.get(), 10))["event"] != "BLOCK_EXPORT_DELETED":
                pass
            await c.execute("blockdev-del", {"node-name": f"d{policy}"})
            await c.execute("blockdev-del", {"node-name": f"f{policy}"})
            os.unlink(img)
        assert results["report"].returncode != 0
        assert "Input/output error" in results["report"].stderr or "No space" in results["report"].stderr
        assert results["ignore"].returncode == 0, results["ignore"].stderr
        await c.disconnect()
    run(go())


def test_reopen_switches_read_only_and_cache_mode_atomically(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        img, sock = await setup_raw(c, workdir, "o0", 32 << 20)
        f = lambda **kw: file_node("f-o0", img, **kw)
        raw = lambda **kw: {"driver": "raw", "node-name": "o0", "file": "f-o0", **kw}
        # The writable export writes through o0 to f-o0: neither may go read-only.
        for opts, needle in [([f(**{"read-only": True})], "node 'o0'"),
                             ([raw(**{"read-only": True}), f(**{"read-only": True})], "export 'o0'")]:
            with pytest.raises(ExecuteError) as e:
                await c.execute("blockdev-reopen", {"options": opts})
            assert needle in str(e.value), str(e.value)
        # Nothing changed on a refusal.
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert not nodes["o0"]["ro"] and not nodes["f-o0"]["ro"]
        # Changes reopen may not make.
        for opts, needle in [([{"driver": "null-co", "node-name": "o0"}], "driver"),
                             ([file_node("f-o0", workdir / "other.img")], "filename"),
                             ([raw(offset=4096)], "offset")]:
            with pytest.raises(ExecuteError) as e:
                await c.execute("blockdev-reopen", {"options": opts})
            assert needle in str(e.value), str(e.value)
        # cache.direct on and off while the guest writes: no request fails.
        proc = await asyncio.create_subprocess_exec(
            *bench_cmd(sock, rw="randwrite", runtime="2"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_log(daemon, "frontend connected")
        for i in range(20):
            await c.execute("blockdev-reopen", {"options": [f(cache={"direct": i % 2 == 0})]})
            await asyncio.sleep(0.05)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["f-o0"]["cache"]["direct"] is False
        # Delete the writable export; a read-only one lets both nodes go ro together.
        await c.execute("block-export-del", {"id": "o0", "mode": "hard"})
        while (await asyncio.wait_for(c.events.get(), 10))["event"] != "BLOCK_EXPORT_DELETED":
            pass
        await c.execute("block-export-add", export("ro", "o0", workdir / "ro.sock"))
        await c.execute("blockdev-reopen", {"options": [raw(**{"read-only": True}),
                                                        f(**{"read-only": True})]})
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["o0"]["ro"] and nodes["f-o0"]["ro"]
        graph = await c.execute("x-debug-query-block-graph")
        assert all("write" not in e["perm"] for e in graph["edges"])
        r = await asyncio.to_thread(bench, workdir / "ro.sock", rw="randread")
        assert r["iops"] > 0
        # Back to read-write: the raw node alone would write to a read-only file.
        with pytest.raises(ExecuteError):
            await c.execute("blockdev-reopen", {"options": [raw()]})
        await c.execute("blockdev-reopen", {"options": [raw(), f()]})
        graph = await c.execute("x-debug-query-block-graph")
        assert any(e["name"] == "file" and "write" in e["perm"] for e in graph["edges"])
        await c.disconnect()
    run(go())
