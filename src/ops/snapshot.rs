//! One picture of the running gateway: what `edgegate status`, `/metrics` and the periodic stats
//! message all show, built from the same counters the logs report.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::front::FrontCounters;
use crate::shared::registry::registry;
use crate::shared::{now_ms, IntakeCounters};
use crate::shared::{ForwardCounters, LinkState};
use crate::store::StoreHandle;

/// The live sources of a snapshot, shared by the status socket, the metrics endpoint and the
/// stats publisher.
pub struct Telemetry {
    pub gateway_id: String,
    pub started: Instant,
    pub intake: Arc<IntakeCounters>,
    pub forward: Arc<ForwardCounters>,
    pub link: watch::Receiver<LinkState>,
    pub store: Option<StoreHandle>,
    /// Ports devices connect to (for counting connected devices without the front).
    pub device_ports: Vec<u16>,
    /// The MQTT front's counters, when it owns the device ports.
    pub front: Option<Arc<FrontCounters>>,
    rates: Mutex<RateSampler>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub version: String,
    pub gateway_id: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub uplink: UplinkStatus,
    /// `None` without an uplink (nothing is stored).
    pub backlog: Option<Backlog>,
    pub rates: Rates,
    /// Messages taken in, by source: `mqtt` (devices, on forwarded topics), `gpio`, `serial`.
    pub messages_in: BTreeMap<String, u64>,
    /// Messages that will never be forwarded, by reason (see the README's "Operating edgegate").
    pub dropped: BTreeMap<String, u64>,
    /// Established connections on the broker's device ports; `None` if `/proc` cannot tell.
    pub devices_connected: Option<u64>,
    pub sensors: Vec<SensorStatus>,
    pub store: Option<StoreFile>,
    /// The MQTT front (device connections): `None` when `broker.front` is off.
    pub front: Option<FrontStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FrontStatus {
    pub connections_total: u64,
    /// Connections closed for a malformed packet, by reason.
    pub malformed: BTreeMap<String, u64>,
    /// Connections refused or closed by policy (auth, ACL, limits, timeouts), by reason.
    pub refused: BTreeMap<String, u64>,
    /// MQTT 5 publishes whose properties were removed to protect 3.1.1 subscribers.
    pub properties_stripped: u64,
    /// Stored QoS 1 messages without a local subscriber, acknowledged by the front itself
    /// (rumqttd never saw them).
    #[serde(default)]
    pub acked_direct: u64,
    /// Stored QoS 0 messages without a local subscriber, not passed to rumqttd.
    #[serde(default)]
    pub skipped_qos0: u64,
    /// MQTT 3.1.1 connections whose QoS 1/2 messages wait unacknowledged because the store
    /// refuses new messages, right now, and how many messages wait.
    #[serde(default)]
    pub devices_held: u64,
    #[serde(default)]
    pub messages_held: u64,
    /// MQTT 5 QoS 1/2 messages answered PUBACK/PUBREC 0x97 because the store refused them,
    /// by the store's reason.
    #[serde(default)]
    pub rejected: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UplinkStatus {
    /// `up`, `down`, `connecting` or `disabled`.
    pub state: String,
    /// Seconds in the current state (up or down).
    pub for_s: Option<u64>,
    pub last_error: Option<String>,
    pub reconnects: u64,
    pub forwarded: u64,
    pub refused: u64,
    pub downlink: u64,
    /// Downlink commands dropped as stale.
    #[serde(default)]
    pub downlink_stale: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Backlog {
    pub rows: u64,
    pub bytes: u64,
    pub oldest_age_s: Option<f64>,
    pub per_priority: Vec<PriorityBacklog>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PriorityBacklog {
    pub priority: u8,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Rates {
    /// Messages per second taken in / forwarded, over the last sampling period (~5 s).
    pub in_per_s: f64,
    pub out_per_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SensorStatus {
    /// `gpio` or `serial`.
    pub kind: String,
    pub name: String,
    pub readings: u64,
    pub last_reading_age_s: Option<f64>,
    pub errors: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreFile {
    pub path: String,
    pub file_bytes: u64,
    pub free_disk_bytes: Option<u64>,
    /// `true` while new messages are taken; otherwise `refusing` says why.
    #[serde(default)]
    pub accepting: bool,
    #[serde(default)]
    pub refusing: Option<Refusing>,
    /// The disk reserve that lets deletes commit on a full disk is held.
    #[serde(default)]
    pub reserve_held: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Refusing {
    /// `disk_full`, `store_full`, `read_only` or `io_error`.
    pub reason: String,
    pub meaning: String,
    pub for_s: f64,
}

#[derive(Default)]
struct RateSampler {
    last: Option<(Instant, u64, u64)>,
    rates: Rates,
}

impl Telemetry {
    pub fn new(
        gateway_id: String,
        intake: Arc<IntakeCounters>,
        forward: Arc<ForwardCounters>,
        link: watch::Receiver<LinkState>,
        store: Option<StoreHandle>,
        device_ports: Vec<u16>,
        front: Option<Arc<FrontCounters>>,
    ) -> Telemetry {
        Telemetry {
            gateway_id,
            started: Instant::now(),
            intake,
            forward,
            link,
            store,
            device_ports,
            front,
            rates: Mutex::new(RateSampler::default()),
        }
    }

    /// Device messages taken for forwarding: by the front when it runs, else by the intake.
    pub fn mqtt_in(&self) -> u64 {
        let front = self.front.as_ref().map_or(0, |f| {
            f.held.load(Ordering::Relaxed)
                + f.stored_qos0.load(Ordering::Relaxed)
                + f.wills_stored.load(Ordering::Relaxed)
        });
        self.intake.taken.load(Ordering::Relaxed) + front
    }

    fn totals(&self) -> (u64, u64) {
        let taken = self.mqtt_in() + registry().sum("messages_in_total", None);
        (taken, self.forward.forwarded.load(Ordering::Relaxed))
    }

    /// Called every few seconds by the supervisor: the rates are the change since the last call.
    pub fn sample_rates(&self) {
        let now = Instant::now();
        let (taken, out) = self.totals();
        let mut s = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, t_in, t_out)) = s.last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.1 {
                s.rates = Rates {
                    in_per_s: round1(taken.saturating_sub(t_in) as f64 / dt),
                    out_per_s: round1(out.saturating_sub(t_out) as f64 / dt),
                };
            }
        }
        s.last = Some((now, taken, out));
    }

    pub async fn snapshot(&self) -> Snapshot {
        let link = self.link.borrow().clone();
        let (state, for_s, last_error) = match &link {
            LinkState::Up { since } => ("up", Some(since.elapsed().as_secs()), None),
            LinkState::Down { since, error } => {
                ("down", Some(since.elapsed().as_secs()), Some(error.clone()))
            }
            LinkState::Connecting => ("connecting", None, None),
            LinkState::Disabled => ("disabled", None, None),
        };
        let f = &self.forward;
        let uplink = UplinkStatus {
            state: state.to_string(),
            for_s,
            last_error: last_error.or_else(|| f.last_error()),
            reconnects: f.reconnects.load(Ordering::Relaxed),
            forwarded: f.forwarded.load(Ordering::Relaxed),
            refused: f.refused.load(Ordering::Relaxed),
            downlink: f.downlink.load(Ordering::Relaxed),
            downlink_stale: f.downlink_stale.load(Ordering::Relaxed),
        };
        let reg = registry();
        let mut messages_in = BTreeMap::new();
        messages_in.insert("mqtt".to_string(), self.mqtt_in());
        for source in ["gpio", "serial", "modbus", "onewire"] {
            messages_in.insert(
                source.to_string(),
                reg.sum("messages_in_total", Some(("source", source))),
            );
        }
        let mut dropped = BTreeMap::new();
        dropped.insert(
            "overrun".to_string(),
            self.intake.overrun.load(Ordering::Relaxed),
        );
        dropped.insert(
            "upstream_refused".to_string(),
            f.refused.load(Ordering::Relaxed),
        );
        let mut backlog = None;
        let mut store = None;
        if let Some(h) = &self.store {
            if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), h.stats()).await {
                for (reason, n) in st.dropped.iter() {
                    dropped.insert(reason.to_string(), n);
                }
                backlog = Some(Backlog {
                    rows: st.rows,
                    bytes: st.bytes,
                    oldest_age_s: st
                        .oldest_created_ms
                        .map(|ms| (now_ms().saturating_sub(ms)).max(0) as f64 / 1000.0),
                    per_priority: st
                        .per_priority
                        .iter()
                        .map(|p| PriorityBacklog {
                            priority: p.priority,
                            rows: p.rows,
                            bytes: p.bytes,
                        })
                        .collect(),
                });
                let refusing = match &st.admission {
                    crate::store::Admission::Open => None,
                    crate::store::Admission::Refusing { reason, since_ms } => Some(Refusing {
                        reason: reason.name().to_string(),
                        meaning: reason.meaning().to_string(),
                        for_s: now_ms().saturating_sub(*since_ms).max(0) as f64 / 1000.0,
                    }),
                };
                store = Some(StoreFile {
                    path: h.path().display().to_string(),
                    file_bytes: st.file_bytes,
                    free_disk_bytes: st.free_disk_bytes,
                    accepting: refusing.is_none(),
                    refusing,
                    reserve_held: st.reserve_held,
                });
            }
        }
        let now = now_ms();
        let sensors = reg
            .sensors()
            .into_iter()
            .map(|(kind, name, s)| SensorStatus {
                kind: kind.to_string(),
                name,
                readings: s.readings,
                last_reading_age_s: s
                    .last_reading_ms
                    .map(|ms| now.saturating_sub(ms).max(0) as f64 / 1000.0),
                errors: s.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            })
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            gateway_id: self.gateway_id.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            uplink,
            backlog,
            rates: self
                .rates
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .rates
                .clone(),
            messages_in,
            dropped,
            devices_connected: match &self.front {
                Some(f) => Some(f.open.load(Ordering::Relaxed) as u64),
                None => established_on(&self.device_ports),
            },
            sensors,
            store,
            front: self.front.as_ref().map(|f| FrontStatus {
                connections_total: f.connections.load(Ordering::Relaxed),
                malformed: f
                    .malformed()
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| (k.to_string(), n))
                    .collect(),
                refused: f
                    .refused()
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| (k.to_string(), n))
                    .collect(),
                properties_stripped: f.properties_stripped.load(Ordering::Relaxed),
                acked_direct: f.acked_direct.load(Ordering::Relaxed),
                skipped_qos0: f.skipped_qos0.load(Ordering::Relaxed),
                devices_held: f.devices_held.load(Ordering::Relaxed) as u64,
                messages_held: f.messages_held.load(Ordering::Relaxed) as u64,
                rejected: f
                    .rejected()
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| (k.to_string(), n))
                    .collect(),
            }),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Counts established TCP connections whose local port is one of `ports` (devices connected to
/// our listeners), from `/proc/self/net/tcp{,6}` — what `ss` reads. rumqttd does not expose its
/// connection count outside its metrics feature, which we do not use.
pub fn established_on(ports: &[u16]) -> Option<u64> {
    let mut total = 0;
    let mut any = false;
    for file in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            any = true;
            total += count_established(&text, ports);
        }
    }
    any.then_some(total)
}

fn count_established(table: &str, ports: &[u16]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1);
            let state = cols.nth(1);
            let port = local
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            // 01 = TCP_ESTABLISHED.
            state == Some("01") && port.is_some_and(|p| ports.contains(&p))
        })
        .count() as u64
}

impl Snapshot {
    /// The human form of `edgegate status`.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "edgegate {} — gateway {} (pid {}), up {}",
            self.version,
            self.gateway_id,
            self.pid,
            crate::shared::human_age(Duration::from_secs(self.uptime_s))
        ));
        let u = &self.uplink;
        let since = u
            .for_s
            .map(|s| format!(" for {}", crate::shared::human_age(Duration::from_secs(s))))
            .unwrap_or_default();
        line(format!(
            "uplink:   {}{since}; {} forwarded, {} reconnects, {} refused, {} downlink ({} stale dropped)",
            u.state, u.forwarded, u.reconnects, u.refused, u.downlink, u.downlink_stale
        ));
        if let Some(e) = &u.last_error {
            line(format!("          last error: {e}"));
        }
        match &self.backlog {
            Some(b) => {
                let oldest = b
                    .oldest_age_s
                    .map(|a| {
                        format!(
                            ", oldest {}",
                            crate::shared::human_age(Duration::from_secs_f64(a))
                        )
                    })
                    .unwrap_or_default();
                line(format!(
                    "backlog:  {} messages, {}{oldest}",
                    b.rows,
                    crate::config::ByteSize(b.bytes)
                ));
                for p in &b.per_priority {
                    line(format!(
                        "          priority {}: {} messages, {}",
                        p.priority,
                        p.rows,
                        crate::config::ByteSize(p.bytes)
                    ));
                }
            }
            None => line("backlog:  no uplink configured, nothing is stored".to_string()),
        }
        line(format!(
            "rates:    in {:.1}/s, out {:.1}/s",
            self.rates.in_per_s, self.rates.out_per_s
        ));
        let ins: Vec<String> = self
            .messages_in
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        line(format!("in:       {}", ins.join(", ")));
        let drops: Vec<String> = self
            .dropped
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        line(format!("dropped:  {}", drops.join(", ")));
        line(format!(
            "devices:  {}",
            self.devices_connected
                .map(|n| n.to_string())
                .unwrap_or_else(|| "unknown".into())
        ));
        for sn in &self.sensors {
            let last = sn
                .last_reading_age_s
                .map(|a| {
                    format!(
                        "last reading {} ago",
                        crate::shared::human_age(Duration::from_secs_f64(a))
                    )
                })
                .unwrap_or_else(|| "no reading yet".into());
            let errs: Vec<String> = sn.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let errs = if errs.is_empty() {
                String::new()
            } else {
                format!("; errors: {}", errs.join(", "))
            };
            line(format!(
                "sensor:   {} {}: {} readings, {last}{errs}",
                sn.kind, sn.name, sn.readings
            ));
        }
        if let Some(f) = &self.front {
            let closed: Vec<String> = f
                .malformed
                .iter()
                .chain(&f.refused)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            line(format!(
                "front:    {} connections since start; closed: {}; without rumqttd (no local subscriber): {} QoS 1 acknowledged, {} QoS 0",
                f.connections_total,
                if closed.is_empty() {
                    "none".to_string()
                } else {
                    closed.join(", ")
                },
                f.acked_direct,
                f.skipped_qos0,
            ));
            if f.devices_held > 0 {
                line(format!(
                    "          HELD: {} MQTT 3.1.1 devices wait with {} unacknowledged messages (the store refuses new messages)",
                    f.devices_held, f.messages_held
                ));
            }
            if !f.rejected.is_empty() {
                let r: Vec<String> = f.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
                line(format!(
                    "          refused to MQTT 5 devices (PUBACK 0x97): {}",
                    r.join(", ")
                ));
            }
        }
        if let Some(st) = &self.store {
            let free = st
                .free_disk_bytes
                .map(|b| format!(", {} free on its disk", crate::config::ByteSize(b)))
                .unwrap_or_default();
            line(format!(
                "store:    {} ({}){free}",
                st.path,
                crate::config::ByteSize(st.file_bytes)
            ));
            if let Some(r) = &st.refusing {
                line(format!(
                    "          REFUSING new messages for {}: {} ({})",
                    crate::shared::human_age(Duration::from_secs_f64(r.for_s)),
                    r.reason,
                    r.meaning
                ));
            }
            if !st.reserve_held {
                line("          the disk reserve is in use (the disk was full); taken back once space returns".to_string());
            }
        }
        s
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            out.push_str(&format!(
                "# HELP edgegate_{name} {help}\n# TYPE edgegate_{name} {kind}\n"
            ));
            for (labels, v) in samples {
                out.push_str(&format!("edgegate_{name}{labels} {v}\n"));
            }
        };
        let one = |v: f64| vec![(String::new(), v)];
        metric(
            "up_seconds",
            "gauge",
            "Seconds since the gateway started.",
            &one(self.uptime_s as f64),
        );
        metric(
            "build_info",
            "gauge",
            "Always 1; the version is a label.",
            &[(format!("{{version=\"{}\"}}", escape(&self.version)), 1.0)],
        );
        if let Some(b) = &self.backlog {
            metric(
                "backlog_rows",
                "gauge",
                "Messages in the store waiting to be forwarded.",
                &one(b.rows as f64),
            );
            metric(
                "backlog_bytes",
                "gauge",
                "Bytes the queued messages are charged against store.max_bytes.",
                &one(b.bytes as f64),
            );
            metric(
                "oldest_message_age_seconds",
                "gauge",
                "Age of the oldest queued message (0 when the backlog is empty).",
                &one(b.oldest_age_s.unwrap_or(0.0)),
            );
            let per: Vec<(String, f64)> = b
                .per_priority
                .iter()
                .map(|p| (format!("{{priority=\"{}\"}}", p.priority), p.rows as f64))
                .collect();
            metric(
                "backlog_priority_rows",
                "gauge",
                "Queued messages per forward priority.",
                &per,
            );
        }
        let ins: Vec<(String, f64)> = self
            .messages_in
            .iter()
            .map(|(k, v)| (format!("{{source=\"{}\"}}", escape(k)), *v as f64))
            .collect();
        metric(
            "messages_in_total",
            "counter",
            "Messages taken in for forwarding, by source.",
            &ins,
        );
        let u = &self.uplink;
        metric(
            "forwarded_total",
            "counter",
            "Messages the upstream acknowledged.",
            &one(u.forwarded as f64),
        );
        let drops: Vec<(String, f64)> = self
            .dropped
            .iter()
            .map(|(k, v)| (format!("{{reason=\"{}\"}}", escape(k)), *v as f64))
            .collect();
        metric(
            "dropped_total",
            "counter",
            "Messages that will never be forwarded, by reason (store drops count since the store file was created).",
            &drops,
        );
        metric(
            "uplink_connected",
            "gauge",
            "1 while the upstream session is up.",
            &one(if u.state == "up" { 1.0 } else { 0.0 }),
        );
        metric(
            "uplink_reconnects_total",
            "counter",
            "Upstream connection attempts after the first.",
            &one(u.reconnects as f64),
        );
        metric(
            "downlink_total",
            "counter",
            "Messages from the upstream delivered to the local broker.",
            &one(u.downlink as f64),
        );
        metric(
            "downlink_stale_total",
            "counter",
            "Downlink commands dropped as stale (max_age, while_offline).",
            &one(u.downlink_stale as f64),
        );
        if let Some(n) = self.devices_connected {
            metric(
                "devices_connected",
                "gauge",
                "Established connections on the broker's device ports.",
                &one(n as f64),
            );
        }
        if let Some(f) = &self.front {
            metric(
                "front_connections_total",
                "counter",
                "Device connections accepted by the MQTT front.",
                &one(f.connections_total as f64),
            );
            let closed: Vec<(String, f64)> = f
                .malformed
                .iter()
                .map(|(k, v)| {
                    (
                        format!("{{kind=\"malformed\",reason=\"{}\"}}", escape(k)),
                        *v as f64,
                    )
                })
                .chain(f.refused.iter().map(|(k, v)| {
                    (
                        format!("{{kind=\"refused\",reason=\"{}\"}}", escape(k)),
                        *v as f64,
                    )
                }))
                .collect();
            metric(
                "front_acked_direct_total",
                "counter",
                "Stored QoS 1 device messages without a local subscriber, acknowledged by the front without the embedded broker.",
                &one(f.acked_direct as f64),
            );
            metric(
                "front_skipped_qos0_total",
                "counter",
                "Stored QoS 0 device messages without a local subscriber, not passed to the embedded broker.",
                &one(f.skipped_qos0 as f64),
            );
            metric(
                "front_closed_total",
                "counter",
                "Device connections the front closed or refused, by kind and reason.",
                &closed,
            );
            metric(
                "devices_held",
                "gauge",
                "MQTT 3.1.1 device connections whose messages wait unacknowledged because the store refuses new messages.",
                &one(f.devices_held as f64),
            );
            metric(
                "messages_held",
                "gauge",
                "QoS 1/2 messages of held devices waiting for the store.",
                &one(f.messages_held as f64),
            );
            let rejected: Vec<(String, f64)> = f
                .rejected
                .iter()
                .map(|(k, v)| (format!("{{reason=\"{}\"}}", escape(k)), *v as f64))
                .collect();
            metric(
                "front_rejected_total",
                "counter",
                "MQTT 5 QoS 1/2 messages answered PUBACK/PUBREC 0x97 because the store refused them, by reason.",
                &rejected,
            );
        }
        if let Some(st) = &self.store {
            metric(
                "store_file_bytes",
                "gauge",
                "Store database plus its write-ahead log.",
                &one(st.file_bytes as f64),
            );
            if let Some(free) = st.free_disk_bytes {
                metric(
                    "store_disk_free_bytes",
                    "gauge",
                    "Free space on the store's filesystem.",
                    &one(free as f64),
                );
            }
            metric(
                "store_accepting",
                "gauge",
                "1 while the store takes new messages; 0 while it refuses them (see store_refusing).",
                &one(if st.accepting { 1.0 } else { 0.0 }),
            );
            let refusing: Vec<(String, f64)> = crate::store::Refusal::ALL
                .iter()
                .filter(|r| !r.is_permanent())
                .map(|r| {
                    let on = st.refusing.as_ref().is_some_and(|x| x.reason == r.name());
                    (
                        format!("{{reason=\"{}\"}}", r.name()),
                        if on { 1.0 } else { 0.0 },
                    )
                })
                .collect();
            metric(
                "store_refusing",
                "gauge",
                "1 for the reason the store refuses new messages now.",
                &refusing,
            );
            metric(
                "store_reserve_held",
                "gauge",
                "1 while the store holds its disk reserve (0: it was used to delete on a full disk).",
                &one(if st.reserve_held { 1.0 } else { 0.0 }),
            );
        }
        let ages: Vec<(String, f64)> = self
            .sensors
            .iter()
            .filter_map(|s| {
                s.last_reading_age_s.map(|a| {
                    (
                        format!(
                            "{{kind=\"{}\",name=\"{}\"}}",
                            escape(&s.kind),
                            escape(&s.name)
                        ),
                        a,
                    )
                })
            })
            .collect();
        metric(
            "sensor_last_reading_age_seconds",
            "gauge",
            "Seconds since each sensor's last reading.",
            &ages,
        );
        // Labelled event counters from the registry, grouped by name.
        let mut groups: BTreeMap<&str, Vec<(String, f64)>> = BTreeMap::new();
        for (name, labels, v) in registry().counters() {
            if name == "messages_in_total" {
                continue; // merged into the per-source family above
            }
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            groups
                .entry(name)
                .or_default()
                .push((format!("{{{}}}", l.join(",")), v as f64));
        }
        for (name, samples) in groups {
            let help = match name {
                "serial_frames_total" => {
                    "Serial frames by port and result (ok or the reason it was skipped)."
                }
                "serial_port_errors_total" => "Serial port open failures and losses.",
                "gpio_events_total" => "Debounced GPIO input edges.",
                "gpio_commands_total" => "GPIO output commands by result.",
                // Modbus and 1-Wire (sources::modbus, sources::onewire).
                "modbus_requests_total" => {
                    "Modbus requests by bus, slave and result (ok, timeout, crc, an exception's name, …)."
                }
                "modbus_polls_total" => "Modbus polls per slave.",
                "modbus_point_errors_total" => "Modbus point values not published, by reason.",
                "modbus_commands_total" => "Modbus write commands by result (ok, refused, failed, bus_down).",
                "modbus_bus_errors_total" => "Modbus port open failures and losses.",
                "modbus_line_frames_total" => "Modbus frames sent and received per bus.",
                "modbus_line_bytes_total" => "Modbus bytes per bus and direction (out, in).",
                "onewire_readings_total" => "1-Wire probe reads by result (ok or the reason refused).",
                _ => "Event counter.",
            };
            metric(name, "counter", help, &samples);
        }
        out
    }
}

/// Escapes a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:075B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:075B 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:A1B2 0100007F:075B 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:075B 0100007F:A1B3 06 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1
";

    #[test]
    fn only_established_connections_to_our_ports_count_as_devices() {
        // 0x075B = 1883: one listening socket, one established inbound, one client side (its
        // local port is ephemeral), one in TIME_WAIT.
        assert_eq!(count_established(TCP, &[1883]), 1);
        assert_eq!(count_established(TCP, &[1884]), 0);
    }

    #[test]
    fn prometheus_output_has_typed_unit_named_families_and_escaped_labels() {
        let mut s = Snapshot {
            version: "1.2.3".into(),
            backlog: Some(Backlog {
                rows: 5,
                bytes: 500,
                oldest_age_s: Some(2.5),
                per_priority: vec![PriorityBacklog {
                    priority: 9,
                    rows: 5,
                    bytes: 500,
                }],
            }),
            ..Snapshot::default()
        };
        s.dropped.insert("store_full".into(), 3);
        s.uplink.state = "up".into();
        s.sensors.push(SensorStatus {
            kind: "serial".into(),
            name: "a\"b".into(),
            readings: 1,
            last_reading_age_s: Some(1.0),
            errors: BTreeMap::new(),
        });
        let text = s.render_prometheus();
        assert!(
            text.contains("# TYPE edgegate_backlog_rows gauge\nedgegate_backlog_rows 5\n"),
            "{text}"
        );
        assert!(
            text.contains("edgegate_oldest_message_age_seconds 2.5\n"),
            "{text}"
        );
        assert!(
            text.contains("edgegate_dropped_total{reason=\"store_full\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("edgegate_uplink_connected 1\n"), "{text}");
        assert!(
            text.contains("edgegate_backlog_priority_rows{priority=\"9\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("name=\"a\\\"b\""), "{text}");
        // Every sample line belongs to a family declared just before it.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "undeclared {name}"
            );
        }
    }

    #[test]
    fn the_text_form_names_the_link_state_backlog_and_each_sensor() {
        let mut s = Snapshot {
            version: "1.2.3".into(),
            gateway_id: "pi".into(),
            uplink: UplinkStatus {
                state: "down".into(),
                for_s: Some(90),
                last_error: Some("connection refused".into()),
                ..UplinkStatus::default()
            },
            backlog: Some(Backlog {
                rows: 1234,
                bytes: 2048,
                oldest_age_s: Some(30.0),
                per_priority: vec![],
            }),
            ..Snapshot::default()
        };
        s.sensors.push(SensorStatus {
            kind: "gpio".into(),
            name: "door".into(),
            readings: 0,
            last_reading_age_s: None,
            errors: BTreeMap::new(),
        });
        let text = s.render_text();
        assert!(text.contains("uplink:   down for 1m"), "{text}");
        assert!(text.contains("last error: connection refused"), "{text}");
        assert!(text.contains("backlog:  1234 messages"), "{text}");
        assert!(
            text.contains("sensor:   gpio door: 0 readings, no reading yet"),
            "{text}"
        );
    }
}
