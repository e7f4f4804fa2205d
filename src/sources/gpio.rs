//! GPIO inputs and outputs.
//!
//! Inputs: raw level changes from the backend → [`Debouncer`] (a level counts once it has been
//! stable for `debounce`) → [`EdgeKind`] filter → a reading `{"ts","state","edge"}` on the input's
//! topic; the current state is also published at start and, with `interval`, periodically.
//! `active_low` turns the physical level into the logical state before any of this.
//!
//! Outputs: commands from the local broker (where the downlink puts cloud commands) → set the
//! line → read it back → a retained `{"ts","state"}` on the state topic, so what is confirmed is
//! what the hardware reports. A fail-safe state is applied at shutdown and, optionally, once the
//! uplink has been down for `fail_safe_after`.
//!
//! The debounce and edge logic is pure (no I/O, time passed in), so it is tested under
//! `tokio::time::pause()` and by hand-fed instants.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::codec::command::parse_switch;
use crate::codec::payload::gpio_state;
use crate::config::{EdgeKind, GpioInputConfig, GpioOutputConfig, SimStep};
use crate::hw::clock::Clock;
use crate::hw::gpio::{InputLine, OutputLine};
use crate::hw::gpio_sim::SimGpio;
use crate::intake::Reading;
use crate::shared::LinkState;
use crate::shared::{HardwareCounters, RateLimited};

/// A debounced change of logical state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// off → on.
    Rising,
    /// on → off.
    Falling,
}

impl Edge {
    pub fn as_str(self) -> &'static str {
        match self {
            Edge::Rising => "rising",
            Edge::Falling => "falling",
        }
    }
    /// Whether the configured edge selection publishes this change.
    pub fn selected_by(self, kind: EdgeKind) -> bool {
        matches!(
            (kind, self),
            (EdgeKind::Both, _)
                | (EdgeKind::Rising, Edge::Rising)
                | (EdgeKind::Falling, Edge::Falling)
        )
    }
}

/// Software debounce: the state changes only after the raw level has held for `window`.
#[derive(Debug, Clone)]
pub struct Debouncer {
    stable: bool,
    candidate: bool,
    since: Instant,
    window: Duration,
}

impl Debouncer {
    pub fn new(initial: bool, window: Duration, now: Instant) -> Debouncer {
        Debouncer {
            stable: initial,
            candidate: initial,
            since: now,
            window,
        }
    }

    pub fn state(&self) -> bool {
        self.stable
    }

    /// A raw level seen at `now`. Each change restarts the window.
    pub fn raw(&mut self, level: bool, now: Instant) {
        if level != self.candidate {
            self.candidate = level;
            self.since = now;
        }
    }

    /// When [`Debouncer::settle`] may next report a change (`None`: nothing pending).
    pub fn deadline(&self) -> Option<Instant> {
        (self.candidate != self.stable).then_some(self.since + self.window)
    }

    /// The change, if the pending level has held long enough by `now`.
    pub fn settle(&mut self, now: Instant) -> Option<Edge> {
        let due = self.deadline()?;
        if now < due {
            return None;
        }
        self.stable = self.candidate;
        Some(if self.stable {
            Edge::Rising
        } else {
            Edge::Falling
        })
    }
}

/// An input with its opened line.
pub struct GpioInput {
    pub cfg: GpioInputConfig,
    pub line: InputLine,
}

/// Runs one input until cancelled.
pub async fn run_input(
    mut input: GpioInput,
    out: mpsc::Sender<Reading>,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
) {
    let cfg = &input.cfg;
    let topic = cfg.topic();
    let logical = |physical: bool| physical != cfg.active_low;
    let mut errors = RateLimited::new(Duration::from_secs(60));
    let initial = match input.line.reader.level() {
        Ok(l) => logical(l),
        Err(e) => {
            tracing::warn!(input = %cfg.name, error = %e, "cannot read the input's level; assuming off");
            false
        }
    };
    let mut deb = Debouncer::new(initial, cfg.debounce.get(), Instant::now());
    let events = crate::shared::registry::GpioInputEvents::new(&cfg.name, &cfg.pin.to_string());
    let send = |state: bool, edge: Option<Edge>| {
        let now = clock.now_ms();
        events.reading(edge.map(Edge::as_str), now);
        Reading {
            topic: topic.clone(),
            payload: gpio_state(now, state, edge.map(Edge::as_str)).into(),
            retain: false,
        }
    };
    if out.send(send(initial, None)).await.is_err() {
        return;
    }
    let mut periodic = cfg.interval.map(|i| {
        let mut t = tokio::time::interval_at(Instant::now() + i.get(), i.get());
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let deadline = deb.deadline();
        tokio::select! {
            _ = cancel.cancelled() => return,
            change = input.line.changes.recv() => match change {
                Some(level) => {
                    deb.raw(logical(level), Instant::now());
                    // A zero window settles at once, without a timer round trip.
                    if let Some(edge) = deb.settle(Instant::now()) {
                        if edge.selected_by(cfg.edge) && out.send(send(deb.state(), Some(edge))).await.is_err() {
                            return;
                        }
                    }
                }
                None => {
                    if errors.allow() {
                        tracing::error!(input = %cfg.name, "the GPIO backend stopped reporting this input");
                    }
                    cancel.cancelled().await;
                    return;
                }
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                if let Some(edge) = deb.settle(Instant::now()) {
                    if edge.selected_by(cfg.edge) && out.send(send(deb.state(), Some(edge))).await.is_err() {
                        return;
                    }
                }
            }
            _ = async { match periodic.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                if out.send(send(deb.state(), None)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Plays an input's `sim_waveform` on the simulated pin, in a loop, until cancelled.
pub async fn play_waveform(sim: SimGpio, cfg: GpioInputConfig, cancel: CancellationToken) {
    let steps: Vec<SimStep> = cfg.sim_waveform.clone();
    if steps.iter().all(|s| s.hold.get().is_zero()) {
        return;
    }
    let pin = cfg.pin.clone();
    let run = async {
        loop {
            for step in &steps {
                let level = step.level.0;
                // Contact bounce: quick toggles ending on the new level, 1 ms apart.
                for i in 0..step.bounces.min(100) {
                    sim.drive(&pin, if i % 2 == 0 { level } else { !level });
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    sim.drive(&pin, if i % 2 == 0 { !level } else { level });
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                sim.drive(&pin, level);
                tokio::time::sleep(step.hold.get()).await;
            }
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = run => {}
    }
}

/// An output with its opened line.
pub struct GpioOutput {
    pub cfg: GpioOutputConfig,
    pub line: Box<dyn OutputLine>,
}

impl GpioOutput {
    /// Sets the logical state, reads the line back and returns the retained confirmation (the
    /// level the hardware reports, which is what the cloud must see).
    fn apply(&mut self, on: bool, clock: &dyn Clock) -> Reading {
        let high = on != self.cfg.active_low;
        if let Err(e) = self.line.set(high) {
            tracing::error!(output = %self.cfg.name, error = %e, "cannot set the output");
        }
        let state = match self.line.get() {
            Ok(level) => level != self.cfg.active_low,
            Err(e) => {
                tracing::error!(output = %self.cfg.name, error = %e, "cannot read the output back; confirming the requested state");
                on
            }
        };
        Reading {
            topic: self.cfg.state_topic(),
            payload: gpio_state(clock.now_ms(), state, None).into(),
            retain: true,
        }
    }
}

/// Runs one output until cancelled, then applies its fail-safe state. Each output is its own task
/// (the hardware stage's unit), so a reload that leaves an output's settings alone leaves its
/// line alone too.
pub async fn run_output(
    mut o: GpioOutput,
    mut commands: mpsc::Receiver<bytes::Bytes>,
    out: mpsc::Sender<Reading>,
    mut link: watch::Receiver<LinkState>,
    clock: Arc<dyn Clock>,
    counters: Arc<HardwareCounters>,
    cancel: CancellationToken,
) {
    // Confirm the initial state (the line was opened at it).
    if out
        .send(o.apply(o.cfg.initial.0, clock.as_ref()))
        .await
        .is_err()
    {
        return;
    }
    let mut rejected_log = RateLimited::new(Duration::from_secs(10));
    let link_down = |s: &LinkState| matches!(s, LinkState::Connecting | LinkState::Down { .. });
    let mut down_since = link_down(&link.borrow()).then(Instant::now);
    let mut applied = false;
    let mut link_open = true;
    loop {
        let next_fail_safe = match (o.cfg.fail_safe, o.cfg.fail_safe_after, down_since) {
            (Some(_), Some(after), Some(since)) if !applied => Some(since + after.get()),
            _ => None,
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            cmd = commands.recv() => {
                let Some(payload) = cmd else { break };
                match parse_switch(&payload) {
                    Ok(on) => {
                        crate::shared::registry::gpio_command(&o.cfg.name, "ok");
                        tracing::info!(output = %o.cfg.name, state = u8::from(on), "command");
                        if out.send(o.apply(on, clock.as_ref())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let total = counters.rejected_commands.fetch_add(1, Ordering::Relaxed) + 1;
                        crate::shared::registry::gpio_command(&o.cfg.name, "rejected");
                        if rejected_log.allow() {
                            let shown: String = String::from_utf8_lossy(&payload).chars().take(40).collect();
                            let topic = o.cfg.command_topic();
                            tracing::warn!(output = %o.cfg.name, %topic, payload = %shown, error = %e, rejected_total = total, "command rejected");
                        }
                    }
                }
            }
            changed = link.changed(), if link_open => {
                if changed.is_err() {
                    // The forwarder is gone (shutdown): no more link states to watch.
                    down_since = None;
                    link_open = false;
                    continue;
                }
                let down = link_down(&link.borrow_and_update());
                match (down, down_since) {
                    (true, None) => down_since = Some(Instant::now()),
                    (false, Some(_)) => {
                        down_since = None;
                        applied = false;
                    }
                    _ => {}
                }
            }
            _ = async { match next_fail_safe { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                if let (Some(state), Some(since)) = (o.cfg.fail_safe, down_since) {
                    applied = true;
                    tracing::warn!(output = %o.cfg.name, state = u8::from(state.0), down_for = ?Instant::now().duration_since(since), "uplink down too long: fail-safe state applied");
                    if out.send(o.apply(state.0, clock.as_ref())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    if let Some(state) = o.cfg.fail_safe {
        tracing::info!(output = %o.cfg.name, state = u8::from(state.0), "stopping: fail-safe state applied");
        let _ = out.send(o.apply(state.0, clock.as_ref())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bouncing_contact_settles_into_one_change() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut d = Debouncer::new(false, Duration::from_millis(20), t0);
        for (i, at) in [0u64, 2, 3, 5, 8, 9].iter().enumerate() {
            d.raw(i % 2 == 0, ms(*at));
            assert_eq!(d.settle(ms(*at)), None);
        }
        // Last raw level (index 5) is low: back where it started, nothing to report.
        assert_eq!(d.deadline(), None);
        d.raw(true, ms(10));
        assert_eq!(d.settle(ms(29)), None);
        assert_eq!(d.settle(ms(30)), Some(Edge::Rising));
        assert_eq!(d.settle(ms(60)), None);
        assert!(d.state());
    }

    #[test]
    fn a_zero_window_passes_every_change() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(true, Duration::ZERO, t0);
        d.raw(false, t0);
        assert_eq!(d.settle(t0), Some(Edge::Falling));
    }

    #[test]
    fn the_edge_selection_filters_changes() {
        assert!(Edge::Rising.selected_by(EdgeKind::Both));
        assert!(Edge::Rising.selected_by(EdgeKind::Rising));
        assert!(!Edge::Falling.selected_by(EdgeKind::Rising));
        assert!(Edge::Falling.selected_by(EdgeKind::Falling));
    }
}
