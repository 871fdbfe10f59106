#!/usr/bin/env bash
# Checks the .deb that `make deb` built (target/deb/nitro-vsock-proxy_VERSION-1_amd64.deb), the
# same way as the RPM: exact file list, no path shared with AWS's package, lintian without
# errors, glibc <= 2.34, install and purge in a throwaway root whose maintainer scripts really
# run (busybox shell), an edited conffile kept on remove.
# Prints one line per check and a closing "N passed, N failed" line; exits non-zero on failure.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

# shellcheck source=tests/packaging/lib.sh
source tests/packaging/lib.sh

version=$(cargo_version)
deb=target/deb/nitro-vsock-proxy_${version}-1_amd64.deb
if [[ ! -f $deb ]]; then
  echo "FAIL no $deb: run 'make deb' first"
  echo "0 passed, 1 failed"
  exit 1
fi
echo "checking $deb"

expected=$(sort <<'LIST'
/etc/nitro-vsock-proxy/routes.yaml
/etc/nitro-vsock-proxy/vsock-proxy.yaml
/lib/systemd/system/nitro-vsock-proxy-routes.service
/lib/systemd/system/nitro-vsock-proxy.service
/lib/systemd/system/nitro-vsock-proxy.socket
/lib/systemd/system/nitro-vsock-proxy@.service
/usr/bin/nitro-vsock-proxy
/usr/share/bash-completion/completions/nitro-vsock-proxy
/usr/share/fish/vendor_completions.d/nitro-vsock-proxy.fish
/usr/share/man/man8/nitro-vsock-proxy.8.gz
/usr/share/zsh/vendor-completions/_nitro-vsock-proxy
/usr/share/doc/nitro-vsock-proxy/README.md.gz
/usr/share/doc/nitro-vsock-proxy/changelog.Debian.gz
/usr/share/doc/nitro-vsock-proxy/copyright
/usr/share/doc/nitro-vsock-proxy/examples/egress.yaml
/usr/share/doc/nitro-vsock-proxy/examples/routes.us-east-1.yaml
/usr/share/doc/nitro-vsock-proxy/examples/workshop.env
/usr/share/doc/nitro-vsock-proxy/examples/workshop.yaml
/usr/share/lintian/overrides/nitro-vsock-proxy
LIST
)
actual=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sed 's,^\.,,' | sort)
if [[ "$actual" == "$expected" ]]; then
  pass "dpkg-deb -c lists exactly the intended files ($(wc -l <<<"$actual"))"
else
  fail "dpkg-deb -c differs from the intended list:"
  diff <(echo "$expected") <(echo "$actual") | sed 's/^/    /'
fi

for p in /usr/bin/vsock-proxy /usr/bin/nitro-cli /etc/nitro_enclaves/vsock-proxy.yaml \
  /lib/systemd/system/nitro-enclaves-vsock-proxy.service /usr/lib/systemd/system/nitro-enclaves-vsock-proxy.service; do
  if grep -qxF "$p" <<<"$actual"; then fail "shares $p with AWS's package"; fi
done
pass "no path shared with aws-nitro-enclaves-cli's"

lint=$(lintian "$deb" 2>&1 | grep -v 'running with root privileges')
errors=$(grep -c '^E: ' <<<"$lint" || true)
check "lintian: no errors ($(grep -c '^W: ' <<<"$lint" || true) warnings, explained in packaging/deb/README.md)" [ "$errors" -eq 0 ]
grep -E '^(E|W): ' <<<"$lint" | sed 's/^/    /'

root=$(mktemp -d)
trap 'rm -rf "$root" "$root.err"' EXIT
busybox_root "$root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
touch "$root/var/lib/dpkg/status"
dpkgroot=(--root="$root" --force-depends --log=/dev/null)
if dpkg "${dpkgroot[@]}" -i "$deb" >/dev/null 2>"$root.err"; then
  pass "dpkg -i into a throwaway root; maintainer scripts succeed"
else
  fail "dpkg -i: $(cat "$root.err")"
fi

bin="$root/usr/bin/nitro-vsock-proxy"
check_installed_binary "$bin" "$version"

echo "# edited by the operator" >>"$root/etc/nitro-vsock-proxy/vsock-proxy.yaml"
if dpkg "${dpkgroot[@]}" -r nitro-vsock-proxy >/dev/null 2>"$root.err"; then
  pass "dpkg -r removes it; maintainer scripts succeed"
else
  fail "dpkg -r: $(cat "$root.err")"
fi
check "the binary is gone after dpkg -r" [ ! -e "$bin" ]
check "the edited conffile stays after dpkg -r (removed only on purge)" \
  grep -q "edited by the operator" "$root/etc/nitro-vsock-proxy/vsock-proxy.yaml"
dpkg "${dpkgroot[@]}" -P nitro-vsock-proxy >/dev/null 2>&1
check "dpkg -P purges the configuration" [ ! -e "$root/etc/nitro-vsock-proxy/vsock-proxy.yaml" ]

summary
