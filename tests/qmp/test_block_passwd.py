"""block_passwd (issue 24). QEMU 2.10 made the command a stub failing with
"Setting block passwords directly is no longer supported" (image
passwords went with the old qcow encryption; encrypted images take their
key through a secret object); QEMU 6.0 removed it, so qemu-storage-daemon
7.2 answers CommandNotFound. Ours gives QEMU's stub answer, which tells an
old client why, and lists the command no more than qemu-storage-daemon
7.2 does. The password is never echoed or logged."""

from test_qmp import raw_socket, send

STUB = {"class": "GenericError",
        "desc": "Setting block passwords directly is no longer supported"}


def test_block_passwd_gets_qemus_answer_and_is_not_listed(daemon, qsd, workdir):
    msgs = [{"execute": "block_passwd", "arguments": {"device": "d0", "password": "hunter2"}},
            {"execute": "block_passwd", "arguments": {"node-name": "n0", "password": "hunter2"}},
            {"execute": "block_passwd", "arguments": {"password": "hunter2"}, "id": 7},
            {"execute": "block_passwd"}]
    replies = {}
    for name, d in (("vub", daemon), ("qsd", qsd)):
        s, f, _ = raw_socket(d.monitor)
        send(f, {"execute": "qmp_capabilities"})
        replies[name] = ([send(f, m) for m in msgs],
                         [c["name"] for c in send(f, {"execute": "query-commands"})["return"]
                          if c["name"] == "block_passwd"])
        s.close()
    (ours, ours_listed), (theirs, theirs_listed) = replies["vub"], replies["qsd"]
    assert ours[0] == {"error": STUB}
    assert ours[1] == {"error": STUB}
    assert ours[2] == {"error": STUB, "id": 7}
    # Without the password: an argument error, not the stub.
    assert ours[3]["error"]["class"] == "GenericError" and "password" in ours[3]["error"]["desc"]
    assert theirs[0] == {"error": {"class": "CommandNotFound",
                                   "desc": "The command block_passwd has not been found"}}
    assert ours_listed == theirs_listed == []
    assert daemon.alive()
    assert "hunter2" not in daemon.read_log()
