//! systemd's notification protocol for `Type=notify` units: `READY=1` once the daemon can do its
//! job, `STATUS=` lines for `systemctl status`, `RELOADING=1`/`STOPPING=1`, and the watchdog
//! (`WATCHDOG=1` at half of `WatchdogSec`, so a wedged process is killed and restarted).
//!
//! Everything here does nothing outside systemd (no `NOTIFY_SOCKET`), so the daemons call it
//! unconditionally; a failure to notify is logged at debug level only by the caller's choice,
//! never fatal.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(states);
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A status line for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `RELOADING=1` with the monotonic time systemd wants with it; then call [`ready`] again.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// How often to feed the watchdog (half of `WatchdogSec`), when the unit has one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// `WATCHDOG=1`: "still alive".
pub fn feed_watchdog() {
    send(&[NotifyState::Watchdog]);
}
