//! The hardware stage: GPIO inputs and outputs, serial ports, and the path their readings take.
//!
//! A reading is **committed to the store first** (when a forward rule matches its topic, with
//! that rule's priority/QoS/retain, `Durability::Now`, awaited) and **then** published into the
//! local broker for local subscribers. Hardware therefore has no broker-side loss window.
//!
//! Double storage: the intake (`sources::local`) stores everything on forward topics that passes
//! through the broker, so it would store every reading a second time. Before publishing a
//! reading it stored, this stage registers it (a 64-bit keyed hash of topic and payload) in
//! [`StoredReadings`]; the intake consumes the entry when the reading comes by and skips it
//! ([`already_stored`]). The registry is bounded (oldest entries evicted) and costs the intake a
//! single atomic load while it is empty (no hardware configured).
//!
//! Why not a marker on the message: an MQTT 5 user property was the first design, but rumqttd
//! 0.20 panics (`unreachable!`) when it forwards a publish carrying properties to an MQTT 3.1.1
//! subscriber, and a QoS 0 publish has no other field the router passes through untouched. A
//! device that publishes byte-for-byte the same payload on the same topic within the same
//! moment would have that one message skipped; readings carry a millisecond timestamp (all but
//! `raw` serial frames), which makes this practically impossible.
//!
//! Cloud commands: the forwarder's downlink publishes them into the local broker; this stage's
//! local link subscribes to the outputs' command topics and hands them to `gpio::run_outputs`.
//!
//! Shutdown (first in the gateway's order): inputs and ports stop, outputs apply their fail-safe
//! states and confirm them, every reading still queued is committed and published, then the
//! stage returns and the intake stops after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::gpio::{self, GpioInput, GpioOutput};
use crate::config::{Config, UplinkConfig};
use crate::hw::clock::{Clock, SystemClock};
use crate::hw::gpio::Gpio;
use crate::hw::HwError;
use crate::shared::{HardwareCounters, LinkState, RateLimited};
use crate::store::{Durability, NewMessage, StoreHandle};

#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    #[error("GPIO: {0}")]
    Gpio(#[from] HwError),
    #[error("GPIO {what} `{name}`: {source}")]
    Line {
        what: &'static str,
        name: String,
        source: HwError,
    },
    #[error("the embedded broker closed the hardware link: {0}; readings are no longer published locally")]
    LinkClosed(String),
}

/// Readings the hardware stage stored and published, waiting to be recognised by the intake.
pub struct StoredReadings {
    hasher: std::collections::hash_map::RandomState,
    inner: std::sync::Mutex<StoredInner>,
    len: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct StoredInner {
    counts: std::collections::HashMap<u64, u32>,
    order: std::collections::VecDeque<u64>,
}

/// Entries kept at most: far more than can be in flight between our publish and the intake.
const STORED_MAX: usize = 8192;

impl StoredReadings {
    fn global() -> &'static StoredReadings {
        static S: OnceLock<StoredReadings> = OnceLock::new();
        S.get_or_init(|| StoredReadings {
            hasher: std::collections::hash_map::RandomState::new(),
            inner: std::sync::Mutex::new(StoredInner::default()),
            len: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn key(&self, topic: &[u8], payload: &[u8]) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.hasher.build_hasher();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoredInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, topic: &[u8], payload: &[u8]) {
        let k = self.key(topic, payload);
        let mut s = self.lock();
        *s.counts.entry(k).or_insert(0) += 1;
        s.order.push_back(k);
        while s.order.len() > STORED_MAX {
            if let Some(old) = s.order.pop_front() {
                consume(&mut s.counts, old);
            }
        }
        self.len.store(s.order.len(), Ordering::Release);
    }

    fn take(&self, topic: &[u8], payload: &[u8]) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let k = self.key(topic, payload);
        let mut s = self.lock();
        if !consume(&mut s.counts, k) {
            return false;
        }
        if let Some(i) = s.order.iter().position(|x| *x == k) {
            s.order.remove(i);
        }
        self.len.store(s.order.len(), Ordering::Release);
        true
    }
}

fn consume(counts: &mut std::collections::HashMap<u64, u32>, k: u64) -> bool {
    match counts.get_mut(&k) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            counts.remove(&k);
            true
        }
        None => false,
    }
}

/// Whether a local-link intake stores what passes through the broker (the MQTT front off).
/// With the front on there is no such intake, and nothing needs to recognise our readings.
static INTAKE_STORES_LOCAL: AtomicBool = AtomicBool::new(true);

/// Tells the hardware stage whether a local-link intake runs (see [`already_stored`]).
pub fn set_intake_stores_local(on: bool) {
    INTAKE_STORES_LOCAL.store(on, Ordering::Relaxed);
}

/// Whether a message arriving through the broker is a reading the hardware stage already stored
/// (the intake must then not store it again). Consumes the registration.
pub fn already_stored(topic: &[u8], payload: &[u8]) -> bool {
    StoredReadings::global().take(topic, payload)
}

/// A reading or state confirmation on its way to the store and the local broker.
#[derive(Debug, Clone)]
pub struct Reading {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// Readings waiting for the store; senders wait when it is full.
const READINGS_CAPACITY: usize = 1024;
/// Most readings committed in one append.
const MAX_BATCH: usize = 256;

/// The configured hardware with its GPIO lines open (so a wrong pin fails the start, not later).
pub struct Hardware {
    cfg: Config,
    inputs: Vec<GpioInput>,
    outputs: Vec<GpioOutput>,
    gpio: Option<Gpio>,
    pub counters: Arc<HardwareCounters>,
}

impl Hardware {
    /// `None` when nothing is configured. Opens the GPIO backend and every line.
    pub fn open(cfg: &Config) -> Result<Option<Hardware>, HardwareError> {
        if cfg.gpio.is_empty()
            && cfg.serial.ports.is_empty()
            && cfg.modbus.is_empty()
            && cfg.onewire.is_empty()
        {
            return Ok(None);
        }
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        let mut gpio = None;
        if !cfg.gpio.is_empty() {
            let mut g = Gpio::open(&cfg.gpio)?;
            for i in &cfg.gpio.inputs {
                let line =
                    g.backend
                        .input(&i.pin, i.pull)
                        .map_err(|source| HardwareError::Line {
                            what: "input",
                            name: i.name.clone(),
                            source,
                        })?;
                inputs.push(GpioInput {
                    cfg: i.clone(),
                    line,
                });
            }
            for o in &cfg.gpio.outputs {
                let high = o.initial.0 != o.active_low;
                let line =
                    g.backend
                        .output(&o.pin, high)
                        .map_err(|source| HardwareError::Line {
                            what: "output",
                            name: o.name.clone(),
                            source,
                        })?;
                outputs.push(GpioOutput {
                    cfg: o.clone(),
                    line,
                });
            }
            tracing::info!(
                backend = g.backend.name(),
                inputs = inputs.len(),
                outputs = outputs.len(),
                "GPIO open"
            );
            gpio = Some(g);
        }
        Ok(Some(Hardware {
            cfg: cfg.clone(),
            inputs,
            outputs,
            gpio,
            counters: Arc::new(HardwareCounters::default()),
        }))
    }

    /// The local topics the outputs obey.
    pub fn command_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.outputs.iter().map(|o| o.cfg.command_topic()).collect();
        // Modbus writable points (sources::modbus).
        topics.extend(super::modbus::command_topics(&self.cfg.modbus));
        topics
    }

    /// Runs until `cancel`, then shuts down in order (see the module doc). `store` and `uplink`
    /// are `None` without an uplink: readings are then only published locally.
    pub async fn run(
        self,
        mut link_tx: LinkTx,
        link_rx: LinkRx,
        store: Option<StoreHandle>,
        uplink: Option<Arc<UplinkConfig>>,
        link_state: watch::Receiver<LinkState>,
        cancel: CancellationToken,
    ) -> Result<(), HardwareError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        for topic in self.command_topics() {
            link_tx
                .subscribe(topic)
                .map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
        }
        let (readings_tx, readings_rx) = mpsc::channel::<Reading>(READINGS_CAPACITY);
        let (publish_tx, publish_rx) = mpsc::channel::<(Reading, bool)>(READINGS_CAPACITY);
        let (commands_tx, commands_rx) = mpsc::channel::<(String, Bytes, bool)>(64);
        // ─── Modbus and 1-Wire (sources::modbus, sources::onewire) ───
        // Modbus command topics go to their bus (retained ones dropped), the rest to the GPIO
        // outputs as before.
        let (commands_rx, mut modbus_commands) =
            super::modbus::route_commands(commands_rx, &self.cfg.modbus);
        // ─── end Modbus and 1-Wire ───

        let mut link_task = tokio::spawn(drive_link(link_tx, link_rx, publish_rx, commands_tx));
        let emitter = tokio::spawn(emit(
            readings_rx,
            store,
            uplink,
            publish_tx,
            self.counters.clone(),
        ));

        let sources = cancel.child_token();
        let mut tasks = JoinSet::new();
        let sim = self.gpio.as_ref().and_then(|g| g.sim.clone());
        for input in self.inputs {
            if let (Some(sim), false) = (&sim, input.cfg.sim_waveform.is_empty()) {
                tasks.spawn(gpio::play_waveform(
                    sim.clone(),
                    input.cfg.clone(),
                    sources.clone(),
                ));
            }
            tasks.spawn(gpio::run_input(
                input,
                readings_tx.clone(),
                clock.clone(),
                sources.clone(),
            ));
        }
        for port in &self.cfg.serial.ports {
            tasks.spawn(super::serial::run_port(
                port.clone(),
                readings_tx.clone(),
                clock.clone(),
                self.counters.clone(),
                sources.clone(),
            ));
        }
        // ─── Modbus and 1-Wire ───
        for bus in &self.cfg.modbus.buses {
            let commands = modbus_commands
                .remove(&bus.name)
                .unwrap_or_else(|| mpsc::channel(1).1);
            let b = super::modbus::Bus::new(bus.clone(), readings_tx.clone(), clock.clone());
            tasks.spawn(b.run(commands, sources.clone()));
        }
        if !self.cfg.onewire.is_empty() {
            tasks.spawn(super::onewire::run(
                self.cfg.onewire.clone(),
                readings_tx.clone(),
                clock.clone(),
                sources.clone(),
            ));
        }
        // ─── end Modbus and 1-Wire ───
        if !self.outputs.is_empty() {
            tasks.spawn(gpio::run_outputs(
                self.outputs,
                commands_rx,
                readings_tx.clone(),
                link_state,
                clock.clone(),
                self.counters.clone(),
                sources.clone(),
            ));
        }
        drop(readings_tx);

        // The link task ends early only on a broker error; that stops the gateway.
        let link_result = tokio::select! {
            _ = cancel.cancelled() => None,
            r = &mut link_task => Some(r),
        };
        sources.cancel();
        while tasks.join_next().await.is_some() {}
        // Every sender is gone now: the emitter commits and publishes what is queued, then ends;
        // the link task sends the last publishes and ends when the emitter drops its channel.
        let _ = emitter.await;
        let link_result = match link_result {
            Some(r) => r,
            None => link_task.await,
        };
        let c = &self.counters;
        tracing::info!(
            readings = c.readings.load(Ordering::Relaxed),
            stored = c.stored.load(Ordering::Relaxed),
            store_failed = c.store_failed.load(Ordering::Relaxed),
            bad_frames = c.bad_frames.load(Ordering::Relaxed),
            rejected_commands = c.rejected_commands.load(Ordering::Relaxed),
            "hardware stopped"
        );
        match link_result {
            Ok(r) => r,
            Err(e) => Err(HardwareError::LinkClosed(e.to_string())),
        }
    }
}

/// Store first (when forwarded), then hand to the link for local publishing.
async fn emit(
    mut rx: mpsc::Receiver<Reading>,
    store: Option<StoreHandle>,
    uplink: Option<Arc<UplinkConfig>>,
    publish: mpsc::Sender<(Reading, bool)>,
    counters: Arc<HardwareCounters>,
) {
    let mut failures = RateLimited::new(Duration::from_secs(10));
    let mut batch: Vec<Reading> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        counters
            .readings
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let now = crate::shared::now_ms();
        let mut stored = vec![false; batch.len()];
        let rows: Vec<NewMessage> = match (&store, &uplink) {
            (Some(_), Some(up)) => batch
                .iter()
                .zip(stored.iter_mut())
                .filter_map(|(r, s)| {
                    let (_, rule) = up.match_rule(&r.topic)?;
                    *s = true;
                    Some(NewMessage {
                        topic: r.topic.clone(),
                        payload: r.payload.clone(),
                        qos: rule.qos,
                        retain: rule.retain,
                        priority: rule.priority,
                        created_ms: now,
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        if let (Some(store), false) = (&store, rows.is_empty()) {
            let n = rows.len() as u64;
            match store.append(rows, Durability::Now).await {
                Ok(out) => {
                    counters
                        .stored
                        .fetch_add(out.stored as u64, Ordering::Relaxed);
                    if let Some(reason) = out.refusal() {
                        // Counted as dropped by the store; not marked as stored, so the
                        // local-link intake (front off) does not skip them either.
                        let mut left = out.stored;
                        for s in stored.iter_mut().filter(|s| **s) {
                            if left == 0 {
                                *s = false;
                            } else {
                                left -= 1;
                            }
                        }
                        if failures.allow() {
                            tracing::warn!(reason = reason.name(), refused = n - out.stored as u64, "hardware readings refused by the store (counted as dropped); they are published locally only");
                        }
                    }
                }
                Err(e) => {
                    counters.store_failed.fetch_add(n, Ordering::Relaxed);
                    // Not marked as stored: if the intake can store them, it will.
                    stored.iter_mut().for_each(|s| *s = false);
                    if failures.allow() {
                        tracing::error!(error = %e, readings = n, "hardware readings could not be stored; they are published locally only");
                    }
                }
            }
        }
        for pair in batch.drain(..).zip(stored) {
            if publish.send(pair).await.is_err() {
                return;
            }
        }
    }
}

/// Owns the local link: publishes readings (registering the stored ones), delivers
/// command topics to the outputs, and re-arms the link after `Unschedule` (rumqttd stops serving
/// a local link that is not woken).
async fn drive_link(
    mut tx: LinkTx,
    mut rx: LinkRx,
    mut publish: mpsc::Receiver<(Reading, bool)>,
    commands: mpsc::Sender<(String, Bytes, bool)>,
) -> Result<(), HardwareError> {
    loop {
        tokio::select! {
            r = publish.recv() => {
                let Some((r, stored)) = r else { return Ok(()) };
                if stored && INTAKE_STORES_LOCAL.load(Ordering::Relaxed) {
                    // Registered just before it enters the broker, so the intake knows it.
                    StoredReadings::global().register(r.topic.as_bytes(), &r.payload);
                }
                let p = Publish::new(Bytes::from(r.topic), r.payload, r.retain);
                tx.send(Packet::Publish(p, None))
                    .await
                    .map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
            }
            n = rx.next() => match n {
                Ok(Some(Notification::Forward(f))) => {
                    let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                    // Commands beyond 64 waiting are dropped: an actuator flooded with commands
                    // is better off taking the latest ones later than queueing without bound.
                    // The retain flag: a retained Modbus command is never written (see
                    // sources::modbus::route_commands).
                    if commands.try_send((topic, f.publish.payload, f.publish.retain)).is_err() {
                        tracing::warn!("GPIO output commands arrive faster than they are applied; one was dropped");
                    }
                }
                Ok(Some(Notification::Unschedule)) => {
                    rx.wake().await.map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
                }
                Ok(_) => {}
                Err(e) => return Err(HardwareError::LinkClosed(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_reading_is_recognised_once_others_never_and_the_oldest_are_forgotten() {
        let s = StoredReadings::global();
        assert!(!already_stored(b"sensors/x", b"1"));
        s.register(b"sensors/x", b"1");
        s.register(b"sensors/x", b"1");
        assert!(!already_stored(b"sensors/x", b"2"));
        assert!(!already_stored(b"sensors/y", b"1"));
        assert!(already_stored(b"sensors/x", b"1"));
        assert!(already_stored(b"sensors/x", b"1"));
        assert!(!already_stored(b"sensors/x", b"1"));

        // Bounded: beyond STORED_MAX entries the oldest are forgotten. (One test: the registry
        // is process-global, and parallel tests would evict each other's entries.)
        s.register(b"bound/first", b"x");
        for i in 0..STORED_MAX {
            s.register(b"bound/many", i.to_string().as_bytes());
        }
        assert!(!already_stored(b"bound/first", b"x"));
        assert!(already_stored(
            b"bound/many",
            (STORED_MAX - 1).to_string().as_bytes()
        ));
    }
}
