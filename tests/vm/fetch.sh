#!/usr/bin/env bash
# Fills the VM test tier's cache (target/vm-cache/) from Debian's package registry, if needed:
#   - qemu-system-x86 with seabios and every library this host lacks,
#   - busybox-static (the VM's shell and tools; on the host it packs the initramfs),
#   - the current Debian 12 cloud kernel (boots fast under emulation) and the modules tier 1
#     loads (VM_TIER1_MODULES in lib.sh: vsock, and the netfilter ones egress.nft needs).
# Nothing is installed on the host: the .debs are fetched with `apt-get download` and unpacked
# with `dpkg-deb -x` into a private sysroot. (`apt-get install qemu-system-x86` would remove the
# qemu-utils backport some of our machines carry.) The package index is refreshed with
# `apt-get update` only when it lacks a package or a download fails.
#
# Once complete, the cache is reused as is: delete target/vm-cache (make vm-clean) to refresh
# it. A cache written by an older fetch.sh (another VM_CACHE_FORMAT in its stamp) is fetched
# again. Exits non-zero with the reason when something cannot be fetched: the tier must not be
# skipped silently. See tests/vm/README.md.
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
source "$(dirname "$0")/lib.sh"

# The packages that make up the emulator; libraries come from the install simulation below.
QEMU_CORE=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
KERNEL_META=linux-image-cloud-amd64

vm_lock_cache
if vm_cache_current; then
  exit 0
fi
if [[ -f $VM_CACHE_STAMP ]]; then
  vm_log "the cache in $VM_CACHE is of an older format (it lacks what tier 1 now loads): fetching it again"
  rm -f "$VM_CACHE_STAMP"
fi

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  vm_die "the VM tier fetches qemu and a kernel with apt-get and dpkg-deb (Debian 12); this machine lacks them"
fi
[[ $(dpkg --print-architecture) == amd64 ]] ||
  vm_die "the VM tier needs an amd64 host (this is $(dpkg --print-architecture))"

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  SUDO=(sudo)
fi

apt_updated=0
apt_update() {
  ((apt_updated)) && return 1
  vm_log "refreshing the package index (apt-get update)"
  apt_updated=1
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get update -qq ||
    vm_die "apt-get update failed: cannot reach Debian's package registry, so qemu and the kernel cannot be fetched"
}

has_candidate() {
  local cand
  cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }')
  [[ -n $cand && $cand != "(none)" ]]
}

# The kernel package the cloud metapackage points at now, e.g. linux-image-6.1.0-56-cloud-amd64.
kernel_package() {
  apt-cache depends "$KERNEL_META" 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

# Everything to download: the qemu packages, the libraries this host lacks for them, busybox
# and the kernel.
package_list() {
  local kpkg
  kpkg=$(kernel_package)
  [[ -n $kpkg ]] || return 1
  {
    printf '%s\n' "${QEMU_CORE[@]}" busybox-static "$kpkg"
    apt-get install -s --no-install-recommends "${QEMU_CORE[@]}" 2>/dev/null |
      awk '/^Inst / { print $2 }'
  } | sort -u
}

for pkg in qemu-system-x86 busybox-static "$KERNEL_META"; do
  if ! has_candidate "$pkg"; then
    apt_update
    has_candidate "$pkg" || vm_die "Debian's package index has no $pkg even after apt-get update (unreachable registry? see apt's warnings above; bookworm main in /etc/apt/sources.list*?): the VM tier cannot fetch qemu and the kernel, so it cannot run on this machine"
  fi
done

started=$(vm_now)
download="$VM_CACHE/debs.partial"
rm -rf "$download" "$VM_SYSROOT" "$VM_SYSROOT.partial"
mkdir -p "$download"
sandbox=()
if [[ $(id -u) -eq 0 ]]; then
  # As root, apt hands downloads to the _apt user, which cannot write into target/.
  sandbox=(-o APT::Sandbox::User=root)
fi
fetch() {
  local list pkgs
  list=$(package_list) || return 1
  mapfile -t pkgs <<<"$list"
  vm_log "downloading ${#pkgs[@]} packages: ${pkgs[*]}"
  (cd "$download" && apt-get download -qq "${sandbox[@]}" "${pkgs[@]}")
}
vm_log "fetching qemu, busybox and the cloud kernel from Debian into $VM_CACHE (first run only)"
if ! fetch; then
  # A stale index names versions the mirror no longer has (e.g. after a security update).
  apt_update || true
  rm -rf "$download" && mkdir -p "$download"
  fetch || vm_die "cannot download qemu-system-x86, busybox-static and the cloud kernel with apt-get download (see the apt errors above): the VM tier cannot run on this machine"
fi

mkdir -p "$VM_SYSROOT.partial"
for deb in "$download"/*.deb; do
  dpkg-deb -x "$deb" "$VM_SYSROOT.partial" || vm_die "cannot unpack $deb"
done
mv "$VM_SYSROOT.partial" "$VM_SYSROOT"

kernel_version=$(find "$VM_SYSROOT/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' |
  sed 's/^vmlinuz-//' | sort -V | tail -n 1)
[[ -n $kernel_version ]] || vm_die "the kernel package unpacked no /boot/vmlinuz-*"
[[ -x $VM_SYSROOT/bin/busybox ]] || vm_die "busybox-static unpacked no /bin/busybox"
moddir="$VM_SYSROOT/lib/modules/$kernel_version"
vsock_dir="$moddir/kernel/net/vmw_vsock"
for m in vsock vmw_vsock_virtio_transport_common vsock_loopback; do
  [[ -f $vsock_dir/$m.ko ]] || vm_die "kernel $kernel_version has no $vsock_dir/$m.ko (compressed modules? a changed Debian kernel?)"
done
# Keep only what the tiers use from the kernel package: the image, the modules tier 1 loads
# with their dependencies (the vsock directory whole: tier 2 copies it) and the index files
# tier 2 needs for depmod. The package has no modules.dep (Debian makes it when installing):
# busybox's depmod makes one to find the dependencies, and again for the modules kept, which
# run.sh reads for tier 1's load order.
"$VM_SYSROOT/bin/busybox" depmod -b "$VM_SYSROOT" "$kernel_version" ||
  vm_die "busybox depmod failed on kernel $kernel_version's modules"
keep=$(vm_module_closure "$moddir" "${VM_TIER1_MODULES[@]}") ||
  vm_die "kernel $kernel_version lacks modules tier 1 loads (VM_TIER1_MODULES in tests/vm/lib.sh; see above)"
(cd "$moddir" && find kernel -name '*.ko*' ! -path 'kernel/net/vmw_vsock/*' |
  { grep -vxF -f <(printf '%s\n' "$keep") || true; } | xargs -r rm -f)
find "$moddir/kernel" -mindepth 1 -type d -empty -delete
"$VM_SYSROOT/bin/busybox" depmod -b "$VM_SYSROOT" "$kernel_version" ||
  vm_die "busybox depmod failed on the modules kept"
vm_module_closure "$moddir" "${VM_TIER1_MODULES[@]}" >/dev/null ||
  vm_die "the modules kept from kernel $kernel_version do not load alone (see above)"

[[ -x $VM_SYSROOT/usr/bin/qemu-system-x86_64 ]] || vm_die "qemu-system-x86 unpacked no /usr/bin/qemu-system-x86_64"
vm_qemu_cmd
if ! qemu_version=$("${VM_QEMU_CMD[@]}" --version 2>&1); then
  vm_die "the fetched qemu does not run on this host (a library missing from the download?):
$qemu_version"
fi
qemu_version=$(head -n 1 <<<"$qemu_version")
busybox_version=$("$VM_SYSROOT/bin/busybox" 2>&1 | head -n 1 || true)
rm -rf "$download"

tmp="$VM_CACHE_STAMP.partial"
{
  printf 'VM_KERNEL_VERSION=%q\n' "$kernel_version"
  printf 'VM_QEMU_VERSION=%q\n' "$qemu_version"
  printf 'VM_BUSYBOX_VERSION=%q\n' "$busybox_version"
  printf 'VM_CACHE_FORMAT=%s\n' "$VM_CACHE_FORMAT"
} >"$tmp"
mv "$tmp" "$VM_CACHE_STAMP"
vm_log "cache ready in $(vm_elapsed "$started") s: kernel $kernel_version, $qemu_version"
