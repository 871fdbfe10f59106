#!/usr/bin/env bash
# Installs the Debian packages that building and testing nitro-vsock-proxy need, if missing.
#   libsystemd-dev, pkg-config: the `systemd` crate links libsystemd
#   iproute2: integration tests run in private network namespaces and add addresses to `lo`
#   util-linux: make demo runs the workshop chain in private namespaces (unshare, mount)
#   ShellCheck: enclave-app's tests lint enclave-app/run.sh and scripts/demo.sh (Docker cannot
#               run here, so the image's entry point is checked statically and run by make demo)
#   systemd: tests/units.rs runs systemd-analyze (verify, security) on systemd/*, and
#            tests/socket_activation.rs runs systemd-socket-activate; a full Debian 12 has it,
#            minimal images do not
#   rpm, rpmlint: make rpm builds the Amazon Linux 2023 RPM with rpmbuild; its test lints it
#   busybox-static: the RPM test installs into a throwaway root whose only shell is busybox;
#                   the VM tests boot an initramfs built around it
#   lintian: the .deb's test lints it
#   debootstrap: the VM tests' tier 2 (systemd as PID 1) builds its Debian 12 root filesystem
#                with it, once, into target/vm-cache/ (tests/vm/rootfs.sh)
#   binutils: objdump, to check the glibc symbol versions the binary needs
#   python3-prometheus-client: tests/operate.rs parses /metrics with Prometheus' own
#                              OpenMetrics parser (/usr/bin/python3)
#   prometheus: tests/metrics_format.rs checks a scrape with `promtool check metrics` (only
#               promtool is used; the server it also installs is not run)
#   curl, openssl: tests/dynamic_routes.rs drives the CONNECT route with `curl -x` and the SNI
#                  routes with `openssl s_client`, real clients of each protocol;
#                  enclave-app/tests/egress.rs runs both (and python3's urllib, which
#                  python3-prometheus-client brings) unmodified in an "enclave" namespace
#   bind9-dnsutils: tests/dns_route.rs asks the dns route with `dig +tcp`, a real DNS client;
#                   enclave-app/tests/egress.rs asks the egress DNS stub with dig
#   nftables: tests/keepalive.rs makes an upstream silent (drops its packets) with `nft`, inside
#             the test's own network namespace; enclave-app/tests/egress.rs applies
#             enclave-app/egress.nft in its "enclave" namespace
#   socat: make bench measures an ingress route against the socat TCP-LISTEN,fork hop it
#          replaces
set -euo pipefail
needed=(libsystemd-dev pkg-config iproute2 util-linux systemd shellcheck rpm rpmlint busybox-static binutils lintian debootstrap curl openssl python3-prometheus-client prometheus nftables bind9-dnsutils socat)
# `install-deps.sh demo` (make demo): only what building and running the demo takes — the
# libsystemd link, `ip` and `unshare`/`mount` for its private namespaces.
if [[ ${1:-} == demo ]]; then
  needed=(libsystemd-dev pkg-config iproute2 util-linux)
fi
missing=()
for pkg in "${needed[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "install-deps: installing missing Debian packages: ${missing[*]}"
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
