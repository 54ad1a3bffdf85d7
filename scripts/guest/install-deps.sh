#!/usr/bin/env bash
# Install the host packages the guest tooling needs (QEMU, qemu-storage-daemon,
# qemu-img, fio, busybox-static, cpio). Idempotent: when everything is already
# present it does nothing and returns in milliseconds, so every other script
# calls it unconditionally.
#
# Why two apt-get invocations: on the CI image qemu-utils 10.0 from
# bookworm-backports is preinstalled, and asking apt for qemu-system-x86 (7.2)
# and qemu-utils in the same command fails to resolve. Installing
# qemu-system-x86 first and then qemu-utils + qemu-block-extra separately
# ends with a consistent 7.2 set.
set -euo pipefail
LOG_TAG=install-deps
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

have apt-get || die "apt-get not found: this tooling expects a Debian (bookworm) host"

step1=0
for c in qemu-system-x86_64 qemu-storage-daemon fio cpio; do
    have "$c" || { log "missing command: $c"; step1=1; }
done
# We need the *static* busybox (the initramfs has no libc for it to use);
# the plain 'busybox' package is dynamically linked.
pkg_installed busybox-static || { log "missing package: busybox-static"; step1=1; }

if [ "$step1" = 1 ]; then
    apt_install qemu-system-x86 fio busybox-static cpio
fi

step2=$step1
have qemu-img || { log "missing command: qemu-img"; step2=1; }
pkg_installed qemu-block-extra || { log "missing package: qemu-block-extra"; step2=1; }
if [ "$step2" = 1 ]; then
    apt_install qemu-utils qemu-block-extra
fi

# tests/systemd.rs: systemd-socket-activate and systemd-analyze.
have systemd-socket-activate || apt_install systemd

# Network storage, in one apt call when any is missing:
#   tests/nbd_client.rs: NBD servers besides qemu-nbd (qemu-utils): nbdkit;
#   tests/nbd.rs: nbdinfo and nbdcopy (libnbd-bin), and libnbd's Python
#     bindings for Debian's /usr/bin/python3 (tests/nbd/edge_cases.py);
#   tests/rbd.rs and scripts/ceph/cluster.sh: a single-node Ceph cluster
#     (monitor, OSD, the ceph CLI) and librbd, which the daemon loads at
#     run time;
#   scripts/callgrind-check.sh: valgrind (the instructions-per-request
#     regression check);
#   tests/luks.rs: cryptsetup (cryptsetup-bin), whose LUKS volumes must open.
net=()
for p in nbdkit libnbd-bin python3-libnbd ceph-mon ceph-osd ceph-common librbd1 valgrind cryptsetup-bin; do
    pkg_installed "$p" || { log "missing package: $p"; net+=("$p"); }
done
if [ "${#net[@]}" -gt 0 ]; then
    apt_install "${net[@]}"
fi

# Final verification, with a clear message instead of a confusing failure later.
for c in qemu-system-x86_64 qemu-storage-daemon qemu-img fio cpio gzip dpkg-deb ldd \
    systemd-socket-activate systemd-analyze ceph-mon ceph-osd ceph rbd qemu-nbd nbdkit nbdinfo nbdcopy valgrind; do
    have "$c" || die "required command '$c' still missing after installation"
done
[ -x /bin/busybox ] || die "/bin/busybox missing after installing busybox-static"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || die "python3-libnbd missing after installation"
