#!/usr/bin/python3
"""NBD protocol edge cases with libnbd's Python bindings (Debian's
python3-libnbd, for /usr/bin/python3). Run by tests/nbd.rs against a
daemon serving `disk` (tests/nbd.rs test_image: read-only, bitmap bm0,
allocation-depth) and `rw` (a writable empty 64 MiB qcow2) on the UNIX
socket given as the only argument. Each case prints one line; any failure
raises. Strict mode is turned off where libnbd would refuse to send."""

import errno
import sys

import nbd

SOCK = sys.argv[1]
MIB = 1 << 20
SIZE = 64 * MIB
cases = 0


def case(name):
    def wrap(f):
        global cases
        f()
        cases += 1
        print(f"ok {name}")
        return f
    return wrap


def handle(export="disk", strict=True, structured=True, contexts=(), opt_mode=False):
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_unix(SOCK)
    if not strict:
        h.set_strict_mode(0)
    return h


def fails_with(err, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errnum == err, f"{f.__name__}: errno {e.errnum} ({e}), want {err}"
        return
    raise AssertionError(f"{f.__name__}{args[1:] if len(args) > 1 else ''}: succeeded")


@case("list exports with descriptions")
def _():
    h = handle(opt_mode=True)
    seen = []
    h.opt_list(lambda name, desc: seen.append(name) or 0)
    assert sorted(seen) == ["disk", "rw"], seen
    h.opt_abort()


@case("info on an unknown export, then go on a known one")
def _():
    h = handle(opt_mode=True)
    h.set_export_name("nope")
    fails_with(errno.ENOENT, h.opt_info)
    h.set_export_name("disk")
    h.opt_info()
    assert h.get_size() == SIZE
    h.opt_go()
    assert h.is_read_only() and h.can_multi_conn() and h.can_cache()


@case("list meta contexts: all, by namespace, by name, unknown")
def _():
    h = handle(opt_mode=True)
    got = []
    h.opt_list_meta_context(lambda name: got.append(name) or 0)
    assert got == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:bm0"], got
    for query, want in [("qemu:", ["qemu:allocation-depth", "qemu:dirty-bitmap:bm0"]),
                        ("qemu:dirty-bitmap:", ["qemu:dirty-bitmap:bm0"]),
                        ("base:", ["base:allocation"]),
                        ("qemu:dirty-bitmap:nope", []),
                        ("other:x", [])]:
        h.clear_meta_contexts()
        h.add_meta_context(query)
        got = []
        h.opt_list_meta_context(lambda name: got.append(name) or 0)
        assert got == want, (query, got)
    h.opt_abort()


@case("meta contexts without structured replies are not negotiated")
def _():
    h = handle(structured=False, contexts=["base:allocation"])
    assert not h.get_structured_replies_negotiated()
    assert not h.can_meta_context("base:allocation")
    # Reads still work with simple replies.
    assert h.pread(512, 0) == b"\x11" * 512
    h.shutdown()


@case("block status: each context, REQ_ONE, past the end")
def _():
    h = handle(contexts=["base:allocation", "qemu:dirty-bitmap:bm0", "qemu:allocation-depth"])
    seen = {}

    def cb(meta, offset, entries, err):
        seen[meta] = entries
        return 0

    h.block_status(16 * MIB, 0, cb)
    assert seen["base:allocation"][:2] == [MIB, 0], seen
    bm = seen["qemu:dirty-bitmap:bm0"]
    assert bm[:6] == [2 * MIB, 0, 65536, 1, 8 * MIB - 65536, 0], bm
    assert seen["qemu:allocation-depth"][:2] == [MIB, 1], seen
    seen.clear()
    h.block_status(16 * MIB, 0, cb, nbd.CMD_FLAG_REQ_ONE)
    assert all(len(v) == 2 for v in seen.values()), seen
    h.set_strict_mode(0)
    fails_with(errno.EINVAL, h.block_status, 512, SIZE, cb)
    fails_with(errno.EINVAL, h.block_status, 0, 0, cb)
    h.shutdown()


@case("reads: out of bounds, oversize, unaligned, zero length")
def _():
    h = handle(strict=False)
    fails_with(errno.EINVAL, h.pread, 4096, SIZE - 512)
    fails_with(errno.EINVAL, h.pread, 512, 2 ** 63)
    # Over 32 MiB: EOVERFLOW with structured replies.
    fails_with(errno.EOVERFLOW, h.pread, 33 * MIB, 0)
    # Byte-granular reads are fine (minimum block size 1 on this node).
    assert h.pread(3, 1) == b"\x11" * 3
    assert h.pread(0, 0) == b""
    assert h.pread(32 * MIB, 0)[:MIB] == b"\x11" * MIB
    h.shutdown()


@case("writes to a read-only export: EPERM, session goes on")
def _():
    h = handle(strict=False)
    fails_with(errno.EPERM, h.pwrite, b"x" * 512, 0)
    fails_with(errno.EPERM, h.trim, 512, 0)
    fails_with(errno.EPERM, h.zero, 512, 0)
    h.flush()
    h.cache(MIB, 0)
    assert h.pread(512, 0) == b"\x11" * 512
    h.shutdown()


@case("writable export: write, zero (fast and not), trim, FUA, out of bounds")
def _():
    h = handle("rw", strict=False)
    assert not h.is_read_only() and h.can_multi_conn()
    assert h.can_zero() and h.can_fast_zero() and h.can_trim() and h.can_fua()
    # Unallocated clusters read as zeroes already: a fast zero succeeds at once.
    h.zero(MIB, 8 * MIB, nbd.CMD_FLAG_FAST_ZERO)
    h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 0) == b"y" * 4096
    # Over data we cannot promise it is fast: ENOTSUP, the client writes.
    fails_with(errno.ENOTSUP, h.zero, MIB, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4096, 0) == b"y" * 4096
    h.zero(MIB, 0)
    assert h.pread(4096, 0) == bytes(4096)
    h.pwrite(b"y" * 4096, 0)
    h.zero(MIB, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 0) == bytes(4096)
    h.trim(MIB, MIB)
    fails_with(errno.ENOSPC, h.pwrite, b"z" * 1024, SIZE - 512)
    fails_with(errno.ENOSPC, h.zero, 1024, SIZE - 512)
    fails_with(errno.EINVAL, h.trim, 1024, SIZE - 512)
    fails_with(errno.EINVAL, h.pwrite, b"z", 0, nbd.CMD_FLAG_REQ_ONE)
    h.flush()
    h.shutdown()


@case("many requests in flight, replies matched by cookie")
def _():
    h = handle()
    bufs = [nbd.Buffer(65536) for _ in range(64)]
    cookies = [h.aio_pread(b, i * 65536) for i, b in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    assert bytes(bufs[0].to_bytearray()) == b"\x11" * 65536
    assert bufs[40].is_zero()
    h.shutdown()


@case("disconnect in the middle of replies")
def _():
    for _ in range(10):
        h = handle()
        for i in range(8):
            h.aio_pread(nbd.Buffer(4 * MIB), i * 4 * MIB)
        h.poll(0)
        del h
    h = handle()
    assert h.pread(512, 0) == b"\x11" * 512
    h.shutdown()


@case("option abort and go on another export name in opt mode")
def _():
    h = handle(opt_mode=True)
    h.set_export_name("rw")
    h.opt_go()
    assert not h.is_read_only()
    h.shutdown()


@case("200 connections in parallel")
def _():
    hs = [handle() for _ in range(200)]
    for i, h in enumerate(hs):
        assert h.pread(512, 0) == b"\x11" * 512
    for h in hs:
        h.shutdown()


print(f"{cases} cases passed")
