#!/usr/bin/env python3
"""Moves a running guest's disk: mirror.py QMP_SOCKET EXPORT NODE TARGET_FILE.
Adds the target (an empty qcow2 file), mirrors the export's node to it
(sync=full, write-blocking), completes once ready, and checks that the
export serves the target. Prints what it saw; exits 1 on any failure."""
import json
import socket
import sys
import time

sock, export, node, target = sys.argv[1:5]
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
f = s.makefile("rw")
json.loads(f.readline())
events = []


def qmp(cmd, args=None):
    msg = {"execute": cmd}
    if args is not None:
        msg["arguments"] = args
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" in reply:
            events.append(reply)
            continue
        if "error" in reply:
            print(f"mirror: {cmd} failed: {reply['error']}")
            sys.exit(1)
        return reply["return"]


qmp("qmp_capabilities")
qmp("blockdev-add", {"driver": "qcow2", "node-name": "mirror-target",
                     "file": {"driver": "file", "filename": target}})
qmp("blockdev-mirror", {"job-id": "guest-mirror", "device": node, "target": "mirror-target",
                        "sync": "full", "copy-mode": "write-blocking"})
deadline = time.time() + 120
while True:
    jobs = qmp("query-block-jobs")
    if jobs and jobs[0]["ready"]:
        break
    if not jobs or time.time() > deadline:
        print(f"mirror: never ready: {jobs}")
        sys.exit(1)
    time.sleep(0.05)
qmp("block-job-complete", {"device": "guest-mirror"})
while qmp("query-block-jobs"):
    if time.time() > deadline:
        print("mirror: did not finish")
        sys.exit(1)
    time.sleep(0.05)
exports = {e["id"]: e["node-name"] for e in qmp("query-block-exports")}
names = [e["event"] for e in events]
print(f"mirror: events {names}; export {export} -> {exports.get(export)}")
ok = exports.get(export) == "mirror-target" and "BLOCK_JOB_COMPLETED" in names \
    and "BLOCK_JOB_READY" in names and not any("error" in e.get("data", {}) for e in events)
sys.exit(0 if ok else 1)
