//! Operations: what a person or a monitoring system can learn about the running gateway.
//!
//! - `snapshot`: [`Telemetry`] builds one [`Snapshot`] from the event registry
//!   (`crate::shared::registry`) and the stages' own counters;
//!   it renders as text (`edgegate status`), JSON (`--json`, the stats message) and Prometheus.
//! - `serve`: the status socket and the `/metrics` endpoint.
//! - `publish`: the periodic stats message and Home Assistant discovery.

pub mod publish;
pub mod serve;
pub mod snapshot;

pub use snapshot::{Snapshot, Telemetry};
