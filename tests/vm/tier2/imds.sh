#!/bin/sh
# One connection of the tier-2 VM's instance metadata stand-in (nvp-imds.socket): reads one
# HTTP/1.1 request on standard input and answers it as IMDSv2 would for an instance in us-east-1
# (PUT /latest/api/token gives a token; the GETs need it, else 401), Connection: close. Each
# request is appended to /run/nvp-tier2/imds.log, which checks.sh reads.
cr=$(printf '\r')
read -r method path _ || exit 0
token=""
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  case $line in
    [Xx]-[Aa]ws-[Ee]c2-[Mm]etadata-[Tt]oken:*) token=${line#*:} token=${token# } ;;
  esac
done
echo "$method $path token=${token:-none}" >>/run/nvp-tier2/imds.log
status="200 OK"
case "$method $path" in
  "PUT /latest/api/token") body=tier2-session-token ;;
  "GET /latest/meta-data/placement/region") body=us-east-1 ;;
  "GET /latest/meta-data/services/domain") body=amazonaws.com ;;
  *) status="404 Not Found" body="" ;;
esac
if [ "$method" = GET ] && [ "$token" != tier2-session-token ]; then
  status="401 Unauthorized" body=""
fi
printf 'HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
  "$status" "${#body}" "$body"
