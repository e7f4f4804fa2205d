//! Plain atomic counters of the stages, written on their hot paths and read by `ops` at snapshot
//! time (`edgegate status`, `/metrics`, the stats message).

use std::sync::atomic::AtomicU64;

/// Counters shared with status reporting.
#[derive(Debug, Default)]
pub struct IntakeCounters {
    pub received: AtomicU64,
    /// Messages from devices handed to the store (hardware readings excluded: stored by their
    /// own stage).
    pub taken: AtomicU64,
    pub unmatched: AtomicU64,
    pub bad_topic: AtomicU64,
    pub rearmed: AtomicU64,
    /// Messages rumqttd's in-memory log rolled over before we read them (lost: the device got
    /// its PUBACK). Detected as a gap in the log offsets of our subscription.
    pub overrun: AtomicU64,
}

/// Counters of the hardware stage (logged at shutdown).
#[derive(Debug, Default)]
pub struct HardwareCounters {
    pub readings: AtomicU64,
    pub stored: AtomicU64,
    pub store_failed: AtomicU64,
    pub bad_frames: AtomicU64,
    pub rejected_commands: AtomicU64,
}

/// Counters other stages read (status line, later metrics).
#[derive(Debug, Default)]
pub struct ForwardCounters {
    pub forwarded: AtomicU64,
    pub refused: AtomicU64,
    pub reconnects: AtomicU64,
    pub downlink: AtomicU64,
    /// Downlink commands dropped as stale (`uplink.downlink[].max_age`, `while_offline`).
    pub downlink_stale: AtomicU64,
    /// Why the last session ended, kept after a reconnect for `edgegate status`.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ForwardCounters {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
