#!/usr/bin/env bash
# make demo: the AWS Nitro Enclaves workshop's "secure local channel", end to end on this machine.
#
#   client --> server --HTTPS--> forwarder --> nitro-vsock-proxy --> ip-ranges.amazonaws.com:443
#   (parent)   (enclave)         (enclave)     (parent)             (HTTPS stand-in, or the real one)
#
# vsock is replaced by unix sockets (--stand-in); the enclave side is started by the image's own
# entry point, enclave-app/run.sh. Offline (the default), everything runs in a private network
# namespace: ip-ranges.amazonaws.com is a local HTTPS stand-in on 192.0.2.10:443 serving the
# bundled sample (enclave-app/testdata/ip-ranges.sample.json) with a certificate made at run time,
# and the proxy finds it through its allowlist (config/your-vsock-proxy.yaml) and DNS (a private
# /etc/hosts, bind-mounted in a private mount namespace, maps the name to 192.0.2.10).
# ONLINE=1 uses the real endpoint over the machine's own network and DNS instead.
#
# It prints the S3 prefixes of us-east-1 (QUERY=... for another region) and stops everything it
# started, on success or failure: all of it runs in a private PID namespace that ends with it.
set -euo pipefail
cd "$(dirname "$0")/.."

APP=target/debug/enclave-app
PROXY=target/debug/nitro-vsock-proxy
QUERY=${QUERY:-us-east-1}
ONLINE=${ONLINE:-}

if [[ "${1:-}" != "--inside" ]]; then
  echo "== building nitro-vsock-proxy and enclave-app"
  cargo build --quiet -p nitro-vsock-proxy -p enclave-app
  flags=(--pid --fork --kill-child --mount --mount-proc)
  if [[ "$ONLINE" != 1 ]]; then
    flags+=(--net)
  fi
  if [[ $(id -u) -ne 0 ]]; then
    flags+=(--map-root-user)
  fi
  if ! unshare "${flags[@]}" true 2>/dev/null; then
    echo "make demo: cannot create private namespaces (unshare ${flags[*]})." >&2
    echo "Run it as root, or enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)." >&2
    exit 1
  fi
  exec unshare "${flags[@]}" -- "$0" --inside
fi

# ---- inside the private namespaces ----
WORK=$(mktemp -d)
PIDS=()
NAMES=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((status != 0)); then
    echo "== make demo FAILED; the logs:" >&2
    for name in "${NAMES[@]}"; do
      echo "---- $name" >&2
      cat "$WORK/$name.log" >&2 || true
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME COMMAND...: runs COMMAND in the background, its output in $WORK/NAME.log.
start() {
  local name=$1
  shift
  NAMES+=("$name")
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

# wait_for WHAT TEST...: polls TEST for up to 10 s while the last started process is alive.
wait_for() {
  local what=$1 pid=${PIDS[-1]}
  shift
  for _ in $(seq 100); do
    if "$@"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "make demo: $what exited before it was ready" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "make demo: $what not ready after 10 s" >&2
  return 1
}

free_port() {
  local port
  for port in $(seq 18443 18543); do
    if ! ss -Hltn "sport = :$port" | grep -q .; then
      echo "$port"
      return 0
    fi
  done
  echo "make demo: no free TCP port in 18443-18543" >&2
  return 1
}

SERVER_ARGS="--stand-in unix:$WORK/server.sock"
if [[ "$ONLINE" != 1 ]]; then
  echo "== offline: private network namespace; ip-ranges.amazonaws.com is a stand-in on 192.0.2.10:443"
  ip link set lo up
  ip addr add 192.0.2.10/32 dev lo
  # The proxy's DNS: /etc/hosts (read because no --nameserver is given) names the stand-in. It
  # names an IPv6 address too (nothing listens there; IPv4 is tried first): with only an A
  # record there, the resolver would ask the (absent) DNS server for AAAA and wait it out.
  printf '127.0.0.1 localhost\n192.0.2.10 ip-ranges.amazonaws.com\n2001:db8::10 ip-ranges.amazonaws.com\n' >"$WORK/hosts"
  mount --bind "$WORK/hosts" /etc/hosts
  if [[ -e /etc/resolv.conf ]]; then
    # Nothing answers DNS in this namespace; say so plainly rather than inherit the host's servers.
    echo 'nameserver 127.0.0.1' >"$WORK/resolv.conf"
    mount --bind "$WORK/resolv.conf" /etc/resolv.conf
  fi
  start https-stand-in "$APP" demo-https --listen 192.0.2.10:443 --name ip-ranges.amazonaws.com \
    --document enclave-app/testdata/ip-ranges.sample.json --ca-out "$WORK/ca.pem"
  wait_for "the HTTPS stand-in" test -s "$WORK/ca.pem"
  FORWARDER_PORT=443
  SERVER_ARGS+=" --ca-file $WORK/ca.pem"
else
  echo "== online: the real https://ip-ranges.amazonaws.com through this machine's network"
  FORWARDER_PORT=$(free_port)
fi
# In the enclave /etc/hosts sends the name to the forwarder; here the server is pinned to it.
SERVER_ARGS+=" --connect-to 127.0.0.1:$FORWARDER_PORT"

echo "== parent: $PROXY unix:proxy.sock ip-ranges.amazonaws.com 443 --config config/your-vsock-proxy.yaml"
start nitro-vsock-proxy "$PROXY" "unix:$WORK/proxy.sock" ip-ranges.amazonaws.com 443 \
  --config config/your-vsock-proxy.yaml
wait_for "nitro-vsock-proxy" test -S "$WORK/proxy.sock"

echo "== enclave: enclave-app/run.sh (forwarder 127.0.0.1:$FORWARDER_PORT -> proxy, then server)"
start enclave env ENCLAVE_APP="$APP" HOSTS_FILE="$WORK/enclave-hosts" \
  FORWARDER_PORT="$FORWARDER_PORT" FORWARDER_ARGS="--stand-in unix:$WORK/proxy.sock" \
  SERVER_ARGS="$SERVER_ARGS" enclave-app/run.sh
wait_for "the enclave (run.sh)" test -S "$WORK/server.sock"

echo "== parent: enclave-app client \$ENCLAVE_CID 5005 $QUERY"
echo "S3 prefixes of $QUERY:"
"$APP" client 16 5005 "$QUERY" --stand-in "unix:$WORK/server.sock"

echo "== what each piece logged:"
for name in "${NAMES[@]}"; do
  echo "---- $name"
  cat "$WORK/$name.log"
done
echo "make demo: done"
