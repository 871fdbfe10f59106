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
# VM_KERNEL_VERSION, VM_QEMU_VERSION, VM_BUSYBOX_VERSION, VM_CACHE_FORMAT.
VM_CACHE_STAMP="$VM_CACHE/cache.env"
# What fetch.sh keeps in the cache, as a number written into the stamp: a cache of another
# format is fetched again (2: the kernel's netfilter modules kept besides the vsock ones).
VM_CACHE_FORMAT=2
# The kernel modules tier 1 loads (with what they depend on, from modules.dep): the vsock
# loopback transport, and what enclave-app/egress.nft needs in the tests' enclave namespace
# (nat chains, redirect, reject for IPv4 and IPv6; nf_tables and conntrack come with them).
VM_TIER1_MODULES=(vsock_loopback nft_chain_nat nft_redir nft_reject_ipv4 nft_reject_ipv6)

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

# Whether fetch.sh has completed a cache of the current VM_CACHE_FORMAT.
vm_cache_current() {
  [[ -f $VM_CACHE_STAMP ]] && grep -qx "VM_CACHE_FORMAT=$VM_CACHE_FORMAT" "$VM_CACHE_STAMP"
}

# Loads the cache description (VM_KERNEL_VERSION, ...). Fails if fetch.sh has not completed.
vm_load_cache() {
  vm_cache_current || vm_die "the VM cache is missing or of an older format: run tests/vm/fetch.sh first"
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

# MODDIR NAME...: the kernel modules NAME... and everything they depend on, as paths relative
# to MODDIR (a lib/modules/<version> directory), one a line, each once, every module after
# its dependencies: an order insmod can load them in. Read from MODDIR/modules.dep (which
# fetch.sh makes with busybox's depmod), following each dependency's own line rather than
# trusting the order of a list. Fails naming a module that modules.dep lacks.
vm_module_closure() {
  local moddir=$1
  shift
  awk -v want="$*" '
    function visit(path, n, dep, i) {
      if (path in done) return
      done[path] = 1
      n = split(deps[path], dep, " ")
      for (i = 1; i <= n; i++) visit(dep[i])
      print path
    }
    {
      path = $1
      sub(/:$/, "", path)
      deps[path] = ""
      for (i = 2; i <= NF; i++) deps[path] = deps[path] " " $i
      base = path
      sub(/.*\//, "", base)
      sub(/\.ko$/, "", base)
      by_name[base] = path
    }
    END {
      n = split(want, names, " ")
      for (i = 1; i <= n; i++) {
        if (!(names[i] in by_name)) {
          print "no module " names[i] " in modules.dep" > "/dev/stderr"
          missing = 1
          continue
        }
        visit(by_name[names[i]])
      }
      exit missing
    }' "$moddir/modules.dep"
}
