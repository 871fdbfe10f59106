#!/usr/bin/env bash
# make rpm: builds the RPM (and source RPM) from this work tree into target/rpm/.
# Source0 is the work tree (files git tracks or would track), Source1 is `cargo vendor` of
# Cargo.lock (cached by the lock file's hash), so rpmbuild itself needs no network, as on a
# build host. On Debian, rpmbuild lacks the systemd macros and an RPM database holding the
# BuildRequires: we load packaging/rpm/debian-systemd.macros and pass --nodeps there only.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=nitro-vsock-proxy
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
TOP=$PWD/target/rpm
mkdir -p "$TOP"/{SOURCES,SPECS,BUILD,RPMS,SRPMS} target/rpm-vendor

# The files that go into Source0, and a hash of their names and contents: an unchanged tree
# reuses the RPMs already built from it (make test asks for the RPM more than once).
files=$TOP/source-files
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done >"$files"
source_hash=$(xargs -0 sha256sum <"$files" | sha256sum | cut -c1-16)
rpm=$TOP/RPMS/x86_64/$NAME-$VERSION-1.x86_64.rpm
if [[ -f $rpm && $(cat "$TOP/.source-hash" 2>/dev/null) == "$source_hash" ]]; then
  echo "build-rpm: sources unchanged since the last build ($source_hash): $rpm"
  exit 0
fi
rm -f "$TOP/.source-hash"

echo "build-rpm: source tarball $NAME-$VERSION.tar.gz"
tar --null -T "$files" --transform "s,^,$NAME-$VERSION/," -czf "$TOP/SOURCES/$NAME-$VERSION.tar.gz"

lock_hash=$(sha256sum Cargo.lock | cut -c1-16)
vendor_tar=target/rpm-vendor/vendor-$lock_hash.tar.gz
if [[ ! -f $vendor_tar ]]; then
  echo "build-rpm: vendoring crates for Cargo.lock $lock_hash"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cargo vendor --locked --quiet "$tmp/vendor" >/dev/null
  tar -C "$tmp" -czf "$vendor_tar.part" vendor
  mv "$vendor_tar.part" "$vendor_tar"
fi
cp "$vendor_tar" "$TOP/SOURCES/$NAME-$VERSION-vendor.tar.gz"

extra=()
if [[ $(rpm --eval '%{_unitdir}') == '%{_unitdir}' ]]; then
  extra+=(--load "$PWD/packaging/rpm/debian-systemd.macros" --nodeps)
fi
# The tests ran already (make test); %check runs on real build hosts.
rpmbuild -ba --nocheck --quiet \
  --define "_topdir $TOP" \
  "${extra[@]}" \
  packaging/rpm/$NAME.spec
echo "$source_hash" >"$TOP/.source-hash"
find "$TOP/RPMS" "$TOP/SRPMS" -name '*.rpm' -newer "$TOP/SOURCES/$NAME-$VERSION.tar.gz" -print
