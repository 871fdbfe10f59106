#!/bin/sh
# Entry point of the enclave image (enclave-app/Dockerfile): the workshop's "secure local channel".
#   1. bring up lo with 127.0.0.1;
#   2. map REMOTE_HOST (ip-ranges.amazonaws.com) to 127.0.0.1 in /etc/hosts;
#   3. start the forwarder on 127.0.0.1:443 -> vsock CID 3 port 8001 (nitro-vsock-proxy on the parent);
#   4. wait until it listens (checked with ss; a probe connection would go through the proxy);
#   5. exec the server on vsock port 5005.
# With EGRESS=1, steps 2-4 are transparent egress instead (README, "Enclave egress without code
# changes"): the nftables ruleset egress.nft, a non-loopback address and the routes via lo,
# resolv.conf naming the stub, and `enclave-app egress` (parent: the dns route on vsock 3:8053 and
# the connect route on 3:8010, or EGRESS_PARENT_DNS and EGRESS_CONNECT_VIA); the server then
# resolves and connects by name like any unmodified app.
# Every setting has a default for the enclave; the environment overrides them (make demo runs this
# script on stand-ins that way). FORWARDER_ARGS and SERVER_ARGS are extra arguments, split on spaces.
set -eu

APP=${ENCLAVE_APP:-/usr/local/bin/enclave-app}
REMOTE_HOST=${REMOTE_HOST:-ip-ranges.amazonaws.com}
HOSTS_FILE=${HOSTS_FILE:-/etc/hosts}
FORWARDER_IP=127.0.0.1
FORWARDER_PORT=${FORWARDER_PORT:-443}
PARENT_CID=${PARENT_CID:-3}
PROXY_PORT=${PROXY_PORT:-8001}
SERVER_PORT=${SERVER_PORT:-5005}
FORWARDER_ARGS=${FORWARDER_ARGS:-}
SERVER_ARGS=${SERVER_ARGS:-}
READY_TIMEOUT_TENTHS=${READY_TIMEOUT_TENTHS:-100}
EGRESS=${EGRESS:-0}
EGRESS_NFT=${EGRESS_NFT:-/usr/local/share/enclave-app/egress.nft}
FAKE_IP=${FAKE_IP:-198.18.0.0/15}
# The port egress.nft redirects to (the ruleset says so; change both together).
EGRESS_LISTEN_PORT=15001
RESOLV_CONF=${RESOLV_CONF:-/etc/resolv.conf}
EGRESS_PARENT_DNS=${EGRESS_PARENT_DNS:-vsock:$PARENT_CID:8053}
EGRESS_CONNECT_VIA=${EGRESS_CONNECT_VIA:-vsock:$PARENT_CID:8010}
EGRESS_ARGS=${EGRESS_ARGS:-}

log() { echo "run.sh: $*" >&2; }

# 1. Loopback. The address may be there already; lo may be up already (then changing it may be
#    refused, which is fine).
ip addr add 127.0.0.1/8 dev lo 2>/dev/null || true
if ! ip link set dev lo up 2>/dev/null; then
  if ! ip -o addr show dev lo | grep -q 'inet 127\.0\.0\.1/'; then
    log "cannot bring up lo with 127.0.0.1 (ip link set dev lo up failed)"
    exit 1
  fi
fi

# Waits until something listens on TCP port $1, started as pid $2 and named $3.
wait_listening() {
  tries=0
  until ss -Hltn "sport = :$1" | grep -q .; do
    if ! kill -0 "$2" 2>/dev/null; then
      log "$3 exited before listening on port $1; its error is above"
      exit 1
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt "$READY_TIMEOUT_TENTHS" ]; then
      log "$3 is not listening on port $1 after $((READY_TIMEOUT_TENTHS / 10)) s"
      exit 1
    fi
    sleep 0.1
  done
}

if [ "$EGRESS" = 1 ]; then
  # 2e. Every outbound TCP connection to a non-loopback address goes to the transparent listener;
  #     nothing else leaves. (The shipped ruleset redirects to port 15001.)
  if ! nft -f "$EGRESS_NFT"; then
    log "cannot apply $EGRESS_NFT with nft -f (is nftables installed, and is this root?)"
    exit 1
  fi
  # 3e. A non-loopback IPv4 address (getaddrinfo with AI_ADDRCONFIG answers nothing without one:
  #     the pool's network address, never handed out) and routes via lo with a source address
  #     (without it the kernel picks 0.0.0.0 and connections hang).
  ip address replace "${FAKE_IP%/*}/32" dev lo
  ip route replace "$FAKE_IP" dev lo src 127.0.0.1
  ip route replace default dev lo src 127.0.0.1
  echo 'nameserver 127.0.0.1' >"$RESOLV_CONF"
  # 4e. The DNS stub and the transparent listener.
  # shellcheck disable=SC2086 # EGRESS_ARGS is a list of arguments, split on purpose
  "$APP" egress --fake-ip "$FAKE_IP" --parent-dns "$EGRESS_PARENT_DNS" \
    --connect-via "$EGRESS_CONNECT_VIA" --listen "127.0.0.1:$EGRESS_LISTEN_PORT" $EGRESS_ARGS &
  egress_pid=$!
  wait_listening "$EGRESS_LISTEN_PORT" "$egress_pid" "enclave-app egress"
  log "egress listening (pid $egress_pid); starting the server on port $SERVER_PORT"
  # 5. The server replaces this shell.
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of arguments, split on purpose
  exec "$APP" server "$SERVER_PORT" $SERVER_ARGS
fi

# 2. The remote name resolves to the forwarder, once.
if ! awk -v host="$REMOTE_HOST" '
    $1 == "127.0.0.1" { for (i = 2; i <= NF; i++) if ($i == host) found = 1 }
    END { exit !found }' "$HOSTS_FILE" 2>/dev/null; then
  echo "127.0.0.1 $REMOTE_HOST" >>"$HOSTS_FILE"
fi
log "$REMOTE_HOST -> 127.0.0.1 in $HOSTS_FILE"

# 3. The forwarder.
# shellcheck disable=SC2086 # FORWARDER_ARGS is a list of arguments, split on purpose
"$APP" forwarder "$FORWARDER_IP" "$FORWARDER_PORT" "$PARENT_CID" "$PROXY_PORT" $FORWARDER_ARGS &
forwarder_pid=$!

# 4. Wait until it listens.
wait_listening "$FORWARDER_PORT" "$forwarder_pid" "the forwarder"
log "forwarder listening on $FORWARDER_IP:$FORWARDER_PORT (pid $forwarder_pid); starting the server on port $SERVER_PORT"

# 5. The server replaces this shell.
# shellcheck disable=SC2086 # SERVER_ARGS is a list of arguments, split on purpose
exec "$APP" server "$SERVER_PORT" $SERVER_ARGS
