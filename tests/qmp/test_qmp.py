"""QMP monitor tests with the qemu.qmp client (a client nobody here wrote)."""

import asyncio
import json
import os
import socket
import subprocess
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

from conftest import BENCH_BIN, run


async def connect(path, name="test"):
    c = QMPClient(name)
    await c.connect(path)
    return c


def file_node(name, path, **extra):
    return {"driver": "file", "node-name": name, "filename": str(path), **extra}


def export(eid, node, sock, **extra):
    return {"type": "vhost-user-blk", "id": eid, "node-name": node,
            "addr": {"type": "unix", "path": str(sock)}, **extra}


def raw_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(5)
    f = s.makefile("rwb")
    greeting = json.loads(f.readline())
    return s, f, greeting


def send(f, obj_or_bytes):
    data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode()
    f.write(data + b"\n")
    f.flush()
    return json.loads(f.readline())


def test_greeting_negotiation_and_version(daemon):
    async def go():
        c = await connect(daemon.monitor)
        v = await c.execute("query-version")
        assert "vhost-user-blkd" in v["package"]
        assert set(v["qemu"]) == {"major", "minor", "micro"}
        names = {x["name"] for x in await c.execute("query-commands")}
        assert {"blockdev-add", "block-export-add", "query-named-block-nodes", "quit"} <= names
        await c.disconnect()
    run(go())


def test_commands_before_negotiation_and_unknown_commands_are_refused(daemon):
    s, f, greeting = raw_socket(daemon.monitor)
    assert "QMP" in greeting and "version" in greeting["QMP"]
    r = send(f, {"execute": "query-version", "id": 1})
    assert r["error"]["class"] == "CommandNotFound" and r["id"] == 1
    assert send(f, {"execute": "qmp_capabilities"}) == {"return": {}}
    r = send(f, {"execute": "qmp_capabilities"})
    assert r["error"]["class"] == "CommandNotFound"
    r = send(f, {"execute": "no-such-command", "id": "x"})
    assert r == {"error": {"class": "CommandNotFound",
                           "desc": "The command no-such-command has not been found"}, "id": "x"}
    s.close()


def test_garbage_bad_json_and_wrong_types_get_errors_and_the_connection_goes_on(daemon):
    s, f, _ = raw_socket(daemon.monitor)
    send(f, {"execute": "qmp_capabilities"})
    for bad in [b"garbage", b'{"execute": ', b'{"execute": "query-version" "x"}',
                b'{"execute": "query-version", "arguments": {"a": "\xff\xfe"}}']:
        if bad == b'{"execute": ':
            f.write(bad)  # completed by the next line below
            f.flush()
            r = send(f, b"1}")
        else:
            r = send(f, bad)
        assert r["error"]["class"] == "GenericError", (bad, r)
    for args in [{"node-name": 5}, {"node-name": "x", "extra": 1}, []]:
        r = send(f, {"execute": "blockdev-del", "arguments": args})
        assert r["error"]["class"] == "GenericError", (args, r)
    r = send(f, {"execute": "query-version", "extra": 1})
    assert "unexpected" in r["error"]["desc"]
    r = send(f, {"execute": "query-version"})
    assert "return" in r
    s.close()


def flood(path, data):
    """Sends `data` after negotiating; returns what the server answered
    before it closed the connection."""
    s, f, _ = raw_socket(path)
    send(f, {"execute": "qmp_capabilities"})
    try:
        f.write(data)
        f.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: expected
    try:
        reply = f.readline()
        rest = f.readline()
    except ConnectionResetError:
        reply, rest = b"", b""
    s.close()
    return reply, rest


def test_a_flood_closes_only_that_connection(daemon):
    reply, rest = flood(daemon.monitor, b"[" * 100000)
    assert b"nested deeper" in reply and rest == b""
    reply, rest = flood(daemon.monitor, b'{"execute": "x", "arguments": {"a": "' + b"x" * (2 << 20) + b'"}}\n')
    assert rest == b""
    run(check_alive(daemon))
    assert daemon.alive()


async def check_alive(daemon):
    c = await connect(daemon.monitor)
    await c.execute("query-version")
    await c.disconnect()


def test_several_clients_at_once(daemon):
    async def go():
        clients = [await connect(daemon.monitor, f"c{i}") for i in range(5)]
        results = await asyncio.gather(*(c.execute("query-version") for c in clients))
        assert all("package" in r for r in results)
        for c in clients:
            await c.disconnect()
    run(go())


def bench(sock, rw="randwrite", runtime="0.5"):
    out = subprocess.run([BENCH_BIN, "--socket", str(sock), "--rw", rw, "--bs", "4k",
                          "--iodepth", "8", "--runtime", runtime, "--ramp", "0", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_nodes_and_exports_are_added_used_and_deleted_at_run_time(daemon, workdir):
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    sock = workdir / "e0.sock"

    async def go():
        c = await connect(daemon.monitor)
        events = c.events
        await c.execute("blockdev-add", file_node("f0", img, discard="unmap"))
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "d0", "file": "f0"})
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-add", {"driver": "raw", "node-name": "d0", "file": "f0"})
        assert "already in use" in str(e.value)
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["d0"]["drv"] == "raw" and nodes["d0"]["image"]["virtual-size"] == 64 << 20
        assert nodes["f0"]["file"] == str(img)

        await c.execute("block-export-add", export("e0", "d0", sock, writable=True, **{"num-queues": 2}))
        assert await c.execute("query-block-exports") == [
            {"type": "vhost-user-blk", "id": "e0", "node-name": "d0", "shutting-down": False,
             "x-writethrough": False, "x-iothread": None, "x-thread-ids": []}]
        graph = await c.execute("x-debug-query-block-graph")
        assert any(n["type"] == "block-backend" and n["name"] == "e0" for n in graph["nodes"])
        assert any(e["name"] == "file" and "write" in e["perm"] for e in graph["edges"])

        # Real I/O through the new export (libblkio via vub-bench).
        result = await asyncio.to_thread(bench, sock)
        assert result["iops"] > 0
        await wait_log(daemon, "frontend disconnected")

        # Statistics of that I/O, then a resize.
        [stats] = await c.execute("query-blockstats")
        assert stats["device"] == "e0" and stats["stats"]["wr_operations"] > 0
        assert stats["stats"]["wr_bytes"] == 4096 * stats["stats"]["wr_operations"]
        await c.execute("block_resize", {"node-name": "d0", "size": 96 << 20})
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["d0"]["image"]["virtual-size"] == 96 << 20

        # In use: the node cannot go, the export and then the nodes can.
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-del", {"node-name": "d0"})
        assert "in use" in str(e.value)
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-del", {"node-name": "f0"})
        assert "in use" in str(e.value)
        await c.execute("block-export-del", {"id": "e0"})
        ev = await asyncio.wait_for(events.get(), 10)
        assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "e0"}
        assert "timestamp" in ev
        assert await c.execute("query-block-exports") == []
        assert not sock.exists()
        await c.execute("blockdev-del", {"node-name": "d0"})
        await c.execute("blockdev-del", {"node-name": "f0"})
        assert await c.execute("query-named-block-nodes") == []
        with pytest.raises(ExecuteError) as e:
            await c.execute("blockdev-del", {"node-name": "f0"})
        assert "f0" in str(e.value)
        await c.disconnect()
    run(go())
    assert os.path.getsize(img) == 96 << 20


def test_export_with_a_connected_frontend_needs_mode_hard(daemon, workdir):
    sock = workdir / "e1.sock"

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        await c.execute("block-export-add", export("e1", "n0", sock, writable=True))
        proc = subprocess.Popen([BENCH_BIN, "--socket", str(sock), "--rw", "randread",
                                 "--runtime", "30", "--ramp", "0", "--json"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_log(daemon, "frontend connected")
            with pytest.raises(ExecuteError) as e:
                await c.execute("block-export-del", {"id": "e1"})
            assert "connected frontend" in str(e.value)
            await c.execute("block-export-del", {"id": "e1", "mode": "hard"})
            ev = await asyncio.wait_for(c.events.get(), 20)
            assert ev["event"] == "BLOCK_EXPORT_DELETED"
        finally:
            proc.kill()
            proc.wait()
        await c.execute("blockdev-del", {"node-name": "n0"})
        await c.disconnect()
    run(go())
    assert daemon.alive()


def test_invalid_management_input_names_what_is_wrong(daemon, workdir):
    async def go():
        c = await connect(daemon.monitor)
        cases = [
            ("blockdev-add", {"driver": "file", "node-name": "f", "filename": "/nonexistent/x"}, "/nonexistent/x"),
            ("blockdev-add", {"driver": "bogus", "node-name": "f"}, "bogus"),
            ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": -1}, "negative"),
            ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "missing"}, "missing"),
            ("block-export-add", export("e", "missing", workdir / "s"), "missing"),
            ("block-export-del", {"id": "nope"}, "nope"),
        ]
        for cmd, args, needle in cases:
            with pytest.raises(ExecuteError) as e:
                await c.execute(cmd, args)
            assert needle in str(e.value), (cmd, str(e.value))
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": "ro", "read-only": True})
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-export-add", export("w", "ro", workdir / "w.sock", writable=True))
        assert "read-only" in str(e.value)
        await c.disconnect()
    run(go())
    assert daemon.alive()


def test_quit_replies_then_drains_and_exits_zero(daemon):
    s, f, _ = raw_socket(daemon.monitor)
    send(f, {"execute": "qmp_capabilities"})
    assert send(f, {"execute": "quit", "id": 7}) == {"return": {}, "id": 7}
    assert f.readline() == b""
    s.close()
    assert daemon.proc.wait(30) == 0
    assert not os.path.exists(daemon.monitor)


async def wait_log(daemon, text, timeout=10):
    deadline = time.time() + timeout
    while text not in daemon.read_log():
        assert time.time() < deadline, f"'{text}' never logged"
        await asyncio.sleep(0.02)


def shape(v):
    """The keys of a reply, recursively (types for leaves)."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(v[0])] if v else []
    return type(v).__name__


def test_replies_have_the_shape_qemu_storage_daemon_gives(daemon, qsd, workdir):
    img = workdir / "shape.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)

    async def both(cmd, args=None):
        out = []
        for d in (daemon, qsd):
            c = await connect(d.monitor)
            try:
                out.append(await c.execute(cmd, args) if args is not None else await c.execute(cmd))
            except ExecuteError as e:
                out.append({"error-class": e.error_class})
            await c.disconnect()
        return out

    async def go():
        await both("blockdev-add", file_node("f0", img))
        await both("blockdev-add", {"driver": "raw", "node-name": "d0", "file": "f0"})
        ours, theirs = await both("query-block-exports")
        assert ours == theirs == []
        ours, theirs = await both("query-version")
        assert set(ours) == set(theirs) and set(ours["qemu"]) == set(theirs["qemu"])
        ours, theirs = await both("query-named-block-nodes")
        ours_d0 = next(n for n in ours if n["node-name"] == "d0")
        theirs_d0 = next(n for n in theirs if n["node-name"] == "d0")
        common = ["node-name", "drv", "file", "ro", "encrypted", "backing_file_depth",
                  "detect_zeroes", "bps", "iops", "write_threshold", "cache"]
        for k in common:
            assert k in theirs_d0 and k in ours_d0, k
            assert shape(ours_d0[k]) == shape(theirs_d0[k]), k
        for k in ["filename", "format", "virtual-size"]:
            assert ours_d0["image"][k] == theirs_d0["image"][k], k
        assert ours_d0["cache"] == theirs_d0["cache"]
        sock_a, sock_b = workdir / "a.sock", workdir / "qsd" / "b.sock"
        c = await connect(daemon.monitor)
        await c.execute("block-export-add", export("e0", "d0", sock_a))
        await c.disconnect()
        c = await connect(qsd.monitor)
        await c.execute("block-export-add", export("e0", "d0", sock_b))
        await c.disconnect()
        ours, theirs = await both("query-block-exports")
        # Our extensions are x- prefixed, as QEMU's; the rest is QEMU's.
        assert [{k: v for k, v in e.items() if not k.startswith("x-")} for e in ours] == theirs
        ours, theirs = await both("blockdev-del", {"node-name": "d0"})
        assert ours == theirs == {"error-class": "GenericError"}
        ours, theirs = await both("no-such-command")
        assert ours == theirs == {"error-class": "CommandNotFound"}
    run(go())


def test_duplicate_keys_get_the_error_qemu_storage_daemon_gives(daemon, qsd):
    msgs = [b'{"execute": "query-version", "execute": "quit"}',
            b'{"execute": "query-version", "id": 1, "id": 2}',
            b'{"execute": "blockdev-add", "arguments": '
            b'{"driver": "null-co", "node-name": "a", "node-name": "b"}}']
    replies = []
    for d in (daemon, qsd):
        s, f, _ = raw_socket(d.monitor)
        send(f, {"execute": "qmp_capabilities"})
        replies.append([send(f, m) for m in msgs] + [send(f, {"execute": "query-named-block-nodes"})])
        s.close()
    ours, theirs = replies
    assert ours == theirs
    assert ours[0] == {"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}
    assert ours[-1] == {"return": []}
    assert daemon.alive()


def test_stalled_and_abusive_monitor_clients_do_not_stall_guest_io(daemon, workdir):
    sock = workdir / "io.sock"

    async def go():
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        await c.execute("block-export-add", export("io", "n0", sock, writable=True))
        # Clients stuck half-way through a command, and one that never reads.
        stuck = []
        for _ in range(10):
            s, f, _ = raw_socket(daemon.monitor)
            f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-version", "argu')
            f.flush()
            stuck.append(s)
        result = await asyncio.to_thread(bench, sock, "randread", "1")
        assert result["iops"] > 0
        v = await c.execute("query-version")
        assert "package" in v
        for s in stuck:
            s.close()
        await c.disconnect()
    run(go())
