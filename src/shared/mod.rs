//! What several stages share, in a leaf that imports nothing else of the crate, so every stage
//! can take from it without an arrow running back up:
//!
//! - `link`: [`LinkState`], the uplink as the forwarder last saw it (the forwarder writes it; the
//!   GPIO fail-safe, the status line and the metrics read it).
//! - `counters`: the plain atomic counters of the intake, the hardware stage and the forwarder,
//!   read by `ops` at snapshot time.
//! - `registry`: process-wide counters for events that happen in many small places, and each
//!   sensor's last reading.
//! - `clock`: wall-clock milliseconds.
//! - `rate`: [`RateLimited`], the one log rate limiter.
//! - `cache`: [`BoundedCache`], the one bounded per-topic memo.

pub mod cache;
pub mod clock;
pub mod counters;
pub mod link;
pub mod rate;
pub mod registry;

pub use cache::BoundedCache;
pub use clock::now_ms;
pub use counters::{ForwardCounters, HardwareCounters, IntakeCounters};
pub use link::{human_age, LinkState};
pub use rate::RateLimited;
