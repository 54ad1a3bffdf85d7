#!/usr/bin/python3
"""Reads an export over and over (64 KiB requests, 16 in flight) and
checks that every byte is BYTE: a point-in-time view must not change
while the guest writes to the disk below it.

usage: read_loop.py URI ROUNDS BYTE"""

import sys

import nbd

uri, rounds, byte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
CH = 65536
want = bytes([byte]) * CH
reads = 0
for r in range(rounds):
    bufs = {}
    off = 0
    while off < size or h.aio_in_flight() > 0:
        while off < size and h.aio_in_flight() < 16:
            b = nbd.Buffer(CH)
            bufs[off] = (b, h.aio_pread(b, off))
            off += CH
        h.poll(-1)
    for o, (b, c) in sorted(bufs.items()):
        assert h.aio_command_completed(c)
        got = bytes(b.to_bytearray())
        if got != want:
            i = next(i for i in range(CH) if got[i] != byte)
            print(f"round {r}: byte {o + i} is {got[i]:#x}, not {byte:#x}")
            sys.exit(1)
        reads += 1
h.shutdown()
print(f"{reads} reads of {CH} bytes, all {byte:#x}")
