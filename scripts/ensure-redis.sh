#!/usr/bin/env bash
# Makes sure a Redis server answers at RAYREC_REDIS_URL's host:port (default 127.0.0.1:6379);
# starts a throw-away local one (no persistence) when it does not.
set -euo pipefail
url="${RAYREC_REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#*://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=6379

ping() { redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> installing redis-server"
  (apt-get update -qq && apt-get install -y -qq redis-server redis-tools) >/dev/null
fi
if ping; then exit 0; fi
case "$host" in
  127.0.0.1|localhost) ;;
  *) echo "Redis at $host:$port does not answer, and it is not local, so it is not started here" >&2; exit 1 ;;
esac
echo "==> starting redis-server on $host:$port"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no >/dev/null
for _ in $(seq 1 50); do ping && exit 0; sleep 0.1; done
echo "redis-server did not answer on $host:$port" >&2
exit 1
