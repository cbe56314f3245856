#!/usr/bin/env bash
# Fault injection: the disk under the broker's SQLite store fills up.
# Expected: senders get a clear refusal (05 "cannot be stored" / 04), nothing acknowledged is
# lost, the database stays intact (PRAGMA integrity_check), and storing works again once there
# is space (no restart).
# Needs root (a small tmpfs is mounted) and Python's websockets (the venv .ci/run makes).
# Usage: sudo tests/faults/disk-full.sh [path/to/wsmb-broker]
set -euo pipefail
cd "$(dirname "$0")/../.."
BROKER="${1:-target/debug/wsmb-broker}"
PY="${WSMB_TEST_PYTHON:-target/ci-venv/bin/python}"
[ -x "$BROKER" ] || cargo build -q -p wsmb-broker
DIR="$(mktemp -d /tmp/wsmb-diskfull.XXXXXX)"
mount -t tmpfs -o size=4m wsmb-diskfull "$DIR"
LOG="$DIR.log"
cleanup() {
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    umount "$DIR" 2>/dev/null || true
    rmdir "$DIR" 2>/dev/null || true
}
trap cleanup EXIT
"$BROKER" --htpasswd deploy/htpasswd.example --state-dir "$DIR" --listen 127.0.0.1:0 >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
    ADDR="$(grep -o 'listening on [0-9.:]*' "$LOG" | awk '{print $3}' || true)"
    [ -n "$ADDR" ] && break
    sleep 0.1
done
[ -n "$ADDR" ] || { cat "$LOG"; exit 1; }

send() { # $1: how many at most; prints "acked <n> refused <code> <reason>"
"$PY" - "$ADDR" "$1" <<'PY'
import base64, json, sys
from websockets.sync.client import connect
addr, most = sys.argv[1], int(sys.argv[2])
auth = {"Authorization": "Basic " + base64.b64encode(b"qa:4lt0@1234").decode()}
acked = 0
with connect(f"ws://{addr}/", additional_headers=auth, max_size=2**22) as ws:
    ws.recv(timeout=5)  # connect
    for i in range(most):
        ws.send(json.dumps({"command": "send-message", "channel": "nobody-listens",
                            "data": [{"id": str(i), "message": "x" * 32768}]}))
        while True:
            r = json.loads(ws.recv(timeout=30))
            if r.get("command") in ("send-result", "error"):
                break
        if r["response_code"] != "00":
            reason = (r.get("data") or [{}])[0].get("reason", "")
            print(f"acked {acked} refused {r['response_code']} {reason}")
            sys.exit(0)
        acked += 1
print(f"acked {acked} refused none")
PY
}

echo "disk-full: filling a 4 MB store with 32 KB messages"
FIRST="$(send 1000)"
echo "  $FIRST"
ACKED="$(echo "$FIRST" | awk '{print $2}')"
case "$FIRST" in
    *"refused 05"*|*"refused 04"*) ;;
    *) echo "disk-full: FAILED: no clear refusal when the disk filled"; tail -20 "$LOG"; exit 1 ;;
esac
ROWS="$(sqlite3 "file:$DIR/broker.sqlite?mode=ro" 'SELECT COUNT(*) FROM mq_data' 2>/dev/null || echo '?')"
echo "  rows stored: $ROWS (acknowledged: $ACKED)"
[ "$ROWS" = "$ACKED" ] || { echo "disk-full: FAILED: acknowledged messages missing"; exit 1; }
grep -E "WARN|ERROR" "$LOG" | tail -3 | sed 's/^/  broker: /'
echo "disk-full: space comes back (the tmpfs grows to 64 MB)"
mount -o remount,size=64m "$DIR"
for _ in $(seq 1 60); do
    AGAIN="$(send 3)"
    case "$AGAIN" in *"refused none"*) break ;; esac
    sleep 0.5
done
echo "  $AGAIN"
case "$AGAIN" in *"refused none"*) ;; *) echo "disk-full: FAILED: no recovery"; exit 1 ;; esac
CHECK="$(sqlite3 "file:$DIR/broker.sqlite?mode=ro" 'PRAGMA integrity_check')"
echo "  integrity_check: $CHECK"
[ "$CHECK" = "ok" ] || { echo "disk-full: FAILED: the database is damaged"; exit 1; }
ROWS="$(sqlite3 "file:$DIR/broker.sqlite?mode=ro" 'SELECT COUNT(*) FROM mq_data')"
[ "$ROWS" = "$((ACKED + 3))" ] || { echo "disk-full: FAILED: $ROWS rows, expected $((ACKED + 3))"; exit 1; }
echo "disk-full: OK ($ACKED stored before the disk was full, refused with a reason, 3 more after, nothing lost, intact)"
