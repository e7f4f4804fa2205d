//! The local-link intake (only with the MQTT front off): a local link subscribed to the forward
//! filters stores what devices publish through the embedded broker.
//!
//! rumqttd PUBACKs a device when the message reaches its in-memory log, *before* this task sees
//! it; until the message is committed (within `store.commit_interval` plus the commit itself) a
//! crash can lose it. That window is stated in the README with its measured size.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::dedup::StoredReadings;
use super::rules::RuleSettings;
use super::MAX_BATCH;
use crate::broker::{Delivery, LocalLink};
use crate::config::UplinkConfig;
use crate::shared::{BoundedCache, IntakeCounters, RateLimited};
use crate::store::{Durability, NewMessage, PendingCommit, StoreHandle};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(
        "the embedded broker closed the intake link: {0}; forwarded topics are no longer stored"
    )]
    LinkClosed(String),
}

pub struct LocalIntake {
    pub uplink: Arc<UplinkConfig>,
    pub store: StoreHandle,
    pub counters: Arc<IntakeCounters>,
    /// Hardware readings already stored by their own stage, to be skipped here.
    pub dedup: Arc<StoredReadings>,
}
/// Longest a message waits in the intake's batch (the store's own commit_interval is longer).
const BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(2);
/// Most rows handed to the store and not yet committed (~10 MB of 100-byte messages): a burst
/// waits here, in our memory, rather than in rumqttd's log, which loses what does not fit.
const MAX_OUTSTANDING_ROWS: usize = 64_000;

impl LocalIntake {
    /// Subscribes the link to the forward filters. Done before the listeners report ready so no
    /// device message on a forwarded topic can arrive before the subscription exists.
    pub fn subscribe(&self, link: &mut LocalLink) -> Result<(), IntakeError> {
        for filter in self.uplink.local_subscriptions() {
            link.subscribe(&filter)
                .map_err(|e| IntakeError::LinkClosed(e.to_string()))?;
            tracing::debug!(%filter, "intake subscribed");
        }
        Ok(())
    }

    pub async fn run(
        self,
        mut link: LocalLink,
        cancel: CancellationToken,
    ) -> Result<(), IntakeError> {
        let mut batch: Vec<NewMessage> = Vec::with_capacity(MAX_BATCH);
        let mut pending: VecDeque<(PendingCommit, usize)> = VecDeque::new();
        let mut outstanding = 0usize;
        let mut routes = Routes::new(&self.uplink);
        let mut batch_started = tokio::time::Instant::now();
        let mut rearmed = 0u64;
        loop {
            // Bounded memory: with this many rows handed to the store and not yet committed,
            // wait for the oldest append. Only then does the link back up into rumqttd's
            // in-memory log (which, if it rolls over, is counted as `overrun`).
            while outstanding >= MAX_OUTSTANDING_ROWS {
                let Some((p, n)) = pending.pop_front() else {
                    break;
                };
                let _ = p.await;
                outstanding -= n;
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                d = link.next() => match d {
                    Ok(d) => {
                        self.accept(&mut routes, d, &mut batch);
                        if batch.len() >= MAX_BATCH {
                            self.flush(&mut batch, &mut pending, &mut outstanding);
                        }
                    }
                    Err(e) => {
                        self.flush(&mut batch, &mut pending, &mut outstanding);
                        return Err(IntakeError::LinkClosed(e.to_string()));
                    }
                },
                // The link has nothing ready and the oldest message in the batch has waited
                // BATCH_LINGER: hand the batch over. The store lingers longer than this anyway,
                // so this adds no latency, and it saves the store thread a wake-up for every
                // handful of messages.
                _ = tokio::time::sleep_until(batch_started + BATCH_LINGER), if !batch.is_empty() => {
                    self.flush(&mut batch, &mut pending, &mut outstanding);
                }
            }
            if batch.len() == 1 {
                batch_started = tokio::time::Instant::now();
            }
            if link.rearmed() > rearmed {
                self.counters
                    .rearmed
                    .fetch_add(link.rearmed() - rearmed, Ordering::Relaxed);
                rearmed = link.rearmed();
            }
        }
        // Shutdown: take what rumqttd already delivered to us, then hand it to the store.
        for d in link
            .drain(std::time::Duration::from_millis(50), MAX_OUTSTANDING_ROWS)
            .await
        {
            self.accept(&mut routes, d, &mut batch);
        }
        self.flush(&mut batch, &mut pending, &mut outstanding);
        // Wait for the store to take all of it before the store itself is closed.
        for (p, _) in pending {
            let _ = p.await;
        }
        Ok(())
    }

    fn accept(&self, routes: &mut Routes, publish: Delivery, batch: &mut Vec<NewMessage>) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let Some(route) = routes.lookup(&publish.topic, &self.uplink) else {
            self.counters.bad_topic.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let (Some(sub), Some(offset)) = (route.subscription, publish.offset) {
            routes.observe_offset(sub, offset, &self.counters);
        }
        // Hardware readings are committed by the hardware stage before it publishes them, and
        // marked so; storing them again here would forward each one twice.
        if self.dedup.take(&publish.topic, &publish.payload) {
            return;
        }
        let Some(rule) = route.rule else {
            self.counters.unmatched.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.counters.taken.fetch_add(1, Ordering::Relaxed);
        // The route cache validated the topic as UTF-8.
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        batch.push(rule.row(topic, publish.payload));
    }

    /// Hands the batch to the store without waiting for the commit: the store thread batches,
    /// and the link must keep being read so rumqttd's in-memory log never rolls over. Drops are
    /// counted and logged by the store.
    fn flush(
        &self,
        batch: &mut Vec<NewMessage>,
        pending: &mut VecDeque<(PendingCommit, usize)>,
        outstanding: &mut usize,
    ) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let p = self.store.append(
            std::mem::replace(batch, Vec::with_capacity(MAX_BATCH)),
            Durability::Linger,
        );
        pending.push_back((p, n));
        *outstanding += n;
    }
}

/// What the intake does with one topic: cached, because devices publish to the same few topics
/// over and over and matching every filter for every message costs more than the rest.
#[derive(Clone, Copy)]
struct Route {
    rule: Option<RuleSettings>,
    /// Index of the intake subscription (filter) this topic arrives through.
    subscription: Option<usize>,
}

/// Topic → route cache, and the rumqttd log offsets seen per subscription.
///
/// rumqttd attaches each forwarded message's absolute offset in its per-filter in-memory log;
/// within one subscription they are consecutive, so a jump means the log rolled over before we
/// read it (rumqttd "jumps to head"). That loss cannot be undone here — the devices already have
/// their PUBACKs — but it must never be silent.
struct Routes {
    cache: BoundedCache<bytes::Bytes, Option<Route>>,
    subscriptions: Vec<String>,
    last_offset: Vec<Option<u64>>,
    log: RateLimited,
    unlogged: u64,
}

/// Distinct topics remembered; past this the cache starts over (bounded memory with many topics).
const ROUTE_CACHE_MAX: usize = 4096;

impl Routes {
    fn new(uplink: &UplinkConfig) -> Self {
        let subscriptions = uplink.local_subscriptions();
        Routes {
            cache: BoundedCache::new(ROUTE_CACHE_MAX),
            last_offset: vec![None; subscriptions.len()],
            subscriptions,
            log: RateLimited::new(std::time::Duration::from_secs(10)),
            unlogged: 0,
        }
    }

    /// `None` when the topic is not UTF-8.
    fn lookup(&mut self, topic: &bytes::Bytes, uplink: &UplinkConfig) -> Option<Route> {
        if let Some(r) = self.cache.get(topic) {
            return *r;
        }
        let route = std::str::from_utf8(topic).ok().map(|t| Route {
            rule: RuleSettings::for_topic(uplink, t),
            subscription: self
                .subscriptions
                .iter()
                .position(|f| crate::config::topic::matches(f, t)),
        });
        // A copy: the original is a slice of rumqttd's read buffer, which it would keep alive.
        self.cache
            .insert(bytes::Bytes::copy_from_slice(topic), route);
        route
    }

    fn observe_offset(&mut self, sub: usize, offset: u64, counters: &IntakeCounters) {
        let Some(slot) = self.last_offset.get_mut(sub) else {
            return;
        };
        let prev = slot.replace(offset);
        let Some(prev) = prev else { return };
        if offset > prev + 1 {
            let lost = offset - prev - 1;
            counters.overrun.fetch_add(lost, Ordering::Relaxed);
            self.unlogged += lost;
            if self.log.allow() {
                tracing::error!(
                    lost = self.unlogged,
                    "the embedded broker's in-memory log rolled over before the store took these messages; they are lost (devices publish faster than the store commits: raise broker.segment_size/segment_count or use faster storage)"
                );
                self.unlogged = 0;
            }
        }
    }
}
