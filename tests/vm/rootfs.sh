#!/usr/bin/env bash
# Tier 2 (systemd as PID 1): builds the Debian 12 root filesystem the tier-2 VM boots. A STUB:
# tier 2 comes after the systemd work lands; this file fixes where it plugs in.
#
#   tests/vm/rootfs.sh    prints the path of the cached rootfs directory (building it if needed)
#
# Plan (measured in /work/shared/notes/vsock-vm-recipe.md, "systemd as PID 1"):
#   1. `debootstrap --variant=minbase --include=systemd-sysv,udev,kmod bookworm ROOT
#      http://deb.debian.org/debian` into $VM_CACHE/rootfs-<hash of this script>.partial
#      (≈35 s; debootstrap itself fetched like qemu: apt-get download + dpkg-deb -x, it is a
#      shell script); drop docs, man pages and locales; rename to rootfs-<hash> when complete,
#      so an edit of this script rebuilds it and a half-built one is never used.
#   2. The cached kernel's vsock modules under lib/modules/$VM_KERNEL_VERSION/kernel/net/vmw_vsock/,
#      `chroot ROOT depmod $VM_KERNEL_VERSION`, /etc/modules-load.d/vsock.conf = vsock_loopback.
#   3. Mask serial-getty@ttyS0.service; a oneshot test unit in multi-user.target.wants/ with
#      `SuccessAction=poweroff-force FailureAction=poweroff-force` in [Unit] and
#      `ExecStart=/bin/sh -c 'CHECKS; echo "@@VM_EXIT=$?@@"'`, `StandardOutput=tty`,
#      `TTYPath=/dev/ttyS0` — the same marker boot.sh already parses.
# run.sh tier2 then copies the cached rootfs, adds the per-run payload (the daemon built with
# the systemd feature, its units from systemd/, the checks), packs it like tier 1 and boots it
# with boot.sh --append "systemd.show_status=false rdinit=/lib/systemd/systemd" (≈8 s/boot).
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
source "$(dirname "$0")/lib.sh"
vm_die "tier 2's rootfs builder is not written yet (systemd as PID 1 comes after the systemd work); see tests/vm/README.md"
