//! SIGHUP (or `Control::Reload`): re-read the file and apply what can change while running.

use std::path::Path;

use super::stage::Stage;
use super::stages::{reconfigure_hardware, spawn_forwarder, spawn_hardware, spawn_intake, Shared};
use super::AppError;
use crate::broker::Broker;
use crate::config::Config;

pub(super) enum ReloadError {
    /// The new file is not applied; the gateway runs on as before.
    Refused(String),
    /// A stage was stopped and its replacement could not start.
    Fatal(AppError),
}

/// SIGHUP: re-reads the file and applies what can change while running.
///
/// - Log level: at once.
/// - Forward rules and uplink settings: a new intake subscribes before the old one stops (a
///   message published in between may be stored twice, never zero times); the forwarder is
///   replaced (what was in flight is sent again: at-least-once). The store and its order are
///   untouched.
/// - GPIO, serial, Modbus, 1-Wire: applied to the running hardware stage unit by unit; only the
///   inputs, outputs, ports and buses whose own settings changed are reopened (a changed output
///   passes through its fail-safe state and comes back at its new `initial`), the others run on
///   untouched (see `sources::hardware`). A change of the GPIO backend restarts the whole stage.
///   The uplink's settings never restart it (readings are stored by the shared rules).
/// - Broker listeners, users and the store need a restart: a change there is reported and the
///   old values are kept.
pub(super) async fn reload(
    path: &Path,
    old: &Config,
    broker: &Broker,
    sh: &mut Shared,
    intake: &mut Option<Stage>,
    forwarder: &mut Option<Stage>,
    hardware: &mut Option<Stage>,
) -> Result<Config, ReloadError> {
    let mut new = crate::config::load(path).map_err(|e| ReloadError::Refused(e.to_string()))?;
    let mut kept = Vec::new();
    if !same(&new.broker, &old.broker) {
        kept.push("broker");
        new.broker = old.broker.clone();
    }
    if !same(&new.store, &old.store) {
        kept.push("store");
        new.store = old.store.clone();
    }
    if new.uplink.is_some() != old.uplink.is_some() {
        return Err(ReloadError::Refused(
            "adding or removing the uplink section needs a restart (the store opens only with an uplink)".into(),
        ));
    }
    if new.gateway.id != old.gateway.id || new.status_topic() != old.status_topic() {
        kept.push("gateway");
        new.gateway = old.gateway.clone();
    }
    if !same(&new.metrics, &old.metrics) || !same(&new.status.socket, &old.status.socket) {
        kept.push("metrics/status.socket");
        new.metrics = old.metrics.clone();
        new.status.socket = old.status.socket.clone();
    }
    if !kept.is_empty() {
        tracing::warn!(sections = %kept.join(", "), "SIGHUP: these settings change only at a restart; keeping the running values");
    }
    if new.log.level != old.log.level {
        match crate::logging::set_level(&new.log.level) {
            Ok(()) => tracing::info!(level = %new.log.level, "log level changed"),
            Err(e) => tracing::warn!(error = %e, "log level not changed"),
        }
    }
    let password = |c: &Config| {
        c.uplink
            .as_ref()
            .and_then(|u| u.password.resolved.as_ref().map(|s| s.expose().to_string()))
    };
    let uplink_changed = !same(&new.uplink, &old.uplink) || password(&new) != password(old);
    let hardware_changed = !same(&new.gpio, &old.gpio)
        || !same(&new.serial, &old.serial)
        || !same(&new.modbus, &old.modbus)
        || !same(&new.onewire, &old.onewire);
    let deadline = tokio::time::Instant::now() + old.gateway.shutdown_timeout.get();
    sh.generation += 1;
    // In place when a stage runs that can take the new settings; otherwise stop and start.
    let in_place = hardware_changed
        && hardware.is_some()
        && !crate::sources::hardware::hardware_is_empty(&new)
        && crate::sources::hardware::reconfigurable(old, &new);
    let restart_hardware = hardware_changed && !in_place;
    if restart_hardware {
        if let Some(h) = hardware.take() {
            tracing::info!("SIGHUP: the hardware stage restarts (GPIO backend changed, or hardware added or removed)");
            h.stop(deadline).await;
        }
    }
    if uplink_changed {
        if let (Some(rules), Some(uplink)) = (&sh.front_rules, &new.uplink) {
            // The front stores by the new rules from its next message on.
            rules.replace(uplink.clone());
        }
        let next = spawn_intake(&new, broker, sh).map_err(ReloadError::Fatal)?;
        if let Some(i) = std::mem::replace(intake, next) {
            i.stop(deadline).await;
        }
        if let Some(f) = forwarder.take() {
            f.stop(deadline).await;
        }
        *forwarder = spawn_forwarder(&new, sh);
    }
    if in_place {
        reconfigure_hardware(&new, sh)
            .await
            .map_err(|e| ReloadError::Fatal(AppError::Start(e)))?;
    }
    if restart_hardware {
        // The old lines were released above; opening may still fail (a pin that does not exist).
        match spawn_hardware(&new, broker, sh) {
            Ok(h) => *hardware = h,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the new hardware configuration cannot be opened; going back to the old one");
                *hardware = spawn_hardware(old, broker, sh).map_err(|e2| {
                    ReloadError::Fatal(AppError::Start(format!(
                        "new hardware: {e}; old hardware again: {e2}"
                    )))
                })?;
                new.gpio = old.gpio.clone();
                new.serial = old.serial.clone();
                new.modbus = old.modbus.clone();
                new.onewire = old.onewire.clone();
            }
        }
    }
    tracing::info!(
        uplink_restarted = uplink_changed,
        hardware_changed,
        hardware_restarted = restart_hardware,
        "SIGHUP: configuration reloaded"
    );
    Ok(new)
}

/// Config sections compare by their debug form (secrets print redacted: the uplink password is
/// compared on its own).
fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}
