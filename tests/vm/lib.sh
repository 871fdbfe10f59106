# shellcheck shell=bash disable=SC2034 # the variables are used by the scripts that source this
# Shared by the VM test tier's scripts (sourced, not run). See tests/vm/README.md.
#
# Paths: everything the tier fetches or builds lives under target/ (never installed on the host):
#   target/vm-cache/   qemu, seabios, busybox, the kernel and its modules, unpacked from Debian
#                      packages into a private sysroot; reused until deleted (make vm-clean)
#   target/vm-build/   cargo target dir for the static binaries that run inside the VM
#   target/vm-run/     the initramfs and console log of the last run of each tier

VM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VM_DIR="$VM_ROOT/tests/vm"
VM_CACHE="${VM_CACHE:-$VM_ROOT/target/vm-cache}"
VM_BUILD="${VM_BUILD:-$VM_ROOT/target/vm-build}"
VM_RUN="${VM_RUN:-$VM_ROOT/target/vm-run}"
VM_SYSROOT="$VM_CACHE/sysroot"
# Written last by fetch.sh: its presence means the cache is complete. Shell assignments of
# VM_KERNEL_VERSION, VM_QEMU_VERSION, VM_BUSYBOX_VERSION.
VM_CACHE_STAMP="$VM_CACHE/cache.env"

vm_log() { printf 'vm-test: %s\n' "$*" >&2; }

# Prints the reason and stops. Every way the tier cannot run ends here, with a message that
# says why: the tier never skips silently.
vm_die() {
  printf 'vm-test: FAILED: %s\n' "$*" >&2
  exit 1
}

# Seconds since the epoch, with milliseconds, for the timing lines.
vm_now() { date +%s.%N; }
vm_elapsed() { awk -v a="$1" -v b="$(vm_now)" 'BEGIN { printf "%.1f", b - a }'; }

# Takes an exclusive lock on the cache for the rest of the calling script (two `make vm-test`
# at once must not unpack into the same sysroot at the same time).
vm_lock_cache() {
  mkdir -p "$VM_CACHE"
  exec 9>"$VM_CACHE/.lock"
  if ! flock -w 900 9; then
    vm_die "another vm-test run holds $VM_CACHE/.lock for more than 15 minutes"
  fi
}

# Loads the cache description (VM_KERNEL_VERSION, ...). Fails if fetch.sh has not completed.
vm_load_cache() {
  [[ -f $VM_CACHE_STAMP ]] || vm_die "the VM cache is missing: run tests/vm/fetch.sh first"
  # shellcheck source=/dev/null
  source "$VM_CACHE_STAMP"
  VM_KERNEL="$VM_SYSROOT/boot/vmlinuz-$VM_KERNEL_VERSION"
  VM_MODULES="$VM_SYSROOT/lib/modules/$VM_KERNEL_VERSION"
  VM_BUSYBOX="$VM_SYSROOT/bin/busybox"
  vm_qemu_cmd
}

# The command that runs the cached qemu with its private libraries and firmware (an array, so
# `timeout` can run it): "${VM_QEMU_CMD[@]}" ARGS...
vm_qemu_cmd() {
  VM_QEMU_CMD=(env "LD_LIBRARY_PATH=$VM_SYSROOT/usr/lib/x86_64-linux-gnu:$VM_SYSROOT/lib/x86_64-linux-gnu"
    "$VM_SYSROOT/usr/bin/qemu-system-x86_64"
    -L "$VM_SYSROOT/usr/share/seabios" -L "$VM_SYSROOT/usr/share/qemu")
}
