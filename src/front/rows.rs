//! One connection's messages on their way into the store, and the store's answer for each.
//!
//! The rows of the packets read in one pass are offered to the store together
//! ([`StoreHandle::offer`]), at most one offer holding device messages at a time: a later one
//! waits until the earlier one is answered, so a refusal can never let a later message be stored
//! before an earlier one that is retried. The store answers with how many rows, from the start,
//! it stored; for the rest it names a [`Refusal`]:
//!
//! - a QoS 0 message that was refused is dropped and counted (QoS 0 promises nothing more);
//! - MQTT 5: a refused QoS 1/2 message gets PUBACK/PUBREC 0x97 (quota exceeded);
//! - MQTT 3.1.1 has no negative PUBACK: the refused QoS 1/2 messages and every later one of the
//!   connection are held unacknowledged ([`Rows::blocked`]) and offered again once the store's
//!   [`Admission`] is open. The device's window fills and it stops sending; a message larger than
//!   the whole store budget can never be stored, so that connection is closed instead.
//!
//! Held (QoS 1/2) messages take their verdicts in order from [`Rows::take_verdict`] as they
//! leave the connection's FIFO.
//!
//! # How soon
//! Each offer says how long its rows may wait for other devices' rows to share their commit
//! (group commit across devices; one fsync and a few pages of log per transaction, whatever
//! it holds). A device that waits for us — a message arrives while an earlier one of the
//! connection is still with the store, or within two store lingers after the store answered
//! the last one — gets [`Durability::Now`], and a lingering offer in flight is hurried
//! ([`StoreHandle::hurry`]): a fast publisher is never slowed down. Any other QoS 1/2 message
//! gets [`Durability::Within`] 1/25 of the connection's usual time between messages (a running
//! estimate that drops at once with a burst): 40 ms for a sensor publishing once a second. The
//! store bounds that (at least its own linger, at most ten `commit_interval`s). A connection's
//! first message, with no interval known yet, gets the store's linger.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::FrontCounters;
use crate::store::{
    Admission, AppendOutcome, Durability, NewMessage, PendingCommit, Refusal, StoreError,
    StoreHandle,
};

/// A message that arrives within this many store lingers after the store answered the
/// connection's last one comes from a device that sends as fast as it is acknowledged.
const SOON_AFTER_LINGERS: u32 = 2;
/// A message of a device that waits for nobody may wait this share of the usual time between
/// its messages for its commit (1/25: 40 ms for a device that publishes once a second), within
/// the store's bounds (see [`Durability::Within`]).
const INTERVAL_SHARE: u32 = 25;

/// What the store said about one held (QoS 1/2) message: `None` stored, else refused.
pub(super) type Verdict = Option<Refusal>;

/// Something the connection must react to.
pub(super) enum StoreEvent {
    /// The offer in flight was answered.
    Answered(Result<AppendOutcome, StoreError>),
    /// The store takes rows again: offer the held ones.
    Admitted,
    /// The store is gone.
    Closed,
}

/// Why the rows of a connection cannot go on: the connection closes.
#[derive(Debug)]
pub(super) enum RowsError {
    Store(StoreError),
    /// MQTT 3.1.1 and a message that can never be stored: the device cannot be told.
    Unstorable(Refusal),
}

pub(super) struct Rows<'a> {
    store: StoreHandle,
    admission: watch::Receiver<Admission>,
    counters: &'a FrontCounters,
    level: u8,
    /// Parsed, not yet offered, with the QoS each was published with.
    unoffered: Vec<NewMessage>,
    unoffered_qos: Vec<u8>,
    /// The offer in flight and the QoS of each of its rows.
    inflight: Option<(PendingCommit, Vec<u8>)>,
    verdicts: VecDeque<Verdict>,
    /// MQTT 3.1.1: refused rows wait at the head of `unoffered` for this reason.
    blocked: Option<Refusal>,
    /// Held messages counted in `counters.messages_held`.
    held_counted: usize,
    /// A row among `unoffered` came from a device that waits for us (see [`Rows::push`]).
    eager: bool,
    /// The offer in flight may linger, and the store was not asked to hurry it yet.
    lingering: bool,
    /// When the store last answered for held messages of this connection.
    last_answer: Option<Instant>,
    /// When the last QoS 1/2 message was read, and the usual time between them.
    last_push: Option<Instant>,
    interval: Option<Duration>,
}

impl<'a> Rows<'a> {
    pub fn new(store: StoreHandle, counters: &'a FrontCounters, level: u8) -> Rows<'a> {
        Rows {
            admission: store.admission(),
            store,
            counters,
            level,
            unoffered: Vec::new(),
            unoffered_qos: Vec::new(),
            inflight: None,
            verdicts: VecDeque::new(),
            blocked: None,
            held_counted: 0,
            eager: false,
            lingering: false,
            last_answer: None,
            last_push: None,
            interval: None,
        }
    }

    /// Queues the row of a message published with `qos`; a QoS 1/2 one also tells how its
    /// device sends (see "How soon" above).
    pub fn push(&mut self, row: NewMessage, qos: u8) {
        self.unoffered.push(row);
        self.unoffered_qos.push(qos);
        if qos == 0 {
            return;
        }
        if self.blocked.is_some() {
            self.count_held(1);
        }
        let now = Instant::now();
        if let Some(last) = self.last_push.replace(now) {
            // Falls at once with a burst, rises slowly with a device that slows down.
            let gap = now - last;
            self.interval = Some(self.interval.map_or(gap, |i| gap.min((i * 3 + gap) / 4)));
        }
        if self.inflight.is_some() {
            self.eager = true;
            if std::mem::take(&mut self.lingering) {
                self.store.hurry();
            }
        } else if self
            .last_answer
            .is_some_and(|t| now - t < self.store.linger() * SOON_AFTER_LINGERS)
        {
            self.eager = true;
        }
    }

    /// Whether messages are held because the store refused them.
    pub fn blocked(&self) -> Option<Refusal> {
        self.blocked
    }

    /// Hands the queued rows to the store, unless an offer is in flight or the connection is
    /// held. Rows of QoS 0 messages only go without waiting (nobody waits for them).
    pub fn offer(&mut self) {
        if self.unoffered.is_empty() || self.inflight.is_some() || self.blocked.is_some() {
            return;
        }
        let rows = std::mem::take(&mut self.unoffered);
        let qos = std::mem::take(&mut self.unoffered_qos);
        if qos.iter().all(|&q| q == 0) {
            // Refused QoS 0 rows are counted by the store itself.
            drop(self.store.append(rows, Durability::Linger));
            return;
        }
        let durability = match (std::mem::take(&mut self.eager), self.interval) {
            (true, _) => Durability::Now,
            (false, None) => Durability::Linger,
            (false, Some(i)) => Durability::Within(i / INTERVAL_SHARE),
        };
        self.lingering = durability != Durability::Now;
        self.inflight = Some((self.store.offer(rows, durability), qos));
    }

    /// The verdict of the next held message, once the store has given it.
    pub fn take_verdict(&mut self) -> Option<Verdict> {
        self.verdicts.pop_front()
    }

    /// The answer to the offer in flight, if it has come.
    pub fn poll_answer(&mut self) -> Option<Result<AppendOutcome, StoreError>> {
        let (pending, _) = self.inflight.as_mut()?;
        match Pin::new(pending).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    /// Waits for the next thing that changes what the connection can do.
    pub async fn event(&mut self) -> StoreEvent {
        if let Some((pending, _)) = self.inflight.as_mut() {
            return StoreEvent::Answered(pending.await);
        }
        if self.blocked.is_some() {
            return match self.admission.wait_for(Admission::is_open).await {
                Ok(_) => StoreEvent::Admitted,
                Err(_) => StoreEvent::Closed,
            };
        }
        std::future::pending().await
    }

    /// The store takes rows again: the held ones go first, in their order.
    pub fn admitted(&mut self) {
        if self.blocked.take().is_some() {
            self.count_held_done();
        }
        // They have waited long enough.
        self.eager = true;
        self.offer();
    }

    /// Applies the store's answer to the offer in flight.
    pub fn answered(&mut self, r: Result<AppendOutcome, StoreError>) -> Result<(), RowsError> {
        let Some((_, qos)) = self.inflight.take() else {
            return Ok(());
        };
        self.lingering = false;
        let out = r.map_err(RowsError::Store)?;
        for &q in &qos[..out.stored.min(qos.len())] {
            if q > 0 {
                self.verdicts.push_back(None);
                self.last_answer = Some(Instant::now());
            }
        }
        let Some(refused) = out.refused else {
            return Ok(());
        };
        let reason = refused.reason;
        if out.stored > 0 && !reason.is_permanent() {
            // The store took a first part (the rest did not fit yet): offer the rest again at
            // once, ahead of what was read since; only a refusal of everything holds.
            self.eager = true;
            let rest_qos = qos[out.stored.min(qos.len())..].to_vec();
            let mut rows = refused.rows;
            rows.append(&mut self.unoffered);
            self.unoffered = rows;
            let mut q = rest_qos;
            q.append(&mut self.unoffered_qos);
            self.unoffered_qos = q;
            return Ok(());
        }
        let mut dropped = 0u64;
        let mut keep = Vec::new();
        let mut keep_qos = Vec::new();
        for (row, &q) in refused
            .rows
            .into_iter()
            .zip(&qos[out.stored.min(qos.len())..])
        {
            if q == 0 {
                dropped += 1;
            } else if self.level == 5 {
                self.verdicts.push_back(Some(reason));
                self.counters.count_rejected(reason);
            } else {
                keep.push(row);
                keep_qos.push(q);
            }
        }
        self.store.count_dropped(reason, dropped);
        if keep.is_empty() {
            return Ok(());
        }
        if reason.is_permanent() {
            return Err(RowsError::Unstorable(reason));
        }
        // Held: the refused rows first, then whatever was read since, in order.
        let held = keep.len();
        keep.append(&mut self.unoffered);
        keep_qos.append(&mut self.unoffered_qos);
        self.unoffered = keep;
        self.unoffered_qos = keep_qos;
        if self.blocked.replace(reason).is_none() {
            self.counters.devices_held.fetch_add(1, Ordering::Relaxed);
            let later = self.unoffered_qos[held..]
                .iter()
                .filter(|&&q| q > 0)
                .count();
            self.count_held(held + later);
        }
        Ok(())
    }

    /// The connection ends while held: its held messages are the device's again (never
    /// acknowledged); the QoS 0 ones among the waiting rows are dropped and counted.
    pub fn abandon(&mut self) {
        let Some(reason) = self.blocked.take() else {
            return;
        };
        let qos0 = self.unoffered_qos.iter().filter(|&&q| q == 0).count() as u64;
        self.store.count_dropped(reason, qos0);
        self.unoffered.clear();
        self.unoffered_qos.clear();
        self.count_held_done();
    }

    fn count_held(&mut self, n: usize) {
        self.held_counted += n;
        self.counters.messages_held.fetch_add(n, Ordering::Relaxed);
    }

    fn count_held_done(&mut self) {
        self.counters
            .messages_held
            .fetch_sub(self.held_counted, Ordering::Relaxed);
        self.held_counted = 0;
        self.counters.devices_held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Rows<'_> {
    fn drop(&mut self) {
        if self.blocked.is_some() {
            // The device went away with messages it never got a PUBACK for: it still has them.
            self.count_held_done();
        }
    }
}
