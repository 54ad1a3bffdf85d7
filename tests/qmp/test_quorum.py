"""The quorum driver and x-blockdev-change, side by side with
qemu-storage-daemon 7.2 where it can be: the same quorum definitions over
the same raw files, the same corruption written into a child's file, read
and written through an NBD export with qemu-io; the same events (shape and
fields) and the same refusals, in QEMU's words."""

import asyncio
import os
import subprocess
import threading

import pytest
from qemu.qmp import ExecuteError

from conftest import run
from test_qmp import connect, export, file_node

SIZE = 1 << 20
CHUNK = 64 * 1024


def make_images(d, names=("a", "b", "c"), fill=0x11):
    for n in names:
        with open(d / f"{n}.img", "wb") as f:
            f.write(bytes([fill]) * SIZE)


def poke(path, offset, data):
    """Writes `data` into a child's file behind the daemon's back."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def peek(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def qemu_io(sock, *cmds):
    """Runs qemu-io commands on the NBD export 'q'; returns its output."""
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    argv.append(f"nbd+unix:///q?socket={sock}")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


async def drain_events(c, want, settle=0.2):
    """The events queued so far: waits (up to 20 s) for `want` QUORUM_*
    events, then `settle` s for any more (an extra one arriving later than
    that would go unseen: the wait never makes a right answer fail)."""
    out = []
    n = 0
    while True:
        try:
            ev = await asyncio.wait_for(c.events.get(), 20 if n < want else settle)
        except asyncio.TimeoutError:
            return out
        out.append(ev)
        n += ev["event"].startswith("QUORUM_")


def quorum_events(evs):
    return [(e["event"], dict(e["data"])) for e in evs
            if e["event"].startswith("QUORUM_")]


async def setup(c, d, children, threshold, extra=None, nodes=None):
    """File nodes over d/<n>.img (or `nodes`, each a blockdev-add), a quorum
    'q' over them, an NBD export 'q' on d/nbd.sock."""
    for n in children:
        await c.execute("blockdev-add", (nodes or {}).get(n) or file_node(n, d / f"{n}.img"))
    await c.execute("blockdev-add", {"driver": "quorum", "node-name": "q",
                                     "children": list(children),
                                     "vote-threshold": threshold, **(extra or {})})
    sock = d / "nbd.sock"
    await c.execute("nbd-server-start",
                    {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    await c.execute("block-export-add", {"type": "nbd", "id": "q", "node-name": "q",
                                         "writable": True})
    return sock


def both(daemon, qsd, f):
    """Runs scenario `f(monitor, workdir)` against ours and QSD; returns both."""
    ours = run(f(daemon.monitor, daemon.workdir))
    theirs = run(f(qsd.monitor, qsd.workdir))
    return ours, theirs


def test_majority_wins_bad_copy_reported_and_rewritten_as_qsd(daemon, qsd):
    async def go(mon, d):
        make_images(d)
        bad = bytes([0xEE]) * 4096
        poke(d / "b.img", 8192, bad)
        c = await connect(mon)
        sock = await setup(c, d, ["a", "b", "c"], 2, {"rewrite-corrupted": True})
        out = qemu_io(sock, "read -P 0x11 8192 4096")
        evs = quorum_events(await drain_events(c, 1))
        repaired = peek(d / "b.img", 8192, 4096)
        await c.disconnect()
        return out, evs, repaired

    ours, theirs = both(daemon, qsd, go)
    for out, evs, repaired in (ours, theirs):
        assert "Pattern verification failed" not in out and "read 4096/4096" in out, out
        assert evs == [("QUORUM_REPORT_BAD", {"type": "read", "node-name": "b",
                                              "sector-num": 16, "sectors-count": 8})], evs
        assert repaired == bytes([0x11]) * 4096
    assert ours[1] == theirs[1]


def test_without_rewrite_the_bad_copy_stays(daemon):
    async def go():
        d = daemon.workdir
        make_images(d)
        poke(d / "c.img", 0, b"\x22" * 512)
        c = await connect(daemon.monitor)
        sock = await setup(c, d, ["a", "b", "c"], 2)
        out = qemu_io(sock, "read -P 0x11 0 4096")
        evs = quorum_events(await drain_events(c, 1))
        await c.disconnect()
        assert "read 4096/4096" in out, out
        assert evs == [("QUORUM_REPORT_BAD", {"type": "read", "node-name": "c",
                                              "sector-num": 0, "sectors-count": 8})]
        assert peek(d / "c.img", 0, 512) == b"\x22" * 512
    run(go())


def test_two_copies_corrupted_differently_fail_the_read_as_qsd(daemon, qsd):
    async def go(mon, d):
        make_images(d)
        poke(d / "b.img", 65536, b"\x33" * 512)
        poke(d / "c.img", 65536, b"\x44" * 512)
        c = await connect(mon)
        sock = await setup(c, d, ["a", "b", "c"], 2)
        out = qemu_io(sock, "read 65536 4096")
        evs = quorum_events(await drain_events(c, 1))
        await c.disconnect()
        return out, evs

    ours, theirs = both(daemon, qsd, go)
    for out, evs in (ours, theirs):
        assert "Input/output error" in out, out
        assert evs == [("QUORUM_FAILURE", {"reference": "q", "sector-num": 128,
                                           "sectors-count": 8})], evs
    assert ours[1] == theirs[1]


def blkdebug(name, image, *rules):
    o = {"driver": "blkdebug", "node-name": name, "image": image}
    if rules:
        # QEMU refuses an empty list ("doesn't support the option").
        o["inject-error"] = list(rules)
    return o


async def add_files(c, d, names):
    for n in names:
        await c.execute("blockdev-add", file_node(f"f{n}", d / f"{n}.img"))


def test_fifo_reads_the_next_child_when_the_first_fails_as_qsd(daemon, qsd):
    async def go(mon, d):
        make_images(d, ("a",), 0x11)
        make_images(d, ("b",), 0x55)
        c = await connect(mon)
        await add_files(c, d, "ab")
        nodes = {"a": blkdebug("a", "fa", {"event": "none", "errno": 5, "iotype": "read"}),
                 "b": blkdebug("b", "fb")}
        sock = await setup(c, d, ["a", "b"], 1, {"read-pattern": "fifo"}, nodes)
        out = qemu_io(sock, "read -P 0x55 0 4096")
        evs = quorum_events(await drain_events(c, 1))
        await c.disconnect()
        return out, evs

    ours, theirs = both(daemon, qsd, go)
    for out, evs in (ours, theirs):
        assert "read 4096/4096" in out and "verification failed" not in out, out
        assert evs == [("QUORUM_REPORT_BAD", {"type": "read", "error": "Input/output error",
                                              "node-name": "a", "sector-num": 0,
                                              "sectors-count": 8})], evs
    assert ours[1] == theirs[1]


@pytest.mark.parametrize("failing,ok", [(1, True), (2, False)])
def test_writes_need_vote_threshold_successes_as_qsd(daemon, qsd, failing, ok):
    async def go(mon, d):
        make_images(d)
        c = await connect(mon)
        await add_files(c, d, "abc")
        rule = {"event": "none", "errno": 28, "iotype": "write"}
        nodes = {n: blkdebug(n, f"f{n}", *([rule] if i < failing else []))
                 for i, n in enumerate("abc")}
        sock = await setup(c, d, ["a", "b", "c"], 2, None, nodes)
        out = qemu_io(sock, "write -P 0x77 4096 4096")
        evs = quorum_events(await drain_events(c, failing + (0 if failing < 2 else 1)))
        await c.disconnect()
        return out, evs, [peek(d / f"{n}.img", 4096, 1) for n in "abc"]

    ours, theirs = both(daemon, qsd, go)
    bad = [("QUORUM_REPORT_BAD", {"type": "write", "error": "No space left on device",
                                  "node-name": n, "sector-num": 8, "sectors-count": 8})
           for n in "ab"[:failing]]
    for out, evs, first in (ours, theirs):
        if ok:
            assert "wrote 4096/4096" in out, out
            assert evs == bad
        else:
            assert "No space left on device" in out, out
            assert sorted(evs, key=str) == sorted(
                bad + [("QUORUM_FAILURE", {"reference": "q", "sector-num": 8,
                                           "sectors-count": 8})], key=str)
        assert first == [b"\x11"] * failing + [b"\x77"] * (3 - failing)
    assert sorted(ours[1], key=str) == sorted(theirs[1], key=str)


async def refusals(mon, d):
    """blockdev-add and x-blockdev-change refusals, case by case."""
    make_images(d, ("a", "b", "c", "e"))
    with open(d / "big.img", "wb") as f:
        f.truncate(2 * SIZE)
    c = await connect(mon)
    out = {}

    async def try_(name, cmd, args):
        try:
            await c.execute(cmd, args)
            out[name] = "ok"
        except ExecuteError as e:
            out[name] = e.error.error.desc

    for n in ("a", "b", "c", "e"):
        await c.execute("blockdev-add", file_node(n, d / f"{n}.img"))
    await c.execute("blockdev-add", file_node("big", d / "big.img"))
    for n in ("a", "b"):
        await c.execute("blockdev-add", {**file_node(f"r{n}", d / f"{n}.img"), "read-only": True})
    q = {"driver": "quorum", "node-name": "x"}
    for name, extra in [
        ("threshold-0", {"children": ["a", "b"], "vote-threshold": 0}),
        ("threshold-3", {"children": ["a", "b"], "vote-threshold": 3}),
        ("threshold-missing", {"children": ["a", "b"]}),
        ("children-missing", {"vote-threshold": 1}),
        ("pattern-unknown", {"children": ["a", "b"], "vote-threshold": 1, "read-pattern": "foo"}),
        ("blkverify-1", {"children": ["a", "b"], "vote-threshold": 1, "blkverify": True}),
        ("blkverify-rewrite", {"children": ["a", "b"], "vote-threshold": 2, "blkverify": True,
                               "rewrite-corrupted": True}),
        ("sizes-differ", {"children": ["a", "big"], "vote-threshold": 1}),
        # QEMU 7.2 takes rewrite-corrupted with fifo and ignores it.
        ("fifo-rewrite", {"children": ["a", "b"], "vote-threshold": 1, "read-pattern": "fifo",
                          "rewrite-corrupted": True}),
        # A read-only quorum reads read-only children; with rewrite-corrupted
        # it writes to them (QEMU's quorum_child_perm), so they cannot be.
        ("read-only", {"children": ["ra", "rb"], "vote-threshold": 1, "read-only": True}),
        ("read-only-rewrite", {"children": ["ra", "rb"], "vote-threshold": 1, "read-only": True,
                               "rewrite-corrupted": True}),
    ]:
        await try_(name, "blockdev-add", {**q, **extra})
        if out[name] == "ok":
            await c.execute("blockdev-del", {"node-name": "x"})
    await c.execute("blockdev-add", {"driver": "quorum", "node-name": "q",
                                     "children": ["a", "b"], "vote-threshold": 2})
    await c.execute("blockdev-add", {"driver": "raw", "node-name": "r", "file": "c"})
    x = "x-blockdev-change"
    await try_("neither", x, {"parent": "q"})
    await try_("both", x, {"parent": "q", "child": "children.0", "node": "e"})
    await try_("parent-unknown", x, {"parent": "nope", "child": "children.0"})
    await try_("child-unknown", x, {"parent": "q", "child": "children.5"})
    await try_("below-threshold", x, {"parent": "q", "child": "children.0"})
    await try_("node-unknown", x, {"parent": "q", "node": "nope"})
    await try_("node-has-parent", x, {"parent": "q", "node": "c"})
    await try_("raw-del", x, {"parent": "r", "child": "file"})
    await try_("raw-add", x, {"parent": "r", "node": "e"})
    await try_("add", x, {"parent": "q", "node": "e"})
    await try_("del-0", x, {"parent": "q", "child": "children.0"})
    await try_("del-0-again", x, {"parent": "q", "child": "children.0"})
    await try_("re-add", x, {"parent": "q", "node": "a"})
    g = await c.execute("x-debug-query-block-graph")
    ids = {n["id"]: n["name"] for n in g["nodes"]}
    out["edges"] = sorted((e["name"], ids[e["child"]]) for e in g["edges"]
                          if ids[e["parent"]] == "q")
    await c.disconnect()
    return out


def test_refusals_and_child_names_as_qsd(daemon, qsd):
    ours, theirs = both(daemon, qsd, refusals)
    for name, want in theirs.items():
        got = ours[name]
        if want == "ok" or name == "edges":
            assert got == want, f"{name}: qemu-storage-daemon says {want!r}, we say {got!r}"
        elif name == "read-only-rewrite":
            # Ours says which node and which parent ("node 'ra' is
            # read-only, but x needs write permission on it").
            assert want == "Block node is read-only" and "is read-only" in got, (want, got)
        else:
            # Ours names the node first ("cannot open node 'x': ...").
            assert got != "ok" and got.endswith(want), \
                f"{name}: qemu-storage-daemon says {want!r}, we say {got!r}"
    assert ours["edges"] == [("children.1", "b"), ("children.2", "e"), ("children.3", "a")]


def test_a_child_added_and_removed_while_verified_io_runs(daemon, tmp_path):
    """x-blockdev-change adds an nbd child (qemu-nbd serving a file) and a
    file child while a writer writes and reads back its patterns through
    the export; the new children end up with what was written after they
    joined, and removing them leaves the I/O running."""
    d = daemon.workdir
    make_images(d, ("a", "b", "n", "f"), 0)
    nbd_sock = d / "qemu-nbd.sock"
    qnbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(nbd_sock), "-t",
                             str(d / "n.img")], stderr=subprocess.DEVNULL)
    try:
        async def go():
            c = await connect(daemon.monitor)
            for _ in range(100):
                if nbd_sock.exists():
                    break
                await asyncio.sleep(0.05)
            sock = await setup(c, d, ["a", "b"], 1)
            await c.execute("blockdev-add", {"driver": "nbd", "node-name": "n",
                                             "server": {"type": "unix", "path": str(nbd_sock)}})
            await c.execute("blockdev-add", file_node("f", d / "f.img"))
            stop = threading.Event()
            errors = []
            rounds = [0]

            async def rounds_pass(n):
                # Waits for `n` whole rounds of the writer (no time limit
                # but the writer's own: it stops after 200 rounds).
                start = rounds[0]
                while rounds[0] < start + n and t.is_alive():
                    await asyncio.sleep(0.02)
                assert rounds[0] >= start + n, errors

            def writer():
                # Each round writes a new pattern over the whole disk, chunk
                # by chunk, and reads every chunk back.
                rnd = 0
                while not stop.is_set() and rnd < 200:
                    rnd += 1
                    p = 0x20 + rnd % 0xC0
                    cmds = []
                    for off in range(0, SIZE, 4 * CHUNK):
                        cmds += [f"write -P {p} {off} {4 * CHUNK}",
                                 f"read -P {p} {off} {4 * CHUNK}"]
                    out = qemu_io(sock, *cmds)
                    if "failed" in out or "error" in out.lower():
                        errors.append(out)
                        return
                    rounds[0] += 1

            t = threading.Thread(target=writer)
            t.start()
            await rounds_pass(1)
            await c.execute("x-blockdev-change", {"parent": "q", "node": "n"})
            await rounds_pass(2)
            await c.execute("x-blockdev-change", {"parent": "q", "node": "f"})
            await rounds_pass(2)
            await c.execute("x-blockdev-change", {"parent": "q", "child": "children.2"})
            await rounds_pass(2)
            stop.set()
            await asyncio.to_thread(t.join)
            assert not errors, errors[0]
            # A final pattern reaches every child still there, and f.
            out = qemu_io(sock, f"write -P 0x99 0 {SIZE}", f"read -P 0x99 0 {SIZE}")
            assert "verification failed" not in out and f"read {SIZE}/{SIZE}" in out, out
            await c.execute("x-blockdev-change", {"parent": "q", "child": "children.3"})
            # The nbd child left: the copy qemu-nbd serves stops at what
            # was written while it was in; f left after the last write.
            assert peek(d / "f.img", 0, SIZE) == b"\x99" * SIZE
            assert peek(d / "a.img", 0, SIZE) == b"\x99" * SIZE
            n = peek(d / "n.img", 0, SIZE)
            assert n != b"\x00" * SIZE and b"\x99" not in n
            await c.execute("blockdev-del", {"node-name": "n"})
            await c.execute("blockdev-del", {"node-name": "f"})
            await c.disconnect()
        run(go())
    finally:
        qnbd.terminate()
        qnbd.wait()


def test_an_inline_child_removed_leaves_the_graph(daemon):
    async def go():
        d = daemon.workdir
        make_images(d)
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", {
            "driver": "quorum", "node-name": "q", "vote-threshold": 1,
            "children": [{"driver": "file", "filename": str(d / f"{n}.img")} for n in "abc"]})
        names = lambda g: sorted(n["node-name"] for n in g)
        assert names(await c.execute("query-named-block-nodes")) == [
            "q", "q-children.0", "q-children.1", "q-children.2"]
        await c.execute("x-blockdev-change", {"parent": "q", "child": "children.1"})
        assert names(await c.execute("query-named-block-nodes")) == [
            "q", "q-children.0", "q-children.2"]
        await c.execute("blockdev-del", {"node-name": "q"})
        assert names(await c.execute("query-named-block-nodes")) == []
        await c.disconnect()
    run(go())


def test_a_child_with_a_larger_alignment_than_an_export_takes_is_refused(daemon):
    async def go():
        d = daemon.workdir
        make_images(d, ("a", "b", "c"))
        c = await connect(daemon.monitor)
        await add_files(c, d, "abc")
        await c.execute("blockdev-add", {"driver": "quorum", "node-name": "q",
                                         "children": ["fa", "fb"], "vote-threshold": 1})
        await c.execute("block-export-add", export("e0", "q", d / "e0.sock", writable=True))
        await c.execute("blockdev-add", {"driver": "blkdebug", "node-name": "big",
                                         "image": "fc", "align": 4096})
        with pytest.raises(ExecuteError) as e:
            await c.execute("x-blockdev-change", {"parent": "q", "node": "big"})
        assert e.value.error.error.desc == (
            "node 'big' needs requests aligned to 4096 bytes, but export 'e0' "
            "above 'q' has logical-block-size 512")
        # Without the export it is taken.
        await c.execute("block-export-del", {"id": "e0"})
        while (await asyncio.wait_for(c.events.get(), 20))["event"] != "BLOCK_EXPORT_DELETED":
            pass
        await c.execute("x-blockdev-change", {"parent": "q", "node": "big"})
        await c.disconnect()
    run(go())
