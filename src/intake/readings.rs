//! Hardware readings into the store: each batch's rows are built from the forward rules (the
//! shared, reloadable [`Rules`], so an uplink change at SIGHUP needs no restart of the hardware)
//! and committed (`Durability::Now`, awaited) before the readings are published locally.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::rules::{RuleSettings, Rules};
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
    rules: Option<Arc<Rules>>,
    counters: Arc<HardwareCounters>,
    failures: RateLimited,
}

impl ReadingStore {
    /// `store` and `rules` are `None` without an uplink: readings are then only published.
    pub fn new(
        store: Option<StoreHandle>,
        rules: Option<Arc<Rules>>,
        counters: Arc<HardwareCounters>,
    ) -> ReadingStore {
        ReadingStore {
            store,
            rules,
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
        let (Some(store), Some(rules)) = (&self.store, &self.rules) else {
            return stored;
        };
        let up = rules.get();
        let rows: Vec<NewMessage> = batch
            .iter()
            .zip(stored.iter_mut())
            .filter_map(|(r, s)| {
                let rule = RuleSettings::for_topic(&up, &r.topic)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, HumanDuration, StoreConfig, SyncMode, WhenFull};
    use crate::store::{Cursor, Store};

    fn rules() -> Arc<Rules> {
        let yaml = "gateway: {id: t}\nstore: {path: unused.db}\nuplink:\n  url: mqtt://127.0.0.1:1\n  forward:\n    - {local: 'alarms/#', priority: 9, retain: true}\n    - {local: 'sensors/#'}\n";
        let cfg = crate::config::load_str(yaml, std::path::Path::new("test.yaml"))
            .expect("a valid config");
        Arc::new(Rules::new(cfg.uplink.expect("an uplink")))
    }

    fn store_config(dir: &std::path::Path, max_bytes: u64) -> StoreConfig {
        StoreConfig {
            path: dir.join("buffer.db"),
            max_bytes: ByteSize(max_bytes),
            min_free_disk: ByteSize(0),
            when_full: WhenFull::DropNewest,
            max_age: None,
            commit_interval: HumanDuration::from_millis(5),
            commit_max_rows: 1000,
            sync: SyncMode::Normal,
        }
    }

    fn reading(topic: &str, payload: &'static str) -> Reading {
        Reading {
            topic: topic.to_string(),
            payload: Bytes::from_static(payload.as_bytes()),
            retain: false,
        }
    }

    #[tokio::test]
    async fn only_forwarded_readings_are_stored_each_with_its_rules_settings() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (handle, _, thread) = Store::open(&store_config(dir.path(), 1 << 30)).expect("opens");
        let counters = Arc::new(HardwareCounters::default());
        let mut intake = ReadingStore::new(Some(handle.clone()), Some(rules()), counters.clone());
        let batch = [
            reading("sensors/t", "21.5"),
            reading("local/only", "x"),
            reading("alarms/door", "open"),
        ];
        assert_eq!(intake.store(&batch).await, vec![true, false, true]);
        let rows = handle
            .fetch(&Cursor::default(), 10)
            .await
            .expect("rows can be read");
        let got: Vec<(&str, u8, bool)> = rows
            .iter()
            .map(|r| (r.topic.as_str(), r.priority, r.retain))
            .collect();
        // Highest priority first.
        assert_eq!(got, vec![("alarms/door", 9, true), ("sensors/t", 0, false)]);
        assert_eq!(counters.readings.load(Ordering::Relaxed), 3);
        assert_eq!(counters.stored.load(Ordering::Relaxed), 2);
        handle.close().await.expect("closes");
        let _ = thread.join();
    }

    #[tokio::test]
    async fn readings_the_store_refuses_are_not_marked_stored() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Room for a few rows only, and drop_newest: the rest of the batch is refused.
        let (handle, _, thread) = Store::open(&store_config(dir.path(), 600)).expect("opens");
        let counters = Arc::new(HardwareCounters::default());
        let mut intake = ReadingStore::new(Some(handle.clone()), Some(rules()), counters.clone());
        let batch: Vec<Reading> = (0..20).map(|_| reading("sensors/t", "21.5")).collect();
        let stored = intake.store(&batch).await;
        let kept = stored.iter().filter(|s| **s).count();
        let rows = handle
            .fetch(&Cursor::default(), 100)
            .await
            .expect("rows can be read")
            .len();
        assert!(
            kept > 0 && kept < batch.len(),
            "a 600-byte store took {kept}"
        );
        assert_eq!(kept, rows, "marked stored: {kept}, in the store: {rows}");
        // The first ones are kept (drop_newest), the marks say which.
        assert!(stored[..kept].iter().all(|s| *s));
        assert_eq!(counters.stored.load(Ordering::Relaxed), kept as u64);
        handle.close().await.expect("closes");
        let _ = thread.join();
    }

    #[tokio::test]
    async fn without_an_uplink_nothing_is_stored_and_every_reading_is_counted() {
        let counters = Arc::new(HardwareCounters::default());
        let mut intake = ReadingStore::new(None, None, counters.clone());
        let batch = [reading("sensors/t", "1"), reading("sensors/u", "2")];
        assert_eq!(intake.store(&batch).await, vec![false, false]);
        assert_eq!(counters.readings.load(Ordering::Relaxed), 2);
        assert_eq!(counters.stored.load(Ordering::Relaxed), 0);
    }
}
