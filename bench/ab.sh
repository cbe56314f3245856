#!/bin/bash
# A/B throughput of two broker binaries on this machine, alternated in one run (the machines
# are shared and noisy: compare the two columns of one run, not runs of different days).
#   bench/ab.sh OLD_BROKER NEW_BROKER ROUNDS [wsmb-bench throughput options...]
# e.g. bench/ab.sh /tmp/old/release/wsmb-broker target/release/wsmb-broker 5 --messages 1000000
set -euo pipefail
old=$1 new=$2 rounds=$3
shift 3
cd "$(dirname "$0")/.."
bench=target/release/wsmb-bench
port=18890
for round in $(seq "$rounds"); do
    for side in old new; do
        if [ "$side" = old ]; then b=$old; else b=$new; fi
        "$b" --htpasswd deploy/htpasswd.example --storage memory --listen "127.0.0.1:$port" \
            --log-level warn 2>/dev/null &
        pid=$!
        for _ in $(seq 100); do
            curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
            sleep 0.1
        done
        per=$("$bench" throughput --addr "127.0.0.1:$port" --quiet --json "$@" |
            python3 -c 'import json,sys; print(round(json.load(sys.stdin)["per_second"]))')
        echo "round $round $side $per"
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    done
done
