#!/usr/bin/env bash
# Build the test guest: a Debian distribution kernel plus a tiny initramfs
# (busybox-static, fio, a few util-linux tools, the virtio-blk modules and
# /init from guest-init.sh).
#
# Usage: scripts/guest/build-guest.sh [--force]
#
# Outputs (in $GUEST_CACHE, default $REPO/.cache/guest):
#   vmlinuz              the kernel (Debian's bzImage)
#   vmlinux              the same kernel decompressed (ELF), when it supports
#                        PVH boot; see extract_vmlinux below
#   initramfs.cpio.gz    the initramfs (without /test.sh; run-guest.sh appends it)
#   initramfs.cpio       the same, uncompressed
#   kernel-version       e.g. 6.1.0-56-amd64
#   stamp                the inputs the outputs were built from
#
# When the outputs exist and the inputs (kernel package version, these
# scripts, fio/busybox/util-linux/libc versions) are unchanged, it exits
# immediately. The downloaded kernel .deb is kept in $GUEST_CACHE/debs.
#
# Environment:
#   GUEST_CACHE       cache directory
#   GUEST_KERNEL_PKG  kernel package to use instead of the one that the
#                     linux-image-amd64 metapackage depends on
set -euo pipefail
LOG_TAG=build-guest
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=0
for a in "$@"; do
    case "$a" in
        --force) force=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $a (see --help)" ;;
    esac
done

# Virtio modules the guest needs, in load order. Their dependencies (read
# from each module's .modinfo) are added in front automatically, and modules
# built into the kernel (modules.builtin) are skipped.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

"$GUEST_DIR/install-deps.sh"

mkdir -p "$GUEST_CACHE"
# Serialise concurrent builds (e.g. parallel run-guest.sh calls in CI).
if have flock; then
    exec 9>"$GUEST_CACHE/.lock"
    flock 9
fi
# Leftovers of an interrupted build (we hold the lock, so none is running).
rm -rf "$GUEST_CACHE"/work.*

# --- Resolve the kernel package -------------------------------------------

# Print "<package> <version>" of the kernel image to use.
resolve_kernel() {
    local pkg ver
    # (apt-cache takes ~1 s per call on images that disable apt's pkgcache,
    # so resolve with a single call.)
    if [ -n "${GUEST_KERNEL_PKG:-}" ]; then
        pkg=$GUEST_KERNEL_PKG
        ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
    else
        # The candidate linux-image-amd64 depends on exactly one versioned
        # image package with a pinned version:
        #   Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
        read -r pkg ver < <(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null \
            | sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1) || true
    fi
    [ -n "${pkg:-}" ] && [ -n "${ver:-}" ] || return 1
    echo "$pkg $ver"
}

# The answer only changes when apt's package lists do, so remember it keyed by
# the lists' names/sizes/mtimes: this keeps the warm path (run-guest.sh calls
# us before every boot) at a fraction of a second.
lists_sig=$( { echo "${GUEST_KERNEL_PKG:-}"; stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null; } | sha256sum | cut -c1-16)
kinfo=""
if [ -f "$GUEST_CACHE/kernel-resolved" ]; then
    read -r sig p v <"$GUEST_CACHE/kernel-resolved" || true
    [ "${sig:-}" = "$lists_sig" ] && [ -n "${v:-}" ] && kinfo="$p $v"
fi
if [ -z "$kinfo" ]; then
    if ! kinfo=$(resolve_kernel); then
        # Fresh machine: the package lists may be empty or stale.
        apt_update_once
        kinfo=$(resolve_kernel) || die "cannot resolve the kernel package (linux-image-amd64 -> linux-image-<version>-amd64) from apt"
        lists_sig=$( { echo "${GUEST_KERNEL_PKG:-}"; stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null; } | sha256sum | cut -c1-16)
    fi
    echo "$lists_sig $kinfo" >"$GUEST_CACHE/kernel-resolved"
fi
read -r KPKG KVER <<<"$kinfo"

# --- Up-to-date check -------------------------------------------------------

hostpkgs() {
    local p
    for p in fio busybox-static util-linux libc6 libaio1; do
        printf '%s=%s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo none)"
    done
}
stamp_new=$(
    echo "kernel=$KPKG=$KVER"
    echo "modules=${MODULES[*]}"
    hostpkgs
    cd "$GUEST_DIR" && sha256sum build-guest.sh guest-init.sh lib.sh
)
if [ "$force" = 0 ] && [ -f "$GUEST_CACHE/vmlinuz" ] && [ -f "$GUEST_CACHE/initramfs.cpio.gz" ] \
   && [ -f "$GUEST_CACHE/stamp" ] && [ "$(cat "$GUEST_CACHE/stamp")" = "$stamp_new" ]; then
    log "up to date ($KPKG $KVER) in $GUEST_CACHE"
    exit 0
fi

log "building guest for $KPKG $KVER in $GUEST_CACHE"
t_start=$SECONDS

# --- Download the kernel package (kept across rebuilds) --------------------

debdir="$GUEST_CACHE/debs"
mkdir -p "$debdir"
deb=""
for f in "$debdir/${KPKG}"_*.deb; do
    [ -f "$f" ] || continue
    if [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$KVER" ]; then deb=$f; else rm -f "$f"; fi
done
if [ -z "$deb" ]; then
    log "apt-get download $KPKG=$KVER"
    # APT::Sandbox::User=root: the _apt user can't write into a root-owned
    # cache dir; without it apt warns and falls back to root anyway.
    (cd "$debdir" && apt-get download -q -o APT::Sandbox::User=root "$KPKG=$KVER" >&2) \
        || die "apt-get download $KPKG=$KVER failed"
    for f in "$debdir/${KPKG}"_*.deb; do [ -f "$f" ] && deb=$f; done
    [ -n "$deb" ] || die "downloaded .deb for $KPKG not found in $debdir"
fi

# --- Extract (not install) the kernel package ------------------------------

work=$(mktemp -d "$GUEST_CACHE/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
kroot="$work/kpkg"
root="$work/root"

log "dpkg-deb -x $(basename "$deb")"
dpkg-deb -x "$deb" "$kroot"

vmlinuz=$(ls "$kroot"/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in $deb"
KREL=${vmlinuz##*/vmlinuz-}
moddir=""
for d in "$kroot/lib/modules/$KREL" "$kroot/usr/lib/modules/$KREL"; do
    [ -d "$d" ] && moddir=$d
done
[ -n "$moddir" ] || die "no lib/modules/$KREL in $deb"

# --- Fast-boot kernel ----------------------------------------------------------

# Under TCG the bzImage's own decompressor is painfully slow: unpacking the
# xz payload takes ~5 s before the kernel prints its first line. QEMU can
# boot the decompressed ELF directly through its PVH entry point
# (CONFIG_PVH=y), which skips that entirely. The payload location is in the
# x86 boot protocol header: setup_sects at 0x1f1, payload_offset/length at
# 0x248/0x24c (relative to the protected-mode code after the setup sectors);
# the last 4 bytes of the payload are the decompressed size, not data.
extract_vmlinux() {
    local bz=$1 out=$2 sects off len magic
    le() { od -An -t "u$2" -j "$1" -N "$2" "$bz" | tr -d ' '; }
    sects=$(le $((0x1f1)) 1); [ "$sects" = 0 ] && sects=4
    off=$(( (sects + 1) * 512 + $(le $((0x248)) 4) ))
    len=$(( $(le $((0x24c)) 4) - 4 ))
    [ "$len" -gt 0 ] || return 1
    magic=$(od -An -t x1 -j "$off" -N 4 "$bz" | tr -d ' ')
    payload() { dd if="$bz" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none; }
    case "$magic" in
        fd377a58) have xz || apt_install xz-utils; payload | xz -dc ;;
        1f8b*)    payload | gzip -dc ;;
        28b52ffd) have zstd || apt_install zstd; payload | zstd -qdc ;;
        *) log "bzImage payload compression (magic $magic) not handled"; return 1 ;;
    esac >"$out" || return 1
    [ "$(head -c 4 "$out" | od -An -t x1 | tr -d ' ')" = 7f454c46 ]   # ELF
}
have_vmlinux=0
if grep -qx 'CONFIG_PVH=y' "$kroot/boot/config-$KREL" 2>/dev/null; then
    if extract_vmlinux "$vmlinuz" "$work/vmlinux"; then
        have_vmlinux=1
    else
        log "warning: could not extract vmlinux; guests will boot the (slower) bzImage"
    fi
else
    log "warning: kernel lacks CONFIG_PVH; guests will boot the (slower) bzImage"
fi

# --- Skeleton -----------------------------------------------------------------

# Merged-/usr layout like Debian's, so library paths reported by ldd on the
# host (/lib/x86_64-linux-gnu/..., /usr/lib/...) can be used verbatim.
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{dev,proc,sys,tmp,run,etc,root,mnt}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s /proc/mounts "$root/etc/mtab"
chmod 1777 "$root/tmp"
# The kernel opens /dev/console on the initramfs before /init runs; without
# the node /init starts with no stdio. mknod needs root; guest-init.sh copes
# without it.
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "warning: cannot mknod /dev/console (not root?)"

# --- busybox ------------------------------------------------------------------

ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is dynamically linked; install busybox-static"
cp /bin/busybox "$root/usr/bin/busybox"
while read -r applet; do
    [ -n "$applet" ] || continue
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /usr/bin/busybox "$root/$applet"
done < <(/bin/busybox --list-full)

# --- Dynamically linked binaries + their libraries --------------------------

# Copy one library/loader to the same path inside the initramfs,
# dereferencing symlinks (the soname link is what the loader looks up).
copy_lib() {
    local src=$1
    [ -e "$root$src" ] && return 0
    mkdir -p "$root$(dirname "$src")"
    cp -L "$src" "$root$src"
}

# Copy a binary to $dest (default: its host path) plus everything ldd lists.
# ldd already prints the full transitive closure, and also the dynamic loader.
copy_bin() {
    local src=$1 dest=${2:-$1} out line lib
    [ -x "$src" ] || die "binary $src not found"
    # A busybox applet of the same name anywhere in PATH would be ambiguous;
    # remove it so the real tool wins.
    find "$root/usr/bin" "$root/usr/sbin" -maxdepth 1 -name "$(basename "$dest")" -type l -delete
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$src" "$root$dest"
    out=$(ldd "$src" 2>&1) || die "ldd $src failed: $out"
    if grep -q 'not found' <<<"$out"; then
        die "ldd $src: missing libraries:"$'\n'"$(grep 'not found' <<<"$out")"
    fi
    while read -r line; do
        case "$line" in
            *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;   # libfoo.so.1 => /path (0x..)
            /*) lib=${line%% (*} ;;                          # /lib64/ld-linux-x86-64.so.2 (0x..)
            *) continue ;;                                    # linux-vdso.so.1, statically linked
        esac
        copy_lib "$lib"
    done <<<"$out"
}

fio_bin=$(command -v fio) || die "fio not installed"
copy_bin "$fio_bin" /usr/bin/fio
# util-linux tools with discard / write-zeroes / ioctl support the busybox
# applets lack (e.g. blkdiscard -z). Optional.
for tool in blkdiscard blockdev fallocate; do
    p=$(PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" || true)
    if [ -n "$p" ]; then
        copy_bin "$p" "$(readlink -f "$p" | sed 's#^/sbin/#/usr/sbin/#; s#^/bin/#/usr/bin/#')"
    else
        log "warning: $tool not found on the host; the guest gets the busybox applet (if any)"
    fi
done

# /bin/sh = dash. Debian's busybox-static is built with "prefer applets"
# (FEATURE_SH_STANDALONE): its ash runs the busybox applet for any command
# that has one, ignoring PATH, so `blkdiscard -z` in a test script would hit
# busybox's blkdiscard (no -z) instead of util-linux's. dash does normal PATH
# lookup; busybox applets still work through their symlinks.
if [ -x /bin/dash ]; then
    copy_bin /bin/dash /usr/bin/dash
    ln -sfn dash "$root/usr/bin/sh"
else
    log "warning: /bin/dash not found; guest /bin/sh is busybox ash, which shadows util-linux tools with applets"
fi

# Loader cache so every copied library directory (e.g. .../ceph for fio's
# librbd dependency chain) is found without LD_LIBRARY_PATH.
find "$root/usr/lib" "$root/usr/lib64" -name '*.so*' -printf '%h\n' | sed "s#^$root##" | sort -u >"$root/etc/ld.so.conf"
if have ldconfig; then
    ldconfig -r "$root" 2>/dev/null || log "warning: ldconfig -r failed; relying on default library paths"
fi

# --- Kernel modules -------------------------------------------------------------

mkdir -p "$root/lib/modules"
: >"$root/lib/modules/load-order"

is_builtin() {   # module names treat '-' and '_' alike
    local n=${1//-/_}
    sed 's#.*/##; s#\.ko.*$##; s#-#_#g' "$moddir/modules.builtin" | grep -qx "$n"
}
find_module() {
    local n=$1
    find "$moddir/kernel" \( -name "$n.ko*" -o -name "${n//_/-}.ko*" \) -print -quit
}
# Decompress (busybox insmod can't read compressed modules) into the initramfs.
install_module() {
    local name=$1 src=$2 dst="$root/lib/modules/$1.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
}
declare -A mod_done=()
add_module() {
    local name=${1//-/_} file deps dep
    [ -n "${mod_done[$name]:-}" ] && return 0
    mod_done[$name]=1
    if is_builtin "$name"; then
        log "module $name: built in"
        return 0
    fi
    file=$(find_module "$name")
    [ -n "$file" ] || die "module $name not found in $KPKG (and not built in)"
    case "$file" in
        *.xz) have xz || apt_install xz-utils ;;
        *.zst) have zstd || apt_install zstd ;;
    esac
    # Dependencies first. The deb ships no modules.dep (depmod runs at
    # install time), so read "depends=" from the module's .modinfo strings.
    deps=$(case "$file" in
               *.xz) xz -dc "$file" ;; *.zst) zstd -qdc "$file" ;; *.gz) gzip -dc "$file" ;; *) cat "$file" ;;
           esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    install_module "$name" "$file"
    echo "$name" >>"$root/lib/modules/load-order"
}
for m in "${MODULES[@]}"; do add_module "$m"; done
log "module load order: $(tr '\n' ' ' <"$root/lib/modules/load-order")"

# --- /init and metadata ---------------------------------------------------------

install -m 755 "$GUEST_DIR/guest-init.sh" "$root/init"
{
    echo "kernel_package=$KPKG"
    echo "kernel_version=$KVER"
    echo "kernel_release=$KREL"
    hostpkgs
} >"$root/etc/guest-build-info"

# --- Archive ----------------------------------------------------------------------

log "creating initramfs ($(du -sh "$root" | cut -f1) uncompressed)"
# newc is the only cpio format the kernel accepts; sorted for reproducibility.
# run-guest.sh boots the uncompressed archive: the kernel gunzips ~1 s per
# 30 MB under TCG, whereas an uncompressed archive is just copied. The .gz is
# kept for anything that wants a small file.
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc -R 0:0 --quiet) >"$work/initramfs.cpio"
gzip -1 -c "$work/initramfs.cpio" >"$work/initramfs.cpio.gz"

rm -f "$GUEST_CACHE/stamp"   # invalid until every output is in place
mv "$work/initramfs.cpio" "$GUEST_CACHE/initramfs.cpio"
mv "$work/initramfs.cpio.gz" "$GUEST_CACHE/initramfs.cpio.gz"
cp "$vmlinuz" "$GUEST_CACHE/vmlinuz"
if [ "$have_vmlinux" = 1 ]; then
    mv "$work/vmlinux" "$GUEST_CACHE/vmlinux"
else
    rm -f "$GUEST_CACHE/vmlinux"
fi
echo "$KREL" >"$GUEST_CACHE/kernel-version"
echo "$stamp_new" >"$GUEST_CACHE/stamp"
log "done in $((SECONDS - t_start)) s: $GUEST_CACHE/vmlinuz ($(du -h "$GUEST_CACHE/vmlinuz" | cut -f1)), initramfs.cpio.gz ($(du -h "$GUEST_CACHE/initramfs.cpio.gz" | cut -f1))"
