#!/usr/bin/env bash
# Installs the Debian packages that building and testing nitro-vsock-proxy need, if missing.
#   libsystemd-dev, pkg-config: the `systemd` crate links libsystemd
#   iproute2: integration tests run in private network namespaces and add addresses to `lo`
#   python3: the demo's local HTTPS stand-in is plain Python (no packages)
set -euo pipefail
needed=(libsystemd-dev pkg-config iproute2 util-linux)
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
