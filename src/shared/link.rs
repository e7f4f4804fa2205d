//! The uplink as the forwarder last saw it.

use std::time::{Duration, Instant};

/// What the rest of the gateway can see of the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Up { since: Instant },
    Down { since: Instant, error: String },
    Disabled,
}

impl LinkState {
    pub fn describe(&self) -> String {
        match self {
            LinkState::Connecting => "link connecting".to_string(),
            LinkState::Up { since } => format!("link up {}", human_age(since.elapsed())),
            LinkState::Down { since, .. } => format!("link down {}", human_age(since.elapsed())),
            LinkState::Disabled => "no uplink configured".to_string(),
        }
    }
}

pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86400 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    }
}
