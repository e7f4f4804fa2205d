//! The supervisor: builds the stages, owns the cancellation tree and the shutdown order.
//!
//! - `mod.rs` ([`run`]): opens the store, starts the front (when on) and rumqttd behind it, the
//!   stages, the status socket and metrics, reports READY, then supervises: [`Control`] (signals
//!   in the daemon: [`signals`]), a failed stage or store, the stats timer, the watchdog.
//! - `stages.rs`: building the intake (front off), forwarder and hardware stages.
//! - `stage.rs`: one stage's task set and token; `reload.rs`: what a reload may change.
//!
//! If any long-lived stage ends, the whole gateway stops in order and exits non-zero so systemd
//! restarts it.
//!
//! Shutdown order (Control::Stop: SIGTERM/SIGINT), bounded by `gateway.shutdown_timeout`: the
//! hardware stage (fail-safe outputs applied, its readings committed) → the front stops accepting
//! device messages → the local-link intake hands what it holds to the store, the forwarder waits
//! for in-flight PUBACKs → status and metrics stop → `offline` is published → the store commits
//! and closes → exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod control;
mod reload;
mod stage;
mod stages;

pub use control::{signals, Control};
use reload::{reload, ReloadError};
use stage::any_ended;
use stages::{
    configured_sensors, publish_discovery, spawn_forwarder, spawn_hardware, spawn_intake, Shared,
};

use crate::broker::{Broker, BrokerError, ListenerExit};
use crate::config::{ByteSize, Config};
use crate::intake::{Rules, StoredReadings};
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

/// Runs the gateway until `control` says stop (or closes), a stage fails or the store fails.
/// `control` is [`signals`] in the daemon; a caller can drive it with any sender.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    mut control: tokio::sync::mpsc::Receiver<Control>,
) -> Result<(), AppError> {
    let started = Instant::now();
    let root = CancellationToken::new();
    let mut cfg = cfg;
    let gateway_id = cfg.gateway.id.clone();
    let status_topic = cfg.status_topic();

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
        hardware_control: None,
    };

    let mut intake = spawn_intake(&cfg, &broker, &shared)?;
    // Hardware first: its command subscriptions must be in place before the forwarder connects
    // and the upstream delivers what it kept for us.
    let mut hardware = spawn_hardware(&cfg, &broker, &mut shared).map_err(AppError::Start)?;
    let mut forwarder = spawn_forwarder(&cfg, &shared);

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
    // The first candidate that can be bound (see `StatusSocket::Auto`); every failure is said.
    let mut status_errors = Vec::new();
    for path in cfg.status.socket.candidates(&cfg.store.path) {
        match crate::ops::serve::bind_status(&path) {
            Ok(l) => {
                tracing::info!(socket = %path.display(), "status socket");
                tokio::spawn(crate::ops::serve::serve_status(
                    l,
                    path.clone(),
                    telemetry.clone(),
                    ops_token.clone(),
                ));
                status_errors.clear();
                break;
            }
            Err(e) => status_errors.push(e.to_string()),
        }
    }
    if !status_errors.is_empty() {
        // Not fatal: the gateway's job is the data; `status` then says it is not running.
        tracing::warn!(error = %status_errors.join("; "), "edgegate status will not work");
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
    // What the network may do without a password (the same lines `check-config` prints).
    let shown = config_path
        .clone()
        .unwrap_or_else(|| PathBuf::from("<config>"));
    let text = config_path
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    for w in crate::config::warnings(&cfg, text.as_deref(), &shown) {
        tracing::warn!("{w}");
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
            c = control.recv() => {
                match c {
                    Some(Control::Stop(why)) => { tracing::info!("{why}: stopping"); break; }
                    None => { tracing::info!("the control channel closed: stopping"); break; }
                    Some(Control::Reload) => {}
                }
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
    use super::*;

    #[test]
    fn thousands_are_grouped_with_spaces() {
        assert_eq!(super::group_thousands(12345), "12 345");
        assert_eq!(super::group_thousands(999), "999");
        assert_eq!(super::group_thousands(1_000_000), "1 000 000");
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    /// A gateway that stores `sensors/#` for an upstream nobody listens on.
    fn config(dir: &std::path::Path, port: u16) -> Config {
        let yaml = format!(
            "gateway: {{id: t}}\nbroker: {{listen: '127.0.0.1:{port}'}}\nstore: {{path: '{db}'}}\nstatus: {{socket: '{sock}'}}\nuplink:\n  url: mqtt://127.0.0.1:{up}\n  forward: [{{local: 'sensors/#'}}]\n",
            db = dir.join("buffer.db").display(),
            sock = dir.join("status.sock").display(),
            up = free_port(),
        );
        crate::config::load_str(&yaml, std::path::Path::new("test.yaml")).expect("a valid config")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_stops_in_order_when_its_control_says_stop_and_the_store_keeps_what_a_device_published(
    ) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let cfg = config(dir.path(), port);
        let store_cfg = cfg.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let device = async move {
            // A device publishes one QoS 1 message once the broker accepts connections.
            let mut stream = None;
            for _ in 0..200 {
                if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    stream = Some(s);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let mut stream = stream.expect("the broker accepts connections within 5 s");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // CONNECT (MQTT 3.1.1, clean session, keep-alive 30 s, client id "d").
            let connect = [
                0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 1, b'd',
            ];
            stream.write_all(&connect).await.expect("CONNECT sent");
            let mut connack = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut connack))
                .await
                .expect("a CONNACK within 5 s")
                .expect("the CONNACK read");
            assert_eq!(connack, [0x20, 2, 0, 0]);
            // PUBLISH QoS 1 "sensors/a" = "42", packet id 7.
            let mut publish = vec![0x32, 0];
            publish.extend_from_slice(&[0, 9]);
            publish.extend_from_slice(b"sensors/a");
            publish.extend_from_slice(&[0, 7]);
            publish.extend_from_slice(b"42");
            publish[1] = (publish.len() - 2) as u8;
            stream.write_all(&publish).await.expect("PUBLISH sent");
            let mut puback = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut puback))
                .await
                .expect("a PUBACK within 5 s")
                .expect("the PUBACK read");
            assert_eq!(puback, [0x40, 2, 0, 7]);

            tx.send(Control::Stop("test"))
                .await
                .expect("the gateway listens");
        };
        // `run` is not Send (the daemon drives it with block_on): both halves run on this task.
        let (result, ()) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(run(cfg, None, rx), device)
        })
        .await
        .expect("run returns within 30 s");
        assert!(result.is_ok(), "run ended with {result:?}");

        // The store was closed cleanly and holds the acknowledged message.
        let (handle, _report, thread) = Store::open(&store_cfg).expect("the store reopens");
        let rows = handle
            .fetch(&crate::store::Cursor::default(), 10)
            .await
            .expect("rows can be read");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].topic, "sensors/a");
        assert_eq!(&rows[0].payload[..], b"42");
        handle.close().await.expect("the store closes");
        let _ = thread.join();
    }
}
