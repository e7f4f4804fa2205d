//! Sources turn hardware input into readings: `hardware` runs `gpio`, `serial`, `modbus` and
//! `onewire`, and hands each reading to the intake (`crate::intake::readings`), which stores it
//! before the stage publishes it locally.

pub mod gpio;
pub mod hardware;
pub mod modbus;
pub mod onewire;
pub mod serial;
