#!/usr/bin/env bash
# make demo: the proxy end to end on this machine, with stand-ins for what only EC2 has.
#   - the enclave's vsock connection  -> a TCP stand-in listener (tcp:127.0.0.1:PORT)
#   - the remote endpoint             -> a local HTTP server on 127.0.0.1 serving a sample document
# It fetches the document through the proxy (allowed by an explicit IP entry), then shows a
# refusal: a proxy whose REMOTE_ADDR is not allowlisted does not start (exit 2).
# Everything it starts is stopped on exit, on success or failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --bin nitro-vsock-proxy
BIN=target/debug/nitro-vsock-proxy
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port)
PROXY_PORT=$(free_port)

mkdir -p "$WORK/www"
cat > "$WORK/www/ip-ranges.json" <<'JSON'
{"syncToken": "0", "prefixes": [{"ip_prefix": "3.5.0.0/19", "region": "us-east-1", "service": "S3"}]}
JSON
python3 -m http.server "$UP_PORT" --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/http.log" 2>&1 &
PIDS+=($!)

cat > "$WORK/allowlist.yaml" <<YAML
allowlist:
  - {address: 127.0.0.1, port: $UP_PORT}
YAML
echo "== allowlist:"; cat "$WORK/allowlist.yaml"

echo "== starting: $BIN tcp:127.0.0.1:$PROXY_PORT 127.0.0.1 $UP_PORT --config allowlist.yaml"
"$BIN" "tcp:127.0.0.1:$PROXY_PORT" 127.0.0.1 "$UP_PORT" --config "$WORK/allowlist.yaml" 2>"$WORK/proxy.log" &
PIDS+=($!)
for _ in $(seq 50); do
  grep -q listening "$WORK/proxy.log" && break
  sleep 0.1
done

echo "== fetching http://127.0.0.1:$PROXY_PORT/ip-ranges.json through the proxy:"
python3 - "$PROXY_PORT" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ip-ranges.json", timeout=10) as r:
    print(r.read().decode().strip())
PY

echo "== a REMOTE_ADDR that is not allowlisted is refused at start-up:"
set +e
"$BIN" "tcp:127.0.0.1:$(free_port)" 169.254.169.254 80 --config "$WORK/allowlist.yaml"
echo "exit status: $?"
set -e

echo "== proxy log:"
cat "$WORK/proxy.log"
