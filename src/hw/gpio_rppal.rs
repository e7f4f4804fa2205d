//! rppal: the Raspberry Pi's GPIO (BCM numbering: `17` or `GPIO17`). rppal's upstream retired
//! the project in 2025; it is kept because the design named it and it still works on Pi 1–4,
//! but `cdev` is the default and the one to prefer (Pi 5 included). Off a Pi, opening fails
//! (rppal reports an unknown model).

use std::sync::Mutex;

use rppal::gpio::{Gpio as RpGpio, InputPin, Level, OutputPin, Trigger};
use tokio::sync::mpsc;

use super::gpio_line::{
    bcm_number, GpioBackend, InputLine, LevelReader, OutputLine, CHANGES_CAPACITY,
};
use super::HwError;
use crate::config::{PinSpec, Pull};

pub struct RppalGpio {
    gpio: RpGpio,
}

fn err(pin: &PinSpec, e: impl std::fmt::Display) -> HwError {
    HwError::Gpio {
        backend: "rppal",
        line: pin.to_string(),
        reason: e.to_string(),
    }
}

impl RppalGpio {
    pub fn new() -> Result<RppalGpio, HwError> {
        RpGpio::new()
            .map(|gpio| RppalGpio { gpio })
            .map_err(|e| HwError::Gpio {
                backend: "rppal",
                line: "-".into(),
                reason: format!(
                    "{e} (rppal works on a Raspberry Pi only; elsewhere use backend: cdev)"
                ),
            })
    }

    fn bcm(pin: &PinSpec) -> Result<u8, HwError> {
        bcm_number(pin).ok_or_else(|| HwError::NotBcm {
            line: pin.to_string(),
        })
    }
}

// The pin stays configured (and its interrupt thread alive) as long as the reader holds it.
struct RppalReader {
    pin: Mutex<InputPin>,
}

impl LevelReader for RppalReader {
    fn level(&mut self) -> Result<bool, HwError> {
        let pin = self.pin.lock().unwrap_or_else(|e| e.into_inner());
        Ok(pin.read() == Level::High)
    }
}

struct RppalOutput {
    pin: OutputPin,
}

impl OutputLine for RppalOutput {
    fn set(&mut self, high: bool) -> Result<(), HwError> {
        self.pin.write(if high { Level::High } else { Level::Low });
        Ok(())
    }
    fn get(&mut self) -> Result<bool, HwError> {
        Ok(self.pin.is_set_high())
    }
}

impl GpioBackend for RppalGpio {
    fn name(&self) -> &'static str {
        "rppal"
    }

    fn input(&mut self, pin: &PinSpec, pull: Pull) -> Result<InputLine, HwError> {
        let p = self.gpio.get(Self::bcm(pin)?).map_err(|e| err(pin, e))?;
        let mut input = match pull {
            Pull::Up => p.into_input_pullup(),
            Pull::Down => p.into_input_pulldown(),
            Pull::None => p.into_input(),
        };
        let (tx, rx) = mpsc::channel(CHANGES_CAPACITY);
        // rppal calls this on its own interrupt thread (not a tokio worker), where blocking is fine.
        input
            .set_async_interrupt(Trigger::Both, None, move |ev| {
                let _ = tx.blocking_send(ev.trigger == Trigger::RisingEdge);
            })
            .map_err(|e| err(pin, e))?;
        Ok(InputLine {
            changes: rx,
            reader: Box::new(RppalReader {
                pin: Mutex::new(input),
            }),
        })
    }

    fn output(
        &mut self,
        pin: &PinSpec,
        initial_high: bool,
    ) -> Result<Box<dyn OutputLine>, HwError> {
        let p = self.gpio.get(Self::bcm(pin)?).map_err(|e| err(pin, e))?;
        let mut out = if initial_high {
            p.into_output_high()
        } else {
            p.into_output_low()
        };
        // The fail-safe level set at shutdown must outlive the process.
        out.set_reset_on_drop(false);
        Ok(Box::new(RppalOutput { pin: out }))
    }
}
