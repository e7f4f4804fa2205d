//! edgegate: an IoT edge gateway for Linux single-board computers.
//!
//! # Layout (folders name the data path)
//! - [`shared`]: a leaf every stage may use: link state, counters, the event registry, the clock,
//!   the log rate limiter, the bounded topic cache.
//! - [`config`]: the YAML file → typed, validated settings (errors name file, line, field).
//! - [`broker`]: the embedded MQTT broker (rumqttd, hidden inside), and our local links into it.
//! - [`front`]: the device-facing MQTT listener in front of the broker: framing, strict
//!   validation, authentication and ACLs, and hold-until-commit (a PUBACK means "on disk").
//! - [`sources`]: the hardware adapters (GPIO, serial, Modbus, 1-Wire) that turn pins and bytes
//!   into readings.
//! - [`intake`]: the one place a device message or a reading becomes a stored row (forward
//!   rules, row building, the local-link intake with the front off).
//! - [`store`]: the durable SQLite queue, owned by one thread behind `StoreHandle`.
//! - [`forward`]: the upstream MQTT client that drains the store, deleting a row only after the
//!   upstream's PUBACK, and delivers downlink commands into the local broker.
//! - [`hw`]: narrow traits over GPIO lines, serial ports and the clock, with real backends (GPIO
//!   character device, rppal, tokio-serial) and simulated ones.
//! - [`codec`]: pure parsers for hardware data: serial framing, formats, NMEA, output commands.
//! - [`ops`]: status socket, Prometheus metrics, the stats message, Home Assistant discovery.
//! - [`app`]: the supervisor: builds the stages, one cancellation tree, shutdown order, sd_notify.
//! - [`cli`]: command-line interface; `main.rs` only maps results to exit codes.

pub mod app;
pub mod broker;
pub mod cli;
pub mod codec;
pub mod config;
pub mod forward;
pub mod front;
pub mod hw;
pub mod intake;
pub mod logging;
pub mod notify;
pub mod ops;
pub mod shared;
pub mod sources;
pub mod store;
