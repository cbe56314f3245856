#!/usr/bin/env bash
# Fault injection: the broker is unreachable for minutes (default 3). Runs the end-to-end test
# tests/tests/gateway.rs::the_agent_waits_out_a_broker_that_is_away_and_loses_nothing with that
# outage (CI runs it with 3 seconds): the agent keeps trying, an SMS received meanwhile is kept
# and published once the broker is back, jobs flow again.
# Usage: tests/faults/broker-away.sh [minutes]
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES="${1:-3}"
WSMB_FAULT_BROKER_AWAY_SECS="$((MINUTES * 60))" cargo test -q -p wsmb-e2e --test gateway \
    the_agent_waits_out_a_broker_that_is_away_and_loses_nothing -- --nocapture
echo "broker-away: OK after ${MINUTES} min"
