//! The Linux GPIO character device (uAPI v2) through gpiocdev: every Linux SBC, including the
//! Raspberry Pi 5 (whose GPIOs rppal's old register access does not reach). Lines are found by
//! number on `gpio.chip` (default: the first chip) or by name on any chip (`GPIO17` on a Pi).
//!
//! Edge events are read on a plain thread (gpiocdev's blocking API; one per input line) that
//! ends once the adapter drops its receiver.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpiocdev::line::{Bias, EdgeDetection, EdgeKind, Offset, Value};
use gpiocdev::Request;
use tokio::sync::mpsc;

use super::gpio_line::{
    gpio_chips, GpioBackend, InputLine, LevelReader, OutputLine, CHANGES_CAPACITY,
};
use super::HwError;
use crate::config::{PinSpec, Pull};

const CONSUMER: &str = "edgegate";

pub struct CdevGpio {
    /// The chip for numbered lines.
    chip: PathBuf,
}

impl CdevGpio {
    pub fn new(chip: Option<PathBuf>) -> Result<CdevGpio, HwError> {
        let chip = match chip {
            Some(c) => c,
            None => gpio_chips().into_iter().next().ok_or(HwError::NoGpioChip)?,
        };
        Ok(CdevGpio { chip })
    }

    fn locate(&self, pin: &PinSpec) -> Result<(PathBuf, Offset), HwError> {
        match pin {
            PinSpec::Number(n) => Ok((self.chip.clone(), *n)),
            PinSpec::Name(name) => gpiocdev::find_named_line(name)
                .map(|found| (found.chip, found.info.offset))
                .ok_or_else(|| HwError::LineNotFound { line: name.clone() }),
        }
    }
}

fn err(pin: &PinSpec, e: impl std::fmt::Display) -> HwError {
    HwError::Gpio {
        backend: "cdev",
        line: pin.to_string(),
        reason: e.to_string(),
    }
}

struct CdevReader {
    req: Arc<Request>,
    offset: Offset,
    pin: PinSpec,
}

impl LevelReader for CdevReader {
    fn level(&mut self) -> Result<bool, HwError> {
        self.req
            .value(self.offset)
            .map(|v| v == Value::Active)
            .map_err(|e| err(&self.pin, e))
    }
}

struct CdevOutput {
    req: Request,
    offset: Offset,
    pin: PinSpec,
}

impl OutputLine for CdevOutput {
    fn set(&mut self, high: bool) -> Result<(), HwError> {
        self.req
            .set_value(
                self.offset,
                if high { Value::Active } else { Value::Inactive },
            )
            .map_err(|e| err(&self.pin, e))
    }
    fn get(&mut self) -> Result<bool, HwError> {
        self.req
            .value(self.offset)
            .map(|v| v == Value::Active)
            .map_err(|e| err(&self.pin, e))
    }
}

impl GpioBackend for CdevGpio {
    fn name(&self) -> &'static str {
        "cdev"
    }

    fn input(&mut self, pin: &PinSpec, pull: Pull) -> Result<InputLine, HwError> {
        let (chip, offset) = self.locate(pin)?;
        let bias = match pull {
            Pull::Up => Bias::PullUp,
            Pull::Down => Bias::PullDown,
            Pull::None => Bias::Disabled,
        };
        let req = Request::builder()
            .on_chip(&chip)
            .with_consumer(CONSUMER)
            .with_line(offset)
            .as_input()
            .with_bias(bias)
            .with_edge_detection(EdgeDetection::BothEdges)
            .request()
            .map_err(|e| err(pin, e))?;
        let req = Arc::new(req);
        let (tx, rx) = mpsc::channel(CHANGES_CAPACITY);
        let thread_req = Arc::clone(&req);
        let name = pin.to_string();
        std::thread::Builder::new()
            .name(format!("gpio-{name}"))
            .spawn(move || edge_thread(&thread_req, &tx, &name))
            .map_err(|e| err(pin, e))?;
        Ok(InputLine {
            changes: rx,
            reader: Box::new(CdevReader {
                req,
                offset,
                pin: pin.clone(),
            }),
        })
    }

    fn output(
        &mut self,
        pin: &PinSpec,
        initial_high: bool,
    ) -> Result<Box<dyn OutputLine>, HwError> {
        let (chip, offset) = self.locate(pin)?;
        let req = Request::builder()
            .on_chip(&chip)
            .with_consumer(CONSUMER)
            .with_line(offset)
            .as_output(if initial_high {
                Value::Active
            } else {
                Value::Inactive
            })
            .request()
            .map_err(|e| err(pin, e))?;
        Ok(Box::new(CdevOutput {
            req,
            offset,
            pin: pin.clone(),
        }))
    }
}

/// Forwards edge events as levels until the adapter is gone. The 200 ms wait bounds how long the
/// thread outlives its adapter.
fn edge_thread(req: &Request, tx: &mpsc::Sender<bool>, name: &str) {
    while !tx.is_closed() {
        match req.wait_edge_event(Duration::from_millis(200)) {
            Ok(false) => {}
            Ok(true) => match req.read_edge_event() {
                Ok(ev) => {
                    if tx.blocking_send(ev.kind == EdgeKind::Rising).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(line = name, error = %e, "GPIO edge events cannot be read; this input stops reporting");
                    return;
                }
            },
            Err(e) => {
                tracing::error!(line = name, error = %e, "GPIO edge events cannot be read; this input stops reporting");
                return;
            }
        }
    }
}
