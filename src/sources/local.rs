//! Intake from the embedded broker: a local link subscribed to the forward filters.
//!
//! rumqttd PUBACKs a device when the message reaches its in-memory log, *before* this task sees
//! it; until the message is committed (within `store.commit_interval` plus the commit itself) a
//! crash can lose it. That window is stated in the README with its measured size.
//!
//! The link must be re-armed with `wake()` after `Notification::Unschedule`, or rumqttd silently
//! stops delivering to it after ~200 messages while devices keep getting PUBACKs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;
use tokio_util::sync::CancellationToken;

use crate::config::UplinkConfig;
use crate::store::{Durability, NewMessage, PendingCommit, StoreHandle};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(
        "the embedded broker closed the intake link: {0}; forwarded topics are no longer stored"
    )]
    LinkClosed(String),
}

/// Counters shared with status reporting.
#[derive(Debug, Default)]
pub struct IntakeCounters {
    pub received: AtomicU64,
    pub unmatched: AtomicU64,
    pub bad_topic: AtomicU64,
    pub rearmed: AtomicU64,
    /// Messages rumqttd's in-memory log rolled over before we read them (lost: the device got
    /// its PUBACK). Detected as a gap in the log offsets of our subscription.
    pub overrun: AtomicU64,
}

pub struct LocalIntake {
    pub uplink: Arc<UplinkConfig>,
    pub store: StoreHandle,
    pub counters: Arc<IntakeCounters>,
}

/// Most messages handed to the store in one append.
const MAX_BATCH: usize = 1000;
/// Most appends handed to the store and not yet committed.
const MAX_OUTSTANDING: usize = 16;

impl LocalIntake {
    /// Subscribes the link to the forward filters. Done before the listeners report ready so no
    /// device message on a forwarded topic can arrive before the subscription exists.
    pub fn subscribe(&self, link_tx: &mut LinkTx) -> Result<(), IntakeError> {
        for filter in self.uplink.local_subscriptions() {
            link_tx
                .subscribe(filter.clone())
                .map_err(|e| IntakeError::LinkClosed(e.to_string()))?;
            tracing::debug!(%filter, "intake subscribed");
        }
        Ok(())
    }

    pub async fn run(
        self,
        _link_tx: LinkTx,
        mut link_rx: LinkRx,
        cancel: CancellationToken,
    ) -> Result<(), IntakeError> {
        let mut batch: Vec<NewMessage> = Vec::with_capacity(MAX_BATCH);
        let mut pending: VecDeque<PendingCommit> = VecDeque::new();
        let mut gaps = GapDetector::default();
        let subscriptions = self.uplink.local_subscriptions();
        loop {
            // Bounded memory: with this many appends not yet committed, wait for the oldest. The
            // link then backs up into rumqttd's in-memory log, which is sized for such bursts.
            while pending.len() >= MAX_OUTSTANDING {
                if let Some(p) = pending.pop_front() {
                    let _ = p.await;
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                n = link_rx.next() => match n {
                    Ok(Some(Notification::Forward(fwd))) => {
                        if let Some((_, offset)) = fwd.cursor {
                            gaps.observe(&fwd.publish.topic, offset, &subscriptions, &self.counters);
                        }
                        self.accept(fwd.publish.topic, fwd.publish.payload, &mut batch);
                        if batch.len() >= MAX_BATCH {
                            pending.extend(self.flush(&mut batch));
                        }
                    }
                    Ok(Some(Notification::Unschedule)) => {
                        self.counters.rearmed.fetch_add(1, Ordering::Relaxed);
                        link_rx.wake().await.map_err(|e| IntakeError::LinkClosed(e.to_string()))?;
                    }
                    Ok(Some(_)) | Ok(None) => {}
                    Err(e) => {
                        drop(self.flush(&mut batch));
                        return Err(IntakeError::LinkClosed(e.to_string()));
                    }
                },
                // Reached only when the link has nothing ready: hand over what we have.
                _ = std::future::ready(()), if !batch.is_empty() => pending.extend(self.flush(&mut batch)),
            }
        }
        // Shutdown: take what rumqttd already delivered to us, then hand it to the store.
        while let Ok(Ok(Some(n))) =
            tokio::time::timeout(std::time::Duration::from_millis(50), link_rx.next()).await
        {
            if let Notification::Forward(fwd) = n {
                self.accept(fwd.publish.topic, fwd.publish.payload, &mut batch);
            }
        }
        pending.extend(self.flush(&mut batch));
        // Wait for the store to take all of it before the store itself is closed.
        for p in pending {
            let _ = p.await;
        }
        Ok(())
    }

    fn accept(&self, topic: bytes::Bytes, payload: bytes::Bytes, batch: &mut Vec<NewMessage>) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let Ok(topic) = String::from_utf8(topic.to_vec()) else {
            self.counters.bad_topic.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some((_, rule)) = self.uplink.match_rule(&topic) else {
            self.counters.unmatched.fetch_add(1, Ordering::Relaxed);
            return;
        };
        batch.push(NewMessage {
            priority: rule.priority,
            qos: rule.qos,
            retain: rule.retain,
            topic,
            payload,
            created_ms: now_ms(),
        });
    }

    /// Hands the batch to the store without waiting for the commit: the store thread batches,
    /// and the link must keep being read so rumqttd's in-memory log never rolls over. Drops are
    /// counted and logged by the store.
    fn flush(&self, batch: &mut Vec<NewMessage>) -> Option<PendingCommit> {
        if batch.is_empty() {
            return None;
        }
        Some(self.store.append(std::mem::take(batch), Durability::Linger))
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Watches the absolute log offsets rumqttd attaches to each forwarded message: within one
/// subscription filter they are consecutive, so a jump means the router's in-memory log rolled
/// over before we read it (rumqttd then "jumps to head"). That loss cannot be undone here — the
/// devices already have their PUBACKs — but it must never be silent.
#[derive(Default)]
struct GapDetector {
    last: std::collections::HashMap<String, u64>,
    last_log: Option<std::time::Instant>,
    unlogged: u64,
}

impl GapDetector {
    fn observe(
        &mut self,
        topic: &[u8],
        offset: u64,
        subscriptions: &[String],
        counters: &IntakeCounters,
    ) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        let Some(filter) = subscriptions
            .iter()
            .find(|f| crate::config::topic::matches(f, topic))
        else {
            return;
        };
        let prev = match self.last.get_mut(filter.as_str()) {
            Some(last) => Some(std::mem::replace(last, offset)),
            None => self.last.insert(filter.clone(), offset),
        };
        let Some(prev) = prev else { return };
        if offset > prev + 1 {
            let lost = offset - prev - 1;
            counters.overrun.fetch_add(lost, Ordering::Relaxed);
            self.unlogged += lost;
            let now = std::time::Instant::now();
            if self
                .last_log
                .is_none_or(|t| now.duration_since(t).as_secs() >= 10)
            {
                tracing::error!(
                    lost = self.unlogged,
                    "the embedded broker's in-memory log rolled over before the store took these messages; they are lost (devices publish faster than the store commits: raise broker.segment_size/segment_count or use faster storage)"
                );
                self.unlogged = 0;
                self.last_log = Some(now);
            }
        }
    }
}
