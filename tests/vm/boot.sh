#!/usr/bin/env bash
# Boots one throwaway VM from the cache and returns the exit status its guest reported.
#
#   tests/vm/boot.sh --initrd FILE --log FILE [--append "KERNEL ARGS"] [--timeout SECONDS]
#
# The guest reports by printing `@@VM_EXIT=<status>@@` on the serial console (ttyS0) before it
# powers off; this script streams the console to standard output (carriage returns removed) and
# to --log, and exits with that status. No marker means the guest never got that far (a boot
# failure, a kernel panic, an /init that died, or the timeout): that is a failure (status 125,
# or 124 on timeout) with the console shown, never a skip.
#
# Both tiers boot through here: tier 1 with a busybox initramfs, tier 2 with a whole systemd
# rootfs packed as an initramfs and `rdinit=/lib/systemd/systemd` in --append.
#
# Environment: VM_ACCEL=auto|tcg|kvm (auto: KVM only where /dev/kvm is writable and is not the
# paravirtual stand-in `kvm_pvm`, which makes qemu abort or hang; otherwise TCG emulation),
# VM_MEMORY (MiB, default 2048), VM_CPUS (default 2).
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
source "$(dirname "$0")/lib.sh"

initrd="" log="" append="" timeout=300
while (($#)); do
  case $1 in
    --initrd) initrd=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --append) append=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    *) vm_die "boot.sh: unknown argument $1" ;;
  esac
done
[[ -n $initrd && -n $log ]] || vm_die "usage: boot.sh --initrd FILE --log FILE [--append ARGS] [--timeout SECONDS]"
vm_load_cache

accel=${VM_ACCEL:-auto}
if [[ $accel == auto ]]; then
  accel=tcg
  if [[ -w /dev/kvm && -r /dev/kvm && ! -e /sys/module/kvm_pvm ]]; then
    accel=kvm
  fi
fi
case $accel in
  tcg) machine=(-accel tcg -cpu max) ;;
  kvm) machine=(-accel kvm -cpu host) ;;
  *) vm_die "VM_ACCEL must be auto, tcg or kvm, not $accel" ;;
esac

mkdir -p "$(dirname "$log")"
vm_log "booting kernel $VM_KERNEL_VERSION ($accel, ${VM_CPUS:-2} CPUs, ${VM_MEMORY:-2048} MiB), timeout ${timeout}s; console log: $log"
started=$(vm_now)
set +e
# q35 (the microvm machine type hung once for minutes here); no network device, no disks: the
# guest has only lo. -no-reboot turns a guest reboot or kernel panic (panic=-1) into an exit.
timeout --kill-after=10 "$timeout" "${VM_QEMU_CMD[@]}" \
  "${machine[@]}" -M q35 -m "${VM_MEMORY:-2048}" -smp "${VM_CPUS:-2}" \
  -nographic -nodefaults -no-reboot -serial stdio -net none \
  -kernel "$VM_KERNEL" -initrd "$initrd" \
  -append "console=ttyS0 quiet panic=-1 $append" </dev/null 2>&1 |
  sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' | tee "$log"
statuses=("${PIPESTATUS[@]}")
set -e
qemu_status=${statuses[0]}
vm_log "VM ran $(vm_elapsed "$started") s (qemu exit status $qemu_status)"

marker=$(grep -ao '@@VM_EXIT=[0-9]*@@' "$log" | tail -n 1 || true)
if [[ -z $marker ]]; then
  if ((qemu_status == 124 || qemu_status == 137)); then
    printf 'vm-test: FAILED: the VM did not finish within %ss (console log above, also in %s)\n' "$timeout" "$log" >&2
    exit 124
  fi
  printf 'vm-test: FAILED: the VM stopped without reporting an exit status (boot failure, kernel panic or /init died; qemu exit status %s). Console log above, also in %s\n' "$qemu_status" "$log" >&2
  exit 125
fi
status=${marker#@@VM_EXIT=}
status=${status%@@}
exit "$status"
