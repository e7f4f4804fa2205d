//! Sources turn input into messages for the store: the embedded broker's subscription on the
//! forward filters (`local`), and the hardware adapters (`hardware` runs `gpio`, `serial`,
//! `modbus` and `onewire`).

pub mod gpio;
pub mod hardware;
pub mod local;
pub mod modbus;
pub mod onewire;
pub mod serial;
