//! systemd notifications (no-ops when not started by systemd with `Type=notify`).

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// READY=1: the store is open and the listeners accept connections.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS=…: shown by `systemctl status edgegate`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// WATCHDOG=1: sent by the supervisor's tick (`app`) only while the store answers within 2 s; a
/// stage that ends stops the gateway instead.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// RELOADING=1 at SIGHUP; `ready` follows when the new configuration is applied (or refused).
pub fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog interval systemd expects, when it set one for us.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
