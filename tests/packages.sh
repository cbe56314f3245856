#!/usr/bin/env bash
# The Debian packages as a user gets them: build both with cargo-deb, install them with dpkg -i,
# check the units, start the installed binaries exactly as the units would (their users, their
# config check, their files; systemd cannot run as PID 1 on the CI machine), send an OTP through
# them with the installed PHP client and the modem simulator, then purge and check that nothing
# is left. Needs root (or sudo). Run by .ci/run after the test suite; takes about 6 minutes
# (two release builds with LTO) on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
CARGO_DEB="${CARGO_DEB:-cargo deb}"
fail() { echo "packages: FAILED: $*" >&2; exit 1; }
step() { echo "packages: $*"; }

step "building"
$CARGO_DEB -p wsmb-broker
$CARGO_DEB -p wsmb-agent
BROKER_DEB=$(ls target/debian/wsmb-broker_*_amd64.deb | tail -1)
AGENT_DEB=$(ls target/debian/wsmb-agent_*_amd64.deb | tail -1)

cleanup() {
    [ -n "${SIM_PID:-}" ] && $SUDO kill "$SIM_PID" 2>/dev/null || true
    [ -n "${AGENT_PID:-}" ] && $SUDO kill "$AGENT_PID" 2>/dev/null || true
    [ -n "${BROKER_PID:-}" ] && $SUDO kill "$BROKER_PID" 2>/dev/null || true
    $SUDO dpkg --purge wsmb-agent wsmb-broker >/dev/null 2>&1 || true
    rm -rf "${WORK:-/nonexistent}"
}
trap cleanup EXIT
$SUDO dpkg --purge wsmb-agent wsmb-broker >/dev/null 2>&1 || true

step "installing $BROKER_DEB $AGENT_DEB"
$SUDO dpkg -i "$BROKER_DEB" "$AGENT_DEB"

step "checking what the maintainer scripts made"
getent passwd wsmb-broker >/dev/null || fail "no wsmb-broker user"
getent passwd wsmb-agent >/dev/null || fail "no wsmb-agent user"
id -nG wsmb-agent | grep -qw dialout || fail "wsmb-agent is not in dialout"
[ "$(stat -c %U:%a /var/lib/wsmb)" = wsmb-broker:750 ] || fail "/var/lib/wsmb: $(stat -c %U:%a /var/lib/wsmb)"
[ "$(stat -c %U:%a /var/lib/wsmb-agent)" = wsmb-agent:750 ] || fail "/var/lib/wsmb-agent"
[ "$(stat -c %U:%G:%a /etc/wsmb/htpasswd)" = root:wsmb-broker:640 ] || fail "/etc/wsmb/htpasswd: $(stat -c %U:%G:%a /etc/wsmb/htpasswd)"
[ "$(stat -c %a /etc/wsmb/agent.env)" = 600 ] || fail "/etc/wsmb/agent.env is not 0600"
grep -q '^[^#]' /etc/wsmb/htpasswd && fail "the package shipped a user"
dpkg-query --control-show wsmb-broker conffiles | grep -q /etc/wsmb/broker.toml || fail "broker.toml is not a conffile"
dpkg-query --control-show wsmb-agent conffiles | grep -q /etc/wsmb/agent.toml || fail "agent.toml is not a conffile"
for u in wsmb-broker wsmb-agent; do
    [ -f /usr/lib/systemd/system/$u.service ] || fail "no $u.service"
    if [ -d /run/systemd/system ]; then
        systemctl is-enabled $u >/dev/null 2>&1 && fail "$u was enabled on install"
        systemctl is-active $u >/dev/null 2>&1 && fail "$u was started on install"
    fi
done
pgrep -x wsmb-broker >/dev/null && fail "a broker was started on install"
step "systemd-analyze verify"
systemd-analyze verify /usr/lib/systemd/system/wsmb-broker.service /usr/lib/systemd/system/wsmb-agent.service
for u in wsmb-broker wsmb-agent; do
    systemd-analyze security --offline=true /usr/lib/systemd/system/$u.service | tail -1
done

# With no user the broker's config check says so; nothing can log in.
FRESH=$($SUDO runuser -u wsmb-broker -- /usr/bin/wsmb-broker check-config --config /etc/wsmb/broker.toml) \
    || fail "check-config of the fresh install: $FRESH"
echo "$FRESH" | grep -q "users: 0" || fail "the fresh install has users: $FRESH"

step "adding users with wsmb-broker passwd"
WORK=$(mktemp -d)
PASSWORD="pkg-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
echo "$PASSWORD" | $SUDO wsmb-broker passwd --stdin /etc/wsmb/htpasswd app
echo "$PASSWORD" | $SUDO wsmb-broker passwd --stdin /etc/wsmb/htpasswd agent
[ "$(stat -c %U:%G:%a /etc/wsmb/htpasswd)" = root:wsmb-broker:640 ] || fail "passwd changed the file's owner or mode"

# The test's settings in place of the conffiles' placeholders (a free port, the simulator).
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$SUDO sed -i "s/^listen = .*/listen = \"127.0.0.1:$PORT\"/" /etc/wsmb/broker.toml
$SUDO sed -i "s|^url = .*|url = \"ws://127.0.0.1:$PORT/\"|; s|^device = .*|device = \"/var/lib/wsmb-agent/modem\"|" /etc/wsmb/agent.toml
echo "WSMB_PASSWORD=$PASSWORD" | $SUDO tee /etc/wsmb/agent.env >/dev/null

step "starting the broker as its unit would"
# ExecStartPre, then ExecStart, as User=wsmb-broker, with UMask=0027.
$SUDO runuser -u wsmb-broker -- /usr/bin/wsmb-broker check-config --config /etc/wsmb/broker.toml
# setpriv execs (runuser would fork and stand between the daemon and its signals).
$SUDO setpriv --reuid=wsmb-broker --regid=wsmb-broker --init-groups -- \
    sh -c 'umask 0027; exec /usr/bin/wsmb-broker --config /etc/wsmb/broker.toml' \
    >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 1 100); do grep -q "listening on" "$WORK/broker.log" && break; sleep 0.1; done
grep -q "listening on 127.0.0.1:$PORT" "$WORK/broker.log" || { cat "$WORK/broker.log"; fail "broker did not start"; }
[ "$(stat -c %U /var/lib/wsmb/broker.sqlite)" = wsmb-broker ] || fail "the store is not the broker user's"

step "starting the simulator and the agent as the agent's unit would"
$SUDO runuser -u wsmb-agent -- /usr/bin/wsmb-modem-sim --link /var/lib/wsmb-agent/modem --registration-delay 200ms \
    >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 1 100); do grep -q "ready at" "$WORK/sim.log" && break; sleep 0.1; done
$SUDO runuser -u wsmb-agent -- /usr/bin/wsmb-agent check-config --config /etc/wsmb/agent.toml
$SUDO env "WSMB_PASSWORD=$PASSWORD" setpriv --reuid=wsmb-agent --regid=wsmb-agent --init-groups -- \
    sh -c 'umask 0027; exec /usr/bin/wsmb-agent --config /etc/wsmb/agent.toml run' >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 300); do grep -q "modem ready" "$WORK/agent.log" && grep -q "connected to the broker" "$WORK/agent.log" && break; sleep 0.1; done
grep -q "connected to the broker" "$WORK/agent.log" || { cat "$WORK/agent.log"; fail "agent did not connect"; }

step "an OTP through the installed binaries, from the installed PHP client"
OUT=$(WSMB_URL="ws://127.0.0.1:$PORT/" WSMB_USER=app WSMB_PASSWORD="$PASSWORD" \
    php /usr/share/doc/wsmb-broker/php/examples/wait-sent.php +6281234567890 "Your code is 123456") \
    || { echo "$OUT"; cat "$WORK/agent.log"; fail "the OTP was not sent"; }
echo "$OUT"
echo "$OUT" | grep -q "sent by modem modem1 to +6281234567890" || fail "no sent status"
for _ in $(seq 1 50); do grep -q "SMS to +6281234567890: Your code is 123456" "$WORK/sim.log" && break; sleep 0.1; done
grep -q "SMS to +6281234567890: Your code is 123456" "$WORK/sim.log" || { cat "$WORK/sim.log"; fail "the modem did not get it"; }

step "stopping (SIGTERM, as systemctl stop)"
$SUDO kill -TERM "$AGENT_PID" "$BROKER_PID"
wait "$AGENT_PID" || fail "agent exit status $?"
wait "$BROKER_PID" || fail "broker exit status $?"
AGENT_PID="" BROKER_PID=""
$SUDO kill "$SIM_PID"; SIM_PID=""

step "purging"
$SUDO dpkg --purge wsmb-agent wsmb-broker
for p in /var/lib/wsmb /var/lib/wsmb-agent /etc/wsmb /usr/bin/wsmb-broker /usr/bin/wsmb-agent; do
    [ -e "$p" ] && fail "$p is left after purge"
done
getent passwd wsmb-broker >/dev/null && fail "the wsmb-broker user is left"
getent passwd wsmb-agent >/dev/null && fail "the wsmb-agent user is left"
step "OK"
