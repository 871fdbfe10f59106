#!/usr/bin/env bash
# Tier 2 (systemd as PID 1): builds, once, the Debian 12 root filesystem the tier-2 VM boots, and
# packs it as an initramfs. Prints the cache directory:
#
#   tests/vm/rootfs.sh    ->  target/vm-cache/rootfs-<hash>/   with
#                               root/          the tree (for inspection; run.sh checks libraries in it)
#                               rootfs.cpio    the tree as an uncompressed newc cpio archive
#                               rootfs.env     VM_ROOTFS_* facts (sizes, package versions)
#
# <hash> covers this script, the cached kernel's version and the mirror, so an edit of this script
# (or a new kernel in target/vm-cache) builds a new rootfs; a half-built one
# (rootfs-<hash>.partial) is never used. Older rootfs-* directories are removed once a new one is
# complete. The downloaded .debs are kept in target/vm-cache/debootstrap-debs/ for rebuilds.
#
# What it holds (measured in /work/shared/notes/vsock-vm-recipe.md, "systemd as PID 1"):
#   - `debootstrap --variant=minbase bookworm` plus PACKAGES below (Debian 12 = systemd 252, the
#     major version of Amazon Linux 2023), minus what nothing here uses (docs, locales, perl
#     modules, ...: ≈150 MB left);
#   - the cached kernel's vsock modules under lib/modules/<ver>/, `depmod`, and
#     /etc/modules-load.d/vsock.conf so systemd-modules-load loads vsock_loopback at boot;
#   - a fixed machine-id (no first-boot preset-all), serial and VT gettys masked (the serial
#     console is the test's output), a hostname.
# Nothing test-specific: run.sh tier2 appends the per-run payload (the RPMs, enclave-app, the test
# units and checks from tests/vm/tier2/) as a second cpio archive, which the kernel unpacks over
# this one. Needs root (debootstrap, chroot, file ownership) and the host's debootstrap
# (scripts/install-deps.sh installs it). Environment: VM_DEBIAN_MIRROR (default: the Debian 12
# archive this machine's apt is configured with).
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
source "$(dirname "$0")/lib.sh"

# Packages on top of minbase, and why:
#   systemd-sysv, udev, kmod   systemd as PID 1, devices, modules-load.d (the recipe's set)
#   rpm                        rpm -i/-U/-e of our RPM inside the running system, so its
#                              scriptlets talk to a live systemd
#   procps                     /bin/kill: the units' ExecReload=/bin/kill -HUP $MAINPID (Amazon
#                              Linux has it from util-linux; Debian's minbase has none); ps, pgrep
#   iproute2                   test addresses on lo; enclave-app/run.sh uses ip and ss
#   dnsmasq-base               a real DNS server in the VM: the daemon's lookups go over UDP
#                              through its sandbox, and the tests change answers with SIGHUP
#   socat                      raw vsock clients (VSOCK-CONNECT) and a slow TCP upstream, and
#                              a second unit holding vsock port 8000 (the migration checks)
#   man-db                     `man nitro-vsock-proxy` after the RPM installs the page
PACKAGES=(systemd-sysv udev kmod rpm procps iproute2 dnsmasq-base socat man-db)
# The archive apt already uses here (its bookworm main index), so no address is written down.
# shellcheck disable=SC2016 # $(URI) is apt-get's format, not a shell expansion
MIRROR=${VM_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(URI)' 'Created-By: Packages' 2>/dev/null |
  grep -m1 '/dists/bookworm/main/binary-amd64/' | sed 's,/dists/.*,,' || true)}
[[ -n $MIRROR ]] || vm_die "no Debian 12 (bookworm) main archive in this machine's apt sources: \
set VM_DEBIAN_MIRROR to one for debootstrap"

vm_cache_current || "$VM_DIR/fetch.sh"
vm_load_cache
vm_lock_cache

hash=$( { cat "$0"; echo "$VM_KERNEL_VERSION $MIRROR"; } | sha256sum | cut -c1-12)
dir="$VM_CACHE/rootfs-$hash"
if [[ -f $dir/rootfs.cpio && -f $dir/rootfs.env ]]; then
  echo "$dir"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || vm_die "tier 2 builds a Debian root filesystem with debootstrap, which needs root (make test runs as root)"
command -v debootstrap >/dev/null ||
  vm_die "debootstrap is missing: run scripts/install-deps.sh (make deps), or apt-get install debootstrap"

started=$(vm_now)
partial="$dir.partial"
# A previous run may have died inside debootstrap with /proc or /sys still mounted in it.
umount_under() {
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r)
}
umount_under "$partial"
rm -rf "$partial"
mkdir -p "$partial"
root="$partial/root"
trap 'umount_under "$partial"' EXIT

vm_log "building tier 2's Debian 12 rootfs with debootstrap from $MIRROR (first run only, ≈1-2 min): minbase + ${PACKAGES[*]}"
include=$(IFS=,; echo "${PACKAGES[*]}")
# The downloaded .debs stay in the cache, so an edit of this script rebuilds without downloading.
mkdir -p "$VM_CACHE/debootstrap-debs"
if ! debootstrap --variant=minbase --include="$include" --cache-dir="$VM_CACHE/debootstrap-debs" \
  bookworm "$root" "$MIRROR" \
  >"$partial/debootstrap.out" 2>&1; then
  tail -n 30 "$partial/debootstrap.out" >&2
  [[ -f $root/debootstrap/debootstrap.log ]] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
  vm_die "debootstrap failed (output above; all of it in $partial/debootstrap.out): tier 2 cannot build its rootfs. Is $MIRROR reachable?"
fi
umount_under "$partial"

# Smaller initramfs, less guest RAM and a faster boot (240 MB -> 150 MB): documentation, man
# pages, translations, downloaded .debs and apt's indexes; perl's modules (rpm depends on perl
# for rpmbuild's helpers, rpm -i/-U/-e do not run it); udev's hardware database (no hardware to
# describe); ICU's data (libxml2 <- libarchive, which nothing run here loads). The ldd check
# below fails the build if a program the tests run lost a library.
rm -rf "$root"/usr/share/{doc,info,locale,lintian,linda}/* "$root"/usr/share/man/* \
  "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
  "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/debootstrap \
  "$root"/usr/share/perl "$root"/usr/lib/x86_64-linux-gnu/perl "$root"/usr/lib/udev/hwdb.bin \
  "$root"/usr/lib/x86_64-linux-gnu/libicudata.so.*

# vsock: the kernel's modules where modprobe finds them, an index, loaded at boot.
moddir="$root/lib/modules/$VM_KERNEL_VERSION"
mkdir -p "$moddir/kernel/net"
cp -r "$VM_MODULES/kernel/net/vmw_vsock" "$moddir/kernel/net/"
cp "$VM_MODULES"/modules.{order,builtin,builtin.modinfo} "$moddir/"
chroot "$root" depmod "$VM_KERNEL_VERSION" || vm_die "depmod $VM_KERNEL_VERSION failed in the rootfs"
echo vsock_loopback >"$root/etc/modules-load.d/vsock.conf"

# A fixed machine-id: an empty one would make systemd treat every boot as the first one
# (preset-all). The serial console is the tests' output: no login prompt there or on a VT.
echo 6e76702d74696572322d766d2d30303031 >"$root/etc/machine-id"
echo nvp-tier2 >"$root/etc/hostname"
for unit in serial-getty@ttyS0.service getty@tty1.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# Nothing in the VM should wait for a network that does not exist (it has only lo).
ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"

for f in /usr/lib/systemd/systemd /usr/bin/systemctl /usr/bin/journalctl /usr/bin/rpm /bin/kill \
  /usr/sbin/dnsmasq /usr/bin/socat /usr/bin/ss /usr/sbin/ip /usr/bin/getent /usr/bin/pgrep \
  /usr/bin/man /usr/bin/groff /usr/bin/nroff; do
  [[ -x $root$f ]] || vm_die "the rootfs lacks $f after debootstrap"
  if chroot "$root" ldd "$f" 2>&1 | grep -q 'not found'; then
    vm_die "$f in the rootfs misses a shared library (removed above?): $(chroot "$root" ldd "$f" 2>&1 | grep 'not found')"
  fi
done

# Packed once here; each run appends its own small archive to a copy.
(cd "$root" && find . | "$VM_BUSYBOX" cpio -o -H newc 2>/dev/null) >"$partial/rootfs.cpio"
version() { chroot "$root" dpkg-query -W -f="\${Version}" "$1"; }
{
  printf 'VM_ROOTFS_SIZE_MB=%s\n' "$(du -sm "$root" | cut -f1)"
  printf 'VM_ROOTFS_SYSTEMD=%q\n' "$(version systemd)"
  printf 'VM_ROOTFS_RPM=%q\n' "$(version rpm)"
  printf 'VM_ROOTFS_LIBC=%q\n' "$(version libc6)"
} >"$partial/rootfs.env"
trap - EXIT
mv "$partial" "$dir"
# Older rootfs builds are not used again.
find "$VM_CACHE" -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$hash" -exec rm -rf {} +
vm_log "rootfs ready in $(vm_elapsed "$started") s: $dir ($(du -sm "$dir/root" | cut -f1) MB, cpio $(du -sm "$dir/rootfs.cpio" | cut -f1) MB)"
echo "$dir"
