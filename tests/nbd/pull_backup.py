#!/usr/bin/python3
"""A pull-mode incremental backup client, as backup tools write them with
libnbd: read the dirty extents of `qemu:dirty-bitmap:BITMAP` from the
source export and write exactly those to the destination (an NBD export
of the incremental image, e.g. qemu-nbd on a qcow2 whose backing file is
the previous backup). Prints one JSON line: the dirty extents, the bytes
read and the number of read requests.

usage: pull_backup.py SRC_URI BITMAP DST_URI"""

import json
import sys

import nbd

src_uri, bitmap, dst_uri = sys.argv[1:4]
ctx = f"qemu:dirty-bitmap:{bitmap}"
src = nbd.NBD()
src.add_meta_context(ctx)
src.connect_uri(src_uri)
assert src.can_meta_context(ctx), f"{ctx} not offered"
dst = nbd.NBD()
dst.connect_uri(dst_uri)
size = src.get_size()
assert dst.get_size() == size, (dst.get_size(), size)

extents = []
off = 0
while off < size:
    got = []

    def cb(meta, o, entries, err):
        if meta == ctx:
            got.extend(entries)
        return 0

    src.block_status(min(size - off, 1 << 30), off, cb)
    assert got, "no extents"
    for i in range(0, len(got), 2):
        length, flags = got[i], got[i + 1]
        length = min(length, size - off)
        if flags & 1:
            if extents and extents[-1][0] + extents[-1][1] == off:
                extents[-1][1] += length
            else:
                extents.append([off, length])
        off += length
        if off >= size:
            break

read_bytes = 0
reads = 0
CHUNK = 4 << 20
for start, length in extents:
    pos = start
    while pos < start + length:
        n = min(CHUNK, start + length - pos)
        data = src.pread(n, pos)
        dst.pwrite(data, pos)
        read_bytes += n
        reads += 1
        pos += n
dst.flush()
dst.shutdown()
src.shutdown()
print(json.dumps({"extents": extents, "read_bytes": read_bytes, "reads": reads}))
