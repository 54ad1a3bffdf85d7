#!/usr/bin/env python3
"""Runs QMP commands on a monitor socket: qmp.py SOCKET 'JSON' ['JSON' ...].
Prints each reply; exits 1 on an error reply."""
import json
import socket
import sys

s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
json.loads(f.readline())
rc = 0
for cmd in [json.dumps({"execute": "qmp_capabilities"})] + sys.argv[2:]:
    f.write(cmd + "\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" not in reply:
            break
    print(json.dumps(reply))
    if "error" in reply:
        rc = 1
sys.exit(rc)
