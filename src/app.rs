//! The supervisor: builds the stages, owns the cancellation tree and the shutdown order.
//!
//! Stages: listeners (rumqttd servers on our runtime) → intake (local link on the forward
//! filters) → store (one thread) → forwarder (upstream client). If any long-lived stage ends, the
//! whole gateway stops in order and exits non-zero so systemd restarts it.
//!
//! Shutdown order (SIGTERM/SIGINT), bounded by `gateway.shutdown_timeout`: stop the intake and
//! hand what it holds to the store → stop sending upstream, wait for in-flight PUBACKs → commit
//! and close the store → exit 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, ListenerExit, LocalPublisher};
use crate::config::{ByteSize, Config};
use crate::forward::Forwarder;
use crate::intake::{LocalIntake, Rules, StoredReadings};
use crate::notify;
use crate::ops::Telemetry;
use crate::shared::IntakeCounters;
use crate::shared::{ForwardCounters, LinkState};
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

/// One running stage: its own task set (so a stage can be stopped and replaced at SIGHUP without
/// touching the others) and its cancellation token.
struct Stage {
    name: &'static str,
    token: CancellationToken,
    task: JoinSet<Result<(), String>>,
}

impl Stage {
    fn spawn<F>(
        name: &'static str,
        parent: &CancellationToken,
        f: impl FnOnce(CancellationToken) -> F,
    ) -> Stage
    where
        F: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let token = parent.child_token();
        let mut task = JoinSet::new();
        task.spawn(f(token.clone()));
        Stage { name, token, task }
    }

    /// Cancels the stage and waits for it until `deadline`; a straggler is logged by name.
    async fn stop(mut self, deadline: tokio::time::Instant) {
        self.token.cancel();
        match tokio::time::timeout_at(deadline, self.task.join_next()).await {
            Ok(Some(Ok(Err(e)))) => {
                tracing::warn!(stage = self.name, error = %e, "stage ended with an error while stopping")
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(stage = self.name, error = %e, "stage task failed while stopping")
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(stage = self.name, "stage did not stop before the deadline");
                self.task.abort_all();
            }
        }
    }
}

/// The first of `stages` to end, with its result (pending forever if none runs).
async fn any_ended(stages: &mut [&mut Option<Stage>]) -> (&'static str, Result<(), String>) {
    std::future::poll_fn(|cx| {
        for stage in stages.iter_mut() {
            if let Some(st) = stage.as_mut() {
                if let std::task::Poll::Ready(Some(r)) = st.task.poll_join_next(cx) {
                    let name = st.name;
                    return std::task::Poll::Ready(match r {
                        Ok(r) => (name, r),
                        Err(e) => (name, Err(e.to_string())),
                    });
                }
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// What every generation of the reloadable stages shares: built once, kept across SIGHUP.
struct Shared {
    root: CancellationToken,
    store: Option<StoreHandle>,
    local: LocalPublisher,
    link_state_tx: Arc<watch::Sender<LinkState>>,
    link_state: watch::Receiver<LinkState>,
    intake_counters: Arc<IntakeCounters>,
    forward_counters: Arc<ForwardCounters>,
    stats: watch::Receiver<bytes::Bytes>,
    /// Bumped at each reload: link names must be unique while old and new overlap.
    generation: u32,
    /// The MQTT front stores device messages itself; the local-link intake then does not run.
    front_on: bool,
    /// The forward rules the front stores by; replaced at a reload.
    front_rules: Option<Arc<Rules>>,
    /// The front's local subscription registry (an in-process subscriber registers its filters
    /// there first, or the front would acknowledge messages on them without passing them on).
    front_subscriptions: Option<Arc<crate::front::Subscriptions>>,
    /// Readings the hardware stage stored, for the local-link intake to skip (front off only).
    dedup: Option<Arc<StoredReadings>>,
}

/// The intake: the broker subscription on the forward filters, into the store.
fn spawn_intake(cfg: &Config, broker: &Broker, sh: &Shared) -> Result<Option<Stage>, AppError> {
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

fn spawn_forwarder(cfg: &Config, sh: &Shared) -> Option<Stage> {
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
/// committed to the store first, then published locally; it stops first at shutdown.
fn spawn_hardware(cfg: &Config, broker: &Broker, sh: &Shared) -> Result<Option<Stage>, String> {
    let hw = match crate::sources::hardware::Hardware::open(cfg).map_err(|e| e.to_string())? {
        Some(hw) => hw,
        None => return Ok(None),
    };
    // The outputs' command topics are subscribed on the local link below: the front must pass
    // device messages on them to rumqttd. They stay registered after a reload (harmless: their
    // messages then merely take rumqttd's path).
    if let Some(subs) = &sh.front_subscriptions {
        for topic in hw.command_topics() {
            subs.add(&topic);
        }
    }
    let hw_link = broker
        .link(&format!("edgegate-hardware-{}", sh.generation))
        .map_err(|e| e.to_string())?;
    let hw_dedup = sh.dedup.clone();
    let hw_store = sh.store.clone();
    let hw_uplink = cfg.uplink.clone().map(Arc::new);
    let hw_link_state = sh.link_state.clone();
    Ok(Some(Stage::spawn(
        "hardware",
        &sh.root,
        move |t| async move {
            hw.run(hw_link, hw_store, hw_uplink, hw_dedup, hw_link_state, t)
                .await
                .map_err(|e| e.to_string())
        },
    )))
}

/// Sensors the registry should list for `cfg`.
fn configured_sensors(cfg: &Config) -> Vec<(&'static str, String)> {
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
async fn publish_discovery(cfg: &Config, old: Option<&Config>, local: &LocalPublisher) {
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

pub async fn run(cfg: Config, config_path: Option<PathBuf>) -> Result<(), AppError> {
    let started = Instant::now();
    let root = CancellationToken::new();
    let mut cfg = cfg;
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
    let front_rules = cfg.uplink.as_ref().map(|u| Arc::new(Rules::new(u.clone())));
    let durable = match (&front_rules, &store) {
        (Some(rules), Some((handle, _))) => Some(crate::front::Durable {
            uplink: rules.clone(),
            store: handle.clone(),
        }),
        _ => None,
    };
    let (front, broker) = if front_on {
        let (front, internal) =
            crate::front::start(&cfg.broker, &mut listeners, durable, front_token.clone())?;
        let broker = Broker::start_behind(&cfg.broker, internal.v4, internal.v5, &mut listeners);
        (Some(front), broker)
    } else {
        (None, Broker::start(&cfg.broker, &mut listeners)?)
    };
    let device_listeners = crate::broker::ListenerSpec::of(&cfg.broker);
    let front_counters = front.as_ref().map(crate::front::Front::counters);
    if !front_on {
        tracing::warn!("the MQTT front is off (broker.front): a device's PUBACK comes from the in-memory broker, before its message is on disk");
    }
    // ─── end of the MQTT front ───
    let local = broker.publisher("edgegate-local")?;

    // Metrics are bound before READY: a taken port is a start error, like the broker's.
    let metrics_listener = if cfg.metrics.enabled {
        Some(
            crate::ops::serve::bind_metrics(cfg.metrics.listen)
                .await
                .map_err(|e| AppError::Start(e.to_string()))?,
        )
    } else {
        None
    };

    let (link_state_tx, link_state) = watch::channel(if cfg.uplink.is_some() {
        LinkState::Connecting
    } else {
        LinkState::Disabled
    });
    let (stats_tx, stats_rx) = watch::channel(bytes::Bytes::new());
    let mut shared = Shared {
        root: root.clone(),
        store: store.as_ref().map(|(h, _)| h.clone()),
        local: local.clone(),
        link_state_tx: Arc::new(link_state_tx),
        link_state: link_state.clone(),
        intake_counters: Arc::new(IntakeCounters::default()),
        forward_counters: Arc::new(ForwardCounters::default()),
        stats: stats_rx,
        generation: 1,
        front_on,
        front_rules,
        front_subscriptions: front.as_ref().map(crate::front::Front::subscriptions),
        // With the front on, the front stores device messages and no local-link intake runs.
        dedup: (!front_on).then(|| Arc::new(StoredReadings::new())),
    };

    let mut intake = spawn_intake(&cfg, &broker, &shared)?;
    let mut forwarder = spawn_forwarder(&cfg, &shared);
    let mut hardware = spawn_hardware(&cfg, &broker, &shared).map_err(AppError::Start)?;

    // Ready only when the listeners really accept connections (rumqttd cannot tell us).
    tokio::select! {
        r = broker.wait_ready(Duration::from_secs(10)) => r?,
        Some(exit) = listeners.join_next() => {
            let e = match exit {
                Ok(exit) => exit.into_error(),
                Err(e) => BrokerError::ListenerFailed { addr: device_listeners.first().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |l| l.addr), what: "listener", reason: e.to_string() },
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

    // ─── Operations: status socket, metrics, stats message, discovery (src/ops) ────────────
    let telemetry = Arc::new(Telemetry::new(
        gateway_id.clone(),
        shared.intake_counters.clone(),
        shared.forward_counters.clone(),
        link_state.clone(),
        shared.store.clone(),
        device_listeners.iter().map(|l| l.addr.port()).collect(),
        front_counters.clone(),
    ));
    crate::shared::registry::registry().retain_sensors(&configured_sensors(&cfg));
    for (kind, name) in configured_sensors(&cfg) {
        crate::shared::registry::registry().sensor(kind, &name);
    }
    let ops_token = root.child_token();
    if let Some(path) = &cfg.status.socket {
        match crate::ops::serve::bind_status(path) {
            Ok(l) => {
                tokio::spawn(crate::ops::serve::serve_status(
                    l,
                    path.clone(),
                    telemetry.clone(),
                    ops_token.clone(),
                ));
            }
            // Not fatal: the gateway's job is the data; `status` then says it is not running.
            Err(e) => tracing::warn!(error = %e, "edgegate status will not work"),
        }
    }
    if let Some(l) = metrics_listener {
        tracing::info!(listen = %cfg.metrics.listen, "metrics at http://{}/metrics", cfg.metrics.listen);
        tokio::spawn(crate::ops::serve::serve_metrics(
            l,
            telemetry.clone(),
            ops_token.clone(),
        ));
    }
    publish_discovery(&cfg, None, &local).await;
    let new_stats_timer = |cfg: &Config| {
        let every = cfg.status.stats_interval.get();
        (!every.is_zero()).then(|| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        })
    };
    let mut stats_timer = new_stats_timer(&cfg);
    // ─── end of operations ──────────────────────────────────────────────────────────────────

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
    let store_handle = shared.store.clone();
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
                let Some(path) = &config_path else {
                    tracing::warn!("SIGHUP: no configuration file to re-read");
                    continue;
                };
                notify::reloading();
                match reload(path, &cfg, &broker, &mut shared, &mut intake, &mut forwarder, &mut hardware).await {
                    Ok(new_cfg) => {
                        publish_discovery(&new_cfg, Some(&cfg), &local).await;
                        let keep = configured_sensors(&new_cfg);
                        crate::shared::registry::registry().retain_sensors(&keep);
                        for (kind, name) in keep {
                            crate::shared::registry::registry().sensor(kind, &name);
                        }
                        if new_cfg.status.stats_interval != cfg.status.stats_interval {
                            stats_timer = new_stats_timer(&new_cfg);
                        }
                        cfg = new_cfg;
                    }
                    Err(ReloadError::Refused(why)) => {
                        tracing::error!(config = %path.display(), "SIGHUP: the new configuration is not applied; still running on the old one:\n{why}");
                    }
                    Err(ReloadError::Fatal(e)) => {
                        tracing::error!(error = %e, "SIGHUP: a stage could not be restarted; stopping the gateway");
                        failure = Some(e);
                        break;
                    }
                }
                notify::ready(&status_line(&link_state.borrow(), store_handle.as_ref()).await);
            }
            Some(exit) = listeners.join_next() => {
                let err = match exit {
                    Ok(exit) => exit.into_error(),
                    Err(e) => BrokerError::ListenerFailed { addr: device_listeners.first().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |l| l.addr), what: "listener", reason: e.to_string() },
                };
                tracing::error!(error = %err, "a broker listener stopped; stopping the gateway");
                failure = Some(err.into());
                break;
            }
            (stage, r) = async { any_ended(&mut [&mut hardware, &mut intake, &mut forwarder]).await } => {
                let error = match r {
                    Ok(()) => "ended unexpectedly".to_string(),
                    Err(e) => e,
                };
                match stage {
                    "hardware" => hardware = None,
                    "intake" => intake = None,
                    _ => forwarder = None,
                }
                tracing::error!(stage, %error, "a stage stopped; stopping the gateway");
                failure = Some(AppError::StageFailed { stage, error });
                break;
            }
            e = async { match &store_handle { Some(h) => h.failed().await, None => std::future::pending().await } } => {
                tracing::error!(error = %e, "the store failed; stopping the gateway (systemd restarts it; a corrupt file is quarantined at the next start)");
                failure = Some(AppError::Store(e));
                break;
            }
            _ = async { match stats_timer.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                match serde_json::to_vec(&telemetry.snapshot().await) {
                    Ok(json) => {
                        let json = bytes::Bytes::from(json);
                        stats_tx.send_replace(json.clone());
                        local.publish(crate::ops::publish::stats_topic(&cfg), json, false).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot encode the stats message"),
                }
            }
            _ = ticker.tick() => {
                telemetry.sample_rates();
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
    if let Some(h) = hardware.take() {
        h.stop(deadline).await;
    }
    // Then the front: no new device messages (its loopback connections stay until exit).
    front_token.cancel();
    for stage in [intake.take(), forwarder.take()].into_iter().flatten() {
        stage.stop(deadline).await;
    }
    ops_token.cancel();
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
        telemetry.mqtt_in(),
        shared.forward_counters.forwarded.load(Ordering::Relaxed),
    );
    // ─── MQTT front: its totals at exit ───
    if let Some(c) = &front_counters {
        let malformed: u64 = c.malformed().map(|(_, n)| n).sum();
        let refused: u64 = c.refused().map(|(_, n)| n).sum();
        tracing::info!(
            connections = c.connections.load(Ordering::Relaxed),
            held = c.held.load(Ordering::Relaxed),
            stored_qos0 = c.stored_qos0.load(Ordering::Relaxed),
            acked_direct = c.acked_direct.load(Ordering::Relaxed),
            skipped_qos0 = c.skipped_qos0.load(Ordering::Relaxed),
            malformed,
            refused,
            properties_stripped = c.properties_stripped.load(Ordering::Relaxed),
            "front totals"
        );
    }
    tracing::info!(
        taken_from_devices = counts.0,
        forwarded = counts.1,
        uptime_s = started.elapsed().as_secs(),
        "stopped"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

enum ReloadError {
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
/// - GPIO and serial: the hardware stage is restarted when its sections change (outputs pass
///   through their fail-safe state and come back to `initial`).
/// - Broker listeners, users and the store need a restart: a change there is reported and the
///   old values are kept.
async fn reload(
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
    let hardware_changed = uplink_changed
        || !same(&new.gpio, &old.gpio)
        || !same(&new.serial, &old.serial)
        || !same(&new.modbus, &old.modbus)
        || !same(&new.onewire, &old.onewire);
    let deadline = tokio::time::Instant::now() + old.gateway.shutdown_timeout.get();
    sh.generation += 1;
    if hardware_changed {
        if let Some(h) = hardware.take() {
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
    if hardware_changed {
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
        hardware_restarted = hardware_changed,
        "SIGHUP: configuration reloaded"
    );
    Ok(new)
}

/// Config sections compare by their debug form (secrets print redacted: the uplink password is
/// compared on its own).
fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
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
                let age_ms = crate::shared::now_ms().saturating_sub(oldest).max(0);
                s.push_str(&format!(
                    ", oldest {}",
                    crate::shared::human_age(Duration::from_millis(age_ms as u64))
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
