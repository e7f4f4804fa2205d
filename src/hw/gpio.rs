//! GPIO lines. Levels here are *physical* (true = high); `active_low`, debounce and edge
//! selection are the adapter's pure logic (`sources::gpio`), identical for every backend.

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use super::gpio_sim::SimGpio;
use super::HwError;
use crate::config::{GpioBackendKind, GpioConfig, PinSpec, Pull};

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

/// The backend chosen by the configuration, plus the simulator's handle when it is `sim`
/// (waveforms and tests drive its pins).
pub struct Gpio {
    pub backend: Box<dyn GpioBackend>,
    pub sim: Option<SimGpio>,
}

impl Gpio {
    pub fn open(cfg: &GpioConfig) -> Result<Gpio, HwError> {
        let kind = match cfg.backend {
            GpioBackendKind::Auto => choose_auto(&gpio_chips())?,
            k => k,
        };
        Ok(match kind {
            GpioBackendKind::Sim => {
                let sim = SimGpio::new(cfg.sim_state_file.clone());
                Gpio {
                    backend: Box::new(sim.clone()),
                    sim: Some(sim),
                }
            }
            GpioBackendKind::Rppal => Gpio {
                backend: Box::new(super::gpio_rppal::RppalGpio::new()?),
                sim: None,
            },
            GpioBackendKind::Cdev | GpioBackendKind::Auto => Gpio {
                backend: Box::new(super::gpio_cdev::CdevGpio::new(cfg.chip.clone())?),
                sim: None,
            },
        })
    }
}

/// `auto` is cdev when a chip exists; never sim (a gateway that silently simulates its inputs
/// would report a door that never opens).
pub fn choose_auto(chips: &[PathBuf]) -> Result<GpioBackendKind, HwError> {
    if chips.is_empty() {
        Err(HwError::NoGpioChip)
    } else {
        Ok(GpioBackendKind::Cdev)
    }
}

/// `/dev/gpiochip*`, sorted.
pub fn gpio_chips() -> Vec<PathBuf> {
    list_chips(Path::new("/dev"))
}

fn list_chips(dir: &Path) -> Vec<PathBuf> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_cdev_only_when_a_chip_exists_and_never_sim() {
        assert!(matches!(choose_auto(&[]), Err(HwError::NoGpioChip)));
        assert_eq!(
            choose_auto(&[PathBuf::from("/dev/gpiochip0")]).ok(),
            Some(GpioBackendKind::Cdev)
        );
        let msg = HwError::NoGpioChip.to_string();
        assert!(msg.contains("backend: sim"), "{msg}");
    }

    #[test]
    fn chips_are_found_by_name_in_a_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        for f in ["gpiochip1", "gpiochip0", "ttyS0"] {
            std::fs::write(dir.path().join(f), b"").expect("write");
        }
        let found = list_chips(dir.path());
        assert_eq!(
            found,
            vec![dir.path().join("gpiochip0"), dir.path().join("gpiochip1")]
        );
    }

    #[test]
    fn raspberry_pi_line_names_give_bcm_numbers() {
        assert_eq!(bcm_number(&PinSpec::Number(17)), Some(17));
        assert_eq!(bcm_number(&PinSpec::Name("GPIO17".into())), Some(17));
        assert_eq!(bcm_number(&PinSpec::Name("bcm4".into())), Some(4));
        assert_eq!(bcm_number(&PinSpec::Name("GPIO".into())), None);
        assert_eq!(bcm_number(&PinSpec::Name("LED0".into())), None);
        assert_eq!(bcm_number(&PinSpec::Number(300)), None);
    }

    #[test]
    fn this_machine_without_gpio_refuses_cdev_and_rppal_with_a_reason() {
        // CI's kernel has no GPIO; on a machine with chips this test says nothing about them.
        if !gpio_chips().is_empty() {
            return;
        }
        for backend in [
            GpioBackendKind::Auto,
            GpioBackendKind::Cdev,
            GpioBackendKind::Rppal,
        ] {
            let cfg = GpioConfig {
                backend,
                ..GpioConfig::default()
            };
            let err = Gpio::open(&cfg)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!err.is_empty(), "{backend:?} opened without GPIO hardware");
        }
    }
}
