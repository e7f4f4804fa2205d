//! Simulated GPIO: pins in memory. Tests and scripted waveforms drive input levels with
//! [`SimGpio::drive`]; outputs remember what they were set to. With a state file, every change is
//! also written there as JSON (`{"17": 1, "GPIO27": 0, "sets": {"GPIO27": [0, 1]}}`: the level by
//! pin, and under `sets` every level each output line was given, in order, the last
//! [`SETS_KEPT`]), so a test outside the process can see the levels — including the fail-safe
//! state written while the gateway stops, or a relay that a reload switched off and on again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::gpio_line::{GpioBackend, InputLine, LevelReader, OutputLine, CHANGES_CAPACITY};
use super::HwError;
use crate::config::{PinSpec, Pull};

#[derive(Clone, Default)]
pub struct SimGpio {
    inner: Arc<Mutex<SimState>>,
}

/// Levels kept per output pin in the state file's `sets`.
pub const SETS_KEPT: usize = 1000;

#[derive(Default)]
struct SimState {
    levels: BTreeMap<String, bool>,
    /// Every level an output line was given (opened at, or set to), by pin.
    sets: BTreeMap<String, std::collections::VecDeque<bool>>,
    watchers: BTreeMap<String, Vec<mpsc::Sender<bool>>>,
    state_file: Option<PathBuf>,
}

impl SimGpio {
    pub fn new(state_file: Option<PathBuf>) -> SimGpio {
        let sim = SimGpio::default();
        sim.lock().state_file = state_file;
        sim
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets a pin's physical level as an external signal would; opened inputs see the change.
    pub fn drive(&self, pin: &PinSpec, high: bool) {
        let key = pin.to_string();
        let mut s = self.lock();
        if s.levels.get(&key) == Some(&high) {
            return;
        }
        s.levels.insert(key.clone(), high);
        if let Some(ws) = s.watchers.get_mut(&key) {
            // A full channel means the adapter is far behind; the level is still readable.
            ws.retain(|w| !matches!(w.try_send(high), Err(mpsc::error::TrySendError::Closed(_))));
        }
        s.write_state_file();
    }

    /// An output line given `high`: recorded in `sets`, then driven.
    fn set_output(&self, pin: &PinSpec, high: bool) {
        {
            let mut s = self.lock();
            let v = s.sets.entry(pin.to_string()).or_default();
            if v.len() == SETS_KEPT {
                v.pop_front();
            }
            v.push_back(high);
        }
        self.drive(pin, high);
        // `drive` skips an unchanged level; the file shows the set anyway.
        self.lock().write_state_file();
    }

    /// The pin's physical level, if anything set it.
    pub fn level(&self, pin: &PinSpec) -> Option<bool> {
        self.lock().levels.get(&pin.to_string()).copied()
    }
}

impl SimState {
    fn write_state_file(&self) {
        let Some(path) = &self.state_file else { return };
        let mut doc: serde_json::Map<String, serde_json::Value> = self
            .levels
            .iter()
            .map(|(k, v)| (k.clone(), u8::from(*v).into()))
            .collect();
        if !self.sets.is_empty() {
            let sets: serde_json::Map<String, serde_json::Value> = self
                .sets
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|l| u8::from(*l)).collect()))
                .collect();
            doc.insert("sets".into(), sets.into());
        }
        let text = serde_json::to_string(&doc).unwrap_or_default();
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the simulated GPIO state file");
        }
    }
}

struct SimReader {
    sim: SimGpio,
    key: PinSpec,
}

impl LevelReader for SimReader {
    fn level(&mut self) -> Result<bool, HwError> {
        Ok(self.sim.level(&self.key).unwrap_or(false))
    }
}

struct SimOutput {
    sim: SimGpio,
    key: PinSpec,
}

impl OutputLine for SimOutput {
    fn set(&mut self, high: bool) -> Result<(), HwError> {
        self.sim.set_output(&self.key, high);
        Ok(())
    }
    fn get(&mut self) -> Result<bool, HwError> {
        Ok(self.sim.level(&self.key).unwrap_or(false))
    }
}

impl GpioBackend for SimGpio {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn input(&mut self, pin: &PinSpec, pull: Pull) -> Result<InputLine, HwError> {
        let (tx, rx) = mpsc::channel(CHANGES_CAPACITY);
        let key = pin.to_string();
        {
            let mut s = self.lock();
            // An undriven pin rests where its pull puts it (floating reads low here).
            if !s.levels.contains_key(&key) {
                s.levels.insert(key.clone(), pull == Pull::Up);
                s.write_state_file();
            }
            s.watchers.entry(key).or_default().push(tx);
        }
        Ok(InputLine {
            changes: rx,
            reader: Box::new(SimReader {
                sim: self.clone(),
                key: pin.clone(),
            }),
        })
    }

    fn output(
        &mut self,
        pin: &PinSpec,
        initial_high: bool,
    ) -> Result<Box<dyn OutputLine>, HwError> {
        self.set_output(pin, initial_high);
        Ok(Box::new(SimOutput {
            sim: self.clone(),
            key: pin.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driven_levels_reach_opened_inputs_and_the_state_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("gpio.json");
        let mut sim = SimGpio::new(Some(file.clone()));
        let pin = PinSpec::Number(17);
        let mut line = sim.input(&pin, Pull::Up).expect("sim input");
        assert_eq!(line.reader.level().ok(), Some(true));
        sim.drive(&pin, false);
        sim.drive(&pin, false);
        assert_eq!(line.changes.try_recv().ok(), Some(false));
        assert!(
            line.changes.try_recv().is_err(),
            "an unchanged level is not a change"
        );
        let mut out = sim
            .output(&PinSpec::Name("GPIO27".into()), true)
            .expect("sim output");
        out.set(false).expect("set");
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).expect("state file")).expect("JSON");
        assert_eq!(
            doc,
            serde_json::json!({"17": 0, "GPIO27": 0, "sets": {"GPIO27": [1, 0]}})
        );
    }
}
