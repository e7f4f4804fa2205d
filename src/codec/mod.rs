//! Pure codecs for hardware data: bytes in, values out. No I/O, no clock, no allocation beyond
//! the result, so the same code runs behind a serial port, in property tests and under a fuzzer.
//!
//! - [`frame`]: a byte stream → frames (newline, `\r\n` or a custom delimiter; maximum length),
//! - [`format`]: one frame → a reading (`raw`, `value`, `json`, `kv`, `csv`, `nmea`),
//! - [`nmea`]: NMEA 0183 sentences (checksum verified; GGA and RMC),
//! - [`command`]: a GPIO output command payload → on/off,
//! - [`time`]: RFC 3339 UTC timestamps with milliseconds,
//! - [`payload`]: the JSON documents the gateway publishes for readings,
//! - [`modbus`]: Modbus RTU and TCP framing, CRC, requests and responses, request planning,
//!   register values in every byte/word order, RTU line timing,
//! - [`w1`]: the Linux w1_therm driver's `w1_slave` file (DS18B20), CRC-8 checked.

pub mod command;
pub mod format;
pub mod frame;
pub mod modbus;
pub mod nmea;
pub mod payload;
pub mod time;
pub mod w1;
