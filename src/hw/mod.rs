//! Hardware behind narrow traits: GPIO lines, serial ports, the clock. The adapters in
//! `sources::{gpio, serial}` see only these, so the same code runs on a Raspberry Pi, on another
//! SBC and in CI (whose kernel has no GPIO at all).
//!
//! - [`gpio`]: [`gpio::Gpio`] (open input and output lines) with the backends `cdev` (the Linux
//!   GPIO character device through gpiocdev, uAPI v2), `rppal` (Raspberry Pi; retired upstream
//!   in 2025) and `sim` (pins in memory, driven by tests or a scripted waveform),
//! - [`serial`]: a port is `AsyncRead + AsyncWrite`, opened from its settings: tokio-serial for a
//!   device path, an in-memory simulated device for `sim`,
//! - [`modbus`]: Modbus RTU lines (tokio-serial) and an in-process simulated RTU slave,
//! - [`clock`]: wall-clock time for reading timestamps.

pub mod clock;
pub mod gpio;
mod gpio_cdev;
mod gpio_line;
mod gpio_rppal;
pub mod gpio_sim;
pub mod modbus;
pub mod serial;

#[derive(Debug, thiserror::Error)]
pub enum HwError {
    #[error("gpio.backend auto: no GPIO chip (/dev/gpiochip*) on this machine; on a machine without GPIO choose `backend: sim` explicitly")]
    NoGpioChip,
    #[error("GPIO line `{line}` not found: no chip has a line of that name")]
    LineNotFound { line: String },
    #[error("GPIO ({backend}) line {line}: {reason}")]
    Gpio {
        backend: &'static str,
        line: String,
        reason: String,
    },
    #[error("rppal: line `{line}` is not a BCM number (use 17 or GPIO17)")]
    NotBcm { line: String },
    #[error("serial port {path}: {reason}")]
    Serial { path: String, reason: String },
}
