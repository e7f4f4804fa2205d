//! Process-wide counters for events that happen in many small places (a serial frame, a GPIO
//! edge, a rejected command) and the last reading of every sensor.
//!
//! Each such event is reported through one function here that the code which also logs it
//! calls, so `edgegate status`, `/metrics` and the journal count the same things. Hot per-message
//! counters (intake, forwarder) stay as atomics in their stages and are read at snapshot time.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

/// Label pairs of one counter, in the order given.
pub type Labels = Vec<(&'static str, String)>;
/// A counter's name and its labels.
type Key = (&'static str, Labels);

#[derive(Default)]
pub struct Registry {
    counters: Mutex<BTreeMap<Key, u64>>,
    sensors: Mutex<BTreeMap<(&'static str, String), SensorState>>,
}

/// What is known about one sensor (a GPIO input or a serial port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SensorState {
    pub last_reading_ms: Option<i64>,
    pub readings: u64,
    /// Errors by reason (`too_long`, `not_utf8`, `port_lost`, …).
    pub errors: BTreeMap<&'static str, u64>,
}

/// The registry of this process.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl Registry {
    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        let key = (
            name,
            labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect(),
        );
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(key).or_insert(0) += n;
    }

    /// Every counter: `(name, labels, value)`, sorted by name then labels.
    pub fn counters(&self) -> Vec<(&'static str, Labels, u64)> {
        let map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|((name, labels), v)| (*name, labels.clone(), *v))
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
            .map(|(_, v)| *v)
            .sum()
    }

    fn sensor<R>(
        &self,
        kind: &'static str,
        name: &str,
        f: impl FnOnce(&mut SensorState) -> R,
    ) -> R {
        let mut map = self.sensors.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry((kind, name.to_string())).or_default())
    }

    /// Registers a configured sensor so it shows up (as never read) before its first reading.
    pub fn sensor_configured(&self, kind: &'static str, name: &str) {
        self.sensor(kind, name, |_| ());
    }

    /// Forgets sensors that are no longer configured (after a reload).
    pub fn retain_sensors(&self, keep: &[(&'static str, String)]) {
        let mut map = self.sensors.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(kind, name), _| keep.iter().any(|(k, n)| k == kind && n == name));
    }

    pub fn sensors(&self) -> Vec<(&'static str, String, SensorState)> {
        let map = self.sensors.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|((kind, name), s)| (*kind, name.clone(), s.clone()))
            .collect()
    }
}

// ─── Events: each is counted here and logged by its caller, in the same place ──────────────

/// A serial frame was parsed into a reading (`result = "ok"`) or skipped for `result` (the
/// reason). The caller logs skipped frames, rate-limited.
pub fn serial_frame(port: &str, result: &'static str, now_ms: i64) {
    let r = registry();
    r.add(
        "serial_frames_total",
        &[("port", port), ("result", result)],
        1,
    );
    if result == "ok" {
        r.add("messages_in_total", &[("source", "serial")], 1);
        r.sensor("serial", port, |s| {
            s.readings += 1;
            s.last_reading_ms = Some(now_ms);
        });
    } else {
        r.sensor("serial", port, |s| {
            *s.errors.entry(result).or_insert(0) += 1
        });
    }
}

/// A serial port vanished or could not be opened (the caller logs it).
pub fn serial_port_error(port: &str, reason: &'static str) {
    let r = registry();
    r.add(
        "serial_port_errors_total",
        &[("port", port), ("reason", reason)],
        1,
    );
    r.sensor("serial", port, |s| {
        *s.errors.entry(reason).or_insert(0) += 1
    });
}

/// A GPIO input produced a reading; `edge` is `Some` for a debounced edge (an event) and `None`
/// for the initial or periodic state report.
pub fn gpio_reading(input: &str, pin: &str, edge: Option<&'static str>, now_ms: i64) {
    let r = registry();
    r.add("messages_in_total", &[("source", "gpio")], 1);
    if let Some(edge) = edge {
        r.add(
            "gpio_events_total",
            &[("input", input), ("pin", pin), ("edge", edge)],
            1,
        );
    }
    r.sensor("gpio", input, |s| {
        s.readings += 1;
        s.last_reading_ms = Some(now_ms);
    });
}

/// A GPIO output command was applied (`result = "ok"`) or rejected (the caller logs it).
pub fn gpio_command(output: &str, result: &'static str) {
    registry().add(
        "gpio_commands_total",
        &[("output", output), ("result", result)],
        1,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_per_label_set_and_sum_filters_by_label() {
        let r = Registry::default();
        r.add("frames", &[("port", "a"), ("result", "ok")], 2);
        r.add("frames", &[("port", "a"), ("result", "ok")], 3);
        r.add("frames", &[("port", "b"), ("result", "bad")], 1);
        assert_eq!(r.sum("frames", None), 6);
        assert_eq!(r.sum("frames", Some(("port", "a"))), 5);
        assert_eq!(r.sum("frames", Some(("result", "bad"))), 1);
        assert_eq!(r.counters().len(), 2);
    }

    #[test]
    fn a_sensor_keeps_its_last_reading_and_its_errors_by_reason() {
        let r = Registry::default();
        r.sensor_configured("serial", "usb");
        assert_eq!(r.sensors()[0].2.last_reading_ms, None);
        r.sensor("serial", "usb", |s| {
            s.readings += 1;
            s.last_reading_ms = Some(42);
        });
        r.sensor("serial", "usb", |s| {
            *s.errors.entry("too_long").or_insert(0) += 1
        });
        let (kind, name, s) = &r.sensors()[0];
        assert_eq!((*kind, name.as_str()), ("serial", "usb"));
        assert_eq!(s.last_reading_ms, Some(42));
        assert_eq!(s.errors.get("too_long"), Some(&1));
        r.retain_sensors(&[("gpio", "door".to_string())]);
        assert!(r.sensors().is_empty());
    }
}
