#!/usr/bin/env bash
# The VM test tier: `make vm-test` runs `tests/vm/run.sh tier1`, then `tier2`. See tests/vm/README.md.
#
#   tests/vm/run.sh [tier1|tier2] [-- LIBTEST ARGS...]
#
# tier1: builds the daemon and the in-VM test programs, packs them (with their shared libraries),
#        busybox and the vsock modules into an initramfs, boots it under qemu and fails unless
#        every test program passed inside the VM. Real AF_VSOCK (vsock_loopback), no systemd.
# tier2: systemd as PID 1: boots the cached Debian 12 rootfs (rootfs.sh) with the RPM `make rpm`
#        builds (and a release-2 rebuild of it), enclave-app and tests/vm/tier2/, and fails unless
#        every check of tests/vm/tier2/checks.sh passed inside: rpm -i, systemctl start/reload/
#        stop, the enclave-app chain over vsock, socket activation, the sandbox, rpm -U, rpm -e.
#
# LIBTEST ARGS go to every test program in the tier-1 VM, e.g. `-- --test-threads=1 two_hundred`.
# Environment: VM_TIMEOUT (seconds the VM may run, default 300, tier 2: 420), VM_ACCEL,
# VM_MEMORY, VM_CPUS (see boot.sh), VM_OPT_LEVEL (of the in-VM build, default 2), VM_STATIC=1
# (tier 1: static programs, without the daemon's systemd feature, in target/vm-build-static),
# VM_TIER1_TESTS (test targets instead of TIER1_TESTS below, space-separated), VM_TIER1_FILES
# (likewise for TIER1_FILES), VM_TIER2_CHECKS (a script to run in the tier-2 VM instead of
# tests/vm/tier2/checks.sh), VM_DEBIAN_MIRROR (rootfs.sh's mirror).
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
  # The daemon and enclave-app always (tests of other packages look for the daemon next to
  # their own binaries; vsock_vm's egress test looks for enclave-app next to the daemon), then
  # the test programs and the binaries they need.
  local cmd
  local vars=("CARGO_TARGET_DIR=$VM_BUILD" "CARGO_PROFILE_DEV_OPT_LEVEL=${VM_OPT_LEVEL:-2}"
    CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_DEV_INCREMENTAL=false)
  local flags=(--workspace --message-format=json-render-diagnostics)
  if [[ ${VM_STATIC:-} == 1 ]]; then
    # Fully static, without the systemd feature (libsystemd has no static archive), with the
    # daemon one (the binary needs it). The explicit
    # --target keeps crt-static away from build scripts and proc-macros, which run on the host.
    vars=("CARGO_TARGET_DIR=$VM_BUILD-static" "${vars[@]:1}" "RUSTFLAGS=-C target-feature=+crt-static")
    flags+=(--target x86_64-unknown-linux-gnu --no-default-features --features nitro-vsock-proxy/daemon)
  fi
  for cmd in "build --bin nitro-vsock-proxy --bin enclave-app" "test --no-run $*"; do
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
# A test of the enclave-app package (vsock_chain) brings enclave-app's binary the same way.
TIER1_TESTS=(vsock_vm vsock_chain)
# Files and directories of the source tree the test programs read (repo-relative), copied into
# the VM at their absolute paths, so paths built from env!("CARGO_MANIFEST_DIR") work there.
TIER1_FILES=(enclave-app/testdata enclave-app/egress.nft config/your-vsock-proxy.yaml)
# Programs of this host the test programs run (the egress test's enclave namespace: nft for
# egress.nft, curl as the unmodified client, iproute2's ip for the routes `enclave-app egress
# --print-setup` prints: busybox's ip has no `address replace`), packed with their shared
# libraries into /usr/local/bin, which the VM's PATH puts before busybox's applets.
TIER1_PROGRAMS=(nft curl ip)
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
  mkdir -p "$root"/{bin,mods,etc,usr/local/bin,vm/tests,vm/bin,proc,sys,dev,tmp}
  add_program "$root" "$VM_BUSYBOX" /bin/busybox
  # The modules init-tier1 loads, in the order it loads them (/mods/load: dependencies first).
  local modules module
  modules=$(vm_module_closure "$VM_MODULES" "${VM_TIER1_MODULES[@]}") ||
    vm_die "the cached kernel lacks modules tier 1 loads (remove $VM_CACHE to fetch it again)"
  while read -r module; do
    cp "$VM_MODULES/$module" "$root/mods/"
    basename "$module" .ko >>"$root/mods/load"
  done <<<"$modules"
  local program host_path
  for program in "${TIER1_PROGRAMS[@]}"; do
    host_path=$(command -v "$program") ||
      vm_die "tier 1 runs $program, which this host lacks (scripts/install-deps.sh installs it)"
    add_program "$root" "$host_path" "/usr/local/bin/$program"
  done
  # The enclave namespace of the egress test bind-mounts its own resolv.conf over this one (a
  # bind mount needs the file); a test's DNS server is on 127.0.0.1:53 of its own namespace.
  printf 'nameserver 127.0.0.1\n' >"$root/etc/resolv.conf"
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

# ---- Tier 2: systemd as PID 1 ----------------------------------------------------------------
# The VM boots tests/vm/rootfs.sh's cached Debian 12 rootfs with a per-run archive appended (the
# RPMs, enclave-app, tests/vm/tier2/), systemd runs nvp-tier2.service, which runs
# tests/vm/tier2/checks.sh and powers off. See tests/vm/README.md, "Tier 2".

# enclave-app for the VM, with tier 1's cargo settings and target dir (optimised dev profile; a
# warm tier 1 leaves nothing to build). Sets TIER2_APP.
tier2_build_enclave_app() {
  local vars=("CARGO_TARGET_DIR=$VM_BUILD" "CARGO_PROFILE_DEV_OPT_LEVEL=${VM_OPT_LEVEL:-2}"
    CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_DEV_INCREMENTAL=false)
  env "${vars[@]}" "${CARGO:-cargo}" build --workspace --bin enclave-app >&2 ||
    vm_die "building enclave-app for the VM failed (${vars[*]} cargo build --workspace --bin enclave-app)"
  TIER2_APP="$VM_BUILD/debug/enclave-app"
  [[ -x $TIER2_APP ]] || vm_die "cargo built no $TIER2_APP"
}

# What goes into the RPM: every file build-rpm.sh puts in the source tarball (what git tracks or
# would track) except the tests, which the package build does not compile (--nocheck), and the
# toolchain's version.
tier2_rpm_key() {
  {
    (cd "$VM_ROOT" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        case $f in tests/* | enclave-app/tests/*) ;; *) [[ -f $f ]] && printf '%s\0' "$f" ;; esac
      done | LC_ALL=C sort -z | xargs -0 sha256sum)
    "${CARGO:-cargo}" --version
    rustc --version
  } | sha256sum | cut -c1-16
}

# The two RPMs the checks install, in $VM_CACHE/tier2-rpm-<key>/release{1,2}/ (sets TIER2_RPMS),
# built only when what goes into them changed:
#   release 1: the RPM `make rpm` builds (scripts/build-rpm.sh; a release build, ≈1.5 min here);
#   release 2: a newer build of it for the upgrade check (tier2_release2).
tier2_rpms() {
  local key dir
  key=$(tier2_rpm_key) || vm_die "cannot list the source files (git ls-files) for the RPM cache key"
  dir="$VM_CACHE/tier2-rpm-$key"
  TIER2_RPMS=$dir
  [[ -f $dir/done ]] && return 0
  find "$VM_CACHE" -maxdepth 1 -name 'tier2-rpm-*' -exec rm -rf {} +
  vm_log "no cached RPMs for these sources: building the RPM with scripts/build-rpm.sh (as make rpm; a release build, ≈1.5 min) and its release 2"
  "$VM_ROOT/scripts/build-rpm.sh" >&2 || vm_die "scripts/build-rpm.sh failed: tier 2 installs the RPM it builds"
  local version rpm1
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$VM_ROOT/Cargo.toml" | head -n 1)
  rpm1="$VM_ROOT/target/rpm/RPMS/x86_64/nitro-vsock-proxy-$version-1.x86_64.rpm"
  [[ -f $rpm1 ]] || vm_die "scripts/build-rpm.sh made no $rpm1"
  mkdir -p "$dir.partial/release1" "$dir.partial/release2"
  cp "$rpm1" "$dir.partial/release1/"
  tier2_release2 "$rpm1" "$dir.partial/release2"
  touch "$dir.partial/done"
  mv "$dir.partial" "$dir"
}

# RELEASE1_RPM OUT_DIR: release 2 of the same package, for the upgrade check. rpmbuild -bb from
# the sources build-rpm.sh just made (target/rpm/SOURCES) with a copy of the committed spec in
# which only two lines differ: `Release: 2%{?dist}`, and %build's `cargo build` replaced by
# installing release 1's binary (taken from that RPM) where %install expects it. The upgrade check
# is about the package (scriptlets, %config files, units), which comes from the spec unchanged; a
# second release build of the same program would add ≈1.5 min.
tier2_release2() {
  local rpm1=$1 out=$2 top spec extra=()
  top="$VM_CACHE/tier2-rpmbuild"
  spec="$top/SPECS/nitro-vsock-proxy.spec"
  rm -rf "$top"
  mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS,prebuilt}
  cp "$VM_ROOT"/target/rpm/SOURCES/* "$top/SOURCES/"
  rpm2cpio "$rpm1" | (cd "$top/prebuilt" && "$VM_BUSYBOX" cpio -idm ./usr/bin/nitro-vsock-proxy 2>/dev/null)
  [[ -x $top/prebuilt/usr/bin/nitro-vsock-proxy ]] || vm_die "cannot extract /usr/bin/nitro-vsock-proxy from $rpm1"
  sed -e 's/^Release:\([[:space:]]*\)1%{?dist}$/Release:\12%{?dist}/' \
    -e "s|^cargo build --release .*-p nitro-vsock-proxy.*|install -D -m 0755 $top/prebuilt/usr/bin/nitro-vsock-proxy target/release/nitro-vsock-proxy|" \
    "$VM_ROOT/packaging/rpm/nitro-vsock-proxy.spec" >"$spec"
  if ! grep -q '^Release:[[:space:]]*2%{?dist}$' "$spec" || ! grep -q "^install .*$top/prebuilt" "$spec" ||
    [[ $(diff "$VM_ROOT/packaging/rpm/nitro-vsock-proxy.spec" "$spec" | grep -c '^>') != 2 ]]; then
    vm_die "cannot make the release-2 spec (packaging/rpm/nitro-vsock-proxy.spec no longer has 'Release: 1%{?dist}' and one 'cargo build --release ... -p nitro-vsock-proxy' line); update tier2_release2 in tests/vm/run.sh"
  fi
  # As scripts/build-rpm.sh: Debian's rpmbuild lacks the systemd macros and the BuildRequires.
  if [[ $(rpm --eval '%{_unitdir}') == '%{_unitdir}' ]]; then
    extra+=(--load "$VM_ROOT/packaging/rpm/debian-systemd.macros" --nodeps)
  fi
  rpmbuild -bb --nocheck --quiet --define "_topdir $top" "${extra[@]}" "$spec" >&2 ||
    vm_die "rpmbuild of the release-2 RPM failed (spec: $spec)"
  local rpm2
  rpm2=$(find "$top/RPMS" -name 'nitro-vsock-proxy-*-2.x86_64.rpm' | head -n 1)
  [[ -n $rpm2 ]] || vm_die "rpmbuild made no release-2 RPM under $top/RPMS"
  cp "$rpm2" "$out/"
  rm -rf "$top"
}

# ROOT_DIR FILE: FILE's shared libraries that the rootfs lacks are copied into ROOT_DIR (the
# per-run archive) at the paths this host's loader resolves; normally none: the rootfs is Debian
# 12, as the build host.
tier2_add_missing_libs() {
  local payload=$1 file=$2 lib
  while read -r lib; do
    if [[ ! -e $TIER2_ROOTFS/root$lib && ! -e $payload$lib ]]; then
      vm_log "the rootfs lacks $lib (needed by $file): adding this host's copy"
      mkdir -p "$payload$(dirname "$lib")"
      cp -L "$lib" "$payload$lib"
    fi
  done < <(ldd "$file" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
}

# The per-run archive's tree: test units, checks, RPMs, enclave-app.
tier2_payload() {
  local p=$1
  rm -rf "$p"
  (
    umask 022
    mkdir -p "$p"/etc/systemd/system/multi-user.target.wants "$p"/etc/systemd/system-preset \
      "$p"/vm/tier2 "$p"/vm/rpm/release1 "$p"/vm/rpm/release2 "$p"/usr/local/bin
    install -m 0644 "$VM_DIR"/tier2/*.service "$VM_DIR"/tier2/*.socket "$p/etc/systemd/system/"
    ln -s ../nvp-tier2.service "$p/etc/systemd/system/multi-user.target.wants/nvp-tier2.service"
    # Amazon Linux 2023's preset policy (its systemd ships 99-default-disable.preset): %post's
    # `systemctl preset` enables nothing unless a preset file names it. Debian enables everything.
    echo 'disable *' >"$p/etc/systemd/system-preset/99-default-disable.preset"
    # The names under test are answered by the VM's own DNS server (nvp-dns.service), not here.
    printf 'nameserver 127.0.0.1\n' >"$p/etc/resolv.conf"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$p/etc/hosts"
    install -m 0755 "$VM_DIR"/tier2/imds.sh "$p/vm/tier2/"
    install -m 0755 "${VM_TIER2_CHECKS:-$VM_DIR/tier2/checks.sh}" "$p/vm/tier2/checks.sh"
    install -m 0644 "$VM_ROOT/enclave-app/testdata/ip-ranges.sample.json" "$p/vm/tier2/"
    install -m 0644 "$TIER2_RPMS"/release1/*.rpm "$p/vm/rpm/release1/"
    install -m 0644 "$TIER2_RPMS"/release2/*.rpm "$p/vm/rpm/release2/"
    install -m 0755 "$TIER2_APP" "$p/usr/local/bin/enclave-app"
    # The enclave image's entry point starts the enclave side in the VM, as in the enclave.
    install -m 0755 "$VM_ROOT/enclave-app/run.sh" "$p/usr/local/bin/enclave-run.sh"
  )
  tier2_add_missing_libs "$p" "$TIER2_APP"
  local bin
  bin=$(mktemp -d)
  rpm2cpio "$TIER2_RPMS"/release1/*.rpm | (cd "$bin" && "$VM_BUSYBOX" cpio -idm ./usr/bin/nitro-vsock-proxy 2>/dev/null)
  tier2_add_missing_libs "$p" "$bin/usr/bin/nitro-vsock-proxy"
  rm -rf "$bin"
}

run_tier2() {
  local started t0 rootfs_s build_s rpm_s pack_s vm_s
  started=$(vm_now)
  "$VM_DIR/fetch.sh"
  t0=$(vm_now)
  TIER2_ROOTFS=$("$VM_DIR/rootfs.sh") || vm_die "tier 2 has no rootfs (tests/vm/rootfs.sh failed; reason above)"
  rootfs_s=$(vm_elapsed "$t0")
  vm_lock_cache
  vm_load_cache

  t0=$(vm_now)
  vm_log "building enclave-app for the VM (optimised, as tier 1)"
  tier2_build_enclave_app
  build_s=$(vm_elapsed "$t0")
  t0=$(vm_now)
  tier2_rpms
  rpm_s=$(vm_elapsed "$t0")
  vm_log "RPMs: $(cd "$TIER2_RPMS" && echo release1/*.rpm release2/*.rpm)"

  t0=$(vm_now)
  local run="$VM_RUN/tier2"
  mkdir -p "$run"
  tier2_payload "$run/payload"
  # The kernel unpacks concatenated cpio archives in order; the payload's files land over the
  # rootfs's. -mindepth 1: the payload must not carry a "." entry (it would set /'s mode).
  (cd "$run/payload" && find . -mindepth 1 | "$VM_BUSYBOX" cpio -o -H newc 2>/dev/null) >"$run/payload.cpio"
  cat "$TIER2_ROOTFS/rootfs.cpio" "$run/payload.cpio" >"$run/initrd.cpio.partial"
  mv "$run/initrd.cpio.partial" "$run/initrd.cpio"
  pack_s=$(vm_elapsed "$t0")

  t0=$(vm_now)
  local log="$run/console.log" status=0
  "$VM_DIR/boot.sh" --initrd "$run/initrd.cpio" --log "$log" --timeout "${VM_TIMEOUT:-420}" \
    --append "rdinit=/lib/systemd/systemd systemd.show_status=false" || status=$?
  vm_s=$(vm_elapsed "$t0")

  # Not the exit status alone: the checks' own summary must be there and agree with the PASS lines.
  local summary passes fails
  summary=$(grep -aE '^tier2: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1 || true)
  passes=$(grep -ac '^PASS ' "$log" || true)
  fails=$(grep -ac '^FAIL ' "$log" || true)
  vm_log "timings: rootfs ${rootfs_s}s, enclave-app build ${build_s}s, RPMs ${rpm_s}s, initramfs ${pack_s}s, VM ${vm_s}s, total $(vm_elapsed "$started")s"
  case $status in
    0) ;;
    124 | 125) vm_die "tier 2 failed: the VM did not complete (reason above); console log above and in $log" ;;
    *)
      grep -a '^FAIL ' "$log" >&2 || true
      vm_die "tier 2 failed inside the VM (status $status, $fails checks failed); console log above and in $log"
      ;;
  esac
  if [[ -z $summary || $summary != "tier2: $passes passed, 0 failed" || $fails != 0 || $passes -lt 50 ]]; then
    vm_die "the VM reported success but the checks' summary does not agree (summary '${summary:-none}', $passes PASS and $fails FAIL lines); console log: $log"
  fi
  vm_log "tier 2 passed: $passes checks under systemd as PID 1 (RPM, units, socket activation, sandbox)"
}

case $tier in
  tier1) run_tier1 ;;
  tier2) run_tier2 ;;
  *) vm_die "unknown tier $tier: use tier1 or tier2" ;;
esac
