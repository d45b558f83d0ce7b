#!/usr/bin/env bash
# Starts or stops the moto server (the local AWS emulator) on 127.0.0.1:${MOTO_PORT:-5000}.
#   moto.sh start   start it unless something already answers there; prints the endpoint
#   moto.sh stop    stop the one this script started
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
port="${MOTO_PORT:-5000}"
state="$root/.local"
pidfile="$state/moto-$port.pid"
mkdir -p "$state"
up() { python3 - "$port" <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(0.3)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}
case "${1:-start}" in
  start)
    if up; then echo "http://127.0.0.1:$port"; exit 0; fi
    bash "$root/infra/local/setup.sh"
    nohup "$root/.venv/bin/python" "$root/infra/local/moto_server.py" -H 127.0.0.1 -p "$port" > "$state/moto-$port.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 1 100); do
      if up; then echo "http://127.0.0.1:$port"; exit 0; fi
      sleep 0.1
    done
    echo "moto did not start on port $port; see $state/moto-$port.log" >&2
    exit 1
    ;;
  stop)
    if [[ -f "$pidfile" ]]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
