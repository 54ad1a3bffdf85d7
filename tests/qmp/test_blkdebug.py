"""blkdebug options, rules and config files: the same ones accepted and the
same refusals (in QEMU's words) as qemu-storage-daemon 7.2."""

import pytest
from qemu.qmp import ExecuteError

from conftest import run
from test_qmp import connect, file_node

# Inline options: (case, blkdebug options beside driver/node-name/image).
INLINE = [
    ("event", {"inject-error": [{"event": "l2_load"}]}),
    ("all-fields", {"inject-error": [{"event": "cluster_alloc", "errno": 28, "once": True,
                                      "immediately": True, "sector": 8, "state": 2,
                                      "iotype": "write-zeroes"}]}),
    ("two-rules", {"inject-error": [{"event": "l1_update"}, {"event": "flush_to_disk",
                                                             "errno": 5}],
                   "set-state": [{"event": "l2_load", "new_state": 2, "state": 1}]}),
    ("errno-zero", {"inject-error": [{"event": "l2_load", "errno": 0}]}),
    ("errno-negative", {"inject-error": [{"event": "l2_load", "errno": -5}]}),
    ("errno-large", {"inject-error": [{"event": "l2_load", "errno": 100000}]}),
    ("sector-negative", {"inject-error": [{"event": "l2_load", "sector": -7}]}),
    ("event-none", {"inject-error": [{"event": "none", "immediately": True, "once": True}]}),
    # QEMU 7.2 spells them with underscores; the old dotted names are gone.
    ("event-dotted", {"inject-error": [{"event": "l1_grow.alloc_table"}]}),
    ("event-underscore", {"inject-error": [{"event": "l1_grow_alloc_table"}]}),
    ("event-unknown", {"inject-error": [{"event": "foo"}]}),
    ("event-missing", {"inject-error": [{"errno": 5}]}),
    ("member-unknown", {"inject-error": [{"event": "l2_load", "bogus": 1}]}),
    ("errno-type", {"inject-error": [{"event": "l2_load", "errno": "x"}]}),
    ("once-type", {"inject-error": [{"event": "l2_load", "once": 3}]}),
    ("iotype-unknown", {"inject-error": [{"event": "l2_load", "iotype": "foo"}]}),
    ("list-type", {"inject-error": {"event": "l2_load"}}),
    ("set-state-new-missing", {"set-state": [{"event": "l2_load"}]}),
    ("set-state-errno", {"set-state": [{"event": "l2_load", "new_state": 2, "errno": 5}]}),
    ("align-3", {"align": 3}),
    ("align-4096", {"align": 4096}),
    ("align-0", {"align": 0}),
    ("align-negative", {"align": -1}),
    ("align-huge", {"align": 1 << 31}),
    ("max-transfer", {"max-transfer": 8192}),
    ("max-transfer-unaligned", {"align": 4096, "max-transfer": 1000}),
    ("opt-write-zero", {"opt-write-zero": 4096}),
    ("max-write-zero-unaligned", {"opt-write-zero": 4096, "max-write-zero": 512}),
    ("opt-discard-unaligned", {"align": 512, "opt-discard": 3}),
    ("max-discard", {"max-discard": 65536}),
    ("config-missing", {"config": "/nonexistent/blkdebug.cfg"}),
    ("take-perms", {"take-child-perms": ["write"]}),
    ("unshare-perms", {"unshare-child-perms": ["resize"]}),
    ("perm-unknown", {"take-child-perms": ["bogus"]}),
    ("option-unknown", {"bogus": 1}),
]

# Config files: (case, text).
CONFIGS = [
    ("ok", '# rules\n[inject-error]\nevent = "l2_load"\nerrno = "28"\nonce = "on"\n\n'
           '[set-state]\nevent = "l2_load"\nstate = "1"\nnew_state = "2"\n'),
    ("with-id", '[inject-error "id1"]\nevent = "l2_load"\n'),
    ("indented", '[inject-error]\n  event = "l2_load"\n'),
    ("numbers", '[inject-error]\nevent = "l2_load"\nerrno = "-5"\nsector = "0x10"\n'),
    ("empty", ''),
    ("new-state-default", '[set-state]\nevent = "l2_load"\n'),
    ("event-unknown", '[inject-error]\nevent = "foo"\n'),
    ("event-missing", '[inject-error]\nerrno = "5"\n'),
    ("member-unknown", '[inject-error]\nevent = "l2_load"\nbogus = "5"\n'),
    ("group-unknown", '[bogus]\nevent = "l2_load"\n'),
    ("no-group", 'event = "l2_load"\n'),
    ("no-equals", '[inject-error]\nevent l2_load\n'),
    ("no-quotes", '[inject-error]\nevent = l2_load\n'),
    ("errno-text", '[inject-error]\nevent = "l2_load"\nerrno = "x"\n'),
    ("once-text", '[inject-error]\nevent = "l2_load"\nonce = "maybe"\n'),
    ("iotype-unknown", '[inject-error]\nevent = "l2_load"\niotype = "foo"\n'),
]


async def outcome(monitor, workdir, cases):
    """Adds a blkdebug node for each case over file node `f`; returns
    'ok' or the error's description, case by case."""
    img = workdir / "base.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    c = await connect(monitor)
    await c.execute("blockdev-add", file_node("f", img))
    out = {}
    for i, (name, opts) in enumerate(cases):
        args = {"driver": "blkdebug", "node-name": f"d{i}", "image": "f", **opts}
        try:
            await c.execute("blockdev-add", args)
            out[name] = "ok"
            await c.execute("blockdev-del", {"node-name": f"d{i}"})
        except ExecuteError as e:
            out[name] = e.error.error.desc
    await c.disconnect()
    return out


def compare(ours, theirs):
    for name, want in theirs.items():
        got = ours[name]
        if want == "ok":
            assert got == "ok", f"{name}: qemu-storage-daemon accepts it, we say {got!r}"
        else:
            # Ours names the node first ("cannot open node 'd3': ...").
            assert got != "ok" and got.endswith(want), \
                f"{name}: qemu-storage-daemon says {want!r}, we say {got!r}"


def test_inline_rules_and_options_as_qemu_storage_daemon(daemon, qsd, workdir):
    theirs = run(outcome(qsd.monitor, qsd.workdir, INLINE))
    ours = run(outcome(daemon.monitor, workdir, INLINE))
    compare(ours, theirs)
    # The comparison must compare something both ways.
    assert "ok" in theirs.values() and set(theirs.values()) != {"ok"}


def test_config_files_as_qemu_storage_daemon(daemon, qsd, workdir):
    cases = []
    for name, text in CONFIGS:
        p = workdir / f"{name}.cfg"
        p.write_text(text)
        cases.append((name, {"config": str(p)}))
    theirs = run(outcome(qsd.monitor, qsd.workdir, cases))
    ours = run(outcome(daemon.monitor, workdir, cases))
    compare(ours, theirs)
    assert theirs["ok"] == "ok" and theirs["event-unknown"] != "ok"


def test_rules_that_can_never_fire_are_warned_about(daemon, workdir):
    async def go():
        img = workdir / "w.img"
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        c = await connect(daemon.monitor)
        await c.execute("blockdev-add", file_node("fw", img))
        await c.execute("blockdev-add", {"driver": "blkdebug", "node-name": "dw", "image": "fw",
                                         "inject-error": [{"event": "write_compressed"},
                                                          {"event": "l2_load"}]})
        await c.disconnect()
    run(go())
    log = daemon.read_log()
    assert "event 'write_compressed' can never fire" in log, log
    assert "event 'l2_load' can never fire" not in log
