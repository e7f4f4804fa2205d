//! Operations: what a person or a monitoring system can learn about the running gateway.
//!
//! - `registry`: counters for events that happen in many places (serial frames, GPIO edges,
//!   commands) and each sensor's last reading; the code that logs an event counts it here too.
//! - `snapshot`: [`Telemetry`] builds one [`Snapshot`] from those and the stages' own counters;
//!   it renders as text (`edgegate status`), JSON (`--json`, the stats message) and Prometheus.
//! - `serve`: the status socket and the `/metrics` endpoint.
//! - `publish`: the periodic stats message and Home Assistant discovery.

pub mod publish;
pub mod registry;
pub mod serve;
pub mod snapshot;

pub use snapshot::{Snapshot, Telemetry};
