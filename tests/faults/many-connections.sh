#!/usr/bin/env bash
# Fault injection: 5 000 clients connect at the same moment (a reconnect storm after a network
# outage). Expected: the broker stays up and within its limits (connections still
# authenticating beyond server.max_pending_connections get 503 and retry), every client gets
# in, and a message still goes from one client to another meanwhile.
# Needs Python's websockets (the venv .ci/run makes). Usage: tests/faults/many-connections.sh
# [path/to/wsmb-broker] [clients]
set -euo pipefail
cd "$(dirname "$0")/../.."
BROKER="${1:-target/debug/wsmb-broker}"
N="${2:-5000}"
PY="${WSMB_TEST_PYTHON:-target/ci-venv/bin/python}"
[ -x "$BROKER" ] || cargo build -q -p wsmb-broker
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
LOG="$(mktemp /tmp/wsmb-storm.XXXXXX.log)"
"$BROKER" --htpasswd deploy/htpasswd.example --storage memory --listen 127.0.0.1:0 >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 100); do
    ADDR="$(grep -o 'listening on [0-9.:]*' "$LOG" | awk '{print $3}' || true)"
    [ -n "$ADDR" ] && break
    sleep 0.1
done
[ -n "$ADDR" ] || { cat "$LOG"; exit 1; }
"$PY" - "$ADDR" "$N" "$PID" <<'PY'
import asyncio, base64, json, random, sys, time
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

addr, n, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
auth = {"Authorization": "Basic " + base64.b64encode(b"qa:4lt0@1234").decode()}
refused = 0

def rss_mb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

async def client(i, opened):
    global refused
    delay = 0.05
    while True:
        try:
            ws = await connect(f"ws://{addr}/", additional_headers=auth, open_timeout=60)
            await asyncio.wait_for(ws.recv(), 30)  # connect
            opened.append(ws)
            return
        except (InvalidStatus, OSError, asyncio.TimeoutError):
            refused += 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

async def main():
    before = rss_mb()
    opened = []
    t0 = time.time()
    storm = asyncio.gather(*(client(i, opened) for i in range(n)))
    # Meanwhile, a well-behaved pair of clients (they retry like everyone).
    pair = []
    await asyncio.gather(client(-1, pair), client(-2, pair))
    rx, tx = pair
    await rx.send(json.dumps({"command": "receive-message", "channel": "calm", "data": []}))
    await rx.send(json.dumps({"command": "ping"}))
    await asyncio.wait_for(rx.recv(), 30)
    await tx.send(json.dumps({"command": "send-message", "channel": "calm", "data": ["during the storm"]}))
    got = await asyncio.wait_for(rx.recv(), 30)
    during = time.time() - t0
    assert "during the storm" in got, got
    await storm
    took = time.time() - t0
    peak = rss_mb()
    print(f"many-connections: {len(opened)} of {n} connected in {took:.1f} s "
          f"({refused} refusals retried); a message went through after {during:.1f} s; "
          f"broker RSS {before:.1f} -> {peak:.1f} MB")
    assert len(opened) == n
    for ws in opened + pair:
        await ws.close()

asyncio.run(main())
PY
kill -0 "$PID" || { echo "many-connections: FAILED: the broker died"; cat "$LOG"; exit 1; }
echo "many-connections: OK"
