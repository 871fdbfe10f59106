#!/usr/bin/env bash
# Checks the RPM that `make rpm` built (target/rpm/RPMS/x86_64/nitro-vsock-proxy-*.rpm):
#   - the spec's Version equals Cargo.toml's;
#   - `rpm -qlp` lists exactly the intended files;
#   - no path is shared with AWS's aws-nitro-enclaves-cli package;
#   - rpmlint reports no errors;
#   - the binary needs at most GLIBC_2.34 (Amazon Linux 2023's glibc);
#   - `rpm -i --root DIR --nodeps` installs it, the scriptlets do no harm, the installed binary runs;
#   - `rpm -e --root DIR` removes it and keeps an edited config as .rpmsave.
# Prints one line per check and a closing "N passed, N failed" line; exits non-zero on failure.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

# shellcheck source=tests/packaging/lib.sh
source tests/packaging/lib.sh

version=$(cargo_version)
rpm_file=target/rpm/RPMS/x86_64/nitro-vsock-proxy-$version-1.x86_64.rpm
[[ -f $rpm_file ]] || rpm_file=""
if [[ -z $rpm_file ]]; then
  echo "FAIL no RPM for version $version under target/rpm/RPMS/x86_64: run 'make rpm' first"
  echo "0 passed, 1 failed"
  exit 1
fi
echo "checking $rpm_file"

spec_version=$(sed -n 's/^Version: *//p' packaging/rpm/nitro-vsock-proxy.spec)
check "spec Version ($spec_version) equals Cargo.toml version ($version)" [ "$spec_version" = "$version" ]

expected_files=$(sort <<'LIST'
/etc/nitro-vsock-proxy
/etc/nitro-vsock-proxy/routes.yaml
/etc/nitro-vsock-proxy/vsock-proxy.yaml
/etc/sysconfig/nitro-vsock-proxy
/usr/bin/nitro-vsock-proxy
/usr/share/bash-completion/completions/nitro-vsock-proxy
/usr/share/fish/vendor_completions.d/nitro-vsock-proxy.fish
/usr/share/man/man8/nitro-vsock-proxy.8.gz
/usr/share/zsh/site-functions/_nitro-vsock-proxy
/usr/lib/systemd/system/nitro-vsock-proxy-routes.service
/usr/lib/systemd/system/nitro-vsock-proxy.service
/usr/lib/systemd/system/nitro-vsock-proxy.socket
/usr/lib/systemd/system/nitro-vsock-proxy@.service
/usr/share/doc/nitro-vsock-proxy
/usr/share/doc/nitro-vsock-proxy/README.md
/usr/share/doc/nitro-vsock-proxy/examples
/usr/share/doc/nitro-vsock-proxy/examples/egress.yaml
/usr/share/doc/nitro-vsock-proxy/examples/routes.us-east-1.yaml
/usr/share/doc/nitro-vsock-proxy/examples/workshop.env
/usr/share/doc/nitro-vsock-proxy/examples/workshop.yaml
/usr/share/licenses/nitro-vsock-proxy
/usr/share/licenses/nitro-vsock-proxy/LICENSE
LIST
)
expected=$expected_files
actual=$(rpm -qlp "$rpm_file" 2>/dev/null | sort)
if [[ "$actual" == "$expected" ]]; then
  pass "rpm -qlp lists exactly the intended files ($(wc -l <<<"$actual") paths)"
else
  fail "rpm -qlp differs from the intended list:"
  diff <(echo "$expected") <(echo "$actual") | sed 's/^/    /'
fi

# Paths of AWS's aws-nitro-enclaves-cli RPM on Amazon Linux 2023 that could collide with ours.
aws_paths=(
  /usr/bin/nitro-cli
  /usr/bin/vsock-proxy
  /usr/bin/nitro-enclaves-allocator
  /usr/lib/systemd/system/nitro-enclaves-allocator.service
  /usr/lib/systemd/system/nitro-enclaves-vsock-proxy.service
  /etc/nitro_enclaves
  /etc/nitro_enclaves/allocator.yaml
  /etc/nitro_enclaves/vsock-proxy.yaml
  /etc/profile.d/nitro-cli-env.sh
  /usr/share/nitro_enclaves
  /usr/share/nitro_enclaves/blobs
  /var/log/nitro_enclaves
  /run/nitro_enclaves
  /usr/lib/udev/rules.d/99-nitro_enclaves.rules
  /usr/share/doc/aws-nitro-enclaves-cli
  /usr/share/licenses/aws-nitro-enclaves-cli
)
shared=""
for p in "${aws_paths[@]}"; do
  if grep -qxF "$p" <<<"$actual"; then shared+=" $p"; fi
done
check "no path shared with aws-nitro-enclaves-cli${shared:+ (shared:$shared)}" [ -z "$shared" ]

lint=$(rpmlint -c packaging/rpm/rpmlint.toml "$rpm_file" 2>&1)
errors=$(grep -c ': E: ' <<<"$lint" || true)
if [[ $errors -eq 0 ]]; then
  pass "rpmlint: no errors ($(grep -c ': W: ' <<<"$lint" || true) warnings)"
else
  fail "rpmlint: $errors errors"
fi
grep -E ': (E|W): ' <<<"$lint" | sed 's/^/    /'

# A throwaway root with only a shell (static busybox), so the scriptlets really run there.
root=$(mktemp -d)
trap 'rm -rf "$root" "$root.err"' EXIT
busybox_root "$root"
mkdir -p "$root/var/lib/rpm"
rpmroot=(--root "$root" --dbpath /var/lib/rpm --nodeps --noplugins)
rpm --root "$root" --dbpath /var/lib/rpm --initdb
# Debian's rpm wrapper prints a note about alien on every call: not ours to report.
strip_notes() { grep -v -e 'use Alien instead' -e 'assuming you know what you are doing' -e 'saved as .*\.rpmsave' "$1"; }
if rpm -i "${rpmroot[@]}" "$rpm_file" 2>"$root.err" && [ -z "$(strip_notes "$root.err")" ]; then
  pass "rpm -i --root installs it; scriptlets run and succeed silently"
else
  fail "rpm -i --root: $(strip_notes "$root.err")"
fi

bin="$root/usr/bin/nitro-vsock-proxy"
check_installed_binary "$bin" "$version"

check "no stray files outside the package's paths" \
  [ -z "$(cd "$root" && find . -path ./var/lib/rpm -prune -o -path ./bin -prune -o -type f -print | sed 's,^\.,,' | grep -vxF -f <(echo "$actual"))" ]

conf=/etc/nitro-vsock-proxy/vsock-proxy.yaml
echo "# edited by the operator" >>"$root$conf"
if rpm -e "${rpmroot[@]}" nitro-vsock-proxy 2>"$root.err" && [ -z "$(strip_notes "$root.err")" ]; then
  pass "rpm -e --root removes it; scriptlets succeed silently"
else
  fail "rpm -e --root: $(strip_notes "$root.err")"
fi
check "the edited $conf is kept as .rpmsave" [ -f "$root$conf.rpmsave" ]
check "the binary is gone after rpm -e" [ ! -e "$bin" ]

summary
