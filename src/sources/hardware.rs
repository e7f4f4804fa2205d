//! The hardware stage: GPIO inputs and outputs, serial ports, and the path their readings take.
//!
//! A reading is **committed to the store first** (through `intake::readings`, when a forward rule matches its topic, with
//! that rule's priority/QoS/retain, `Durability::Now`, awaited) and **then** published into the
//! local broker for local subscribers. Hardware therefore has no broker-side loss window.
//!
//! The rows are built and committed by the intake (`intake::readings`). With the MQTT front off,
//! the local-link intake would store each reading a second time as it passes through the
//! broker; readings stored here are registered in the [`StoredReadings`] `app` hands to both
//! (see `intake::dedup`).
//!
//! Cloud commands: the forwarder's downlink publishes them into the local broker; this stage's
//! local link subscribes to the outputs' command topics and hands them to `gpio::run_outputs`.
//!
//! Shutdown (first in the gateway's order): inputs and ports stop, outputs apply their fail-safe
//! states and confirm them, every reading still queued is committed and published, then the
//! stage returns and the intake stops after it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::gpio::{self, GpioInput, GpioOutput};
use crate::broker::LocalLink;
use crate::config::{Config, UplinkConfig};
use crate::hw::clock::{Clock, SystemClock};
use crate::hw::gpio::Gpio;
use crate::hw::HwError;
use crate::intake::Reading;
use crate::intake::{ReadingStore, StoredReadings, MAX_BATCH};
use crate::shared::{HardwareCounters, LinkState};
use crate::store::StoreHandle;

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

/// Readings waiting for the store; senders wait when it is full.
const READINGS_CAPACITY: usize = 1024;

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
    /// `dedup` is `Some` when a local-link intake runs (the front off): readings stored here are
    /// registered there so that intake does not store them again.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        self,
        mut link: LocalLink,
        store: Option<StoreHandle>,
        uplink: Option<Arc<UplinkConfig>>,
        dedup: Option<Arc<StoredReadings>>,
        link_state: watch::Receiver<LinkState>,
        cancel: CancellationToken,
    ) -> Result<(), HardwareError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        for topic in self.command_topics() {
            link.subscribe(&topic)
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

        let mut link_task = tokio::spawn(drive_link(link, publish_rx, commands_tx, dedup));
        let emitter = tokio::spawn(emit(
            readings_rx,
            ReadingStore::new(store, uplink, self.counters.clone()),
            publish_tx,
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

/// Store first (when forwarded, through the intake), then hand to the link for local publishing.
async fn emit(
    mut rx: mpsc::Receiver<Reading>,
    mut intake: ReadingStore,
    publish: mpsc::Sender<(Reading, bool)>,
) {
    let mut batch: Vec<Reading> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let stored = intake.store(&batch).await;
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
    mut link: LocalLink,
    mut publish: mpsc::Receiver<(Reading, bool)>,
    commands: mpsc::Sender<(String, Bytes, bool)>,
    dedup: Option<Arc<StoredReadings>>,
) -> Result<(), HardwareError> {
    loop {
        tokio::select! {
            r = publish.recv() => {
                let Some((r, stored)) = r else { return Ok(()) };
                if let (true, Some(dedup)) = (stored, &dedup) {
                    // Registered just before it enters the broker, so the intake knows it.
                    dedup.register(r.topic.as_bytes(), &r.payload);
                }
                link.publish(Bytes::from(r.topic), r.payload, r.retain)
                    .await
                    .map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
            }
            d = link.next() => {
                let d = d.map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
                let topic = String::from_utf8_lossy(&d.topic).into_owned();
                // Commands beyond 64 waiting are dropped: an actuator flooded with commands
                // is better off taking the latest ones later than queueing without bound.
                // The retain flag: a retained Modbus command is never written (see
                // sources::modbus::route_commands).
                if commands.try_send((topic, d.payload, d.retain)).is_err() {
                    tracing::warn!("GPIO output commands arrive faster than they are applied; one was dropped");
                }
            }
        }
    }
}
