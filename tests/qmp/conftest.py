"""Fixtures for the QMP tests: a daemon (ours or qemu-storage-daemon) with a
monitor socket, and qemu.qmp clients connected to it."""

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VUB_BIN = os.environ.get("VUB_BIN", str(REPO / "target/debug/vhost-user-blkd"))
BENCH_BIN = os.environ.get("VUB_BENCH", str(REPO / "target/debug/vub-bench"))
QSD_BIN = os.environ.get("QSD_BIN", "qemu-storage-daemon")


def listening(path):
    """Whether the UNIX socket at `path` listens: its file appears at
    bind(), a moment before listen(), and a connect in between is refused.
    /proc/net/unix marks listening sockets with __SO_ACCEPTCON (0x10000)."""
    if not os.path.exists(path):
        return False
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


class Daemon:
    def __init__(self, argv, workdir, monitor):
        self.workdir = Path(workdir)
        self.monitor = str(monitor)
        self.log = open(self.workdir / "daemon.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while not listening(self.monitor):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("daemon did not start:\n" + self.read_log())
            time.sleep(0.02)

    def read_log(self):
        self.log.flush()
        return (self.workdir / "daemon.log").read_text()

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def start_daemon(binary, workdir, extra=(), allow=None):
    mon = Path(workdir) / "qmp.sock"
    argv = [binary, "--chardev", f"socket,id=mon0,path={mon},server=on,wait=off",
            "--monitor", "chardev=mon0", *extra]
    if binary == VUB_BIN and "--allow-path" not in extra:
        # The tests add images and sockets in their work directory (or
        # `allow`) over QMP: the sandbox lets the daemon reach it.
        argv += ["--allow-path", str(allow or workdir)]
    return Daemon(argv, workdir, mon)


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="vub-qmp-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(workdir):
    if not os.access(VUB_BIN, os.X_OK):
        pytest.fail(f"daemon binary {VUB_BIN} not built")
    d = start_daemon(VUB_BIN, workdir)
    yield d
    d.stop()


@pytest.fixture
def qsd(workdir):
    if shutil.which(QSD_BIN) is None:
        pytest.fail("qemu-storage-daemon is not installed (scripts/guest/install-deps.sh installs it)")
    qdir = workdir / "qsd"
    qdir.mkdir()
    d = start_daemon(QSD_BIN, qdir)
    yield d
    d.stop()


def run(coro):
    return asyncio.run(coro)
