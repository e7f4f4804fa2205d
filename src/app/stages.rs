//! Building the stages from the configuration: the local-link intake (front off), the forwarder
//! and the hardware stage, from what every generation shares ([`Shared`]); the sensors the
//! registry lists, and Home Assistant discovery.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::stage::Stage;
use super::AppError;
use crate::broker::{Broker, LocalPublisher};
use crate::config::Config;
use crate::forward::Forwarder;
use crate::intake::{LocalIntake, Rules, StoredReadings};
use crate::shared::{ForwardCounters, IntakeCounters, LinkState};
use crate::sources::hardware::Reconfigure;
use crate::store::StoreHandle;

/// What every generation of the reloadable stages shares: built once, kept across SIGHUP.
pub(super) struct Shared {
    pub(super) root: CancellationToken,
    pub(super) store: Option<StoreHandle>,
    pub(super) local: LocalPublisher,
    pub(super) link_state_tx: Arc<watch::Sender<LinkState>>,
    pub(super) link_state: watch::Receiver<LinkState>,
    pub(super) intake_counters: Arc<IntakeCounters>,
    pub(super) forward_counters: Arc<ForwardCounters>,
    pub(super) stats: watch::Receiver<bytes::Bytes>,
    /// Bumped at each reload: link names must be unique while old and new overlap.
    pub(super) generation: u32,
    /// The MQTT front stores device messages itself; the local-link intake then does not run.
    pub(super) front_on: bool,
    /// The forward rules the front stores by; replaced at a reload.
    pub(super) front_rules: Option<Arc<Rules>>,
    /// The front's local subscription registry (an in-process subscriber registers its filters
    /// there first, or the front would acknowledge messages on them without passing them on).
    pub(super) front_subscriptions: Option<Arc<crate::front::Subscriptions>>,
    /// Readings the hardware stage stored, for the local-link intake to skip (front off only).
    pub(super) dedup: Option<Arc<StoredReadings>>,
    /// The running hardware stage's door for SIGHUP's new settings (see `spawn_hardware`).
    pub(super) hardware_control: Option<tokio::sync::mpsc::Sender<Reconfigure>>,
}

/// The intake: the broker subscription on the forward filters, into the store.
pub(super) fn spawn_intake(
    cfg: &Config,
    broker: &Broker,
    sh: &Shared,
) -> Result<Option<Stage>, AppError> {
    let (Some(uplink), Some(store)) = (&cfg.uplink, &sh.store) else {
        return Ok(None);
    };
    // With the front on, the front stores device messages and the hardware stage its
    // readings: a local-link intake would store each of them a second time.
    if sh.front_on {
        return Ok(None);
    }
    let Some(dedup) = sh.dedup.clone() else {
        return Ok(None);
    };
    let mut link = broker.link(&format!("edgegate-intake-{}", sh.generation))?;
    let intake = LocalIntake {
        uplink: Arc::new(uplink.clone()),
        store: store.clone(),
        counters: sh.intake_counters.clone(),
        dedup,
    };
    intake
        .subscribe(&mut link)
        .map_err(|e| AppError::Start(e.to_string()))?;
    Ok(Some(Stage::spawn(
        "intake",
        &sh.root,
        move |t| async move { intake.run(link, t).await.map_err(|e| e.to_string()) },
    )))
}

pub(super) fn spawn_forwarder(cfg: &Config, sh: &Shared) -> Option<Stage> {
    let (Some(uplink), Some(store)) = (&cfg.uplink, &sh.store) else {
        return None;
    };
    let forwarder = Forwarder {
        uplink: Arc::new(uplink.clone()),
        gateway_id: cfg.gateway.id.clone(),
        status_topic: cfg.status_topic(),
        store: store.clone(),
        local: sh.local.clone(),
        state: sh.link_state_tx.clone(),
        counters: sh.forward_counters.clone(),
        drain_timeout: cfg.gateway.shutdown_timeout.get().mul_f64(0.5),
        stats: sh.stats.clone(),
    };
    Some(Stage::spawn("forwarder", &sh.root, move |t| async move {
        forwarder.run(t).await.map_err(|e| e.to_string())
    }))
}

/// GPIO and serial (sources::hardware). Opened here, so a wrong pin or a missing GPIO chip is an
/// error now (at start: the start fails; at SIGHUP: the reload is refused). Readings are
/// committed to the store first, then published locally; it stops first at shutdown. Its
/// control sender goes to `sh.hardware_control`, for [`reconfigure_hardware`].
pub(super) fn spawn_hardware(
    cfg: &Config,
    broker: &Broker,
    sh: &mut Shared,
) -> Result<Option<Stage>, String> {
    sh.hardware_control = None;
    let hw = match crate::sources::hardware::Hardware::open(cfg).map_err(|e| e.to_string())? {
        Some(hw) => hw,
        None => return Ok(None),
    };
    register_command_topics(cfg, sh);
    let mut hw_link = broker
        .link(&format!("edgegate-hardware-{}", sh.generation))
        .map_err(|e| e.to_string())?;
    hw.subscribe_commands(&mut hw_link)
        .map_err(|e| e.to_string())?;
    let hw_dedup = sh.dedup.clone();
    let hw_store = sh.store.clone();
    let hw_rules = sh.front_rules.clone();
    let hw_link_state = sh.link_state.clone();
    let (control, reconfig) = tokio::sync::mpsc::channel(1);
    sh.hardware_control = Some(control);
    Ok(Some(Stage::spawn(
        "hardware",
        &sh.root,
        move |t| async move {
            hw.run(
                hw_link,
                hw_store,
                hw_rules,
                hw_dedup,
                hw_link_state,
                reconfig,
                t,
            )
            .await
            .map_err(|e| e.to_string())
        },
    )))
}

/// The outputs' and writable points' command topics are subscribed on the hardware stage's
/// local link: the front must pass device messages on them to rumqttd. They stay registered
/// after a reload (harmless: their messages then merely take rumqttd's path).
fn register_command_topics(cfg: &Config, sh: &Shared) {
    if let Some(subs) = &sh.front_subscriptions {
        for topic in crate::sources::hardware::command_topics(cfg) {
            subs.add(&topic);
        }
    }
}

/// SIGHUP with changed hardware settings, applied to the running stage unit by unit (see
/// `sources::hardware`). `Err` when the stage is gone; a unit that could not be opened is
/// reported in the journal and keeps its old settings where it had some.
pub(super) async fn reconfigure_hardware(cfg: &Config, sh: &Shared) -> Result<(), String> {
    let Some(control) = &sh.hardware_control else {
        return Err("the hardware stage is not running".into());
    };
    register_command_topics(cfg, sh);
    let (reply, answer) = tokio::sync::oneshot::channel();
    control
        .send(Reconfigure {
            cfg: cfg.clone(),
            reply,
        })
        .await
        .map_err(|_| "the hardware stage is not running".to_string())?;
    match answer.await {
        Ok(Ok(changes)) => {
            tracing::info!(changes = %changes.join("; "), "SIGHUP: hardware changed in place; every other input, output and port runs on untouched");
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "SIGHUP: part of the new hardware configuration cannot be opened");
            Ok(())
        }
        Err(_) => Err("the hardware stage stopped during the reload".into()),
    }
}

/// Sensors the registry should list for `cfg`.
pub(super) fn configured_sensors(cfg: &Config) -> Vec<(&'static str, String)> {
    cfg.gpio
        .inputs
        .iter()
        .map(|i| ("gpio", i.name.clone()))
        .chain(cfg.serial.ports.iter().map(|p| ("serial", p.name.clone())))
        // Modbus slaves and listed 1-Wire probes (sources::modbus, sources::onewire).
        .chain(cfg.modbus.buses.iter().flat_map(|b| {
            b.slaves
                .iter()
                .map(move |s| ("modbus", format!("{}/{}", b.name, s.name)))
        }))
        .chain(
            cfg.onewire
                .sensors
                .iter()
                .map(|s| ("onewire", s.name().to_string())),
        )
        .collect()
}

/// Publishes Home Assistant discovery (retained) for `cfg`, and empty retained payloads for
/// what `old` announced and `cfg` no longer does, so removed sensors vanish from Home Assistant.
pub(super) async fn publish_discovery(cfg: &Config, old: Option<&Config>, local: &LocalPublisher) {
    let new_msgs = if cfg.homeassistant.enabled {
        crate::ops::publish::discovery_messages(cfg)
    } else {
        Vec::new()
    };
    if let Some(old) = old.filter(|o| o.homeassistant.enabled) {
        for (topic, _) in crate::ops::publish::discovery_messages(old) {
            if !new_msgs.iter().any(|(t, _)| *t == topic) {
                local.publish(topic, bytes::Bytes::new(), true).await;
            }
        }
    }
    let n = new_msgs.len();
    for (topic, payload) in new_msgs {
        local.publish(topic, payload, true).await;
    }
    if n > 0 {
        tracing::info!(entities = n, prefix = %cfg.homeassistant.prefix, "Home Assistant discovery published");
    }
}
