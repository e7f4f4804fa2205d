//! The intake: the one place that turns a device message or a sensor reading into a stored row.
//!
//! - `rules`: the forward rules ([`Rules`], replaceable at a reload, with a generation that tells
//!   per-topic caches to start over) and what a rule makes of a message ([`RuleSettings::row`]).
//!   Every path into the store builds its rows here, so they are identical whichever way a
//!   message came.
//! - `readings`: hardware readings ([`Reading`]) committed before they are published locally
//!   ([`ReadingStore`]).
//! - `local`: with the MQTT front off, the local-link subscription on the forward filters
//!   ([`LocalIntake`]). With the front on, the front stores device messages itself (its
//!   hold-until-commit pipeline is `front::rows`), building them with `rules`.
//! - `dedup`: the hardware readings the local-link intake must skip ([`StoredReadings`]), one
//!   value `app` creates and hands to both, only when that intake runs.
//!
//! The data path reads from the folder names: `hw` → `sources` → `intake` → `store` → `forward`.

mod dedup;
pub mod local;
mod readings;
mod rules;

pub use dedup::StoredReadings;
pub use local::{IntakeError, LocalIntake};
pub use readings::{Reading, ReadingStore};
pub use rules::{RuleSettings, Rules};

/// Most rows handed to the store in one append, on every path.
pub const MAX_BATCH: usize = 1000;
