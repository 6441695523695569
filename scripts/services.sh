#!/usr/bin/env bash
# Make sure the services the tests use are here: a Redis server at REDIS_URL (default
# 127.0.0.1:6379), the redis-server binary (tests start private servers and a cluster), and
# headless Chromium for the dashboard test. Installs Debian packages when something is missing.
set -euo pipefail
apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "error: $* missing and apt-get is not available; install it by hand" >&2
    exit 1
  fi
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v redis-server >/dev/null || apt_install redis-server redis-tools
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || apt_install chromium fonts-dejavu-core

redis_ping() { python3 - "$1" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
try:
    s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=1)
    s.sendall(b"PING\r\n"); ok = s.recv(16).startswith(b"+PONG")
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}
url=${REDIS_URL:-redis://127.0.0.1:6379/0}
if ! redis_ping "$url"; then
  port=$(python3 -c "import sys,urllib.parse;print(urllib.parse.urlparse(sys.argv[1]).port or 6379)" "$url")
  echo "no Redis answering at $url; starting redis-server on 127.0.0.1:$port"
  mkdir -p /tmp/kvproxy-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir /tmp/kvproxy-redis --logfile /tmp/kvproxy-redis/redis.log
  for _ in $(seq 50); do redis_ping "$url" && break; sleep 0.1; done
  redis_ping "$url" || { echo "error: could not start redis-server at $url" >&2; exit 1; }
fi
