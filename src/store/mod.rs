//! The durable queue between intake and the forwarder: SQLite in WAL mode, owned by one thread.
//!
//! # The promise this module keeps
//! A message is *accepted* when the transaction that inserts it commits; the [`PendingCommit`]
//! returned by [`StoreHandle::append`] or [`StoreHandle::offer`] resolves only then, and its
//! [`AppendOutcome`] says how many of the rows were stored. A row leaves the file only when
//! [`StoreHandle::ack`] says the upstream PUBACKed it, or by a counted, logged policy:
//! `max_bytes` under `drop_oldest` (`store_full`), `max_age` (`expired`).
//!
//! # Refusals
//! The store may refuse new rows ([`Refusal`]): the disk is below `min_free_disk` once what the
//! store itself still needs is counted (see `space`), the filesystem is read-only or failing,
//! the budget is full under `drop_newest`, or a row can never fit `max_bytes`. A refusal covers
//! a suffix of an append: the rows before it were stored, the refused one and every row after
//! it in the same append were not, so a caller that retries them keeps their order. With
//! [`StoreHandle::append`] (readings, QoS 0, wills) refused rows are counted as dropped; with
//! [`StoreHandle::offer`] they come back in the outcome uncounted, for a caller that holds a
//! device's message unacknowledged or answers it with a negative PUBACK. While it refuses, the
//! store says so on [`StoreHandle::admission`]; it keeps forwarding and deleting what is
//! acknowledged, and resumes by itself when the cause is gone.
//!
//! # Layout
//! - `mod.rs` (this file): the public types and [`StoreHandle`], a cloneable sender of commands.
//! - `schema`: opening the file: pragmas, schema creation and checks, quarantine of corrupt files.
//! - `queue`: the command channel into the thread, which wakes it only for a command due before
//!   it would wake anyway.
//! - `worker`: the owner thread: group commit, eviction, expiry, drop logging.
//! - `space`: whether the disk can take more rows, and the reserve that lets deletes commit on a
//!   full filesystem.
//! - `readonly`: [`ReadOnlyStore`] for `edgegate buffer stats|export` next to a running daemon.
//!
//! # Why one thread
//! A `rusqlite::Connection` is blocking and not `Sync`. The thread named `store` owns it; async
//! code sends commands over a channel and awaits a oneshot reply, so no runtime thread ever waits
//! on the disk. The thread batches everything queued into one transaction (group commit): measured
//! here, 1 row per transaction writes ~4.5 KB per 100-byte message, 1000 rows ~220 B. How long
//! the thread waits for company is the caller's to say: a [`Durability::Now`] append (someone is
//! waiting for it) commits at once with whatever is queued; a [`Durability::Linger`] one waits
//! up to [`StoreHandle::linger`] — `commit_interval`, or five times what recent commits took
//! when the disk is slow (a Pi's card), at most ten `commit_interval`s — and a
//! [`Durability::Within`] one as long as the caller allows within those bounds.
//! [`StoreHandle::hurry`] commits a lingering batch at once. Acks wait for the next commit of new
//! rows, at most ten lingers, and not once [`ACK_COMMIT_ROWS`] wait.
//!
//! # Crashes
//! Only committed work survives. If every handle is dropped without [`StoreHandle::close`], the
//! thread stops *without* committing what is still queued, exactly like `kill -9` would: queued
//! appends were never accepted, and queued acks only cause duplicates later. `close()` is the
//! orderly path (flush, checkpoint, stop).

mod queue;
mod readonly;
mod schema;
mod space;
mod worker;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::config::StoreConfig;

use queue::Wake;
pub use readonly::ReadOnlyStore;

/// Bytes counted for every row on top of its topic and payload, against `max_bytes`.
///
/// It approximates what SQLite spends per row besides those two: the rowid and record header
/// (~14 B), the topic id, flags, created and size columns (~12 B), the cell pointer (2 B), and a
/// share of the page's free space. The topic text is charged in full although it is stored once
/// per distinct topic, so a store of many tiny messages cannot outgrow its budget on disk.
pub const ROW_OVERHEAD_BYTES: u64 = 64;

/// Bits of a row id that hold the sequence number; the priority sits above them.
const SEQ_BITS: u32 = 48;
/// The sequence-number part of a row id (2^48: 89 years at 100 000 messages per second).
pub const SEQ_MASK: i64 = (1 << SEQ_BITS) - 1;

/// The row id of sequence number `seq` at `priority`: ascending ids are drain order.
fn row_id(priority: u8, seq: i64) -> i64 {
    ((255 - i64::from(priority)) << SEQ_BITS) | (seq & SEQ_MASK)
}

/// The priority encoded in a row id (the inverse of [`row_id`]).
fn priority_of(id: i64) -> u8 {
    (255 - (id >> SEQ_BITS)).clamp(0, 255) as u8
}

/// What `max_bytes` is charged for one message.
pub fn row_bytes(topic: &str, payload: &[u8]) -> u64 {
    topic.len() as u64 + payload.len() as u64 + ROW_OVERHEAD_BYTES
}

/// A message to queue for forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Higher drains first.
    pub priority: u8,
    /// Unix time in milliseconds when the gateway received or produced the message.
    pub created_ms: i64,
}

/// A committed row. `id` is stable for the row's lifetime and never reused; its sequence number
/// ([`StoredMessage::seq`]) is the upstream message id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: i64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub priority: u8,
    pub created_ms: i64,
}

impl StoredMessage {
    /// The row's sequence number: unique in this store, never reused, increasing in commit
    /// order across priorities.
    pub fn seq(&self) -> i64 {
        self.id & SEQ_MASK
    }
}

/// How soon an append must be committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The thread may wait up to [`StoreHandle::linger`] (or until `commit_max_rows` rows are
    /// queued) to put more rows in the same transaction.
    Linger,
    /// Like `Linger`, but the caller allows this long (at least [`StoreHandle::linger`], at
    /// most ten times `commit_interval`): a device that publishes rarely may wait longer.
    Within(std::time::Duration),
    /// Commit everything queued right away: someone is waiting to acknowledge a device.
    Now,
}

/// Most an append may wait for company, in `commit_interval`s (see [`append_wait`]).
const MAX_WAIT_INTERVALS: u32 = 10;
/// Acks (and drop counts) wait this many lingers for a commit of their own; they join any
/// commit made before. A crash loses only their deletes (duplicates, never losses).
const ACK_LINGERS: u32 = 10;
/// ... or until this many acks wait: a fast drain (tens of thousands a second after an outage)
/// then never has more than this many deletes uncommitted.
const ACK_COMMIT_ROWS: usize = 256;

/// How long an append may wait for its commit (`None`: not at all), given the store's linger
/// now: `Linger` the linger, `Within` what the caller allows but at least the linger and at most
/// [`MAX_WAIT_INTERVALS`] × `commit_interval`.
fn append_wait(
    durability: Durability,
    linger: std::time::Duration,
    commit_interval: std::time::Duration,
) -> Option<std::time::Duration> {
    match durability {
        Durability::Now => None,
        Durability::Linger => Some(linger),
        Durability::Within(d) => {
            Some(d.clamp(linger, (commit_interval * MAX_WAIT_INTERVALS).max(linger)))
        }
    }
}

/// Per-priority "last id handed out" positions, owned by the forwarder; `Default` = start of
/// the queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    last: BTreeMap<u8, i64>,
}

impl Cursor {
    /// Moves past `m`, so the next fetch starts after it within its priority.
    pub fn advance(&mut self, m: &StoredMessage) {
        let slot = self.last.entry(m.priority).or_insert(0);
        *slot = (*slot).max(m.id);
    }

    /// The last id handed out at `priority` (0 when none).
    pub fn position(&self, priority: u8) -> i64 {
        self.last.get(&priority).copied().unwrap_or(0)
    }
}

/// What happened to the rows of one append once its transaction committed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Rows committed, from the start of the append.
    pub stored: usize,
    /// The rows from `stored` on, when the store refused them.
    pub refused: Option<Refused>,
    /// Id of the last stored row of this append.
    pub last_id: Option<i64>,
}

impl AppendOutcome {
    /// Whether every row of the append was stored.
    pub fn all_stored(&self) -> bool {
        self.refused.is_none()
    }

    /// Why rows were refused, if any were.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refused.as_ref().map(|r| r.reason)
    }
}

/// Rows the store did not take, and why. From [`StoreHandle::offer`] they are the caller's
/// again; from [`StoreHandle::append`] they were counted as dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub rows: Vec<NewMessage>,
}

/// Why the store did not take a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The filesystem is below `min_free_disk` (counting what the store still needs) or full.
    DiskFull,
    /// `max_bytes` reached under `when_full: drop_newest`, or nothing older may be evicted for
    /// it under `drop_oldest` (only rows of its priority or lower are).
    StoreFull,
    /// The row alone is larger than `max_bytes`: it can never be stored.
    TooLarge,
    /// The filesystem is read-only (an SD card remounted after errors).
    ReadOnly,
    /// Writing failed with an I/O error (or the file stayed locked by another program).
    IoError,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::DiskFull,
        Refusal::StoreFull,
        Refusal::TooLarge,
        Refusal::ReadOnly,
        Refusal::IoError,
    ];

    /// Stable name, for metrics, status and logs.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::DiskFull => "disk_full",
            Refusal::StoreFull => "store_full",
            Refusal::TooLarge => "too_large",
            Refusal::ReadOnly => "read_only",
            Refusal::IoError => "io_error",
        }
    }

    /// Whether waiting can help: a row larger than the whole budget never fits.
    pub fn is_permanent(self) -> bool {
        self == Refusal::TooLarge
    }

    /// What it means, for the person reading the log or `status`.
    pub fn meaning(self) -> &'static str {
        match self {
            Refusal::DiskFull => {
                "the filesystem holding the store is below store.min_free_disk (counting what the store still needs) or full"
            }
            Refusal::StoreFull => "the store reached store.max_bytes (when_full: drop_newest)",
            Refusal::TooLarge => "a message is larger than store.max_bytes",
            Refusal::ReadOnly => "the filesystem holding the store is read-only",
            Refusal::IoError => "writing the store failed (I/O error or locked by another program)",
        }
    }

    /// The drop counter a refused, counted row goes to.
    fn drop_reason(self) -> DropReason {
        match self {
            Refusal::DiskFull => DropReason::DiskFull,
            Refusal::StoreFull | Refusal::TooLarge => DropReason::StoreFull,
            Refusal::ReadOnly | Refusal::IoError => DropReason::Unwritable,
        }
    }
}

/// Whether the store takes new rows right now (watched by the MQTT front, shown by `status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Admission {
    #[default]
    Open,
    /// New rows are refused for `reason`, since `since_ms` (Unix time in milliseconds).
    Refusing { reason: Refusal, since_ms: i64 },
}

impl Admission {
    pub fn is_open(&self) -> bool {
        *self == Admission::Open
    }
}

/// Rows and bytes queued at one priority.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PriorityStats {
    pub priority: u8,
    pub rows: u64,
    pub bytes: u64,
}

/// Rows dropped without being forwarded, by reason. Kept in the store file (table `meta`), so
/// they count since the store was created and `edgegate buffer stats` sees them too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// `max_bytes` reached: evicted (`drop_oldest`) or refused (`drop_newest`, oversized).
    pub store_full: u64,
    /// Older than `max_age`.
    pub expired: u64,
    /// Refused because the filesystem was below `min_free_disk` or full (ENOSPC).
    pub disk_full: u64,
    /// Refused because the filesystem was read-only or writing failed.
    pub unwritable: u64,
}

impl DropCounters {
    /// `(reason, count)` pairs with stable reason names, for metrics and status.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            (DropReason::StoreFull.name(), self.store_full),
            (DropReason::Expired.name(), self.expired),
            (DropReason::DiskFull.name(), self.disk_full),
            (DropReason::Unwritable.name(), self.unwritable),
        ]
        .into_iter()
    }

    pub fn total(&self) -> u64 {
        self.store_full + self.expired + self.disk_full + self.unwritable
    }

    /// The `meta` key a reason's counter is kept under.
    fn meta_key(reason: DropReason) -> &'static str {
        match reason {
            DropReason::StoreFull => "dropped.store_full",
            DropReason::Expired => "dropped.expired",
            DropReason::DiskFull => "dropped.disk_full",
            DropReason::Unwritable => "dropped.unwritable",
        }
    }

    /// Reads the persisted counters.
    pub(super) fn load(conn: &rusqlite::Connection) -> rusqlite::Result<DropCounters> {
        let mut d = DropCounters::default();
        let mut stmt = conn.prepare("SELECT value FROM meta WHERE key = ?1")?;
        for reason in DropReason::ALL {
            let v: Option<i64> = rusqlite::OptionalExtension::optional(
                stmt.query_row([Self::meta_key(reason)], |r| r.get(0)),
            )?;
            d.add(reason, v.unwrap_or(0).max(0) as u64);
        }
        Ok(d)
    }

    fn add(&mut self, reason: DropReason, n: u64) {
        match reason {
            DropReason::StoreFull => self.store_full += n,
            DropReason::Expired => self.expired += n,
            DropReason::DiskFull => self.disk_full += n,
            DropReason::Unwritable => self.unwritable += n,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DropReason {
    StoreFull,
    Expired,
    DiskFull,
    Unwritable,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        DropReason::StoreFull,
        DropReason::Expired,
        DropReason::DiskFull,
        DropReason::Unwritable,
    ];

    fn name(self) -> &'static str {
        match self {
            DropReason::StoreFull => "store_full",
            DropReason::Expired => "expired",
            DropReason::DiskFull => "disk_full",
            DropReason::Unwritable => "unwritable",
        }
    }

    /// What a drop means for the data, for the person reading the log.
    fn meaning(self) -> &'static str {
        match self {
            DropReason::StoreFull => {
                "store reached max_bytes: queued or new messages were discarded unsent (when_full policy)"
            }
            DropReason::Expired => "queued messages older than max_age were discarded unsent",
            DropReason::DiskFull => {
                "filesystem below min_free_disk or full: new messages were refused; queued ones are kept and still forwarded"
            }
            DropReason::Unwritable => {
                "the store's filesystem is read-only or failing: new messages were refused; queued ones are kept and still forwarded"
            }
        }
    }

    fn index(self) -> usize {
        match self {
            DropReason::StoreFull => 0,
            DropReason::Expired => 1,
            DropReason::DiskFull => 2,
            DropReason::Unwritable => 3,
        }
    }
}

/// A snapshot of the queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub rows: u64,
    /// Charged bytes (see [`row_bytes`]), the quantity `max_bytes` limits.
    pub bytes: u64,
    pub oldest_created_ms: Option<i64>,
    /// Highest priority first.
    pub per_priority: Vec<PriorityStats>,
    /// Rows committed since open (0 from [`ReadOnlyStore`]: counters live in the daemon).
    pub appended_total: u64,
    /// Rows deleted by ack since open (0 from [`ReadOnlyStore`]).
    pub acked_total: u64,
    /// Since open (zeros from [`ReadOnlyStore`]).
    pub dropped: DropCounters,
    /// Database file plus its write-ahead log.
    pub file_bytes: u64,
    pub free_disk_bytes: Option<u64>,
    /// Whether new rows are taken now (always `Open` from [`ReadOnlyStore`]).
    pub admission: Admission,
    /// The disk reserve is held (false while it is released to let deletes commit).
    pub reserve_held: bool,
}

/// Where the store was opened and what it found there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// Set when the existing file was corrupt or not ours and was moved to this path.
    pub quarantined: Option<PathBuf>,
    /// Rows queued at open (left over from the last run).
    pub rows: u64,
    pub bytes: u64,
}

#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    #[error("cannot create the store directory {path}: {source}; nothing can be queued")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store {path}: {source}; the file was left untouched")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the store {path} is corrupt ({reason}) and could not be moved aside: {source}; \
         nothing was deleted: move it away by hand to start with an empty store"
    )]
    Quarantine {
        path: PathBuf,
        reason: String,
        source: std::io::Error,
    },
    #[error(
        "the store {path} has schema version {found}, newer than this edgegate understands \
         ({supported}); it was left untouched: run the newer edgegate or move the file away"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{path} is not an edgegate store ({reason})")]
    NotAStore { path: PathBuf, reason: String },
    #[error("store {what} failed: {source}")]
    Sqlite {
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("store I/O failed ({what}): {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the store stopped after a fatal error: {0}; messages not yet committed were not \
         accepted, committed ones stay in the file (a corrupt file is moved aside at next start)"
    )]
    Failed(String),
    #[error("the store is closed; the request was not carried out and nothing new was accepted")]
    Closed,
}

/// State of the store thread, watched by handles and the supervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Health {
    Running,
    Closed,
    Failed(String),
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the store does with rows it refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnRefusal {
    /// Count them as dropped.
    Count,
    /// Hand them back to the caller, uncounted.
    Return,
}

enum Command {
    /// Committed by the command's due time ([`Wake`]): at once for [`Durability::Now`].
    Append {
        msgs: Vec<NewMessage>,
        on_refusal: OnRefusal,
        reply: Reply<AppendOutcome>,
    },
    Ack(Vec<i64>),
    /// Commit what is queued at once (see [`StoreHandle::hurry`]).
    Hurry,
    /// Rows a caller dropped after the store refused them (see [`StoreHandle::count_dropped`]).
    Dropped(Refusal, u64),
    Fetch {
        cursor: Cursor,
        limit: usize,
        reply: Reply<Vec<StoredMessage>>,
    },
    Stats {
        reply: Reply<StoreStats>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// Resolves when the transaction holding an append has committed (or failed). Dropping it does
/// not cancel the append.
#[must_use = "an append is accepted only once this resolves; drop it explicitly to not wait"]
pub struct PendingCommit {
    rx: oneshot::Receiver<Result<AppendOutcome, StoreError>>,
    health: watch::Receiver<Health>,
}

impl Future for PendingCommit {
    type Output = Result<AppendOutcome, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match Pin::new(&mut this.rx).poll(cx) {
            Poll::Ready(Ok(res)) => Poll::Ready(res),
            Poll::Ready(Err(_)) => Poll::Ready(Err(stopped_error(&this.health))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Why a command could not reach the thread or its reply never came.
fn stopped_error(health: &watch::Receiver<Health>) -> StoreError {
    match &*health.borrow() {
        Health::Failed(reason) => StoreError::Failed(reason.clone()),
        Health::Closed => StoreError::Closed,
        // The thread always records why it stops before dropping a reply; no record means it
        // died (a panic), which the supervisor also learns from `failed()` and the JoinHandle.
        Health::Running => StoreError::Failed("the store thread stopped unexpectedly".to_string()),
    }
}

/// Cloneable access to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: queue::Sender,
    committed: watch::Receiver<u64>,
    health: watch::Receiver<Health>,
    admission: watch::Receiver<Admission>,
    linger_us: Arc<AtomicU64>,
    commit_interval: std::time::Duration,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StoreHandle {
    /// Queues rows for the next transaction at once (never blocks) and returns a future that
    /// resolves after that transaction commits. The caller may await it or drop it.
    ///
    /// `Linger`: the thread may wait up to [`StoreHandle::linger`] to batch more rows (until
    /// `commit_max_rows` are queued). `Now`: commit everything queued immediately.
    /// Acks sent earlier from the same task are committed in the same or an earlier transaction.
    ///
    /// Rows the store refuses (see [`Refusal`]) are counted as dropped; the outcome still names
    /// the reason.
    pub fn append(&self, msgs: Vec<NewMessage>, durability: Durability) -> PendingCommit {
        self.send_append(msgs, durability, OnRefusal::Count)
    }

    /// Like [`StoreHandle::append`], but refused rows come back in the outcome
    /// ([`AppendOutcome::refused`]) and are not counted: for a caller that holds them (a
    /// device's unacknowledged messages) and offers them again once
    /// [`StoreHandle::admission`] is open, or that answers them with a negative PUBACK.
    pub fn offer(&self, msgs: Vec<NewMessage>, durability: Durability) -> PendingCommit {
        self.send_append(msgs, durability, OnRefusal::Return)
    }

    /// Commits whatever is queued at once, as if the last append had been [`Durability::Now`]:
    /// for a caller whose lingering append turned out to hold someone up.
    pub fn hurry(&self) {
        let _ = self.tx.send(Command::Hurry, Wake::Now);
    }

    /// Counts `n` rows the caller dropped after the store refused them (e.g. QoS 0 messages
    /// from an [`StoreHandle::offer`]); persisted with the next transaction.
    pub fn count_dropped(&self, reason: Refusal, n: u64) {
        if n > 0 {
            let _ = self
                .tx
                .send(Command::Dropped(reason, n), self.later(ACK_LINGERS));
        }
    }

    /// How long a [`Durability::Linger`] append may wait for its commit now:
    /// `store.commit_interval`, longer on a disk whose commits are slow (see `worker`).
    pub fn linger(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.linger_us.load(Ordering::Relaxed))
    }

    /// `lingers` store lingers from now.
    fn later(&self, lingers: u32) -> Wake {
        Wake::By(std::time::Instant::now() + self.linger() * lingers)
    }

    /// Whether new rows are taken now; changes when the store starts or stops refusing.
    pub fn admission(&self) -> watch::Receiver<Admission> {
        self.admission.clone()
    }

    fn send_append(
        &self,
        msgs: Vec<NewMessage>,
        durability: Durability,
        on_refusal: OnRefusal,
    ) -> PendingCommit {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Append {
            msgs,
            on_refusal,
            reply,
        };
        let wake = match append_wait(durability, self.linger(), self.commit_interval) {
            None => Wake::Now,
            Some(wait) => Wake::By(std::time::Instant::now() + wait),
        };
        if let Err(Command::Append { reply, .. }) = self.tx.send(cmd, wake) {
            // The receiver is right here, so this send cannot fail.
            let _ = reply.send(Err(stopped_error(&self.health)));
        }
        PendingCommit {
            rx,
            health: self.health.clone(),
        }
    }

    /// The next committed rows after `cursor`: highest priority first, ascending id within a
    /// priority, at most `limit` rows.
    pub async fn fetch(
        &self,
        cursor: &Cursor,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.request(
            Command::Fetch {
                cursor: cursor.clone(),
                limit,
                reply,
            },
            rx,
        )
        .await
    }

    /// Delivered upstream: delete these rows with the next commit of new rows, at most ten
    /// lingers from now. An ack lost to a crash only causes a duplicate, never a loss.
    pub fn ack(&self, ids: Vec<i64>) {
        if ids.is_empty() {
            return;
        }
        // A stopped store has nothing left to delete from; the rows (if any) are re-sent after
        // restart, which is the documented duplicate, not a loss.
        let _ = self.tx.send(Command::Ack(ids), self.later(ACK_LINGERS));
    }

    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.request(Command::Stats { reply }, rx).await
    }

    /// Bumped (to a commit sequence number) after every commit that inserted rows; the forwarder
    /// waits on `changed()` when it has caught up.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Flushes queued appends and acks, checkpoints the WAL (TRUNCATE) and stops the thread.
    /// Calling it again after a clean close is fine.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        match self.request(Command::Close { reply }, rx).await {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }

    /// Resolves with the reason if the store thread stops on its own (a fatal error such as a
    /// corrupt file, or a panic). Never resolves while the store runs or after a clean close.
    /// The supervisor selects on this and exits non-zero so the next start can recover.
    pub async fn failed(&self) -> StoreError {
        let mut health = self.health.clone();
        loop {
            let state = health.borrow_and_update().clone();
            match state {
                Health::Failed(reason) => return StoreError::Failed(reason),
                Health::Closed => std::future::pending::<()>().await,
                Health::Running => {}
            }
            if health.changed().await.is_err() {
                // The sender is gone: re-read the final state (a panic leaves it Running).
                let last = health.borrow().clone();
                return match last {
                    Health::Failed(reason) => StoreError::Failed(reason),
                    Health::Closed => {
                        std::future::pending::<()>().await;
                        StoreError::Closed
                    }
                    Health::Running => {
                        StoreError::Failed("the store thread stopped unexpectedly".to_string())
                    }
                };
            }
        }
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn request<T>(
        &self,
        cmd: Command,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if self.tx.send(cmd, Wake::Now).is_err() {
            return Err(stopped_error(&self.health));
        }
        match rx.await {
            Ok(res) => res,
            Err(_) => Err(stopped_error(&self.health)),
        }
    }
}

/// Opens the store and starts its thread.
pub struct Store;

impl Store {
    /// Opens (or creates) the store at `cfg.path`, moving a corrupt file aside, and starts the
    /// `store` thread. Blocking: it runs an integrity check, so call it at startup or from
    /// `spawn_blocking`.
    pub fn open(
        cfg: &StoreConfig,
    ) -> Result<(StoreHandle, OpenReport, std::thread::JoinHandle<()>), StoreError> {
        Self::open_with(cfg, worker::Probes::default())
    }

    pub(crate) fn open_with(
        cfg: &StoreConfig,
        probes: worker::Probes,
    ) -> Result<(StoreHandle, OpenReport, std::thread::JoinHandle<()>), StoreError> {
        // A full disk may not have room for what opening needs: give back the reserve first.
        space::release_leftover_reserve(&cfg.path);
        let opened = schema::open_writer(&cfg.path, cfg.sync)?;
        for &(name, value) in &probes.pragmas {
            opened
                .conn
                .execute_batch(&format!("PRAGMA {name} = {value}"))
                .map_err(|source| StoreError::Sqlite {
                    what: "applying a test pragma",
                    source,
                })?;
        }
        let (tx, rx) = queue::queue();
        let (committed_tx, committed_rx) = watch::channel(0u64);
        let (health_tx, health_rx) = watch::channel(Health::Running);
        let (admission_tx, admission_rx) = watch::channel(Admission::Open);
        let linger_us = Arc::new(AtomicU64::new(
            u64::try_from(cfg.commit_interval.get().as_micros()).unwrap_or(u64::MAX),
        ));
        let worker = worker::Worker::new(
            opened.conn,
            cfg,
            opened.totals,
            opened.next_seq,
            worker::Channels {
                committed: committed_tx,
                health: health_tx,
                admission: admission_tx,
                linger_us: linger_us.clone(),
            },
            probes,
        )?;
        let report = OpenReport {
            quarantined: opened.quarantined,
            rows: worker.rows(),
            bytes: worker.bytes(),
        };
        let join = std::thread::Builder::new()
            .name("store".to_string())
            .spawn(move || worker.run(rx))
            .map_err(|source| StoreError::Io {
                what: "starting the store thread",
                source,
            })?;
        tracing::info!(
            path = %cfg.path.display(),
            rows = report.rows,
            bytes = report.bytes,
            "store open"
        );
        Ok((
            StoreHandle {
                tx,
                committed: committed_rx,
                health: health_rx,
                admission: admission_rx,
                linger_us,
                commit_interval: cfg.commit_interval.get(),
                path: Arc::new(cfg.path.clone()),
            },
            report,
            join,
        ))
    }
}

/// Size of the database file plus its WAL (0 for files that do not exist).
fn file_bytes(path: &Path) -> u64 {
    let wal = schema::sidecar(path, "-wal");
    [path, wal.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// The directory holding the database file (where free space is measured).
fn store_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
