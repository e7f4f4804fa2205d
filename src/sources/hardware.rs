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
//! local link subscribes to the command topics and routes each to the output
//! (`gpio::run_output`) or Modbus bus that obeys it.
//!
//! Units: every input, output, serial port and Modbus bus, and the 1-Wire section, runs as its
//! own task. At SIGHUP ([`Reconfigure`]) the stage compares each unit's settings: a unit whose
//! settings did not change keeps running untouched (an output keeps its line and its state, an
//! input or port has no gap and sends no extra reading); one that changed or went is stopped (an
//! output applies its fail-safe state, as at shutdown) and a changed or new one is started; the
//! journal lists what was. Only a change of the GPIO backend itself restarts the whole stage
//! ([`reconfigurable`]).
//!
//! Shutdown (first in the gateway's order): inputs and ports stop, outputs apply their fail-safe
//! states and confirm them, every reading still queued is committed and published, then the
//! stage returns and the intake stops after it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::gpio::{self, GpioInput, GpioOutput};
use crate::broker::LocalLink;
use crate::config::modbus::{ModbusBusConfig, OnewireConfig};
use crate::config::{Config, GpioConfig, GpioInputConfig, GpioOutputConfig, SerialPortConfig};
use crate::hw::clock::{Clock, SystemClock};
use crate::hw::gpio::{Gpio, InputLine, OutputLine};
use crate::hw::HwError;
use crate::intake::Reading;
use crate::intake::{ReadingStore, Rules, StoredReadings, MAX_BATCH};
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
/// Commands waiting per GPIO output; more are dropped: an actuator flooded with commands is
/// better off taking the latest ones later than queueing without bound.
const OUTPUT_COMMANDS: usize = 16;

/// A new configuration for the running stage (SIGHUP), and where to answer what changed: one
/// line per unit started, stopped or restarted, or what could not be opened.
pub struct Reconfigure {
    pub cfg: Config,
    pub reply: oneshot::Sender<Result<Vec<String>, String>>,
}

/// Whether a stage running `old` can take `new` unit by unit ([`Reconfigure`]): it keeps the GPIO
/// backend it has open, so `gpio.backend`, `gpio.chip` and `gpio.sim_state_file` must stay the
/// same while both have GPIO lines. Otherwise the stage restarts (every output passes through
/// its fail-safe state).
pub fn reconfigurable(old: &Config, new: &Config) -> bool {
    let backend = |c: &Config| {
        (
            c.gpio.backend,
            c.gpio.chip.clone(),
            c.gpio.sim_state_file.clone(),
        )
    };
    old.gpio.is_empty() || new.gpio.is_empty() || backend(old) == backend(new)
}

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
        if hardware_is_empty(cfg) {
            return Ok(None);
        }
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        let mut gpio = None;
        if !cfg.gpio.is_empty() {
            let mut g = Gpio::open(&cfg.gpio)?;
            for i in &cfg.gpio.inputs {
                inputs.push(GpioInput {
                    cfg: i.clone(),
                    line: open_input(&mut g, i)?,
                });
            }
            for o in &cfg.gpio.outputs {
                outputs.push(GpioOutput {
                    cfg: o.clone(),
                    line: open_output(&mut g, o)?,
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
        command_topics(&self.cfg)
    }

    /// Subscribes `link` to the outputs' and writable points' command topics. Called before the
    /// stage starts, and before the forwarder connects: rumqttd's router takes every link's
    /// requests in order, so a command the upstream delivers at connection (queued while the
    /// link was down, or retained) finds its output subscribed.
    pub fn subscribe_commands(&self, link: &mut LocalLink) -> Result<(), HardwareError> {
        for topic in self.command_topics() {
            link.subscribe(&topic)
                .map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
        }
        Ok(())
    }

    /// Runs until `cancel`, then shuts down in order (see the module doc). `link` is already
    /// subscribed to the command topics ([`Hardware::subscribe_commands`]). `store` and `rules`
    /// are `None` without an uplink: readings are then only published locally.
    /// `dedup` is `Some` when a local-link intake runs (the front off): readings stored here are
    /// registered there so that intake does not store them again. `reconfig` brings SIGHUP's
    /// new settings (see [`Reconfigure`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        self,
        link: LocalLink,
        store: Option<StoreHandle>,
        rules: Option<Arc<Rules>>,
        dedup: Option<Arc<StoredReadings>>,
        link_state: watch::Receiver<LinkState>,
        mut reconfig: mpsc::Receiver<Reconfigure>,
        cancel: CancellationToken,
    ) -> Result<(), HardwareError> {
        let subscribed: HashSet<String> = self.command_topics().into_iter().collect();
        let (readings_tx, readings_rx) = mpsc::channel::<Reading>(READINGS_CAPACITY);
        let (publish_tx, publish_rx) = mpsc::channel::<(Reading, bool)>(READINGS_CAPACITY);
        let (commands_tx, mut commands_rx) = mpsc::channel::<(String, Bytes, bool)>(64);
        let (subscribe_tx, subscribe_rx) = mpsc::unbounded_channel::<String>();
        let mut link_task = tokio::spawn(drive_link(
            link,
            publish_rx,
            commands_tx,
            subscribe_rx,
            dedup,
        ));
        let emitter = tokio::spawn(emit(
            readings_rx,
            ReadingStore::new(store, rules, self.counters.clone()),
            publish_tx,
        ));

        let sources = cancel.child_token();
        let mut units = Units {
            running: BTreeMap::new(),
            routes: HashMap::new(),
            subscribed,
            gpio: self.gpio,
            gpio_cfg: self.cfg.gpio.clone(),
            ctx: Ctx {
                readings: readings_tx,
                clock: Arc::new(SystemClock),
                counters: self.counters.clone(),
                link_state,
                parent: sources.clone(),
            },
        };
        // The lines `open` opened, then everything that opens in its own task.
        for i in self.inputs {
            units.start(Spec::Input(i.cfg), Some(Line::Input(i.line)))?;
        }
        for o in self.outputs {
            units.start(Spec::Output(o.cfg), Some(Line::Output(o.line)))?;
        }
        for spec in Spec::all(&self.cfg).into_iter().filter(|s| !s.is_gpio()) {
            units.start(spec, None)?;
        }
        units.route(&subscribe_tx);

        // The link task ends early only on a broker error; that stops the gateway.
        let link_result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break None,
                r = &mut link_task => break Some(r),
                Some((topic, payload, retained)) = commands_rx.recv() => {
                    units.dispatch(topic, payload, retained);
                }
                Some(rc) = reconfig.recv() => {
                    let result = units.reconfigure(&rc.cfg, &subscribe_tx).await;
                    let _ = rc.reply.send(result);
                }
            }
        };
        sources.cancel();
        units.stop_all().await;
        drop(units);
        drop(subscribe_tx);
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

/// Nothing for the hardware stage to run.
pub fn hardware_is_empty(cfg: &Config) -> bool {
    cfg.gpio.is_empty()
        && cfg.serial.ports.is_empty()
        && cfg.modbus.is_empty()
        && cfg.onewire.is_empty()
}

/// The local topics the outputs and writable Modbus points obey.
pub fn command_topics(cfg: &Config) -> Vec<String> {
    Spec::all(cfg)
        .iter()
        .flat_map(Spec::command_topics)
        .collect()
}

fn open_input(g: &mut Gpio, i: &GpioInputConfig) -> Result<InputLine, HardwareError> {
    g.backend
        .input(&i.pin, i.pull)
        .map_err(|source| HardwareError::Line {
            what: "input",
            name: i.name.clone(),
            source,
        })
}

fn open_output(g: &mut Gpio, o: &GpioOutputConfig) -> Result<Box<dyn OutputLine>, HardwareError> {
    let high = o.initial.0 != o.active_low;
    g.backend
        .output(&o.pin, high)
        .map_err(|source| HardwareError::Line {
            what: "output",
            name: o.name.clone(),
            source,
        })
}

// ─── Units: what runs on its own and is replaced on its own ─────────────────────────────────

/// One part of the stage that runs as its own task: a GPIO input or output, a serial port, a
/// Modbus bus, the 1-Wire section. At a reload a unit whose settings are the same is left
/// alone (its line, its port, its state); one whose settings changed is stopped (an output
/// applies its fail-safe state, like at shutdown) and started again with the new ones.
#[derive(Clone)]
enum Spec {
    Input(GpioInputConfig),
    Output(GpioOutputConfig),
    Port(SerialPortConfig),
    Bus(ModbusBusConfig),
    Onewire(OnewireConfig),
}

impl Spec {
    /// Every unit `cfg` asks for, in the file's order.
    fn all(cfg: &Config) -> Vec<Spec> {
        let mut v: Vec<Spec> = Vec::new();
        v.extend(cfg.gpio.inputs.iter().cloned().map(Spec::Input));
        v.extend(cfg.gpio.outputs.iter().cloned().map(Spec::Output));
        v.extend(cfg.serial.ports.iter().cloned().map(Spec::Port));
        v.extend(cfg.modbus.buses.iter().cloned().map(Spec::Bus));
        if !cfg.onewire.is_empty() {
            v.push(Spec::Onewire(cfg.onewire.clone()));
        }
        v
    }

    fn is_gpio(&self) -> bool {
        matches!(self, Spec::Input(_) | Spec::Output(_))
    }

    /// What the journal calls it; unique within a configuration (names are unique per kind).
    fn key(&self) -> String {
        match self {
            Spec::Input(c) => format!("GPIO input `{}`", c.name),
            Spec::Output(c) => format!("GPIO output `{}`", c.name),
            Spec::Port(c) => format!("serial port `{}`", c.name),
            Spec::Bus(c) => format!("Modbus bus `{}`", c.name),
            Spec::Onewire(_) => "1-Wire".to_string(),
        }
    }

    /// Its settings, compared at a reload.
    fn settings(&self) -> String {
        match self {
            Spec::Input(c) => format!("{c:?}"),
            Spec::Output(c) => format!("{c:?}"),
            Spec::Port(c) => format!("{c:?}"),
            Spec::Bus(c) => format!("{c:?}"),
            Spec::Onewire(c) => format!("{c:?}"),
        }
    }

    fn command_topics(&self) -> Vec<String> {
        match self {
            Spec::Output(c) => vec![c.command_topic()],
            Spec::Bus(b) => {
                let one = crate::config::modbus::ModbusConfig {
                    buses: vec![b.clone()],
                };
                super::modbus::command_topics(&one)
            }
            _ => Vec::new(),
        }
    }
}

/// A GPIO line opened before its unit starts.
enum Line {
    Input(InputLine),
    Output(Box<dyn OutputLine>),
}

/// Where a running unit's commands go.
enum Commands {
    Output(mpsc::Sender<Bytes>),
    Bus(mpsc::Sender<super::modbus::Command>),
}

struct Unit {
    spec: Spec,
    settings: String,
    token: CancellationToken,
    task: JoinHandle<()>,
    commands: Option<Commands>,
}

impl Unit {
    /// Cancels the unit and waits until it has let go of its line or port.
    async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
}

/// What every unit is given.
struct Ctx {
    readings: mpsc::Sender<Reading>,
    clock: Arc<dyn Clock>,
    counters: Arc<HardwareCounters>,
    link_state: watch::Receiver<LinkState>,
    /// Cancelled at shutdown; each unit has a child of it.
    parent: CancellationToken,
}

/// The running units, the command topics routed to them, and the GPIO backend their lines
/// come from.
struct Units {
    running: BTreeMap<String, Unit>,
    /// Command topic → the key of the unit that obeys it.
    routes: HashMap<String, String>,
    /// Topics the local link subscribes to (never unsubscribed: a stale one is simply not
    /// routed).
    subscribed: HashSet<String>,
    gpio: Option<Gpio>,
    gpio_cfg: GpioConfig,
    ctx: Ctx,
}

impl Units {
    fn backend(&mut self) -> Result<&mut Gpio, HardwareError> {
        if self.gpio.is_none() {
            let g = Gpio::open(&self.gpio_cfg)?;
            tracing::info!(backend = g.backend.name(), "GPIO open");
            self.gpio = Some(g);
        }
        self.gpio
            .as_mut()
            .ok_or(HardwareError::Gpio(HwError::NoGpioChip))
    }

    /// Starts `spec`, on `line` when its GPIO line is open already.
    fn start(&mut self, spec: Spec, line: Option<Line>) -> Result<(), HardwareError> {
        let token = self.ctx.parent.child_token();
        let t = token.clone();
        let readings = self.ctx.readings.clone();
        let clock = self.ctx.clock.clone();
        let counters = self.ctx.counters.clone();
        let (task, commands) = match &spec {
            Spec::Input(cfg) => {
                let line = match line {
                    Some(Line::Input(l)) => l,
                    _ => open_input(self.backend()?, cfg)?,
                };
                let sim = self
                    .gpio
                    .as_ref()
                    .and_then(|g| g.sim.clone())
                    .filter(|_| !cfg.sim_waveform.is_empty());
                let input = GpioInput {
                    cfg: cfg.clone(),
                    line,
                };
                let wave_cfg = cfg.clone();
                let task = tokio::spawn(async move {
                    let wave = async {
                        if let Some(sim) = sim {
                            gpio::play_waveform(sim, wave_cfg, t.clone()).await;
                        }
                    };
                    tokio::join!(gpio::run_input(input, readings, clock, t.clone()), wave);
                });
                (task, None)
            }
            Spec::Output(cfg) => {
                let line = match line {
                    Some(Line::Output(l)) => l,
                    _ => open_output(self.backend()?, cfg)?,
                };
                let output = GpioOutput {
                    cfg: cfg.clone(),
                    line,
                };
                let (tx, rx) = mpsc::channel(OUTPUT_COMMANDS);
                let link_state = self.ctx.link_state.clone();
                let task = tokio::spawn(gpio::run_output(
                    output, rx, readings, link_state, clock, counters, t,
                ));
                (task, Some(Commands::Output(tx)))
            }
            Spec::Port(cfg) => (
                tokio::spawn(super::serial::run_port(
                    cfg.clone(),
                    readings,
                    clock,
                    counters,
                    t,
                )),
                None,
            ),
            Spec::Bus(cfg) => {
                let (tx, rx) = mpsc::channel(super::modbus::COMMAND_QUEUE);
                let bus = super::modbus::Bus::new(cfg.clone(), readings, clock);
                (tokio::spawn(bus.run(rx, t)), Some(Commands::Bus(tx)))
            }
            Spec::Onewire(cfg) => (
                tokio::spawn(super::onewire::run(cfg.clone(), readings, clock, t)),
                None,
            ),
        };
        let key = spec.key();
        let settings = spec.settings();
        self.running.insert(
            key,
            Unit {
                spec,
                settings,
                token,
                task,
                commands,
            },
        );
        Ok(())
    }

    /// Routes every running unit's command topics to it; subscribes the new ones.
    fn route(&mut self, subscribe: &mpsc::UnboundedSender<String>) {
        self.routes.clear();
        for (key, unit) in &self.running {
            for topic in unit.spec.command_topics() {
                if self.subscribed.insert(topic.clone()) {
                    let _ = subscribe.send(topic.clone());
                }
                self.routes.insert(topic, key.clone());
            }
        }
    }

    /// A command from the local broker, to the output or bus that obeys its topic. A retained
    /// Modbus command is never written (it would write at every restart or reload).
    fn dispatch(&self, topic: String, payload: Bytes, retained: bool) {
        let Some(unit) = self.routes.get(&topic).and_then(|k| self.running.get(k)) else {
            return;
        };
        let full = match &unit.commands {
            Some(Commands::Output(tx)) => tx.try_send(payload).is_err(),
            Some(Commands::Bus(_)) if retained => {
                tracing::info!(%topic, "retained Modbus command ignored (only live commands are written)");
                false
            }
            Some(Commands::Bus(tx)) => tx.try_send((topic.clone(), payload)).is_err(),
            None => false,
        };
        if full {
            // An actuator flooded with commands is better off taking the latest ones later.
            tracing::warn!(%topic, "commands arrive faster than they are applied; one was dropped");
            if matches!(unit.commands, Some(Commands::Bus(_))) {
                super::modbus::bus_error("commands", "queue_full");
            }
        }
    }

    /// Applies `cfg` unit by unit (see [`Spec`]); says what changed, or what failed.
    async fn reconfigure(
        &mut self,
        cfg: &Config,
        subscribe: &mpsc::UnboundedSender<String>,
    ) -> Result<Vec<String>, String> {
        let wanted = Spec::all(cfg);
        let mut changes = Vec::new();
        let mut errors = Vec::new();
        // First stop what went or changed: its line or port is then free for its successor.
        let mut before: HashMap<String, Spec> = HashMap::new();
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(key, unit)| {
                !wanted
                    .iter()
                    .any(|w| w.key() == **key && w.settings() == unit.settings)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            if let Some(unit) = self.running.remove(&key) {
                before.insert(key, unit.spec.clone());
                unit.stop().await;
            }
        }
        self.gpio_cfg = cfg.gpio.clone();
        if cfg.gpio.is_empty() {
            self.gpio = None;
        }
        for spec in wanted {
            let key = spec.key();
            if self.running.contains_key(&key) {
                continue;
            }
            let old = before.remove(&key);
            match self.start(spec, None) {
                Ok(()) => changes.push(format!(
                    "{key} {}",
                    if old.is_some() {
                        "restarted with its new settings"
                    } else {
                        "started"
                    }
                )),
                Err(e) => {
                    errors.push(format!("{key}: {e}"));
                    // A changed unit whose new settings cannot be opened goes back to its old ones.
                    if let Some(old) = old {
                        match self.start(old, None) {
                            Ok(()) => changes.push(format!("{key} kept its old settings")),
                            Err(e) => errors.push(format!("{key}, old settings again: {e}")),
                        }
                    }
                }
            }
        }
        for key in before.keys() {
            changes.push(format!("{key} stopped"));
        }
        self.route(subscribe);
        if errors.is_empty() {
            Ok(changes)
        } else {
            Err(format!(
                "{} (applied: {})",
                errors.join("; "),
                changes.join("; ")
            ))
        }
    }

    /// Stops every unit (outputs apply their fail-safe states) and waits for them all.
    async fn stop_all(&mut self) {
        let units: Vec<Unit> = std::mem::take(&mut self.running).into_values().collect();
        for u in &units {
            u.token.cancel();
        }
        for u in units {
            let _ = u.task.await;
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
/// command topics to the stage, subscribes the topics a reload added, and re-arms the link
/// after `Unschedule` (rumqttd stops serving a local link that is not woken).
async fn drive_link(
    mut link: LocalLink,
    mut publish: mpsc::Receiver<(Reading, bool)>,
    commands: mpsc::Sender<(String, Bytes, bool)>,
    mut subscribe: mpsc::UnboundedReceiver<String>,
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
            Some(topic) = subscribe.recv() => {
                link.subscribe(&topic)
                    .map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
            }
            d = link.next() => {
                let d = d.map_err(|e| HardwareError::LinkClosed(e.to_string()))?;
                let topic = String::from_utf8_lossy(&d.topic).into_owned();
                // The retain flag: a retained Modbus command is never written (see
                // `Units::dispatch`).
                if commands.try_send((topic, d.payload, d.retain)).is_err() {
                    tracing::warn!("commands arrive faster than the hardware takes them; one was dropped");
                }
            }
        }
    }
}
