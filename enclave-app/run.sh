#!/bin/sh
# Entry point of the enclave image (enclave-app/Dockerfile): the workshop's "secure local channel".
#   1. bring up lo with 127.0.0.1;
#   2. map REMOTE_HOST (ip-ranges.amazonaws.com) to 127.0.0.1 in /etc/hosts;
#   3. start the forwarder on 127.0.0.1:443 -> vsock CID 3 port 8001 (nitro-vsock-proxy on the parent);
#   4. wait until it listens (checked with ss; a probe connection would go through the proxy);
#   5. exec the server on vsock port 5005.
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
tries=0
until ss -Hltn "sport = :$FORWARDER_PORT" | grep -q .; do
  if ! kill -0 "$forwarder_pid" 2>/dev/null; then
    log "the forwarder exited before listening on $FORWARDER_IP:$FORWARDER_PORT; its error is above"
    exit 1
  fi
  tries=$((tries + 1))
  if [ "$tries" -gt "$READY_TIMEOUT_TENTHS" ]; then
    log "the forwarder is not listening on $FORWARDER_IP:$FORWARDER_PORT after $((READY_TIMEOUT_TENTHS / 10)) s"
    exit 1
  fi
  sleep 0.1
done
log "forwarder listening on $FORWARDER_IP:$FORWARDER_PORT (pid $forwarder_pid); starting the server on port $SERVER_PORT"

# 5. The server replaces this shell.
# shellcheck disable=SC2086 # SERVER_ARGS is a list of arguments, split on purpose
exec "$APP" server "$SERVER_PORT" $SERVER_ARGS
