//! The supervisor: builds the stages, owns the cancellation tree and the shutdown order.
//!
//! Stages: listeners (rumqttd servers on our runtime) → intake (local link on the forward
//! filters) → store (one thread) → forwarder (upstream client). If any long-lived stage ends, the
//! whole gateway stops in order and exits non-zero so systemd restarts it.
//!
//! Shutdown order (SIGTERM/SIGINT), bounded by `gateway.shutdown_timeout`: stop the intake and
//! hand what it holds to the store → stop sending upstream, wait for in-flight PUBACKs → commit
//! and close the store → exit 0.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, ListenerExit};
use crate::config::{ByteSize, Config};
use crate::forward::{ForwardCounters, Forwarder, LinkState};
use crate::notify;
use crate::sources::local::{IntakeCounters, LocalIntake};
use crate::store::{Store, StoreHandle};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot start: {0}")]
    Start(String),
    #[error(transparent)]
    Broker(Box<BrokerError>),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("stage `{stage}` failed: {error}")]
    StageFailed { stage: &'static str, error: String },
}

impl From<BrokerError> for AppError {
    fn from(e: BrokerError) -> Self {
        AppError::Broker(Box::new(e))
    }
}

type StageResult = (&'static str, Result<(), String>);

pub async fn run(cfg: Config) -> Result<(), AppError> {
    let started = Instant::now();
    let root = CancellationToken::new();
    let gateway_id = cfg.gateway.id.clone();
    let status_topic = cfg.status_topic();

    // Signals first, so a SIGTERM during start-up is not the default "die at once".
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| AppError::Start(e.to_string()))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| AppError::Start(e.to_string()))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| AppError::Start(e.to_string()))?;

    // The store opens before any listener: nothing may be accepted that cannot be kept.
    let store = match &cfg.uplink {
        Some(_) => {
            let (handle, report, thread) = Store::open(&cfg.store)?;
            if let Some(q) = &report.quarantined {
                tracing::error!(quarantined = %q.display(), "the store file was unreadable; it was moved aside and a new store started");
            }
            Some((handle, thread))
        }
        None => None,
    };

    let mut listeners: JoinSet<ListenerExit> = JoinSet::new();
    // ─── MQTT front (src/front/): device messages are stored before rumqttd sees them ───
    let front_on = cfg.broker.front_enabled();
    let front_token = root.child_token();
    let durable = match (&cfg.uplink, &store) {
        (Some(uplink), Some((handle, _))) => Some(crate::front::Durable {
            uplink: Arc::new(uplink.clone()),
            store: handle.clone(),
        }),
        _ => None,
    };
    let broker = Broker::start(&cfg.broker, &mut listeners, durable, front_token.clone())?;
    crate::sources::hardware::set_intake_stores_local(!front_on);
    if !front_on {
        tracing::warn!("the MQTT front is off (broker.front): a device's PUBACK comes from the in-memory broker, before its message is on disk");
    }
    // ─── end of the MQTT front ───
    let local = broker.publisher("edgegate-local")?;

    let mut stages: JoinSet<StageResult> = JoinSet::new();
    let intake_token = root.child_token();
    let forward_token = root.child_token();
    let (link_state_tx, link_state) = watch::channel(if cfg.uplink.is_some() {
        LinkState::Connecting
    } else {
        LinkState::Disabled
    });
    let intake_counters = Arc::new(IntakeCounters::default());
    let forward_counters = Arc::new(ForwardCounters::default());

    if let (Some(uplink), Some((store_handle, _))) = (&cfg.uplink, &store) {
        let uplink = Arc::new(uplink.clone());
        // With the front on, the front stores device messages and the hardware stage its
        // readings: a local-link intake would store each of them a second time.
        if !front_on {
            let (mut link_tx, link_rx) = broker.link("edgegate-intake")?;
            let intake = LocalIntake {
                uplink: uplink.clone(),
                store: store_handle.clone(),
                counters: intake_counters.clone(),
            };
            intake
                .subscribe(&mut link_tx)
                .map_err(|e| AppError::Start(e.to_string()))?;
            let t = intake_token.clone();
            stages.spawn(async move {
                (
                    "intake",
                    intake
                        .run(link_tx, link_rx, t)
                        .await
                        .map_err(|e| e.to_string()),
                )
            });
        }

        let forwarder = Forwarder {
            uplink,
            gateway_id: gateway_id.clone(),
            status_topic: status_topic.clone(),
            store: store_handle.clone(),
            local: local.clone(),
            state: link_state_tx,
            counters: forward_counters.clone(),
            drain_timeout: cfg.gateway.shutdown_timeout.get().mul_f64(0.5),
        };
        let t = forward_token.clone();
        stages.spawn(async move {
            (
                "forwarder",
                forwarder.run(t).await.map_err(|e| e.to_string()),
            )
        });
    }

    // ─── Hardware stage (GPIO, serial; sources::hardware) ────────────────────────────────
    // Opened before READY so a wrong pin or a missing GPIO chip fails the start. Readings are
    // committed to the store first, then published locally; it stops first at shutdown.
    let hardware_token = root.child_token();
    let mut hardware_running = false;
    if let Some(hw) = crate::sources::hardware::Hardware::open(&cfg)
        .map_err(|e| AppError::Start(e.to_string()))?
    {
        let (hw_tx, hw_rx) = broker.link("edgegate-hardware")?;
        let hw_store = store.as_ref().map(|(h, _)| h.clone());
        let hw_uplink = cfg.uplink.clone().map(Arc::new);
        let hw_link_state = link_state.clone();
        let t = hardware_token.clone();
        hardware_running = true;
        stages.spawn(async move {
            (
                "hardware",
                hw.run(hw_tx, hw_rx, hw_store, hw_uplink, hw_link_state, t)
                    .await
                    .map_err(|e| e.to_string()),
            )
        });
    }
    // ─── end of the hardware stage ──────────────────────────────────────────────────────────

    // Ready only when the listeners really accept connections (rumqttd cannot tell us).
    tokio::select! {
        r = broker.wait_ready(Duration::from_secs(10)) => r?,
        Some(exit) = listeners.join_next() => {
            let e = match exit {
                Ok(exit) => exit.into_error(),
                Err(e) => BrokerError::ListenerFailed { addr: broker.listeners()[0].addr, what: "listener", reason: e.to_string() },
            };
            return Err(e.into());
        }
    }
    local
        .publish(
            status_topic.clone(),
            bytes::Bytes::from_static(b"online"),
            true,
        )
        .await;
    let addrs: Vec<String> = broker
        .listeners()
        .iter()
        .map(|l| format!("{} ({})", l.addr, l.what))
        .collect();
    tracing::info!(gateway = %gateway_id, listeners = %addrs.join(", "), startup_ms = started.elapsed().as_millis() as u64, "ready");
    if cfg.broker.users.is_empty() {
        let exposed: Vec<String> = broker
            .listeners()
            .iter()
            .filter(|l| !l.addr.ip().is_loopback())
            .map(|l| l.addr.to_string())
            .collect();
        if !exposed.is_empty() {
            tracing::warn!(listeners = %exposed.join(", "), "the broker accepts anonymous clients from the network (no broker.users configured)");
        }
    }
    let store_handle = store.as_ref().map(|(h, _)| h.clone());
    notify::ready(&status_line(&link_state.borrow(), store_handle.as_ref()).await);

    // Supervise.
    let tick = notify::watchdog_interval()
        .map(|w| w / 2)
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    let mut ticker = tokio::time::interval(tick);
    let mut failure: Option<AppError> = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                tracing::warn!("SIGHUP: configuration reload is not supported yet; restart the service to apply changes");
            }
            Some(exit) = listeners.join_next() => {
                let err = match exit {
                    Ok(exit) => exit.into_error(),
                    Err(e) => BrokerError::ListenerFailed { addr: broker.listeners()[0].addr, what: "listener", reason: e.to_string() },
                };
                tracing::error!(error = %err, "a broker listener stopped; stopping the gateway");
                failure = Some(err.into());
                break;
            }
            Some(done) = stages.join_next() => {
                let (stage, error) = match done {
                    Ok((stage, Ok(()))) => (stage, "ended unexpectedly".to_string()),
                    Ok((stage, Err(e))) => (stage, e),
                    Err(e) => ("task", e.to_string()),
                };
                tracing::error!(stage, %error, "a stage stopped; stopping the gateway");
                failure = Some(AppError::StageFailed { stage, error });
                break;
            }
            e = async { match &store_handle { Some(h) => h.failed().await, None => std::future::pending().await } } => {
                tracing::error!(error = %e, "the store failed; stopping the gateway (systemd restarts it; a corrupt file is quarantined at the next start)");
                failure = Some(AppError::Store(e));
                break;
            }
            _ = ticker.tick() => {
                let line = status_line(&link_state.borrow().clone(), store_handle.as_ref()).await;
                notify::status(&line);
                // The watchdog is fed only while the store answers: a wedged store thread means
                // nothing is being kept, and systemd should restart us.
                let store_ok = match &store_handle {
                    Some(h) => tokio::time::timeout(Duration::from_secs(2), h.stats()).await.is_ok_and(|r| r.is_ok()),
                    None => true,
                };
                if store_ok {
                    notify::watchdog();
                } else {
                    tracing::warn!("store did not answer within 2 s; not feeding the watchdog");
                }
            }
        }
    }

    // Orderly stop.
    notify::stopping();
    let deadline = tokio::time::Instant::now() + cfg.gateway.shutdown_timeout.get();
    // Hardware first: fail-safe outputs applied, its readings committed before the intake stops.
    hardware_token.cancel();
    if hardware_running {
        wait_stage(&mut stages, "hardware", deadline).await;
    }
    front_token.cancel();
    intake_token.cancel();
    if !front_on {
        wait_stage(&mut stages, "intake", deadline).await;
    }
    forward_token.cancel();
    wait_stage(&mut stages, "forwarder", deadline).await;
    root.cancel();
    local
        .publish(status_topic, bytes::Bytes::from_static(b"offline"), true)
        .await;
    if let Some((handle, thread)) = store {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining.max(Duration::from_secs(1)), handle.close()).await {
            Ok(Ok(())) => {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                tracing::info!("store closed");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "store close failed; committed rows are safe, the next start recovers the rest of the WAL")
            }
            Err(_) => {
                tracing::error!("store did not close before the deadline; committed rows are safe")
            }
        }
    }
    listeners.abort_all();
    let counts = (
        intake_counters.received.load(Ordering::Relaxed),
        forward_counters.forwarded.load(Ordering::Relaxed),
    );
    // ─── MQTT front: its totals at exit ───
    if let Some(c) = broker.front_counters() {
        let malformed: u64 = c.malformed().map(|(_, n)| n).sum();
        let refused: u64 = c.refused().map(|(_, n)| n).sum();
        tracing::info!(
            connections = c.connections.load(Ordering::Relaxed),
            held = c.held.load(Ordering::Relaxed),
            stored_qos0 = c.stored_qos0.load(Ordering::Relaxed),
            malformed,
            refused,
            properties_stripped = c.properties_stripped.load(Ordering::Relaxed),
            "front totals"
        );
    }
    tracing::info!(
        received = counts.0,
        forwarded = counts.1,
        uptime_s = started.elapsed().as_secs(),
        "stopped"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Waits for one named stage within the overall deadline; a straggler is logged by name.
async fn wait_stage(
    stages: &mut JoinSet<StageResult>,
    name: &'static str,
    deadline: tokio::time::Instant,
) {
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining, stages.join_next()).await {
            Ok(Some(Ok((stage, r)))) => {
                if let Err(e) = r {
                    tracing::warn!(stage, error = %e, "stage ended with an error during shutdown");
                }
                if stage == name {
                    return;
                }
            }
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "stage task failed during shutdown"),
            Ok(None) => return,
            Err(_) => {
                tracing::warn!(
                    stage = name,
                    "stage did not stop before the shutdown deadline"
                );
                return;
            }
        }
    }
}

/// One line for `systemctl status`: link state and backlog.
async fn status_line(link: &LinkState, store: Option<&StoreHandle>) -> String {
    let mut s = link.describe();
    if let Some(h) = store {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(1), h.stats()).await {
            s.push_str(&format!(
                "; {} queued ({})",
                group_thousands(st.rows),
                ByteSize(st.bytes)
            ));
            if let Some(oldest) = st.oldest_created_ms {
                let age_ms = crate::sources::local::now_ms()
                    .saturating_sub(oldest)
                    .max(0);
                s.push_str(&format!(
                    ", oldest {}",
                    crate::forward::human_age(Duration::from_millis(age_ms as u64))
                ));
            }
        }
    }
    s
}

pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped_with_spaces() {
        assert_eq!(super::group_thousands(12345), "12 345");
        assert_eq!(super::group_thousands(999), "999");
        assert_eq!(super::group_thousands(1_000_000), "1 000 000");
    }
}
