#!/usr/bin/env bash
# The VM test tier: `make vm-test` runs `tests/vm/run.sh tier1`. See tests/vm/README.md.
#
#   tests/vm/run.sh [tier1|tier2] [-- LIBTEST ARGS...]
#
# tier1: builds the daemon and the in-VM test programs, packs them (with their shared libraries),
#        busybox and the vsock modules into an initramfs, boots it under qemu and fails unless
#        every test program passed inside the VM. Real AF_VSOCK (vsock_loopback), no systemd.
# tier2: systemd as PID 1 (units, socket activation, packages): not built yet, see README.md.
#
# LIBTEST ARGS go to every test program in the VM, e.g. `-- --test-threads=1 two_hundred`.
# Environment: VM_TIMEOUT (seconds the VM may run, default 300), VM_ACCEL, VM_MEMORY, VM_CPUS
# (see boot.sh), VM_OPT_LEVEL (of the in-VM build, default 2), VM_STATIC=1 (static programs,
# without the daemon's systemd feature, in target/vm-build-static), VM_TIER1_TESTS (test targets
# instead of TIER1_TESTS below, space-separated), VM_TIER1_FILES (likewise for TIER1_FILES).
# Every reason the tier cannot run is a failure with a message, never a skip.
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
source "$(dirname "$0")/lib.sh"

tier=${1:-tier1}
shift || true
if [[ ${1:-} == -- ]]; then
  shift
fi
test_args=("$@")

# Builds the in-VM programs (cargo test --workspace --no-run ARGS) and prints the artifacts as
# lines "KIND NAME PATH" (KIND: bin or test).
#
# In their own target dir ($VM_BUILD, so the normal build in target/debug is left alone), with
# the dev profile optimised (VM_OPT_LEVEL, default 2) and without debug info: under software
# emulation the unoptimised 64 MiB transfers take minutes instead of seconds. --workspace keeps
# the feature set that of the normal build. The programs are linked like the normal build,
# dynamically (the daemon links libsystemd, which Debian ships only as a shared library, so a
# static build cannot link it); add_program gives the initramfs their shared libraries.
build_programs() {
  local json="$VM_RUN/cargo-artifacts.json"
  mkdir -p "$VM_RUN"
  : >"$json"
  # The daemon always (tests of other packages look for it next to their own binaries), then
  # the test programs and the binaries they need.
  local cmd
  local vars=("CARGO_TARGET_DIR=$VM_BUILD" "CARGO_PROFILE_DEV_OPT_LEVEL=${VM_OPT_LEVEL:-2}"
    CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_DEV_INCREMENTAL=false)
  local flags=(--workspace --message-format=json-render-diagnostics)
  if [[ ${VM_STATIC:-} == 1 ]]; then
    # Fully static, without the systemd feature (libsystemd has no static archive). The explicit
    # --target keeps crt-static away from build scripts and proc-macros, which run on the host.
    vars=("CARGO_TARGET_DIR=$VM_BUILD-static" "${vars[@]:1}" "RUSTFLAGS=-C target-feature=+crt-static")
    flags+=(--target x86_64-unknown-linux-gnu --no-default-features)
  fi
  for cmd in "build --bin nitro-vsock-proxy" "test --no-run $*"; do
    # shellcheck disable=SC2086 # $cmd is a list of words
    if ! env "${vars[@]}" "${CARGO:-cargo}" $cmd "${flags[@]}" >>"$json"; then
      vm_die "building the programs for the VM failed (${vars[*]} cargo $cmd ${flags[*]})"
    fi
  done
  # One JSON object per line; artifacts with an "executable" are binaries and test programs.
  # A test harness (profile "test":true; also a binary's unit tests) is reported as "test".
  local line kind
  local re_art='"kind":\["([a-z-]+)"\].*"name":"([^"]+)".*"executable":"([^"]+)"'
  local re_test='"profile":\{[^}]*"test":true'
  while IFS= read -r line; do
    [[ $line == *'"reason":"compiler-artifact"'* && $line =~ $re_art ]] || continue
    kind=${BASH_REMATCH[1]}
    local name=${BASH_REMATCH[2]} exe=${BASH_REMATCH[3]}
    if [[ $line =~ $re_test ]]; then
      kind="test"
    fi
    printf '%s %s %s\n' "$kind" "$name" "$exe"
  done <"$json"
}

# Copies the executable FILE into the initramfs ROOT at path DEST (default: FILE's own path),
# with every shared library it loads (resolved by this host's loader, copied to the same paths,
# the loader included). Static executables are copied alone.
add_program() {
  local root=$1 file=$2 dest=${3:-$2} deps lib
  mkdir -p "$root$(dirname "$dest")"
  cp "$file" "$root$dest"
  if ! deps=$(ldd "$file" 2>&1); then
    case $deps in
      *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
      *) vm_die "ldd $file failed: $deps" ;;
    esac
  fi
  if grep -q 'not found' <<<"$deps"; then
    vm_die "$file needs shared libraries this host lacks:
$deps"
  fi
  # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
  while read -r lib; do
    if [[ ! -e $root$lib ]]; then
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    fi
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps")
}

# Tier 1's test programs: cargo test targets of the workspace (`--test NAME`), run in the VM in
# this order. Every binary cargo builds along with them (the daemon: the tests'
# CARGO_BIN_EXE_nitro-vsock-proxy) goes into the VM at the path cargo compiled into the tests,
# and as /vm/bin/NAME.
# HOOK (enclave-app chain test): add its test target here, e.g. (vsock_vm enclave_chain_vm);
# if it is a test of the enclave-app package, cargo builds enclave-app's binary with it and it
# lands in the VM the same way. See tests/vm/README.md.
TIER1_TESTS=(vsock_vm vsock_chain)
# Files and directories of the source tree the test programs read (repo-relative), copied into
# the VM at their absolute paths, so paths built from env!("CARGO_MANIFEST_DIR") work there.
TIER1_FILES=(enclave-app/testdata config/your-vsock-proxy.yaml)
if [[ -n ${VM_TIER1_TESTS:-} ]]; then
  # Another selection, for trying a new test program in the VM before it is listed above.
  read -r -a TIER1_TESTS <<<"$VM_TIER1_TESTS"
fi
if [[ -n ${VM_TIER1_FILES:-} ]]; then
  read -r -a TIER1_FILES <<<"$VM_TIER1_FILES"
fi

run_tier1() {
  local started t0 build_s pack_s
  started=$(vm_now)
  "$VM_DIR/fetch.sh"
  vm_lock_cache
  vm_load_cache

  t0=$(vm_now)
  vm_log "building the programs that run in the VM (optimised$([[ ${VM_STATIC:-} == 1 ]] && echo ", static"))"
  local artifacts name
  local selection=()
  for name in "${TIER1_TESTS[@]}"; do
    selection+=(--test "$name")
  done
  artifacts=$(build_programs "${selection[@]}")
  build_s=$(vm_elapsed "$t0")

  t0=$(vm_now)
  local run="$VM_RUN/tier1" root
  root="$run/root"
  rm -rf "$root"
  mkdir -p "$root"/{bin,mods,vm/tests,vm/bin,proc,sys,dev,tmp}
  add_program "$root" "$VM_BUSYBOX" /bin/busybox
  for m in vsock vmw_vsock_virtio_transport_common vsock_loopback; do
    cp "$VM_MODULES/kernel/net/vmw_vsock/$m.ko" "$root/mods/"
  done
  cp "$VM_DIR/init-tier1" "$root/init"
  chmod 755 "$root/init"
  local kind path n=10
  while read -r kind name path; do
    [[ $kind == bin ]] || continue
    add_program "$root" "$path"
    ln -sf "$path" "$root/vm/bin/$name"
  done <<<"$artifacts"
  [[ -e $root/vm/bin/nitro-vsock-proxy ]] || vm_die "cargo built no nitro-vsock-proxy binary for the tests:
$artifacts"
  for name in "${TIER1_TESTS[@]}"; do
    path=$(awk -v n="$name" '$1 == "test" && $2 == n { print $3 }' <<<"$artifacts" | tail -n 1)
    [[ -n $path && -x $path ]] || vm_die "cargo built no test program $name:
$artifacts"
    add_program "$root" "$path" "/vm/tests/$n-$name"
    n=$((n + 10))
  done
  local file
  for file in "${TIER1_FILES[@]}"; do
    [[ -e $VM_ROOT/$file ]] || vm_die "TIER1_FILES names $file, which does not exist"
    mkdir -p "$root$VM_ROOT/$(dirname "$file")"
    cp -r "$VM_ROOT/$file" "$root$VM_ROOT/$file"
  done
  local initrd="$run/initrd.cpio"
  # busybox's cpio (from the cache) packs it, so the host needs no cpio. Uncompressed: the
  # kernel copies it faster than it would inflate it under emulation.
  (cd "$root" && find . | "$VM_BUSYBOX" cpio -o -H newc 2>/dev/null) >"$initrd.partial"
  mv "$initrd.partial" "$initrd"
  pack_s=$(vm_elapsed "$t0")

  t0=$(vm_now)
  local log="$run/console.log" status=0 append=""
  if ((${#test_args[@]})); then
    append="-- ${test_args[*]}"
  fi
  "$VM_DIR/boot.sh" --initrd "$initrd" --log "$log" --timeout "${VM_TIMEOUT:-300}" \
    --append "$append" || status=$?
  local vm_s
  vm_s=$(vm_elapsed "$t0")

  # The guest's exit status alone is not trusted: a test program that skipped itself (the
  # in-VM tests print "SKIPPED on this host" when they are not in the VM), or that ran no test,
  # must not pass.
  if grep -q 'SKIPPED on this host' "$log"; then
    vm_die "tests skipped themselves inside the VM (is NVP_VM_TIER still set by tests/vm/init-tier1?); console log: $log"
  fi
  local passed
  passed=$(grep -Ec '^test result: ok\. [1-9][0-9]* passed' "$log" || true)
  if ((status == 0 && passed < ${#TIER1_TESTS[@]})); then
    vm_die "the VM reported success but only $passed of ${#TIER1_TESTS[@]} test programs passed a test; console log: $log"
  fi
  vm_log "timings: build ${build_s}s, initramfs ${pack_s}s, VM ${vm_s}s, total $(vm_elapsed "$started")s"
  case $status in
    0) ;;
    124 | 125) vm_die "tier 1 failed: the VM did not complete (reason above); console log above and in $log" ;;
    *)
      grep -a '^@@VM_TEST ' "$log" >&2 || true
      vm_die "tier 1 failed inside the VM (status $status); console log above and in $log"
      ;;
  esac
  vm_log "tier 1 passed: the daemon over real AF_VSOCK inside the VM"
}

case $tier in
  tier1) run_tier1 ;;
  tier2)
    "$VM_DIR/rootfs.sh" >/dev/null
    vm_die "tier 2 (systemd as PID 1) is not built yet; see tests/vm/README.md"
    ;;
  *) vm_die "unknown tier $tier: use tier1 (or tier2, once it exists)" ;;
esac
