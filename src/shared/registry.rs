//! Process-wide counters for events that happen in many small places (a serial frame, a GPIO
//! edge, a rejected command) and the last reading of every sensor.
//!
//! Each such event is reported through one method here that the code which also logs it calls,
//! so `edgegate status`, `/metrics` and the journal count the same things. Per-port and per-input
//! handles are made once when their task starts, so counting a reading is a few atomic adds. Hot
//! per-message counters of the intake and forwarder stay in their stages and are read at
//! snapshot time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Label pairs of one counter, in the order given.
pub type Labels = Vec<(&'static str, String)>;
/// A counter's name and its labels.
type Key = (&'static str, Labels);

/// Counters are looked up (and allocated) once, when the code that counts starts; the hot path
/// then only increments an atomic.
#[derive(Default)]
pub struct Registry {
    counters: Mutex<BTreeMap<Key, Arc<AtomicU64>>>,
    sensors: Mutex<BTreeMap<(&'static str, String), Arc<Sensor>>>,
}

/// What is known about one sensor (a GPIO input or a serial port), updated in place.
#[derive(Default)]
pub struct Sensor {
    /// Unix ms of the last reading; `i64::MIN` before the first.
    last_reading_ms: AtomicI64,
    readings: AtomicU64,
    /// Errors by reason (`too_long`, `not_utf8`, `port_lost`, …): rare, so a lock is fine.
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Sensor {
    fn new() -> Sensor {
        Sensor {
            last_reading_ms: AtomicI64::new(i64::MIN),
            ..Sensor::default()
        }
    }

    /// A reading at `now_ms` (public for the Modbus and 1-Wire sources' own event structs).
    pub fn read(&self, now_ms: i64) {
        self.readings.fetch_add(1, Ordering::Relaxed);
        self.last_reading_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn error(&self, reason: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_insert(0) += 1;
    }

    fn state(&self) -> SensorState {
        let last = self.last_reading_ms.load(Ordering::Relaxed);
        SensorState {
            last_reading_ms: (last != i64::MIN).then_some(last),
            readings: self.readings.load(Ordering::Relaxed),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// A copy of one sensor's state, for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SensorState {
    pub last_reading_ms: Option<i64>,
    pub readings: u64,
    pub errors: BTreeMap<&'static str, u64>,
}

/// The registry of this process.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl Registry {
    /// The counter `name{labels}`, created at 0 the first time.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Arc<AtomicU64> {
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect(),
        );
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_default().clone()
    }

    /// Every counter: `(name, labels, value)`, sorted by name then labels.
    pub fn counters(&self) -> Vec<(&'static str, Labels, u64)> {
        let map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|((name, labels), v)| (*name, labels.clone(), v.load(Ordering::Relaxed)))
            .collect()
    }

    /// Sum of one counter over all its label values whose `label` is `value` (or all, if `None`).
    pub fn sum(&self, name: &str, filter: Option<(&str, &str)>) -> u64 {
        let map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|((n, labels), _)| {
                *n == name
                    && filter.is_none_or(|(k, v)| labels.iter().any(|(lk, lv)| *lk == k && lv == v))
            })
            .map(|(_, v)| v.load(Ordering::Relaxed))
            .sum()
    }

    /// The sensor `kind/name`, registered (as never read) the first time.
    pub fn sensor(&self, kind: &'static str, name: &str) -> Arc<Sensor> {
        let mut map = self.sensors.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((kind, name.to_string()))
            .or_insert_with(|| Arc::new(Sensor::new()))
            .clone()
    }

    /// Forgets sensors that are no longer configured (after a reload).
    pub fn retain_sensors(&self, keep: &[(&'static str, String)]) {
        let mut map = self.sensors.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(kind, name), _| keep.iter().any(|(k, n)| k == kind && n == name));
    }

    pub fn sensors(&self) -> Vec<(&'static str, String, SensorState)> {
        let map = self.sensors.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|((kind, name), s)| (*kind, name.clone(), s.state()))
            .collect()
    }
}

// ─── Events: each is counted here and logged by its caller, in the same place ──────────────

/// The counters of one serial port, made when its task starts.
pub struct SerialPortEvents {
    port: String,
    ok: Arc<AtomicU64>,
    messages_in: Arc<AtomicU64>,
    sensor: Arc<Sensor>,
}

impl SerialPortEvents {
    pub fn new(port: &str) -> SerialPortEvents {
        let r = registry();
        SerialPortEvents {
            port: port.to_string(),
            ok: r.counter("serial_frames_total", &[("port", port), ("result", "ok")]),
            messages_in: r.counter("messages_in_total", &[("source", "serial")]),
            sensor: r.sensor("serial", port),
        }
    }

    /// A frame was parsed into a reading.
    pub fn frame_ok(&self, now_ms: i64) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.sensor.read(now_ms);
    }

    /// A frame was skipped for `reason` (the caller logs it, rate-limited).
    pub fn frame_skipped(&self, reason: &'static str) {
        registry()
            .counter(
                "serial_frames_total",
                &[("port", &self.port), ("result", reason)],
            )
            .fetch_add(1, Ordering::Relaxed);
        self.sensor.error(reason);
    }

    /// The port vanished or could not be opened (the caller logs it).
    pub fn port_error(&self, reason: &'static str) {
        registry()
            .counter(
                "serial_port_errors_total",
                &[("port", &self.port), ("reason", reason)],
            )
            .fetch_add(1, Ordering::Relaxed);
        self.sensor.error(reason);
    }
}

/// The counters of one GPIO input, made when its task starts.
pub struct GpioInputEvents {
    messages_in: Arc<AtomicU64>,
    rising: Arc<AtomicU64>,
    falling: Arc<AtomicU64>,
    sensor: Arc<Sensor>,
}

impl GpioInputEvents {
    pub fn new(input: &str, pin: &str) -> GpioInputEvents {
        let r = registry();
        let edge = |e| {
            r.counter(
                "gpio_events_total",
                &[("input", input), ("pin", pin), ("edge", e)],
            )
        };
        GpioInputEvents {
            messages_in: r.counter("messages_in_total", &[("source", "gpio")]),
            rising: edge("rising"),
            falling: edge("falling"),
            sensor: r.sensor("gpio", input),
        }
    }

    /// The input produced a reading: `rising`/`falling` for a debounced edge (an event), `None`
    /// for the initial or periodic state report.
    pub fn reading(&self, edge: Option<&str>, now_ms: i64) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        match edge {
            Some("rising") => self.rising.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.falling.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        self.sensor.read(now_ms);
    }
}

/// A GPIO output command was applied (`result = "ok"`) or rejected (the caller logs it).
pub fn gpio_command(output: &str, result: &'static str) {
    registry()
        .counter(
            "gpio_commands_total",
            &[("output", output), ("result", result)],
        )
        .fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_per_label_set_and_sum_filters_by_label() {
        let r = Registry::default();
        r.counter("frames", &[("port", "a"), ("result", "ok")])
            .fetch_add(2, Ordering::Relaxed);
        // The same name and labels are the same counter.
        r.counter("frames", &[("port", "a"), ("result", "ok")])
            .fetch_add(3, Ordering::Relaxed);
        r.counter("frames", &[("port", "b"), ("result", "bad")])
            .fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.sum("frames", None), 6);
        assert_eq!(r.sum("frames", Some(("port", "a"))), 5);
        assert_eq!(r.sum("frames", Some(("result", "bad"))), 1);
        assert_eq!(r.counters().len(), 2);
    }

    #[test]
    fn a_sensor_keeps_its_last_reading_and_its_errors_by_reason() {
        let r = Registry::default();
        let usb = r.sensor("serial", "usb");
        assert_eq!(r.sensors()[0].2.last_reading_ms, None);
        usb.read(42);
        usb.error("too_long");
        let (kind, name, s) = &r.sensors()[0];
        assert_eq!((*kind, name.as_str()), ("serial", "usb"));
        assert_eq!(s.last_reading_ms, Some(42));
        assert_eq!(s.readings, 1);
        assert_eq!(s.errors.get("too_long"), Some(&1));
        // Asking again is the same sensor.
        assert_eq!(r.sensor("serial", "usb").state().readings, 1);
        r.retain_sensors(&[("gpio", "door".to_string())]);
        assert!(r.sensors().is_empty());
    }
}
