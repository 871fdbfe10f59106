#!/bin/bash
# The tier-2 checks: run inside the VM, as root, by nvp-tier2.service once systemd (PID 1) has
# reached multi-user.target. See tests/vm/README.md, "Tier 2". Everything here is VM-internal:
# vsock goes to CID 1 (the VM's own loopback transport), TCP to addresses on the VM's lo.
#
#   package    rpm -i of the release-1 RPM (the one `make rpm` builds), as on Amazon Linux 2023
#   workshop   systemctl enable --now nitro-vsock-proxy@workshop (the examples copied into /etc);
#              the enclave-app chain over vsock gets its answer; sandbox facts of the process
#   reload     DNS re-pointed at a loopback address: denied (WARN in journalctl -u, and found by
#              journalctl -u ... NVP_REASON=denied); the allowlist edited + systemctl reload:
#              allowed; an invalid edit: systemctl reload fails, the daemon keeps its PID and the
#              previous allowlist; the stock file again + reload: denied again
#   sandbox    no permission errors in the journal; a soft open-file limit raised under
#              ~@resources (second instance with a drop-in); the watchdog fed, no restart
#   stop       systemctl stop while a connection is open: new ones refused, the open one
#              finishes, the unit ends inactive with Result=success
#   routes     nitro-vsock-proxy-routes.service with a routes.yaml of two routes: traffic on both
#              over vsock, each to its own upstream; systemctl reload adds a third; a reload with
#              a route the allowlist does not allow fails and changes nothing; stop
#   migration  a second unit holding vsock port 8000 when the default service starts: the bind
#              message in systemctl status and the journal; retries end at the start limit
#   socket     the shipped nitro-vsock-proxy.socket + .service, unchanged: the first connection
#              starts the service (region from a stand-in IMDS at 169.254.169.254), is served
#   upgrade    rpm -U to release 2 restarts the running instance and the default service;
#              traffic flows; the operator's edit survives
#   erase      rpm -e stops and removes everything, the edited config kept as .rpmsave
#
# Prints one PASS/FAIL line per check and `tier2: N passed, M failed`; exits 1 if any failed (and
# then prints the units' status and journals). Checks never skip: a missing prerequisite makes
# the checks that need it fail.
#
# Conditions written `check "what" eval '...'` are single-quoted on purpose: check evaluates them.
# shellcheck disable=SC2016
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export SYSTEMD_PAGER="" SYSTEMD_COLORS=0

W=/run/nvp-tier2
APP=/usr/local/bin/enclave-app
DOC=/vm/tier2/ip-ranges.sample.json
INSTANCE=nitro-vsock-proxy@workshop.service
DEFAULT=nitro-vsock-proxy.service
SOCKET=nitro-vsock-proxy.socket
CONF=/etc/nitro-vsock-proxy/workshop.yaml
RPM1=$(find /vm/rpm/release1 -name '*.rpm' 2>/dev/null | head -n 1)
RPM2=$(find /vm/rpm/release2 -name '*.rpm' 2>/dev/null | head -n 1)
mkdir -p "$W"
cd "$W" || exit 1

passed=0
failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
# check DESCRIPTION COMMAND...: one PASS or FAIL line.
check() {
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
section() { printf '\n== %s (VM up %ss)\n' "$*" "$(cut -d. -f1 /proc/uptime)"; }
note() { echo "   $*"; }

# wait_for SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds or SECONDS pass.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS >= deadline)) && return 1
    sleep 0.2
  done
}
prop() { systemctl show -p "$2" --value "$1"; }
state_is() { [[ $(prop "$1" ActiveState) == "$2" ]]; }
# jlog UNIT [journalctl options]: the unit's messages, text only.
jlog() { journalctl -q --no-pager -o cat -u "$1" "${@:2}"; }
# jcount UNIT REGEX [journalctl options]: how many of the unit's messages match.
jcount() { jlog "$1" "${@:3}" | grep -Ec -- "$2"; }
# has_logged UNIT REGEX N [journalctl options]: the unit has at least N messages matching.
has_logged() {
  local unit=$1 re=$2 n=$3
  shift 3
  (($(jcount "$unit" "$re" "$@") >= n))
}
# wait_log SECONDS UNIT REGEX N [journalctl options]: until has_logged.
wait_log() {
  local seconds=$1
  shift
  wait_for "$seconds" has_logged "$@"
}
strip_rpm_notes() { grep -v -e 'use Alien instead' -e 'assuming you know what you are doing' -e 'saved as .*\.rpmsave' "$1"; }

# ask NAME PORT: the parent's query (enclave-app client) to the enclave server on vsock 1:PORT;
# reply in NAME.out, errors in NAME.err; the client's exit status.
ask() {
  timeout 60 "$APP" client 1 "$2" us-east-1 >"$W/$1.out" 2>"$W/$1.err"
}
# The S3 prefixes of us-east-1 from the bundled document: two of them, and neither its EC2 nor
# its S3_EXPRESS prefix.
good_reply() {
  grep -q '3\.5\.0\.0/19' "$W/$1.out" && grep -q '52\.92\.16\.0/20' "$W/$1.out" &&
    ! grep -q -e '3\.208\.0\.0/12' -e '15\.193\.6\.0' "$W/$1.out"
}
answered() {
  ask "$1" "$2" && good_reply "$1"
}
refused_reply() {
  local rc=0
  ask "$1" "$2" || rc=$?
  ((rc == 1)) && grep -q error "$W/$1.out" "$W/$1.err"
}
resolves_to() { [[ $(getent ahostsv4 "$1" | awk 'NR == 1 { print $1 }') == "$2" ]]; }
# set_dns NAME=ADDR...: the test DNS server's answers (nvp-dns.service), in effect on return.
set_dns() {
  local pair
  : >"$W/dns-hosts.new"
  for pair in "$@"; do echo "${pair#*=} ${pair%%=*}" >>"$W/dns-hosts.new"; done
  mv "$W/dns-hosts.new" "$W/dns-hosts"
  systemctl reload nvp-dns.service 2>/dev/null || true
  for pair in "$@"; do
    wait_for 10 resolves_to "${pair%%=*}" "${pair#*=}" || return 1
  done
}
tcp_listening() { ss -Hltn | awk -v a="$1" '$4 == a { found = 1 } END { exit !found }'; }
vsock_listening() { ss -H --vsock -l 2>/dev/null | grep -q ":$1\b"; }
pid_of() { prop "$1" MainPID; }
count_processes() { pgrep -c -x nitro-vsock-pro || true; }

# The hardening systemd applied to a running process (the unit's own settings, in effect).
sandbox_facts() { # UNIT
  local pid status
  pid=$(pid_of "$1")
  if ! [[ $pid =~ ^[1-9][0-9]*$ ]]; then
    fail "$1 has a main process whose sandbox can be inspected (MainPID=$pid)"
    return
  fi
  status=$(cat "/proc/$pid/status")
  local uid capeff nnp seccomp
  uid=$(awk '/^Uid:/ { print $2 }' <<<"$status")
  capeff=$(awk '/^CapEff:/ { print $2 }' <<<"$status")
  nnp=$(awk '/^NoNewPrivs:/ { print $2 }' <<<"$status")
  seccomp=$(awk '/^Seccomp:/ { print $2 }' <<<"$status")
  note "$1: pid $pid uid $uid CapEff $capeff NoNewPrivs $nnp Seccomp $seccomp"
  check "$1 runs as a dynamic user (uid $uid, not root)" [ "$uid" != 0 ]
  check "$1 has no effective capabilities" [ "$capeff" = 0000000000000000 ]
  check "$1 runs with NoNewPrivileges and a seccomp filter (SystemCallFilter)" \
    eval '[ "$nnp" = 1 ] && [ "$seccomp" = 2 ]'
  check "$1 runs in its own user namespace (PrivateUsers=yes)" \
    [ "$(readlink "/proc/$pid/ns/user")" != "$(readlink /proc/1/ns/user)" ]
  check "$1 sees /proc with subset=pid and hidepid=invisible (ProcSubset=pid, ProtectProc=invisible)" \
    eval 'grep " /proc " "/proc/$pid/mountinfo" | grep "subset=pid" | grep -q "hidepid=invisible"'
  check "$1 has a read-only / (ProtectSystem=strict)" \
    awk '$5 == "/" { split($6, o, ","); if (o[1] == "ro") found = 1 } END { exit !found }' "/proc/$pid/mountinfo"
}

dump_diagnostics() {
  section "diagnostics (some check failed)"
  systemctl --no-pager --failed
  systemctl --no-pager status 'nitro-vsock-proxy*' 'nvp-*' 2>&1 | head -n 120
  local u
  for u in "$INSTANCE" "$DEFAULT" "$SOCKET" nvp-enclave.service nvp-enclave-kms.service \
    nvp-https.service nvp-loopback.service nvp-dns.service nvp-slow.service \
    nitro-vsock-proxy-routes.service; do
    echo "---- journalctl -u $u"
    jlog "$u" -o short-monotonic | tail -n 60
  done
  echo "---- /run/nvp-tier2/imds.log"
  cat "$W/imds.log" 2>/dev/null
  echo "---- journal warnings and errors"
  journalctl -q --no-pager -b -p warning | tail -n 60
}

# ---------------------------------------------------------------------------------------------
section "the VM"
note "kernel $(uname -r); $(systemctl --version | head -n 1); system: $(systemctl is-system-running)"
check "systemd is PID 1" [ "$(cat /proc/1/comm)" = systemd ]
check "systemd-modules-load loaded vsock_loopback (modules-load.d)" [ -d /sys/module/vsock_loopback ]
check "the release-1 and release-2 RPMs are in the VM" eval '[ -f "$RPM1" ] && [ -f "$RPM2" ]'

# Test addresses on lo: the HTTPS stand-in (192.0.2.10, TEST-NET-1), a slow upstream for the
# drain check (192.0.2.30), the instance metadata service's own address (the VM has no other
# network, so nothing leaves it). 127.0.0.10 is loopback already.
for a in 192.0.2.10 192.0.2.30 169.254.169.254; do ip addr add "$a/32" dev lo; done
echo "nameserver 127.0.0.1" >/etc/resolv.conf
systemctl start nvp-dns.service
check "the test DNS server answers ip-ranges.amazonaws.com = 192.0.2.10" \
  set_dns ip-ranges.amazonaws.com=192.0.2.10 kms.us-east-1.amazonaws.com=192.0.2.10

# The HTTPS stand-in for both names on 192.0.2.10:443, with a certificate from a CA made at
# start; and 127.0.0.10:443 relayed to it (what a DNS answer of 127.0.0.10 reaches, the reload
# checks).
systemd-run --quiet --collect --unit=nvp-https "$APP" demo-https --listen 192.0.2.10:443 \
  --name ip-ranges.amazonaws.com --name kms.us-east-1.amazonaws.com \
  --document "$DOC" --ca-out "$W/ca.pem"
systemd-run --quiet --collect --unit=nvp-loopback socat TCP-LISTEN:443,bind=127.0.0.10,reuseaddr,fork \
  TCP:192.0.2.10:443
check "the HTTPS stand-in is listening (enclave-app demo-https)" wait_for 20 test -s "$W/ca.pem"
check "127.0.0.10:443 relays to it" wait_for 10 tcp_listening 127.0.0.10:443

# ---------------------------------------------------------------------------------------------
section "package: rpm -i of the release-1 RPM"
note "installing $RPM1"
rpm --initdb
rc=0
rpm -i --nodeps "$RPM1" 2>"$W/rpm-i.err" || rc=$?
check "rpm -i --nodeps installs it; the scriptlets succeed silently against a running systemd" \
  eval '((rc == 0)) && [ -z "$(strip_rpm_notes "$W/rpm-i.err")" ]'
strip_rpm_notes "$W/rpm-i.err"
all_exist() {
  local f
  for f in "$@"; do [ -e "$f" ] || { note "missing: $f"; return 1; }; done
}
EXAMPLES=/usr/share/doc/nitro-vsock-proxy/examples
check "it installed the binary, the four units, the two files to edit in /etc and the examples" all_exist \
  /usr/bin/nitro-vsock-proxy /usr/lib/systemd/system/{nitro-vsock-proxy.service,nitro-vsock-proxy@.service,nitro-vsock-proxy.socket,nitro-vsock-proxy-routes.service} \
  /etc/nitro-vsock-proxy/{vsock-proxy.yaml,routes.yaml} "$EXAMPLES"/{workshop.env,workshop.yaml,routes.us-east-1.yaml}
check "only files an operator is meant to edit are in /etc (no workshop samples)" \
  eval '[ ! -e /etc/nitro-vsock-proxy/workshop.env ] && [ ! -e /etc/nitro-vsock-proxy/workshop.yaml ]'
note "rpm -q: $(rpm -q nitro-vsock-proxy 2>&1)"
check "rpm -i starts nothing (the service, instance and socket are inactive)" \
  eval '! systemctl -q is-active "$DEFAULT" "$SOCKET" "$INSTANCE"'
check "rpm -i enables nothing under Amazon Linux's 'disable *' preset policy (%post: systemctl preset)" \
  eval '[[ $(systemctl is-enabled "$DEFAULT") == disabled && $(systemctl is-enabled "$SOCKET") == disabled ]]'
# man-db in the rootfs; `man` formats the page the RPM installed (MANPAGER=cat: no terminal).
check "man nitro-vsock-proxy shows the installed page (NAME, SYNOPSIS, --config)" \
  eval 'MANPAGER=cat MANWIDTH=100 man nitro-vsock-proxy >"$W/man.out" 2>"$W/man.err" &&
    grep -q "^NAME" "$W/man.out" && grep -q "nitro-vsock-proxy" "$W/man.out" &&
    grep -q "^SYNOPSIS" "$W/man.out" && grep -q -- "--config" "$W/man.out"'
note "man: $(head -n 4 "$W/man.out" 2>/dev/null | tr -s ' \n' ' ') $(head -c 200 "$W/man.err" 2>/dev/null)"
# As README.md says: the workshop's instance is the examples copied into /etc, unedited.
install -m 0644 "$EXAMPLES/workshop.env" /etc/nitro-vsock-proxy/workshop.env
install -m 0644 "$EXAMPLES/workshop.yaml" "$CONF"
cp "$CONF" "$W/workshop.yaml.stock"

# ---------------------------------------------------------------------------------------------
section "workshop: systemctl enable --now nitro-vsock-proxy@workshop, the enclave-app chain over vsock"
rc=0
timeout 60 systemctl enable --now "$INSTANCE" || rc=$?
check "systemctl enable --now $INSTANCE succeeds (Type=notify: READY=1 came)" [ "$rc" = 0 ]
check "$INSTANCE is active" state_is "$INSTANCE" active
check "it listens on vsock port 8001 (any CID)" wait_for 10 vsock_listening 8001
started_pid=$(pid_of "$INSTANCE")
started_at=$SECONDS
sandbox_facts "$INSTANCE"

# The enclave side, started by the enclave image's own entry point (enclave-app/run.sh) with the
# workshop's settings but one: the forwarder on 127.0.0.1:443 -> vsock CID 1 (the VM itself,
# where an enclave has the parent's CID 3) port 8001, then the server on vsock port 5005. The
# server is pinned to the forwarder with --connect-to (the enclave does that with /etc/hosts;
# here /etc/hosts is the proxy's too). --cache-ttl 100ms: every query downloads again, through
# the proxy; --max-stale 0s: a download the proxy refuses is an error reply, not the last good
# copy (the server's default serves that for 24h, which would hide the proxy's decision).
systemd-run --quiet --collect --unit=nvp-enclave \
  --setenv=ENCLAVE_APP="$APP" --setenv=PARENT_CID=1 --setenv=PROXY_PORT=8001 \
  --setenv=FORWARDER_PORT=443 --setenv=SERVER_PORT=5005 --setenv=HOSTS_FILE="$W/enclave-hosts" \
  --setenv=SERVER_ARGS="--ca-file $W/ca.pem --connect-to 127.0.0.1:443 --cache-ttl 100ms --max-stale 0s" \
  /usr/local/bin/enclave-run.sh
check "the enclave side (run.sh: forwarder, then server on vsock 5005) is up" wait_for 20 vsock_listening 5005
served_before=$(jcount nvp-https.service 'served')
check "the chain answers: client -> vsock 5005 -> server -> forwarder -> vsock 8001 -> proxy -> HTTPS stand-in" \
  answered chain 5005
note "reply: $(head -c 200 "$W/chain.out") $(cat "$W/chain.err")"
check "the stand-in served the document once more" \
  eval '(($(jcount nvp-https.service served) > served_before))'
check "journalctl -u $INSTANCE: the connection from vsock CID 1 relayed to 192.0.2.10:443 and completed" \
  wait_log 10 "$INSTANCE" 'connection closed route=[^ ]+ id=[0-9]+ peer=vsock:1:[0-9]+ enclave=- upstream=192\.0\.2\.10:443 .*end=completed' 1
check "systemctl status shows the live counters (STATUS=)" \
  wait_for 5 eval '[[ $(prop "$INSTANCE" StatusText) == *"accepted"* ]]'
note "StatusText: $(prop "$INSTANCE" StatusText)"

# ---------------------------------------------------------------------------------------------
section "reload: the allowlist decides, systemctl reload changes the decision"
check "DNS now answers ip-ranges.amazonaws.com = 127.0.0.10 (loopback)" \
  set_dns ip-ranges.amazonaws.com=127.0.0.10 kms.us-east-1.amazonaws.com=192.0.2.10
# shellcheck disable=SC2034 # read by the eval below
served_before=$(jcount nvp-https.service 'served')
check "a loopback answer is denied by the stock allowlist: the client gets an error (exit 1)" \
  refused_reply denied1 5005
check "journalctl -u $INSTANCE -p warning shows the denial (127.0.0.10, loopback)" \
  wait_log 10 "$INSTANCE" 'connection refused: no allowed address: 127\.0\.0\.10 denied \(loopback' 1 -p warning
check "the denied connection never reached the stand-in" \
  eval '(($(jcount nvp-https.service served) == served_before))'
# The journal format sends each event's and span's fields as journal fields (NVP_<NAME>), over the
# journal's native protocol.
journalctl -q --no-pager -o export -u "$INSTANCE" NVP_REASON=denied >"$W/denied.export" 2>&1
check "journalctl -u $INSTANCE NVP_REASON=denied finds the denial, with NVP_ROUTE, NVP_PEER, PRIORITY=4" \
  eval 'grep -q "^MESSAGE=.*connection refused: no allowed address: 127\.0\.0\.10 denied" "$W/denied.export" &&
    grep -qx "NVP_ROUTE=vsock:8001" "$W/denied.export" && grep -Eqx "NVP_PEER=vsock:1:[0-9]+" "$W/denied.export" &&
    grep -qx "PRIORITY=4" "$W/denied.export" && grep -qx "SYSLOG_IDENTIFIER=nitro-vsock-proxy" "$W/denied.export"'
note "the denial's fields: $(grep -a -e '^NVP_' -e '^PRIORITY=' "$W/denied.export" | tr '\n' ' ')"
check "the daemon's entries come over the native protocol (_TRANSPORT=journal), not the stderr stream" \
  eval 'grep -qx "_TRANSPORT=journal" "$W/denied.export" &&
    [ -z "$(journalctl -q --no-pager -o cat -u "$INSTANCE" _TRANSPORT=stdout _PID="$started_pid")" ]'

reloads=$(jcount "$INSTANCE" 'allowlist reloaded')
{ cat "$W/workshop.yaml.stock"; echo "  - {address: 127.0.0.10, port: 443}"; } >"$CONF"
rc=0
systemctl reload "$INSTANCE" || rc=$?
check "systemctl reload succeeds with 127.0.0.10 added to the allowlist" [ "$rc" = 0 ]
check "the daemon logs the reload (SIGHUP, RELOADING=1 ... READY=1)" \
  wait_log 10 "$INSTANCE" 'allowlist reloaded' $((reloads + 1))
check "the reload kept the process (same MainPID)" [ "$(pid_of "$INSTANCE")" = "$started_pid" ]
check "after the reload the same query is answered" answered allowed 5005
check "... through the proxy to 127.0.0.10:443" \
  wait_log 10 "$INSTANCE" 'connection closed .*upstream=127\.0\.0\.10:443 .*end=completed' 1

# An invalid edit: ExecReload='s --check-config fails first, so systemctl reload fails, says why,
# and the daemon never gets the SIGHUP.
printf 'allowlist:\n  - {address: ip-ranges.amazonaws.com, port: 443x}\n' >"$CONF"
# shellcheck disable=SC2034 # read by the eval below
sighups=$(jcount "$INSTANCE" 'SIGHUP: reloading')
rc=0
systemctl reload "$INSTANCE" 2>"$W/reload-invalid.err" || rc=$?
note "systemctl reload: exit $rc: $(cat "$W/reload-invalid.err")"
check "systemctl reload of an invalid allowlist fails (--check-config in ExecReload=)" eval '((rc != 0))'
check "the journal says why: the file and the line" \
  wait_log 10 "$INSTANCE" "configuration file $CONF, line 2" 1
systemctl status --no-pager -l -n 20 "$INSTANCE" >"$W/reload-invalid.status" 2>&1
check "systemctl status shows the failed check and why" \
  eval 'grep -q -- "--check-config (code=exited, status=2" "$W/reload-invalid.status" &&
    grep -q "configuration file $CONF, line 2" "$W/reload-invalid.status"'
check "... the daemon got no SIGHUP (no reload attempt logged)" \
  eval '(($(jcount "$INSTANCE" "SIGHUP: reloading") == sighups))'
check "... and keeps its process (same MainPID) and stays active" \
  eval '[ "$(pid_of "$INSTANCE")" = "$started_pid" ] && state_is "$INSTANCE" active'
check "... and the previous allowlist stays: still answered" answered kept 5005

cp "$W/workshop.yaml.stock" "$CONF"
reloads=$(jcount "$INSTANCE" 'allowlist reloaded')
systemctl reload "$INSTANCE"
check "the stock allowlist reloaded" wait_log 10 "$INSTANCE" 'allowlist reloaded' $((reloads + 1))
check "after that reload the loopback answer is denied again" refused_reply denied2 5005
check "two denials in journalctl -u $INSTANCE -p warning" \
  wait_log 10 "$INSTANCE" 'no allowed address: 127\.0\.0\.10 denied' 2 -p warning
set_dns ip-ranges.amazonaws.com=192.0.2.10 kms.us-east-1.amazonaws.com=192.0.2.10
check "DNS back to 192.0.2.10: answered again" answered again 5005

# ---------------------------------------------------------------------------------------------
section "sandbox: the hardened unit works (vsock, DNS, journal, sd_notify, watchdog)"
# Everything above ran under the shipped hardening: vsock listen/accept, DNS over UDP to
# 127.0.0.1:53, the journal stream with priorities, READY/RELOADING/STATUS. What the sandbox
# would break shows as an error in the daemon's own log.
check "no permission error in the daemon's log (EPERM/EACCES from the sandbox)" \
  eval '! jlog "$INSTANCE" | grep -Ei "operation not permitted|permission denied|os error (1|13)\b|cannot raise"'
# systemd itself notes the reload refused by --check-config ("Reload failed for ...") at warning.
check "its only warnings and errors are the expected denials and systemd's note of the refused reload" \
  eval '! jlog "$INSTANCE" -p warning | grep -v -e "no allowed address: 127\.0\.0\.10 denied" -e "^Reload failed for $INSTANCE" | grep -v "^$"'
check "the journal has the daemon's messages at their priorities (WARN -> PRIORITY=4)" \
  eval '(($(journalctl -q -u "$INSTANCE" -p warning..warning -o cat | grep -c "denied") >= 2))'
# ~@resources takes setrlimit(2) out of the filter; the daemon raises its soft open-file limit to
# the hard one at start (glibc does that with prlimit64, which @system-service keeps). A second
# instance with a drop-in giving a lower soft limit, as `systemctl edit` would, must come up with
# the limit raised and without the "cannot raise the open-file limit" warning. The units' own
# LimitNOFILE=8192 sets both limits, so the workshop instance does not exercise this.
sed 's/^LISTEN=.*/LISTEN=8002/' /etc/nitro-vsock-proxy/workshop.env >/etc/nitro-vsock-proxy/limits.env
cp "$W/workshop.yaml.stock" /etc/nitro-vsock-proxy/limits.yaml
mkdir -p /etc/systemd/system/nitro-vsock-proxy@limits.service.d
printf '[Service]\nLimitNOFILE=1024:8192\n' >/etc/systemd/system/nitro-vsock-proxy@limits.service.d/limits.conf
systemctl daemon-reload
rc=0
systemctl start nitro-vsock-proxy@limits.service || rc=$?
check "a second instance, nitro-vsock-proxy@limits (LISTEN=8002, drop-in LimitNOFILE=1024:8192), starts" \
  eval '((rc == 0)) && wait_for 10 vsock_listening 8002'
limits_pid=$(pid_of nitro-vsock-proxy@limits.service)
note "its limits: $(grep 'Max open files' "/proc/$limits_pid/limits" 2>&1)"
check "under SystemCallFilter=~@resources it raised its soft open-file limit to 8192" \
  awk '/^Max open files/ { found = ($4 == 8192 && $5 == 8192) } END { exit !found }' "/proc/$limits_pid/limits"
check "... without a warning" eval '[ -z "$(jlog nitro-vsock-proxy@limits.service -p warning)" ]'
systemctl stop nitro-vsock-proxy@limits.service
rm -rf /etc/nitro-vsock-proxy/limits.* /etc/systemd/system/nitro-vsock-proxy@limits.service.d
systemctl daemon-reload
# WatchdogSec=20s: if WATCHDOG=1 did not reach systemd, the daemon would be killed and restarted
# within 20 s. Let it run at least 25 s.
remaining=$((25 - (SECONDS - started_at)))
((remaining > 0)) && sleep "$remaining"
check "the watchdog is fed: after $((SECONDS - started_at)) s, same MainPID, no restart" \
  eval '[[ $(pid_of "$INSTANCE") == "$started_pid" && $(prop "$INSTANCE" NRestarts) == 0 ]] && state_is "$INSTANCE" active'
check "systemd recorded watchdog pings (WatchdogTimestamp set)" \
  eval '(($(prop "$INSTANCE" WatchdogTimestampMonotonic) > 0))'
check "no watchdog timeout in the journal" eval '! journalctl -q -b -o cat | grep -qi "watchdog timeout"'

# ---------------------------------------------------------------------------------------------
section "stop: systemctl stop drains the open connection; the unit ends inactive, not failed"
# A slow upstream: answers 4 s after the request, then closes. DNS points the name at it.
cat >"$W/slow.sh" <<'SLOW'
#!/bin/sh
read -r line
echo "$line" >/run/nvp-tier2/slow.got
sleep 4
echo "late reply to $line"
SLOW
chmod +x "$W/slow.sh"
# -t 10: after the proxy passes on the client's half-close, socat would otherwise end the
# exchange 0.5 s later, before the reply.
systemd-run --quiet --collect --unit=nvp-slow socat -t 10 TCP-LISTEN:443,bind=192.0.2.30,reuseaddr,fork \
  EXEC:"$W/slow.sh"
check "the slow upstream listens on 192.0.2.30:443" wait_for 10 tcp_listening 192.0.2.30:443
set_dns ip-ranges.amazonaws.com=192.0.2.30 kms.us-east-1.amazonaws.com=192.0.2.10
rm -f "$W/slow.got"
# The request is written and the client's side half-closed at once (stdin ends); -t 15 keeps the
# client reading the reply for 15 s.
(printf 'drain-ping\n' | timeout 30 socat -t 15 - VSOCK-CONNECT:1:8001 >"$W/drain.out" 2>"$W/drain.err") &
client=$!
check "a connection is open through the proxy to the slow upstream" wait_for 15 test -s "$W/slow.got"
stop_started=$SECONDS
systemctl stop --no-block "$INSTANCE"
check "the unit is deactivating while the connection is open" \
  wait_for 5 state_is "$INSTANCE" deactivating
check "the daemon stopped accepting (SIGTERM) and waits for the open connection" \
  wait_log 10 "$INSTANCE" 'stopped accepting; waiting for open connections open=1' 1
check "while draining, a new vsock connection is not served (the listener is closed)" \
  eval '! timeout 5 socat -u OPEN:/dev/null VSOCK-CONNECT:1:8001 2>/dev/null'
check "the stop completes within the drain time" wait_for 40 state_is "$INSTANCE" inactive
stop_took=$((SECONDS - stop_started))
note "stop took $stop_took s"
check "the stop waited for the open connection (the upstream answers after 4 s)" [ "$stop_took" -ge 3 ]
wait "$client"
check "the open connection finished: the client got the upstream's late reply" \
  grep -q 'late reply to drain-ping' "$W/drain.out"
check "the unit ended inactive with Result=success and exit status 0 (not failed)" \
  eval '[[ $(prop "$INSTANCE" Result) == success && $(prop "$INSTANCE" ExecMainStatus) == 0 ]] && ! systemctl -q is-failed "$INSTANCE"'
check "the daemon logged the drain: SIGTERM, stopped accepting, stopped with none cut" \
  eval 'jlog "$INSTANCE" | grep -Eq "stopping signal=\"?SIGTERM" && jlog "$INSTANCE" | grep -q "stopped accepting" && jlog "$INSTANCE" | grep -Eq "stopped .*closed_at_stop=0"'
systemctl stop nvp-slow.service
set_dns ip-ranges.amazonaws.com=192.0.2.10 kms.us-east-1.amazonaws.com=192.0.2.10

# ---------------------------------------------------------------------------------------------
section "routes: nitro-vsock-proxy-routes.service serves every route of routes.yaml; reload adds one"
ROUTES=nitro-vsock-proxy-routes.service
ROUTES_CONF=/etc/nitro-vsock-proxy/routes.yaml
check "the RPM installed $ROUTES, a commented routes.yaml and the us-east-1 example in the docs" \
  eval '[ -f "/usr/lib/systemd/system/$ROUTES" ] && grep -q "^#routes:" "$ROUTES_CONF" &&
    grep -q "remote: secretsmanager.us-east-1.amazonaws.com:443" "$EXAMPLES/routes.us-east-1.yaml"'
cp "$ROUTES_CONF" "$W/routes.yaml.stock"
# One upstream per route, each answering with its own name.
for n in 41 42 43; do
  ip addr add "192.0.2.$n/32" dev lo
  systemd-run --quiet --collect --unit="nvp-upstream-$n" socat TCP-LISTEN:443,bind="192.0.2.$n",reuseaddr,fork \
    SYSTEM:"echo upstream-$n"
done
check "the three route upstreams listen on 192.0.2.41-43:443" \
  eval 'wait_for 10 tcp_listening 192.0.2.41:443 && wait_for 10 tcp_listening 192.0.2.42:443 && wait_for 10 tcp_listening 192.0.2.43:443'
# via_route PORT: what the upstream behind vsock 1:PORT answers.
via_route() { printf 'hello\n' | timeout 20 socat -t 5 - "VSOCK-CONNECT:1:$1" 2>/dev/null; }
answers() { [[ $(via_route "$1") == "$2" ]]; }
routes_yaml() { # LAST_REMOTE [THIRD_ROUTE_REMOTE]
  echo "allowlist:"
  for n in 41 42 43; do echo "  - {address: 192.0.2.$n, port: 443}"; done
  echo "routes:"
  echo "  - {listen: 8020, remote: '192.0.2.41:443'}"
  echo "  - {listen: 8021, remote: '$1', max_connections: 16}"
  if [ -n "${2:-}" ]; then echo "  - {listen: 8022, remote: '$2', idle_timeout: 1m}"; fi
}
routes_yaml 192.0.2.42:443 >"$ROUTES_CONF"
rc=0
systemctl start "$ROUTES" || rc=$?
check "systemctl start $ROUTES succeeds: active, vsock 8020 and 8021 listen" \
  eval '((rc == 0)) && state_is "$ROUTES" active && wait_for 10 vsock_listening 8020 && wait_for 10 vsock_listening 8021'
check "route vsock:8020 reaches its upstream (192.0.2.41)" answers 8020 upstream-41
check "route vsock:8021 reaches its own upstream (192.0.2.42)" answers 8021 upstream-42
check "the journal names each connection's route" \
  eval 'wait_log 10 "$ROUTES" "connection closed route=vsock:8020 id=[0-9]+ peer=vsock:1:[0-9]+ enclave=- upstream=192\.0\.2\.41:443 " 1 &&
    wait_log 10 "$ROUTES" "connection closed route=vsock:8021 id=[0-9]+ peer=vsock:1:[0-9]+ enclave=- upstream=192\.0\.2\.42:443 " 1'
status_starts() { [[ $(prop "$ROUTES" StatusText) == "$1"* ]]; }
check "STATUS= shows 2 routes and the totals" \
  wait_for 10 status_starts "2 routes: vsock:8020 -> 192.0.2.41:443, vsock:8021 -> 192.0.2.42:443; 0 open, 2 accepted"
note "status: $(prop "$ROUTES" StatusText)"
# shellcheck disable=SC2034 # used in the eval'd conditions below
routes_pid=$(pid_of "$ROUTES")
routes_yaml 192.0.2.42:443 192.0.2.43:443 >"$ROUTES_CONF"
rc=0
systemctl reload "$ROUTES" || rc=$?
check "systemctl reload with a third route succeeds (same process)" \
  eval '((rc == 0)) && [[ $(pid_of "$ROUTES") == "$routes_pid" ]]'
check "the new route vsock:8022 listens and reaches 192.0.2.43" \
  eval 'wait_for 10 vsock_listening 8022 && answers 8022 upstream-43'
check "the first two routes still answer" eval 'answers 8020 upstream-41 && answers 8021 upstream-42'
check "the reload was logged: 1 added, 2 unchanged" \
  wait_log 10 "$ROUTES" 'allowlist reloaded; 3 allowlist entries; 3 routes: 1 added, 0 removed, 0 changed, 2 unchanged' 1
check "STATUS= shows 3 routes" status_starts "3 routes: "
# An edit the allowlist does not allow: systemctl reload fails (--check-config in ExecReload),
# nothing changes.
routes_yaml 192.0.2.99:443 192.0.2.43:443 >"$ROUTES_CONF"
rc=0
systemctl reload "$ROUTES" 2>"$W/routes-reload.err" || rc=$?
check "systemctl reload of a route the allowlist does not allow fails" eval '((rc != 0))'
check "the journal says which route and why" \
  wait_log 10 "$ROUTES" 'route vsock:8021 -> 192\.0\.2\.99:443 \(routes\[1\], line 7\): 192\.0\.2\.99:443 is not allowed' 1
check "the service still runs and serves every route as before" \
  eval 'state_is "$ROUTES" active && [[ $(pid_of "$ROUTES") == "$routes_pid" ]] && answers 8021 upstream-42 && answers 8022 upstream-43'
sandbox_facts "$ROUTES"
rc=0
systemctl stop "$ROUTES" || rc=$?
check "systemctl stop $ROUTES: inactive with Result=success, no route listens" \
  eval '((rc == 0)) && state_is "$ROUTES" inactive && [[ $(prop "$ROUTES" Result) == success ]] &&
    ! vsock_listening 8020 && ! vsock_listening 8021 && ! vsock_listening 8022'
cp "$W/routes.yaml.stock" "$ROUTES_CONF"
for n in 41 42 43; do systemctl stop "nvp-upstream-$n.service"; done

# ---------------------------------------------------------------------------------------------
section "migration: another unit already holds vsock port 8000 when the default service starts"
# What an operator who has not yet disabled AWS's proxy sees: a second unit (socat standing in
# for nitro-enclaves-vsock-proxy, under another name so that Conflicts= does not stop it) holds
# vsock port 8000. Ours exits 1 naming the address (after the metadata stand-in, ≈2 s);
# Restart=on-failure retries 5 s later, and StartLimitBurst=10 within StartLimitIntervalSec=100s
# ends the retries ("Start request repeated too quickly") after about 70 s.
systemctl start nvp-imds.socket
systemd-run --quiet --collect --unit=nvp-holds-8000 socat VSOCK-LISTEN:8000,fork OPEN:/dev/null
check "the other unit listens on vsock port 8000" wait_for 10 vsock_listening 8000
BIND_MSG='cannot listen on vsock:8000: Address already in use \(os error 98\) \(is another proxy already using it\?\)'
migration_since=$(date '+%Y-%m-%d %H:%M:%S')
rc=0
systemctl start "$DEFAULT" 2>"$W/migration-start.err" || rc=$?
check "systemctl start $DEFAULT fails (exit status 1 before READY=1)" \
  eval '((rc != 0)) && [[ $(prop "$DEFAULT" ExecMainStatus) == 1 ]]'
# systemctl status exits 3 for a unit that is not active: `|| true`, or pipefail fails the check.
check "systemctl status shows the bind message naming the address" \
  eval '{ systemctl status --full --no-pager -n 20 "$DEFAULT" 2>&1 || true; } | grep -Eq "$BIND_MSG"'
check "the journal has it at priority err" \
  eval 'jlog "$DEFAULT" --since "$migration_since" -p err | grep -Eq "$BIND_MSG"'
# systemd 252 keeps Result=exit-code and says why it stopped in the unit's journal.
gave_up() {
  state_is "$DEFAULT" failed &&
    jlog "$DEFAULT" --since "$migration_since" | grep -q 'Start request repeated too quickly'
}
check "the retries stop within the start limit: failed, 'Start request repeated too quickly', within 100 s" \
  wait_for 100 gave_up
starts=$(jcount "$DEFAULT" "$BIND_MSG" --since "$migration_since")
note "$starts starts, NRestarts=$(prop "$DEFAULT" NRestarts), result $(prop "$DEFAULT" Result)"
check "ten starts (StartLimitBurst=10), each ending with the bind message" eval '((starts == 10))'
sleep 7
check "no start after giving up (still 10 bind messages 7 s later; RestartSec is 5 s)" \
  eval '(($(jcount "$DEFAULT" "$BIND_MSG" --since "$migration_since") == starts)) && state_is "$DEFAULT" failed'
systemctl stop nvp-holds-8000.service
systemctl reset-failed "$DEFAULT"
check "with the port freed and reset-failed, nothing holds 8000 and the unit is inactive" \
  eval 'wait_for 10 eval "! vsock_listening 8000" && state_is "$DEFAULT" inactive'

# ---------------------------------------------------------------------------------------------
section "socket: the shipped nitro-vsock-proxy.socket starts the shipped service on the first connection"
socket_since=$(date '+%Y-%m-%d %H:%M:%S')
# Unchanged units: the service asks the metadata service (the stand-in on 169.254.169.254:80)
# for the region and serves kms.us-east-1.amazonaws.com:443, allowlisted in vsock-proxy.yaml.
systemctl start nvp-imds.socket
rc=0
systemctl start "$SOCKET" || rc=$?
check "systemctl start $SOCKET succeeds; vsock port 8000 listens" \
  eval '((rc == 0)) && wait_for 10 vsock_listening 8000'
check "the service is not started yet" state_is "$DEFAULT" inactive
# The same enclave pieces for the KMS name: forwarder 127.0.0.1:8444 -> vsock 1:8000, server on
# vsock 5006 downloading https://kms.us-east-1.amazonaws.com/ip-ranges.json.
systemd-run --quiet --collect --unit=nvp-enclave-kms \
  --setenv=ENCLAVE_APP="$APP" --setenv=PARENT_CID=1 --setenv=PROXY_PORT=8000 \
  --setenv=REMOTE_HOST=kms.us-east-1.amazonaws.com \
  --setenv=FORWARDER_PORT=8444 --setenv=SERVER_PORT=5006 --setenv=HOSTS_FILE="$W/enclave-hosts-kms" \
  --setenv=SERVER_ARGS="--url https://kms.us-east-1.amazonaws.com/ip-ranges.json --ca-file $W/ca.pem --connect-to 127.0.0.1:8444 --cache-ttl 100ms --max-stale 0s" \
  /usr/local/bin/enclave-run.sh
check "the second enclave server (vsock 5006, via vsock 8000) is up" wait_for 20 vsock_listening 5006
check "the service is still not started (nothing connected to 8000)" state_is "$DEFAULT" inactive
check "the first connection is served: the chain through vsock 8000 answers" answered socket 5006
note "reply: $(head -c 120 "$W/socket.out") $(cat "$W/socket.err")"
check "that connection started $DEFAULT (active)" state_is "$DEFAULT" active
check "it took the socket from systemd (socket activation), not a bind of its own" \
  wait_log 10 "$DEFAULT" 'using the sockets passed by systemd \(socket activation\)' 1
check "it filled kms.{region}.{domain} from the metadata stand-in (IMDSv2 token, then region and domain)" \
  eval 'jlog "$DEFAULT" | grep -q "region=us-east-1 remote=kms.us-east-1.amazonaws.com" &&
    grep -q "^PUT /latest/api/token" "$W/imds.log" && grep -q "^GET /latest/meta-data/placement/region token=tier2-session-token" "$W/imds.log"'
check "exactly one connection, relayed to 192.0.2.10:443, completed" \
  eval 'wait_log 10 "$DEFAULT" "connection closed route=[^ ]+ id=[0-9]+ peer=vsock:1:[0-9]+ enclave=- upstream=192\.0\.2\.10:443 .*end=completed" 1 &&
    (($(jcount "$DEFAULT" "connection closed") == 1))'
sandbox_facts "$DEFAULT"
# Since this section began: the migration checks made this unit log its bind errors before.
check "no warnings or errors from $DEFAULT" eval '[ -z "$(jlog "$DEFAULT" -p warning --since "$socket_since")" ]'
# All three shipped units have been loaded by now: systemd reports a problem in a unit file as a
# warning naming FILE:LINE.
check "systemd reported no problem in the shipped unit files" \
  eval '! journalctl -q -b -p warning -o cat | grep -E "nitro-vsock-proxy[^ ]*\.(service|socket):[0-9]+:"'

# ---------------------------------------------------------------------------------------------
section "upgrade: rpm -U to release 2 restarts the running services"
systemctl start "$INSTANCE"
check "the instance runs again and answers" eval 'state_is "$INSTANCE" active && answered before-upgrade 5005'
# The packaged file an operator edits: the default service's allowlist (the workshop's files
# were copied from the examples, so rpm does not own them).
PKG_CONF=/etc/nitro-vsock-proxy/vsock-proxy.yaml
echo "# edited by the operator before the upgrade" >>"$PKG_CONF"
instance_pid=$(pid_of "$INSTANCE")
default_pid=$(pid_of "$DEFAULT")
note "before: $(rpm -q nitro-vsock-proxy); $INSTANCE pid $instance_pid, $DEFAULT pid $default_pid"
note "upgrading to $RPM2"
rc=0
rpm -U --nodeps "$RPM2" 2>"$W/rpm-U.err" || rc=$?
check "rpm -U --nodeps succeeds silently" eval '((rc == 0)) && [ -z "$(strip_rpm_notes "$W/rpm-U.err")" ]'
strip_rpm_notes "$W/rpm-U.err"
check "release 2 is installed" eval '[[ $(rpm -q nitro-vsock-proxy) == nitro-vsock-proxy-*-2.* ]]'
note "after: $(rpm -q nitro-vsock-proxy)"
check "the upgrade restarted $INSTANCE (new MainPID, active)" \
  eval 'state_is "$INSTANCE" active && [[ $(pid_of "$INSTANCE") != "$instance_pid" ]]'
check "the upgrade restarted $DEFAULT (new MainPID, active)" \
  eval 'state_is "$DEFAULT" active && [[ $(pid_of "$DEFAULT") != "$default_pid" ]]'
check "the socket unit is still listening" eval 'state_is "$SOCKET" active && vsock_listening 8000'
check "traffic flows after the upgrade: the workshop chain answers" answered after-upgrade 5005
check "... and the chain through the socket-activated service answers" answered after-upgrade-kms 5006
check "the operator's edit of vsock-proxy.yaml survived the upgrade (%config(noreplace))" \
  grep -q 'edited by the operator' "$PKG_CONF"
check "no .rpmnew/.rpmsave from the upgrade (the packaged file did not change)" \
  eval '! ls /etc/nitro-vsock-proxy/*.rpmnew /etc/nitro-vsock-proxy/*.rpmsave 2>/dev/null'

# ---------------------------------------------------------------------------------------------
# %preun runs `systemctl --no-reload disable --now nitro-vsock-proxy.service
# nitro-vsock-proxy.socket 'nitro-vsock-proxy@*.service'`; systemctl disable takes no pattern.
section "erase: rpm -e stops everything and removes it, keeping the edited config as .rpmsave"
note "running before: $(count_processes) nitro-vsock-proxy processes"
rc=0
rpm -e --nodeps nitro-vsock-proxy 2>"$W/rpm-e.err" || rc=$?
check "rpm -e succeeds silently" eval '((rc == 0)) && [ -z "$(strip_rpm_notes "$W/rpm-e.err")" ]'
strip_rpm_notes "$W/rpm-e.err"
check "rpm -e stopped the running instance $INSTANCE" eval '! systemctl -q is-active "$INSTANCE"'
systemctl --no-pager list-units --all --plain --no-legend 'nitro-vsock-proxy*' | sed 's/^/   left: /'
for link in /etc/systemd/system/*.wants/nitro-vsock-proxy*; do
  [ -L "$link" ] && note "left: enablement link $link -> $(readlink "$link")"
done
check "rpm -e stopped $DEFAULT and $SOCKET" eval '! systemctl -q is-active "$DEFAULT" "$SOCKET"'
check "no nitro-vsock-proxy process is left" eval '(($(count_processes) == 0))'
check "vsock ports 8000 and 8001 no longer listen" eval '! vsock_listening 8000 && ! vsock_listening 8001'
check "none of them ended failed" eval '! systemctl -q is-failed "$INSTANCE" "$DEFAULT" "$SOCKET"'
check "the binary and the units are gone" \
  eval '[ ! -e /usr/bin/nitro-vsock-proxy ] && ! ls /usr/lib/systemd/system/nitro-vsock-proxy* 2>/dev/null'
check "systemd no longer knows the unit files (daemon-reload in %postun)" \
  eval '[ -z "$(systemctl list-unit-files --no-legend "nitro-vsock-proxy*")" ]'
check "the edited vsock-proxy.yaml is kept as vsock-proxy.yaml.rpmsave" \
  grep -q 'edited by the operator' "$PKG_CONF.rpmsave"
check "the unedited configuration files are removed" \
  eval '[ ! -e /etc/nitro-vsock-proxy/routes.yaml ] && [ ! -e /etc/nitro-vsock-proxy/vsock-proxy.yaml ]'
check "the files the operator copied from the examples stay (rpm does not own them)" \
  eval '[ -e /etc/nitro-vsock-proxy/workshop.env ] && [ -e "$CONF" ]'
check "rpm no longer lists the package" eval '! rpm -q nitro-vsock-proxy >/dev/null'

# ---------------------------------------------------------------------------------------------
echo
if ((failed > 0)); then
  dump_diagnostics
fi
echo "tier2: $passed passed, $failed failed"
((failed == 0))
