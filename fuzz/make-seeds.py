#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/
(small valid inputs; libFuzzer mutates from them). qcow2 seeds are made
with qemu-img and qemu-io. Run from anywhere: python3 fuzz/make-seeds.py"""
import os, struct, subprocess, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
C = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(C, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- guest memory with a virtqueue (virtio_blk_request, vhost_user_messages)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = 0, 1, 4, 8, 11, 13
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
QSIZE, TABLE, AVAIL, USED = 16, 0x1000, 0x2000, 0x3000


def guest(kind, indirect=False, span=False):
    mem = bytearray(0x11000 if span else 0x8000)
    def desc(tab, i, addr, ln, flags, nxt):
        struct.pack_into("<QIHH", mem, tab + 16 * i, addr, ln, flags, nxt)
    hdr, data, status = 0x4000, 0x5000, 0x6000
    if span:
        data = 0xff00  # 512 bytes across the two 64 KiB regions
    struct.pack_into("<IIQ", mem, hdr, kind, 0, 8)
    chain = [(hdr, 16, 0)]
    if kind in (T_IN, T_GET_ID):
        chain.append((data, 512 if kind == T_IN else 20, F_WRITE))
    elif kind == T_OUT:
        chain.append((data, 1024, 0))
        mem[data:data + 1024] = bytes([0xa5]) * 1024
    elif kind in (T_DISCARD, T_WZ):
        struct.pack_into("<QII", mem, data, 16, 8, 1 if kind == T_WZ else 0)
        chain.append((data, 16, 0))
    chain.append((status, 1, F_WRITE))
    tab = 0x7000 if indirect else TABLE
    for i, (a, ln, fl) in enumerate(chain):
        last = i == len(chain) - 1
        desc(tab, i, a, ln, fl | (0 if last else F_NEXT), 0 if last else i + 1)
    if indirect:
        desc(TABLE, 0, 0x7000, 16 * len(chain), F_INDIRECT, 0)
    struct.pack_into("<HH", mem, AVAIL, 0, 1)
    struct.pack_into("<H", mem, AVAIL + 4, 0)
    return bytes(mem)


kinds = {"read": T_IN, "write": T_OUT, "flush": T_FLUSH, "get-id": T_GET_ID,
         "discard": T_DISCARD, "write-zeroes": T_WZ}
for name, k in kinds.items():
    for ind in (False, True):
        hdr = struct.pack("<HHHHBBBBI", QSIZE, TABLE, AVAIL, USED, 0, 128, 1, 4, 1 << 20)
        put("virtio_blk_request", f"{name}{'-indirect' if ind else ''}",
            hdr + guest(k, indirect=ind).rstrip(b"\0"))
put("virtio_blk_request", "read-spanning-regions",
    struct.pack("<HHHHBBBBI", QSIZE, TABLE, AVAIL, USED, 0, 128, 1, 4, 1 << 20)
    + guest(T_IN, span=True).rstrip(b"\0"))

# ---- vhost_user_messages: a frontend bringing up queue 0 and running one
# request, then stopping and resetting.
UADDR = 0x7f00_0000_0000
VERSION_1 = 1 << 32
# MQ, REPLY_ACK, BACKEND_REQ, CONFIG, RESET_DEVICE, CONFIGURE_MEM_SLOTS
ALL_PROTO = 0x1 | 0x8 | 0x20 | 0x200 | 0x2000 | 0x8000


def op(code, fmt="", *args):
    return bytes([code]) + struct.pack("<" + fmt, *args)


def region(fd, gpa, size, uaddr, off=0):
    return struct.pack("<BQQQQ", fd, gpa, size, uaddr, off)


def bring_up(kind, proto=ALL_PROTO, add_reg=False):
    s = op(2) + op(3, "Q", VERSION_1 | (1 << 30) | (1 << 28) | (1 << 29)) + op(4)
    s += op(5, "Q", proto) + op(0)
    if add_reg:
        s += op(7) + region(0, 0, 0x10000, UADDR)
    else:
        s += op(6, "B", 1) + region(0, 0, 0x10000, UADDR)
    s += op(9, "BH", 0, QSIZE)
    s += op(10, "BHIQQQ", 0, QSIZE, 0, UADDR + TABLE, UADDR + USED, UADDR + AVAIL)
    s += op(11, "BH", 0, 0) + op(13, "B", 0) + op(14, "B", 0) + op(16, "BB", 0, 1)
    s += op(15, "B", 0) + op(12, "B", 0) + op(17, "III", 0, 60, 0)
    s += op(18, "IIB", 32, 0, 1) + b"\x00" + op(19)
    return struct.pack("<H", len(s)) + s + guest(kind).rstrip(b"\0")


for name, k in kinds.items():
    put("vhost_user_messages", name, bring_up(k))
put("vhost_user_messages", "add-mem-reg-read", bring_up(T_IN, add_reg=True))
put("vhost_user_messages", "no-reply-ack-write", bring_up(T_OUT, proto=ALL_PROTO & ~0x8))
s = op(2) + op(20) + op(21) + op(24, "IIIB", 1, 1, 0, 0)
put("vhost_user_messages", "raw-get-features", struct.pack("<H", len(s)) + s)

# ---- qmp: sessions
S = '{"execute": "qmp_capabilities"}\n'
sessions = {
    "query": S + '{"execute": "query-named-block-nodes"}\n{"execute": "query-commands", "id": 1}\n'
             '{"execute": "query-version"}\n{"execute": "query-blockstats"}\n{"execute": "query-jobs"}\n',
    "blockdev": S + '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r0", "file": "n0", "offset": 4096, "size": 65536}}\n'
                '{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "size": 4096}}\n'
                '{"execute": "block_resize", "arguments": {"node-name": "n1", "size": 2097152}}\n'
                '{"execute": "blockdev-del", "arguments": {"node-name": "r0"}}\n'
                '{"execute": "x-debug-query-block-graph"}\n',
    "bitmaps": S + '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "n0", "name": "b0", "granularity": 65536}}\n'
               '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "n0", "name": "b1"}}\n'
               '{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "n0", "target": "b0", "bitmaps": ["b1", {"node": "n0", "name": "b1"}]}}\n'
               '{"execute": "block-dirty-bitmap-disable", "arguments": {"node": "n0", "name": "b0"}}\n'
               '{"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "n0", "name": "b0"}}\n'
               '{"execute": "block-dirty-bitmap-clear", "arguments": {"node": "n0", "name": "b0"}}\n'
               '{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "n0", "name": "b1"}}\n',
    "transaction": S + '{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "n1", "name": "t"}}, {"type": "abort", "data": {}}]}}\n'
                   '{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "n1", "name": "t"}}]}}\n',
    "throttle": S + '{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 1000, "bps-read": 1048576}}}\n'
                '{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "th", "throttle-group": "tg0", "file": "n2"}}\n'
                '{"execute": "qom-get", "arguments": {"path": "tg0", "property": "limits"}}\n'
                '{"execute": "qom-set", "arguments": {"path": "tg0", "property": "limits", "value": {"iops-total": 10}}}\n'
                '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "node-name": "n0", "size": 1048576, "read-only": true}]}}\n'
                '{"execute": "object-del", "arguments": {"id": "tg0"}}\n',
    "jobs": S + '{"execute": "block-job-cancel", "arguments": {"device": "j"}}\n{"execute": "job-dismiss", "arguments": {"id": "j"}}\n'
            '{"execute": "block-set-write-threshold", "arguments": {"node-name": "n0", "write-threshold": 4096}}\n'
            '{"execute": "block-latency-histogram-set", "arguments": {"id": "n0", "boundaries": [10, 100]}}\n{"execute": "cont"}\n',
    "errors": '{"execute": "query-version"}\n' + S + '{"execute": "nope"}\n{"execute": 1}\n{"arguments": {}}\n'
              '[1, 2, {"a": "\\u00e9\\n"}]\n{"execute": "query-version", "execute": "quit"}\n  garbage {"x": [[[1]]]}\n'
              '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q", "file": "n0"}}\n'
              '{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "n0", "name": "s"}}\n'
              '{"execute": "blockdev-snapshot", "arguments": {"node": "n0", "overlay": "n1"}}\n'
              '{"execute": "change-backing-file", "arguments": {"device": "n0", "image-node-name": "n0", "backing-file": "x"}}\n',
}
for name, text in sessions.items():
    put("qmp", name, text)

# ---- config: mode byte, then text (fuzz_targets/config.rs)
cfg = {
    "keyval-blockdev": "\x00\x00driver=qcow2,node-name=d0,file.driver=file,file.filename=disk.qcow2,cache.direct=on",
    "keyval-export": "\x00\x02vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/vub.sock,writable=on,num-queues=4,iothread.0=io0,iothread.1=io1",
    "keyval-object": "\x00\x01throttle-group,id=tg0,limits.iops-total=1000,limits.bps-total-max=2M,x-iops-read=5",
    "keyval-escapes": "\x00\x00driver=file,filename=a,,b.img,aio=io_uring,locking=off,detect-zeroes=unmap,discard=unmap",
    "cmdline": "\x01b driver=null-co,node-name=n0,size=1G\nb {\"driver\": \"raw\", \"node-name\": \"r0\", \"file\": \"n0\"}\n"
               "e vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=/tmp/vub-fz.sock,writable=on,logical-block-size=4096,serial=abc\n"
               "o throttle-group,id=tg0,limits.iops-total=100\no iothread,id=io0,poll-max-ns=1000\n"
               "c socket,id=mon0,path=/tmp/vub-fz-qmp.sock,server=on,wait=off\nm chardev=mon0,pretty=on\nM 0660\ns off\nu 0\n",
    "cmdline-fd": "\x01b driver=null-co,node-name=n0\ne vhost-user-blk,id=e1,node-name=n0,addr.type=fd,addr.str=3,on-read-error=stop,on-write-error=enospc\n",
    "toml": "\x02" + open(os.path.join(HERE, "..", "config", "example.toml")).read()
            if os.path.exists(os.path.join(HERE, "..", "config", "example.toml")) else "\x02",
    "toml-small": "\x02socket-mode = \"0600\"\n[[blockdev]]\ndriver = \"null-co\"\nnode-name = \"n0\"\nsize = \"64M\"\n\n"
                  "[[export]]\ntype = \"vhost-user-blk\"\nid = \"e0\"\nnode-name = \"n0\"\nwritable = true\n"
                  "addr = { type = \"unix\", path = \"/tmp/vub-fz.sock\" }\n\n[[object]]\nqom-type = \"throttle-group\"\nid = \"t\"\n"
                  "limits = { iops-total = 10 }\n\n[[monitor]]\npath = \"/tmp/vub-fz-qmp.sock\"\n",
    "json-blockdev": "\x03{\"driver\": \"qcow2\", \"node-name\": \"q\", \"file\": {\"driver\": \"file\", \"filename\": \"x\"}, \"backing\": null, \"l2-cache-size\": 1048576}",
    "json-export": "\x03{\"id\": \"e\", \"node-name\": \"n\", \"addr\": {\"type\": \"unix\", \"path\": \"/tmp/s\"}, \"num-queues\": 2, \"queue-size\": 256, \"max-guest-memory\": \"4G\"}",
}
for name, text in cfg.items():
    put("config", name, text)

# ---- qcow2 images (small clusters keep them small)
with tempfile.TemporaryDirectory() as d:
    def img(name, opts, io=(), size="1M", extra=()):
        p = os.path.join(d, name)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *extra, p, size], check=True)
        for cmd in io:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, p], check=True, stdout=subprocess.DEVNULL)
        return p
    w = ("write -P 0x11 0 4k", "write -P 0x22 64k 1k", "write -z 128k 8k")
    seeds = {
        "v3-512": img("a", "cluster_size=512", w),
        "v2-512": img("b", "cluster_size=512,compat=0.10", w),
        "v3-16k-extended-l2": img("c", "cluster_size=16384,extended_l2=on", w),
        "v3-1k-refcount-bits-1": img("d", "cluster_size=1024,refcount_bits=1", w),
        "v3-512-refcount-bits-64": img("e", "cluster_size=512,refcount_bits=64", w),
        "empty-512": img("f", "cluster_size=512"),
        "backing-name": img("g", "cluster_size=512", (), extra=("-F", "raw", "-b", "base.raw", "-u")),
    }
    # internal snapshot
    p = img("h", "cluster_size=512", w)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", p], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 2k", p], check=True, stdout=subprocess.DEVNULL)
    seeds["snapshot-512"] = p
    # persistent bitmap
    p = img("i", "cluster_size=512", w)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "4096", p, "bm0"], check=True)
    seeds["bitmap-512"] = p
    # compressed clusters
    raw = os.path.join(d, "raw")
    with open(raw, "wb") as f:
        f.write(b"abcdefgh" * 4096 + bytes(32768))
    p = os.path.join(d, "j")
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw, p], check=True)
    seeds["compressed-4k"] = p
    for name, path in seeds.items():
        put("qcow2_image", name, open(path, "rb").read())
