# shellcheck shell=bash
# Shared by rpm-test.sh and deb-test.sh (sourced): the PASS/FAIL tally and the checks both
# packages get the same way.

passed=0
failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
# check WHAT COMMAND...: one PASS or FAIL line for the command's status.
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
# The closing "N passed, N failed" line; the status says whether everything passed.
summary() { echo "$passed passed, $failed failed"; [[ $failed -eq 0 ]]; }

# The package version: Cargo.toml's.
cargo_version() { sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1; }

# busybox_root DIR: DIR becomes a root whose only program is a static busybox as /bin/sh, so a
# package's scripts really run there (chrooted) and can touch nothing of the host.
busybox_root() {
  mkdir -p "$1/bin"
  cp /bin/busybox "$1/bin/busybox"
  ln -s busybox "$1/bin/sh"
}

# glibc_at_most FOUND MAX: FOUND is a version no higher than MAX (an empty FOUND is not).
# check_installed_binary BIN VERSION: the highest GLIBC symbol version BIN needs is at most 2.34
# (Amazon Linux 2023's glibc), and BIN runs and reports VERSION.
glibc_at_most() { [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n 1)" = "$2" ]; }
check_installed_binary() {
  local bin=$1 version=$2 max_glibc out
  max_glibc=$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
  check "highest GLIBC symbol version needed is ${max_glibc:-?} (<= 2.34 for Amazon Linux 2023)" \
    glibc_at_most "$max_glibc" 2.34
  out=$("$bin" --version 2>&1)
  check "installed binary runs: '$out'" [ "$out" = "nitro-vsock-proxy $version" ]
}
