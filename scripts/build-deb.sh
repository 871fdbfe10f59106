#!/usr/bin/env bash
# make deb: builds target/deb/nitro-vsock-proxy_VERSION-1_amd64.deb for Debian/Ubuntu parents,
# with dpkg-deb from a staged tree (no extra tool): the release binary, the systemd units in
# /lib/systemd/system, the configurations in /etc/nitro-vsock-proxy as conffiles, and maintainer
# scripts (packaging/deb/) that behave like the RPM's scriptlets.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=nitro-vsock-proxy
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
OUT=target/deb
STAGE=$OUT/stage
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN"

CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --quiet -p "$NAME" --bin "$NAME"
bin=target/release/$NAME
# The man page and the shell completions, from the same clap definitions as --help.
cargo run --release --locked --quiet -p "$NAME" --example gen-docs -- target/docs

install -D -m 0755 "$bin" "$STAGE/usr/bin/$NAME"
install -d -m 0755 "$STAGE/lib/systemd/system"
install -m 0644 systemd/$NAME.service systemd/$NAME@.service systemd/$NAME.socket \
  systemd/$NAME-routes.service "$STAGE/lib/systemd/system/"
install -d -m 0755 "$STAGE/etc/$NAME"
install -m 0644 config/vsock-proxy.yaml "$STAGE/etc/$NAME/vsock-proxy.yaml"
install -m 0644 config/routes.yaml "$STAGE/etc/$NAME/routes.yaml"
# Only files an operator is meant to edit live in /etc: the examples go with the documentation.
install -D -m 0644 config/workshop.env "$STAGE/usr/share/doc/$NAME/examples/workshop.env"
install -D -m 0644 config/your-vsock-proxy.yaml "$STAGE/usr/share/doc/$NAME/examples/workshop.yaml"
install -D -m 0644 config/routes.example.yaml "$STAGE/usr/share/doc/$NAME/examples/routes.us-east-1.yaml"
install -D -m 0644 config/egress.example.yaml "$STAGE/usr/share/doc/$NAME/examples/egress.yaml"
install -d -m 0755 "$STAGE/usr/share/man/man8"
gzip -9n -c target/docs/$NAME.8 >"$STAGE/usr/share/man/man8/$NAME.8.gz"
install -D -m 0644 target/docs/$NAME.bash "$STAGE/usr/share/bash-completion/completions/$NAME"
install -D -m 0644 target/docs/_$NAME "$STAGE/usr/share/zsh/vendor-completions/_$NAME"
install -D -m 0644 target/docs/$NAME.fish "$STAGE/usr/share/fish/vendor_completions.d/$NAME.fish"
install -d -m 0755 "$STAGE/usr/share/doc/$NAME"
gzip -9n -c README.md >"$STAGE/usr/share/doc/$NAME/README.md.gz"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: $NAME"
  echo
  echo "Files: *"
  echo "Copyright: 2026 nitro-vsock-proxy developers"
  echo "License: Apache-2.0"
  echo " On Debian systems, the full text of the Apache License 2.0 can be found in"
  echo " /usr/share/common-licenses/Apache-2.0."
} >"$STAGE/usr/share/doc/$NAME/copyright"
printf '%s (%s-1) unstable; urgency=medium\n\n  * First package: the daemon, its systemd units and default allowlists.\n\n -- nitro-vsock-proxy developers <nitro-vsock-proxy@users.noreply.github.com>  Thu, 26 Nov 2026 12:00:00 +0000\n' \
  "$NAME" "$VERSION" | gzip -9n >"$STAGE/usr/share/doc/$NAME/changelog.Debian.gz"

install -D -m 0644 packaging/deb/lintian-overrides "$STAGE/usr/share/lintian/overrides/$NAME"

# Dependencies from what the binary links: glibc at the highest symbol version it uses.
glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
depends="libc6 (>= $glibc), libgcc-s1"
if objdump -p "$bin" | grep -q 'NEEDED.*libsystemd'; then
  depends+=", libsystemd0"
fi
sed -e "s/@VERSION@/$VERSION/" -e "s/@DEPENDS@/$depends/" packaging/deb/control.in >"$STAGE/DEBIAN/control"
echo "Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)" >>"$STAGE/DEBIAN/control"
(cd "$STAGE" && find etc -type f | sed 's,^,/,' | sort) >"$STAGE/DEBIAN/conffiles"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$STAGE/DEBIAN/"
(cd "$STAGE" && find usr lib -type f -exec md5sum {} + | sort -k 2) >"$STAGE/DEBIAN/md5sums"

deb=$OUT/${NAME}_${VERSION}-1_amd64.deb
dpkg-deb --root-owner-group --build "$STAGE" "$deb" >/dev/null
echo "$deb"
