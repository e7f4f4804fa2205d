//! Hardware readings into the store: each batch's rows are built from the forward rules and
//! committed (`Durability::Now`, awaited) before the readings are published locally.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::rules::RuleSettings;
use crate::config::UplinkConfig;
use crate::shared::{HardwareCounters, RateLimited};
use crate::store::{Durability, NewMessage, StoreHandle};

/// A reading or state confirmation on its way to the store and the local broker.
#[derive(Debug, Clone)]
pub struct Reading {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// Stores hardware readings whose topic a forward rule matches.
pub struct ReadingStore {
    store: Option<StoreHandle>,
    uplink: Option<Arc<UplinkConfig>>,
    counters: Arc<HardwareCounters>,
    failures: RateLimited,
}

impl ReadingStore {
    /// `store` and `uplink` are `None` without an uplink: readings are then only published.
    pub fn new(
        store: Option<StoreHandle>,
        uplink: Option<Arc<UplinkConfig>>,
        counters: Arc<HardwareCounters>,
    ) -> ReadingStore {
        ReadingStore {
            store,
            uplink,
            counters,
            failures: RateLimited::new(Duration::from_secs(10)),
        }
    }

    /// Commits the batch's forwarded readings; returns, per reading, whether it is in the store.
    /// A reading the store refused or could not take is counted and published locally only.
    pub async fn store(&mut self, batch: &[Reading]) -> Vec<bool> {
        self.counters
            .readings
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut stored = vec![false; batch.len()];
        let (Some(store), Some(up)) = (&self.store, &self.uplink) else {
            return stored;
        };
        let rows: Vec<NewMessage> = batch
            .iter()
            .zip(stored.iter_mut())
            .filter_map(|(r, s)| {
                let rule = RuleSettings::for_topic(up, &r.topic)?;
                *s = true;
                Some(rule.row(r.topic.clone(), r.payload.clone()))
            })
            .collect();
        if rows.is_empty() {
            return stored;
        }
        let n = rows.len() as u64;
        match store.append(rows, Durability::Now).await {
            Ok(out) => {
                self.counters
                    .stored
                    .fetch_add(out.stored as u64, Ordering::Relaxed);
                if let Some(reason) = out.refusal() {
                    // Counted as dropped by the store; not marked as stored, so the local-link
                    // intake (front off) does not skip them either.
                    let mut left = out.stored;
                    for s in stored.iter_mut().filter(|s| **s) {
                        if left == 0 {
                            *s = false;
                        } else {
                            left -= 1;
                        }
                    }
                    if self.failures.allow() {
                        tracing::warn!(reason = reason.name(), refused = n - out.stored as u64, "hardware readings refused by the store (counted as dropped); they are published locally only");
                    }
                }
            }
            Err(e) => {
                self.counters.store_failed.fetch_add(n, Ordering::Relaxed);
                // Not marked as stored: if the intake can store them, it will.
                stored.iter_mut().for_each(|s| *s = false);
                if self.failures.allow() {
                    tracing::error!(error = %e, readings = n, "hardware readings could not be stored; they are published locally only");
                }
            }
        }
        stored
    }
}
