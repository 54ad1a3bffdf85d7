"""block_passwd (issue 24). QEMU 2.10 made the command a stub failing with
"Setting block passwords directly is no longer supported"; QEMU 6.0 removed
it ("block: Remove monitor command block_passwd", March 2021), so
qemu-storage-daemon 7.2 answers CommandNotFound whatever the arguments and
does not list it. Ours gives the same replies, side by side with it."""

from test_qmp import raw_socket, send


def test_block_passwd_gets_the_reply_qemu_storage_daemon_7_2_gives(daemon, qsd, workdir):
    msgs = [{"execute": "block_passwd", "arguments": {"device": "d0", "password": "x"}},
            {"execute": "block_passwd", "arguments": {"node-name": "n0", "password": "x"}},
            {"execute": "block_passwd"},
            {"execute": "block_passwd", "arguments": {"password": "x"}, "id": 7}]
    replies = []
    for d in (daemon, qsd):
        s, f, _ = raw_socket(d.monitor)
        send(f, {"execute": "qmp_capabilities"})
        replies.append([send(f, m) for m in msgs]
                       + [sorted(c["name"] for c in send(f, {"execute": "query-commands"})["return"]
                                 if c["name"] == "block_passwd")])
        s.close()
    ours, theirs = replies
    assert ours == theirs
    assert ours[0] == {"error": {"class": "CommandNotFound",
                                 "desc": "The command block_passwd has not been found"}}
    assert ours[3]["id"] == 7
    assert ours[-1] == []
    assert daemon.alive()
