//! GPIO: the backend the configuration chooses ([`Gpio`]). The line traits every backend
//! implements are in `gpio_line` (re-exported here). Levels here are *physical* (true = high); `active_low`, debounce and edge
//! selection are the adapter's pure logic (`sources::gpio`), identical for every backend.

use std::path::PathBuf;

pub use super::gpio_line::{
    bcm_number, gpio_chips, GpioBackend, InputLine, LevelReader, OutputLine, CHANGES_CAPACITY,
};
use super::gpio_sim::SimGpio;
use super::HwError;
use crate::config::{GpioBackendKind, GpioConfig};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PinSpec;

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
        let found = super::super::gpio_line::list_chips(dir.path());
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
