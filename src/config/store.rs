//! The `store:` section (crate::store): where the on-disk buffer lives, its size budget and
//! free-disk floor, what happens when it is full, message age, group commit and sync mode.

use std::path::PathBuf;

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// Budget for queued messages (topic + payload + per-row overhead).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Stop accepting (counted drops) when the filesystem has less free space than this.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk: ByteSize,
    #[serde(default)]
    pub when_full: WhenFull,
    /// Messages older than this are dropped (counted as `expired`). Default: kept until sent.
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    /// Longest a received message waits for its transaction to commit.
    #[serde(default = "default_commit_interval")]
    pub commit_interval: HumanDuration,
    /// Most rows in one transaction.
    #[serde(default = "default_commit_max_rows")]
    pub commit_max_rows: usize,
    #[serde(default)]
    pub sync: SyncMode,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: default_store_path(),
            max_bytes: default_max_bytes(),
            min_free_disk: default_min_free_disk(),
            when_full: WhenFull::default(),
            max_age: None,
            commit_interval: default_commit_interval(),
            commit_max_rows: default_commit_max_rows(),
            sync: SyncMode::default(),
        }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/edgegate/buffer.db")
}
fn default_max_bytes() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}
fn default_min_free_disk() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_commit_interval() -> HumanDuration {
    HumanDuration::from_millis(10)
}
fn default_commit_max_rows() -> usize {
    1000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    DropOldest,
    DropNewest,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// fsync every commit: survives power loss.
    #[default]
    Full,
    /// WAL without fsync on commit: survives crashes, may lose the last commits on power loss.
    Normal,
}
