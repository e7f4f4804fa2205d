//! What every GPIO backend implements (opened lines, the backend trait) and the helpers they
//! share (chip discovery, Raspberry Pi BCM names). Imports no backend, so backends and the
//! chooser (`gpio`) both take from here without a circle.

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use super::HwError;
use crate::config::{PinSpec, Pull};

/// Raw level changes of an input line are delivered on a channel of this size; a backend thread
/// that finds it full waits (the kernel keeps queueing edge events meanwhile).
pub const CHANGES_CAPACITY: usize = 1024;

/// An opened input line.
pub struct InputLine {
    /// Physical level after each change the backend saw (not debounced).
    pub changes: mpsc::Receiver<bool>,
    pub reader: Box<dyn LevelReader>,
}

/// Reads an input's current physical level.
pub trait LevelReader: Send {
    fn level(&mut self) -> Result<bool, HwError>;
}

/// An opened output line.
pub trait OutputLine: Send {
    fn set(&mut self, high: bool) -> Result<(), HwError>;
    /// The level read back from the line (the hardware's answer, not what we asked for).
    fn get(&mut self) -> Result<bool, HwError>;
}

/// A GPIO backend: opens lines.
pub trait GpioBackend: Send {
    fn name(&self) -> &'static str;
    fn input(&mut self, pin: &PinSpec, pull: Pull) -> Result<InputLine, HwError>;
    fn output(&mut self, pin: &PinSpec, initial_high: bool)
        -> Result<Box<dyn OutputLine>, HwError>;
}

/// `/dev/gpiochip*`, sorted.
pub fn gpio_chips() -> Vec<PathBuf> {
    list_chips(Path::new("/dev"))
}

pub(super) fn list_chips(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("gpiochip"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The BCM number of a Raspberry Pi line: `17`, `GPIO17` or `BCM17`.
pub fn bcm_number(pin: &PinSpec) -> Option<u8> {
    match pin {
        PinSpec::Number(n) => u8::try_from(*n).ok(),
        PinSpec::Name(s) => {
            let upper = s.to_ascii_uppercase();
            let digits = upper
                .strip_prefix("GPIO")
                .or_else(|| upper.strip_prefix("BCM"))?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        }
    }
}
