//! The `store` thread: owns the connection and turns queued commands into group commits.
//!
//! Each loop iteration collects queued appends and acks, then runs ONE transaction: deletes for
//! acks, inserts (each evicting older rows first under `drop_oldest` when `max_bytes` is
//! reached); then it replies to every waiter and bumps `committed`. Before the transaction the
//! disk is asked whether it can take the new rows (`space`). Reads (fetch, stats) are answered
//! between transactions, so they only ever see committed rows. Housekeeping (expiry, the disk
//! check while refusing, rate-limited drop logs, vacuum) runs on a sweep at most every second,
//! idle or not.
//!
//! A write that fails for lack of space, a read-only filesystem or an I/O error does not stop
//! the store: the appends of that transaction are refused (see [`super::Refusal`]), acks are
//! kept and committed as soon as they can be (on a full disk by releasing the reserve), and the
//! store keeps serving fetches so the backlog drains. Only corruption stops it.
//!
//! In-memory totals change only after a commit succeeds, so a rolled-back transaction cannot make
//! them drift from the file.
//!
//! Here: the loop, admission and the commit. `evict.rs`: `drop_oldest` inside a transaction;
//! `topics.rs`: topic interning; `housekeeping.rs`: the sweep (expiry, the disk recheck,
//! vacuum) and the file state the disk check reads.

mod evict;
use evict::Evictor;
use housekeeping::file_state;
mod housekeeping;
mod topics;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use tokio::sync::watch;

use super::queue::{Receiver, Recv, Wake};
use super::schema::{
    self, band, is_corruption, read_message, Totals, MESSAGE_COLUMNS, SEQ_RESERVED_KEY,
};
use super::space::{self, DiskProbe, FileState, Layout, Short, Space};
use super::{
    row_bytes, Admission, AppendOutcome, Command, Cursor, DropCounters, DropReason, Health,
    NewMessage, OnRefusal, PriorityStats, Refusal, Refused, Reply, StoreError, StoreStats,
    StoredMessage, ACK_COMMIT_ROWS, MAX_WAIT_INTERVALS,
};
use crate::config::{StoreConfig, WhenFull};
use crate::shared::BoundedCache;

/// Longest pause between housekeeping sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// While writes fail (read-only filesystem, I/O errors), they are tried again at most this
/// often: each failing attempt costs a system call or more, and the cause rarely goes away fast.
const UNWRITABLE_RETRY: Duration = Duration::from_secs(1);
/// After `drop_newest` refused a row, accepting resumes once the backlog is this far below
/// `max_bytes` (a fraction of it, at least 64 KiB), so one acknowledgement does not make it flip.
const BUDGET_HYSTERESIS_DIV: u64 = 100;
/// At most one drop log line per reason per this period, carrying the count since the last one.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
/// Pages returned to the filesystem per sweep, bounding the time one vacuum step takes (files
/// from schema 1, which use incremental auto-vacuum).
const VACUUM_PAGES_PER_SWEEP: i64 = 1024;
/// Files without auto-vacuum are compacted by a full VACUUM, which rewrites what is still
/// queued: only once that is at most this much.
const VACUUM_MAX_LIVE_BYTES: i64 = 4 << 20;
/// Vacuum only when at least this many pages are free: a queue that refills soon would just
/// grow the file again, which costs more writes than it saves.
const VACUUM_MIN_FREE_PAGES: i64 = 1024;
/// Eviction reads candidates in chunks of this many rows.
const EVICT_CHUNK: i64 = 256;
/// Sequence numbers reserved in `meta` at a time: one small write per this many messages makes
/// ids unique forever without AUTOINCREMENT's write per transaction.
const SEQ_RESERVE_STEP: i64 = 1 << 16;
/// A lingering commit waits this many times what the disk's recent commits took (when that is
/// longer than `commit_interval`): on a slow card, fsyncs then take at most about a sixth of the
/// time, and each carries as many messages as arrived meanwhile.
const LINGER_PER_COMMIT_COST: u32 = 5;
/// Weight of the newest commit in the running commit cost, out of 8.
const COMMIT_COST_WEIGHT: u32 = 2;
/// Topic ids kept in memory; past this the cache starts over (the table answers misses).
const TOPIC_CACHE_MAX: usize = 4096;
/// Unused topics are deleted once this many new ones were added: all of them when the queue is
/// empty (cheap, and the usual state). Not at every empty moment: a queue that the forwarder
/// keeps empty would then re-insert its devices' topics after each cleanup.
pub(super) const TOPIC_GC_EMPTY_AFTER: u64 = 1024;
/// While rows stay queued, after this many new topics (a scan of the table).
const TOPIC_GC_AFTER: u64 = 1 << 16;

/// Seams for tests: a fake filesystem reading, and pragmas applied after open (a
/// `max_page_count` makes SQLite report SQLITE_FULL; a tiny `cache_size` makes it re-read pages).
#[derive(Clone, Default)]
pub(crate) struct Probes {
    pub disk: Option<DiskProbe>,
    pub pragmas: Vec<(&'static str, i64)>,
}

/// The watch channels the worker publishes on.
pub(super) struct Channels {
    pub committed: watch::Sender<u64>,
    pub health: watch::Sender<Health>,
    pub admission: watch::Sender<Admission>,
    /// The current linger in microseconds (see [`Worker::linger`]), for the front.
    pub linger_us: Arc<AtomicU64>,
}

struct Settings {
    max_bytes: u64,
    when_full: WhenFull,
    max_age: Option<Duration>,
    commit_interval: Duration,
    commit_max_rows: usize,
    path: PathBuf,
    wal_path: PathBuf,
    sweep_every: Duration,
    /// `sync: full`: new rows are fsynced at commit.
    sync_full: bool,
}

/// One append waiting for its transaction.
struct Pending {
    msgs: Vec<NewMessage>,
    on_refusal: OnRefusal,
    reply: Reply<AppendOutcome>,
}

/// Work queued for the next transaction.
#[derive(Default)]
struct Batch {
    appends: Vec<Pending>,
    rows: usize,
    acks: Vec<i64>,
    now: bool,
    deadline: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.appends.is_empty() && self.acks.is_empty()
    }

    fn due(&self, max_rows: usize, now: Instant) -> bool {
        !self.is_empty()
            && (self.now
                || self.rows >= max_rows
                || self.acks.len() >= ACK_COMMIT_ROWS
                || self.deadline.is_some_and(|d| now >= d))
    }

    /// The batch must be committed by `at` at the latest.
    fn by(&mut self, at: Instant) {
        self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
    }
}

/// What one transaction did, applied to the in-memory state only after COMMIT succeeds.
struct TxnResult {
    totals: Totals,
    /// The next unused sequence number after this transaction.
    next_seq: i64,
    /// A new `meta.seq_reserved` written by this transaction.
    reserved: Option<i64>,
    /// Topics looked up or added by this transaction.
    new_topics: Vec<(String, i64)>,
    topics_inserted: u64,
    /// Per append: rows stored (a prefix) and why the rest were refused.
    outcomes: Vec<(usize, Option<Refusal>)>,
    /// Ids stored per append (the last one is reported).
    last_ids: Vec<Option<i64>>,
    inserted: u64,
    acked: u64,
    dropped: [u64; 4],
    freed_bytes: u64,
}

/// A rate-limited WARN per drop reason.
#[derive(Default)]
struct DropLog {
    pending: [u64; 4],
    last: [Option<Instant>; 4],
}

impl DropLog {
    fn record(&mut self, reason: DropReason, n: u64, now: Instant) {
        if n == 0 {
            return;
        }
        self.pending[reason.index()] += n;
        self.flush(now);
    }

    fn flush(&mut self, now: Instant) {
        for reason in DropReason::ALL {
            let i = reason.index();
            let quiet = self.last[i].is_none_or(|t| now.duration_since(t) >= DROP_LOG_EVERY);
            if self.pending[i] > 0 && quiet {
                tracing::warn!(
                    reason = reason.name(),
                    dropped = self.pending[i],
                    meaning = reason.meaning(),
                    "messages dropped"
                );
                self.pending[i] = 0;
                self.last[i] = Some(now);
            }
        }
    }
}

/// A write failure the store survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteFailure {
    /// SQLITE_FULL: ENOSPC (or `max_page_count`).
    Full,
    /// Read-only filesystem, an I/O error, or a lock held by another program past the busy
    /// timeout: refused, retried later.
    Unwritable(Refusal),
}

/// What a failed write means: survivable, or fatal (corruption, misuse).
fn write_failure(e: &rusqlite::Error) -> Option<WriteFailure> {
    if is_corruption(e) {
        return None;
    }
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => Some(WriteFailure::Full),
        Some(ErrorCode::ReadOnly) => Some(WriteFailure::Unwritable(Refusal::ReadOnly)),
        Some(
            ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::FileLockingProtocolFailed,
        ) => Some(WriteFailure::Unwritable(Refusal::IoError)),
        _ => None,
    }
}

pub(super) struct Worker {
    conn: Connection,
    settings: Settings,
    totals: Totals,
    appended_total: u64,
    acked_total: u64,
    dropped: DropCounters,
    /// Drops counted while the disk was full, written to `meta` with the next transaction.
    unpersisted: [u64; 4],
    drop_log: DropLog,
    space: Space,
    admission: Admission,
    /// Writes failed for this reason (read-only, I/O): the next try not before the instant.
    unwritable: Option<(Refusal, Instant)>,
    /// Acks that could not be committed (an unwritable filesystem): fetch skips these rows, so
    /// a reconnect does not send them again while they wait to be deleted.
    stuck_acks: HashSet<i64>,
    channels: Channels,
    commit_seq: u64,
    /// Running average of what a COMMIT took (the fsync, mostly).
    commit_cost: Duration,
    freed_since_vacuum: u64,
    next_sweep: Instant,
    next_seq: i64,
    seq_reserved: i64,
    /// topic → `topics.id`, for topics committed in the table.
    topic_ids: BoundedCache<String, i64>,
    /// Topics inserted since the table was last cleaned up.
    topics_since_gc: u64,
}

/// How the loop ended.
enum Exit {
    Closed(Reply<()>),
    Disconnected,
    Fatal(String),
}

impl Worker {
    pub(super) fn new(
        conn: Connection,
        cfg: &StoreConfig,
        totals: Totals,
        next_seq: i64,
        channels: Channels,
        probes: Probes,
    ) -> Result<Worker, StoreError> {
        let max_age = cfg.max_age.map(|d| d.get());
        // Short max_age values (tests, aggressive configs) need sweeps finer than a second.
        let sweep_every = max_age
            .map(|a| (a / 4).clamp(Duration::from_millis(20), SWEEP_EVERY))
            .unwrap_or(SWEEP_EVERY);
        let dropped = DropCounters::load(&conn).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the persisted drop counters; counting from 0");
            DropCounters::default()
        });
        let probe: DiskProbe = probes
            .disk
            .unwrap_or_else(|| Arc::new(space::statvfs_probe));
        let dir = super::store_dir(&cfg.path);
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(|source| StoreError::Sqlite {
                what: "reading the page size",
                source,
            })?;
        let reading = probe(&dir);
        let layout = Layout::new(page_size.max(512) as u64, reading.map(|r| r.total));
        // The log is checkpointed and cut back to its cap, so what it may take of the disk is
        // known (see `space`); a checkpoint never needs more than the reserve.
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint = {}; PRAGMA journal_size_limit = {}; PRAGMA temp_store = MEMORY;",
            layout.autocheckpoint_pages(),
            layout.wal_cap
        ))
        .map_err(|source| StoreError::Sqlite {
            what: "setting the write-ahead log's limits",
            source,
        })?;
        let mut space = Space::new(probe, &cfg.path, &dir, cfg.min_free_disk.get(), layout);
        if let Some(r) = reading {
            space.take_reserve(r);
        }
        Ok(Worker {
            conn,
            settings: Settings {
                max_bytes: cfg.max_bytes.get(),
                when_full: cfg.when_full,
                max_age,
                commit_interval: cfg.commit_interval.get(),
                commit_max_rows: cfg.commit_max_rows.max(1),
                path: cfg.path.clone(),
                wal_path: schema::sidecar(&cfg.path, "-wal"),
                sweep_every,
                sync_full: cfg.sync == crate::config::SyncMode::Full,
            },
            totals,
            appended_total: 0,
            acked_total: 0,
            dropped,
            unpersisted: [0; 4],
            drop_log: DropLog::default(),
            space,
            admission: Admission::Open,
            unwritable: None,
            stuck_acks: HashSet::new(),
            channels,
            commit_seq: 0,
            commit_cost: Duration::ZERO,
            freed_since_vacuum: 0,
            next_sweep: Instant::now(),
            next_seq,
            // Not yet persisted for this run: the first insert writes a reservation.
            seq_reserved: next_seq,
            topic_ids: BoundedCache::new(TOPIC_CACHE_MAX),
            // Leftovers of the last run are cleaned up at the first sweep with an empty queue.
            topics_since_gc: TOPIC_GC_EMPTY_AFTER,
        })
    }

    pub(super) fn rows(&self) -> u64 {
        self.totals.rows
    }

    pub(super) fn bytes(&self) -> u64 {
        self.totals.bytes
    }

    pub(super) fn run(mut self, rx: Receiver) {
        let mut batch = Batch::default();
        let exit = self.serve(&rx, &mut batch);
        match exit {
            Exit::Closed(reply) => {
                let res = self.checkpoint();
                self.drop_log.flush(Instant::now() + DROP_LOG_EVERY);
                self.channels.health.send_replace(Health::Closed);
                tracing::info!(
                    path = %self.settings.path.display(),
                    rows = self.totals.rows,
                    "store closed"
                );
                let _ = reply.send(res);
            }
            Exit::Disconnected => {
                // Dropping every handle without close() is treated like a crash: only committed
                // work survives, so tests can rely on it and production never half-commits.
                if !batch.is_empty() {
                    tracing::warn!(
                        rows = batch.rows,
                        acks = batch.acks.len(),
                        "store handles dropped without close(): queued rows were not committed \
                         (never accepted) and queued acks will cause duplicates after restart"
                    );
                }
                self.drop_log.flush(Instant::now() + DROP_LOG_EVERY);
                self.channels.health.send_replace(Health::Closed);
            }
            Exit::Fatal(reason) => {
                tracing::error!(
                    path = %self.settings.path.display(),
                    error = %reason,
                    "store stopped: uncommitted messages were not accepted; committed ones stay \
                     in the file; restart edgegate (a corrupt file is moved aside at start)"
                );
                self.channels
                    .health
                    .send_replace(Health::Failed(reason.clone()));
                for p in batch.appends.drain(..) {
                    let _ = p.reply.send(Err(StoreError::Failed(reason.clone())));
                }
                // Whatever is still queued gets a precise answer instead of a closed channel.
                while let Some((cmd, _)) = rx.try_recv() {
                    fail_command(cmd, &reason);
                }
            }
        }
    }

    fn serve(&mut self, rx: &Receiver, batch: &mut Batch) -> Exit {
        loop {
            let now = Instant::now();
            if batch.due(self.settings.commit_max_rows, now) {
                // Take whatever else is already queued: that is what makes group commit cheap.
                while batch.rows < self.settings.commit_max_rows {
                    match rx.try_recv() {
                        Some((cmd, wake)) => {
                            if let Some(exit) = self.accept(cmd, wake, batch) {
                                return exit;
                            }
                        }
                        None => break,
                    }
                }
                if let Err(reason) = self.commit(batch) {
                    return Exit::Fatal(reason);
                }
                continue;
            }
            if now >= self.next_sweep {
                if let Err(reason) = self.sweep(now) {
                    return Exit::Fatal(reason);
                }
                self.next_sweep = Instant::now() + self.settings.sweep_every;
                continue;
            }
            let wake = match batch.deadline {
                Some(d) if !batch.is_empty() => d.min(self.next_sweep),
                _ => self.next_sweep,
            };
            match rx.recv_until(wake) {
                Recv::Command(cmd, wake) => {
                    if let Some(exit) = self.accept(cmd, wake, batch) {
                        return exit;
                    }
                }
                Recv::Timeout => {}
                Recv::Disconnected => return Exit::Disconnected,
            }
        }
    }

    /// Queues or answers one command; returns how to exit when the loop must end.
    fn accept(&mut self, cmd: Command, wake: Wake, batch: &mut Batch) -> Option<Exit> {
        match cmd {
            Command::Append {
                msgs,
                on_refusal,
                reply,
            } => {
                batch.rows += msgs.len();
                batch.appends.push(Pending {
                    msgs,
                    on_refusal,
                    reply,
                });
                match wake {
                    Wake::Now => batch.now = true,
                    Wake::By(at) => batch.by(at),
                }
            }
            Command::Ack(ids) => {
                batch.acks.extend(ids);
                if let Wake::By(at) = wake {
                    batch.by(at);
                }
            }
            Command::Hurry => {
                if !batch.appends.is_empty() {
                    batch.now = true;
                }
            }
            Command::Dropped(reason, n) => {
                let r = reason.drop_reason();
                self.dropped.add(r, n);
                self.unpersisted[r.index()] += n;
                self.drop_log.record(r, n, Instant::now());
            }
            Command::Fetch {
                cursor,
                limit,
                reply,
            } => match self.fetch(&cursor, limit, &batch.acks) {
                Ok(rows) => {
                    let _ = reply.send(Ok(rows));
                }
                Err(e) => return Self::read_failed(e, reply, "reading queued messages"),
            },
            Command::Stats { reply } => match self.stats() {
                Ok(stats) => {
                    let _ = reply.send(Ok(stats));
                }
                Err(e) => return Self::read_failed(e, reply, "reading statistics"),
            },
            Command::Close { reply } => {
                if !batch.is_empty() {
                    if let Err(reason) = self.commit(batch) {
                        let _ = reply.send(Err(StoreError::Failed(reason.clone())));
                        return Some(Exit::Fatal(reason));
                    }
                }
                return Some(Exit::Closed(reply));
            }
        }
        None
    }

    /// A failed read: corruption stops the store, anything else is only reported to the caller
    /// (a transient lock or I/O hiccup must not stop intake).
    fn read_failed<T>(e: rusqlite::Error, reply: Reply<T>, what: &'static str) -> Option<Exit> {
        if is_corruption(&e) {
            let reason = format!("{what}: {e}");
            let _ = reply.send(Err(StoreError::Failed(reason.clone())));
            Some(Exit::Fatal(reason))
        } else {
            let _ = reply.send(Err(StoreError::Sqlite { what, source: e }));
            None
        }
    }

    /// Commits the batch. `Err` carries the reason for a fatal stop.
    fn commit(&mut self, batch: &mut Batch) -> Result<(), String> {
        let now = Instant::now();
        let appends = std::mem::take(&mut batch.appends);
        let acks = std::mem::take(&mut batch.acks);
        *batch = Batch::default();

        let room = if appends.is_empty() {
            Ok(None)
        } else {
            self.admit(&appends, now)
        };
        let room = match room {
            Ok(room) if !appends.is_empty() => room,
            other => {
                // Nothing to insert: refuse what there is at once, then commit the acks alone.
                if let Err(reason) = other {
                    for p in appends {
                        self.refuse(p, reason, now);
                    }
                }
                return self.commit_acks(acks, batch, now);
            }
        };

        let result = self.in_transaction(|w| w.write(&appends, &acks, room));
        match result {
            Ok(txn) => {
                self.apply(txn, appends, now);
                self.stuck_acks.clear();
                self.unwritable = None;
                Ok(())
            }
            Err(e) => match write_failure(&e) {
                Some(failure) => {
                    // Nothing of this transaction happened. The acks go on their own (they
                    // free space); on a full disk each append is then tried alone, so what
                    // still fits is kept and only the rest is refused; after the first that
                    // does not fit, the others are refused without trying.
                    let reason = self.note_failure(failure, &e, now);
                    self.commit_acks(acks, batch, now)?;
                    let mut full = failure != WriteFailure::Full || appends.len() == 1;
                    for p in appends {
                        if full {
                            self.refuse(p, reason, now);
                            continue;
                        }
                        let one = vec![p];
                        match self.in_transaction(|w| w.write(&one, &[], None)) {
                            Ok(txn) => self.apply(txn, one, now),
                            Err(e) => {
                                if write_failure(&e).is_none() {
                                    let reason = format!("committing queued messages: {e}");
                                    for p in one {
                                        let _ =
                                            p.reply.send(Err(StoreError::Failed(reason.clone())));
                                    }
                                    return Err(reason);
                                }
                                full = true;
                                for p in one {
                                    self.refuse(p, reason, now);
                                }
                            }
                        }
                    }
                    Ok(())
                }
                None => {
                    let reason = format!("committing queued messages: {e}");
                    for p in appends {
                        let _ = p.reply.send(Err(StoreError::Failed(reason.clone())));
                    }
                    Err(reason)
                }
            },
        }
    }

    /// Whether the appends may be written now: not while writes fail, and only when the disk
    /// can take them (see `space`).
    /// What the disk admits of `appends`: `None` all of it, `Some(bytes)` a first part (the
    /// transaction refuses the rows past it), `Err` nothing.
    fn admit(&mut self, appends: &[Pending], now: Instant) -> Result<Option<u64>, Refusal> {
        if let Some((reason, retry_at)) = self.unwritable {
            if now < retry_at {
                return Err(reason);
            }
        }
        let bytes: u64 = appends
            .iter()
            .flat_map(|p| &p.msgs)
            .map(|m| row_bytes(&m.topic, &m.payload))
            .sum();
        let layout = self.space.layout();
        let (conn, settings) = (&self.conn, &self.settings);
        let result = self
            .space
            .room(bytes, now, || file_state(conn, settings, layout));
        match result {
            Ok(room) if room >= bytes => Ok(None),
            // Only a first part fits: admission stays open (each round stores at least a
            // row), the caller gets the rest back and offers it again.
            Ok(room) => Ok(Some(room)),
            Err(short) => {
                let reason = match short {
                    Short::ReadOnly => Refusal::ReadOnly,
                    Short::Headroom { .. } | Short::NoReserve { .. } => Refusal::DiskFull,
                };
                self.set_admission(Some(reason), Some(short));
                Err(reason)
            }
        }
    }

    /// Records a survivable write failure and returns the refusal it means for new rows.
    fn note_failure(
        &mut self,
        failure: WriteFailure,
        e: &rusqlite::Error,
        now: Instant,
    ) -> Refusal {
        let reason = match failure {
            WriteFailure::Full => {
                tracing::debug!(error = %e, reserve_held = self.space.reserve_held(), "store write failed: disk full");
                // The next admission reads the filesystem again.
                self.space.read(now);
                Refusal::DiskFull
            }
            WriteFailure::Unwritable(reason) => {
                // SQLite reports EROFS on a write as an I/O error; the filesystem's flag (or,
                // after an ext4 error remount, a probe file) says which it is.
                let read_only = matches!(self.space.read(now), Some(r) if r.read_only)
                    || (reason == Refusal::IoError && space::refuses_writes(self.space.dir()));
                let reason = if read_only { Refusal::ReadOnly } else { reason };
                if self.unwritable.is_none() {
                    tracing::error!(error = %e, reason = reason.name(), "writing the store failed; new messages are refused until it works again, queued ones are still forwarded");
                }
                self.unwritable = Some((reason, now + UNWRITABLE_RETRY));
                reason
            }
        };
        self.set_admission(Some(reason), None);
        reason
    }

    /// Commits acks on their own. On a full disk the reserve is released and the log
    /// checkpointed first, so acknowledged rows are deleted whoever filled the disk; acks that
    /// still cannot be committed wait in the batch (and fetch no longer returns their rows).
    fn commit_acks(
        &mut self,
        mut acks: Vec<i64>,
        batch: &mut Batch,
        now: Instant,
    ) -> Result<(), String> {
        if acks.is_empty() {
            return Ok(());
        }
        if let Some((_, retry_at)) = self.unwritable {
            if now < retry_at {
                return self.keep_acks(acks, batch, now);
            }
        }
        let mut released = false;
        loop {
            match self.write_acks_relaxed(&acks) {
                Ok(txn) => {
                    self.apply(txn, Vec::new(), now);
                    self.stuck_acks.clear();
                    if self.unwritable.take().is_some() {
                        tracing::info!("the store is writable again");
                    }
                    if released {
                        tracing::warn!(
                            deleted = acks.len(),
                            "disk full: the store's reserve was released so acknowledged messages could be deleted; it is taken back once space returns"
                        );
                    }
                    return Ok(());
                }
                Err(e) => match write_failure(&e) {
                    Some(WriteFailure::Full) if !released => {
                        released = true;
                        self.set_admission(Some(Refusal::DiskFull), None);
                        self.space.release_reserve();
                        // Moves what the log holds into the database file (the space the reserve
                        // gave back) and lets the next transaction reuse the log from its start.
                        if let Err(e) =
                            self.conn
                                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                        {
                            tracing::debug!(error = %e, "checkpoint on a full disk failed");
                        }
                    }
                    Some(WriteFailure::Full) if acks.len() > 1 => {
                        // More deletes than the log has room for on this disk (acks wait for
                        // company, so a fast drain hands over thousands at once): in halves,
                        // each checkpointed so the next reuses the log from its start. The first
                        // single delete that does not fit stops the rest (see `unwritable`).
                        let rest = acks.split_off(acks.len() / 2);
                        self.commit_acks(acks, batch, now)?;
                        if let Err(e) =
                            self.conn
                                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                        {
                            tracing::debug!(error = %e, "checkpoint on a full disk failed");
                        }
                        return self.commit_acks(rest, batch, now);
                    }
                    Some(failure) => {
                        let reason = self.note_failure(failure, &e, now);
                        if reason == Refusal::DiskFull {
                            // Even with the reserve given back: try again at the next sweep.
                            self.unwritable = Some((Refusal::DiskFull, now + UNWRITABLE_RETRY));
                        }
                        return self.keep_acks(acks, batch, now);
                    }
                    None => {
                        return Err(format!("committing acknowledgements: {e}"));
                    }
                },
            }
        }
    }

    /// A transaction that only deletes acknowledged rows need not wait for an fsync: in WAL
    /// mode its frames are in the OS page cache at COMMIT, so a crash of edgegate keeps it, and
    /// a power cut can only bring those rows back as duplicates, never lose one. The next
    /// commit with new rows fsyncs the WAL, these frames included.
    fn write_acks_relaxed(&mut self, acks: &[i64]) -> rusqlite::Result<TxnResult> {
        let relax = self.settings.sync_full;
        if relax {
            self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        }
        let result = self.in_transaction(|w| w.write(&[], acks, None));
        if relax {
            self.conn.execute_batch("PRAGMA synchronous = FULL")?;
        }
        result
    }

    /// Acks that cannot be committed now: they wait in the batch (tried again within a
    /// second) and fetch skips their rows meanwhile.
    fn keep_acks(&mut self, acks: Vec<i64>, batch: &mut Batch, now: Instant) -> Result<(), String> {
        self.stuck_acks.extend(acks.iter().copied());
        batch.acks.extend(acks);
        let retry = now + UNWRITABLE_RETRY;
        batch.deadline = Some(batch.deadline.map_or(retry, |d| d.min(retry)));
        Ok(())
    }

    /// Answers one append refused before its transaction: counted as dropped or handed back.
    fn refuse(&mut self, p: Pending, reason: Refusal, now: Instant) {
        let rows = p.msgs.len() as u64;
        if p.on_refusal == OnRefusal::Count {
            let r = reason.drop_reason();
            self.dropped.add(r, rows);
            self.unpersisted[r.index()] += rows;
            self.drop_log.record(r, rows, now);
        }
        let refused = match p.on_refusal {
            OnRefusal::Count => Vec::new(),
            OnRefusal::Return => p.msgs,
        };
        let _ = p.reply.send(Ok(AppendOutcome {
            stored: 0,
            refused: Some(Refused {
                reason,
                rows: refused,
            }),
            last_id: None,
        }));
    }

    /// Changes what [`Admission`] says (and logs the change): `Some(reason)` refusing,
    /// `None` open.
    fn set_admission(&mut self, refusing: Option<Refusal>, short: Option<Short>) {
        let next = match refusing {
            None => Admission::Open,
            Some(reason) => match &self.admission {
                Admission::Refusing {
                    reason: r,
                    since_ms,
                } if *r == reason => Admission::Refusing {
                    reason,
                    since_ms: *since_ms,
                },
                _ => Admission::Refusing {
                    reason,
                    since_ms: crate::shared::now_ms(),
                },
            },
        };
        if next == self.admission {
            return;
        }
        match &next {
            Admission::Open => tracing::info!(
                was = %match &self.admission { Admission::Refusing { reason, .. } => reason.name(), Admission::Open => "open" },
                "the store accepts new messages again"
            ),
            Admission::Refusing { reason, .. } => {
                let free = match short {
                    Some(Short::Headroom { free } | Short::NoReserve { free }) => Some(free),
                    _ => self.space.last_reading().map(|r| r.free),
                };
                tracing::warn!(
                    reason = reason.name(),
                    meaning = reason.meaning(),
                    free_bytes = free,
                    reserve_held = self.space.reserve_held(),
                    "the store refuses new messages: MQTT 5 devices get PUBACK/PUBREC 0x97 (quota exceeded), MQTT 3.1.1 devices are held unacknowledged, QoS 0 messages and readings are dropped and counted; queued messages are still forwarded"
                );
            }
        }
        self.admission = next.clone();
        self.channels.admission.send_replace(next);
    }

    /// Runs `f` inside BEGIN IMMEDIATE … COMMIT, rolling back on any error.
    /// How long rows that nobody waits for may wait for company before their commit:
    /// `commit_interval`, or [`LINGER_PER_COMMIT_COST`] times what recent commits took when the
    /// disk is slower than that makes sense for, at most [`MAX_WAIT_INTERVALS`] ×
    /// `commit_interval`.
    pub(super) fn linger(&self) -> Duration {
        let base = self.settings.commit_interval;
        (self.commit_cost * LINGER_PER_COMMIT_COST).clamp(base, base * MAX_WAIT_INTERVALS)
    }

    /// Folds the duration of one COMMIT into the running commit cost and publishes the linger.
    fn note_commit_cost(&mut self, took: Duration) {
        self.commit_cost =
            (self.commit_cost * (8 - COMMIT_COST_WEIGHT) + took * COMMIT_COST_WEIGHT) / 8;
        let us = u64::try_from(self.linger().as_micros()).unwrap_or(u64::MAX);
        self.channels.linger_us.store(us, Ordering::Relaxed);
    }

    fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let res = f(self).and_then(|v| {
            let started = Instant::now();
            self.conn.execute_batch("COMMIT")?;
            self.note_commit_cost(started.elapsed());
            Ok(v)
        });
        if res.is_err() && !self.conn.is_autocommit() {
            // SQLite may already have rolled back (it does on some SQLITE_FULL paths).
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "store rollback failed");
            }
        }
        res
    }

    /// The body of one group commit: acks first (they free budget), then each append's rows in
    /// order until one is refused; that one and the rest of its append are not written.
    /// Deletes `acks` and inserts `appends`; with `room` (what the disk admits, in charged
    /// bytes), the rows past it are refused as `DiskFull`, as are all after the first refused.
    fn write(
        &mut self,
        appends: &[Pending],
        acks: &[i64],
        mut room: Option<u64>,
    ) -> rusqlite::Result<TxnResult> {
        let mut txn = TxnResult {
            totals: self.totals.clone(),
            next_seq: self.next_seq,
            reserved: None,
            new_topics: Vec::new(),
            topics_inserted: 0,
            outcomes: Vec::with_capacity(appends.len()),
            last_ids: Vec::with_capacity(appends.len()),
            inserted: 0,
            acked: 0,
            dropped: [0; 4],
            freed_bytes: 0,
        };

        if !acks.is_empty() {
            // Acks arrive mostly as runs of consecutive ids (PUBACK order is send order): one
            // range delete per run instead of one statement per row. A run holds only acked ids,
            // so the range cannot touch a row that was not acknowledged.
            let mut sorted = acks.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            let mut del = self.conn.prepare_cached(
                "DELETE FROM messages WHERE id BETWEEN ?1 AND ?2 RETURNING id, size",
            )?;
            let mut i = 0;
            while i < sorted.len() {
                let first = sorted[i];
                let mut last = first;
                while i + 1 < sorted.len() && sorted[i + 1] == last + 1 {
                    i += 1;
                    last = sorted[i];
                }
                i += 1;
                let mut rows = del.query([first, last])?;
                while let Some(r) = rows.next()? {
                    let (id, size): (i64, i64) = (r.get(0)?, r.get(1)?);
                    txn.totals.remove(super::priority_of(id), size as u64);
                    txn.freed_bytes += size as u64;
                    txn.acked += 1;
                }
            }
        }

        let rows: i64 = appends.iter().map(|p| p.msgs.len() as i64).sum();
        if rows > 0 && txn.next_seq + rows > self.seq_reserved {
            let reserved = txn.next_seq + rows + SEQ_RESERVE_STEP;
            self.conn
                .prepare_cached(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![SEQ_RESERVED_KEY, reserved])?;
            txn.reserved = Some(reserved);
        }
        // Rows committed before this transaction have lower sequence numbers than any it
        // inserts: eviction takes only those, never a row it has just stored.
        let mut evictor = Evictor::new(txn.next_seq);
        {
            let mut ins = self.conn.prepare_cached(
                "INSERT INTO messages (id, topic, payload, flags, created_ms, size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for p in appends {
                let mut stored = 0usize;
                let mut last_id = None;
                let mut refused = None;
                for m in &p.msgs {
                    let size = row_bytes(&m.topic, &m.payload);
                    if size > self.settings.max_bytes {
                        refused = Some(Refusal::TooLarge);
                        break;
                    }
                    if let Some(left) = room.as_mut() {
                        if size > *left {
                            *left = 0;
                            refused = Some(Refusal::DiskFull);
                            break;
                        }
                        *left -= size;
                    }
                    if txn.totals.bytes + size > self.settings.max_bytes {
                        let fits = match self.settings.when_full {
                            WhenFull::DropNewest => false,
                            WhenFull::DropOldest => evictor.make_room(
                                &self.conn,
                                &mut txn,
                                size,
                                m.priority,
                                self.settings.max_bytes,
                            )?,
                        };
                        if !fits {
                            refused = Some(Refusal::StoreFull);
                            break;
                        }
                    }
                    let topic = self.topic_id(&m.topic, &mut txn)?;
                    let id = super::row_id(m.priority, txn.next_seq);
                    txn.next_seq += 1;
                    let flags = i64::from(m.qos & 3) | (i64::from(m.retain) << 2);
                    ins.execute(params![
                        id,
                        topic,
                        &m.payload[..],
                        flags,
                        m.created_ms,
                        size as i64
                    ])?;
                    txn.totals.add(m.priority, size);
                    txn.inserted += 1;
                    stored += 1;
                    last_id = Some(id);
                }
                if let (Some(reason), OnRefusal::Count) = (refused, p.on_refusal) {
                    txn.dropped[reason.drop_reason().index()] += (p.msgs.len() - stored) as u64;
                }
                txn.outcomes.push((stored, refused));
                txn.last_ids.push(last_id);
            }
        }
        let mut to_persist = self.unpersisted;
        for (p, d) in to_persist.iter_mut().zip(txn.dropped) {
            *p += d;
        }
        self.persist_drops(&to_persist)?;
        Ok(txn)
    }

    /// Adds drop counts to the counters kept in `meta`, inside the caller's transaction. Only
    /// transactions that drop something pay for this write.
    fn persist_drops(&self, counts: &[u64; 4]) -> rusqlite::Result<()> {
        if counts.iter().all(|&n| n == 0) {
            return Ok(());
        }
        let mut up = self.conn.prepare_cached(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
        )?;
        for reason in DropReason::ALL {
            let n = counts[reason.index()];
            if n > 0 {
                up.execute(params![DropCounters::meta_key(reason), n as i64])?;
            }
        }
        Ok(())
    }

    /// Applies a committed transaction to memory, answers waiters, wakes the forwarder.
    fn apply(&mut self, txn: TxnResult, appends: Vec<Pending>, now: Instant) {
        self.totals = txn.totals;
        self.next_seq = txn.next_seq;
        if let Some(r) = txn.reserved {
            self.seq_reserved = r;
        }
        for (topic, id) in txn.new_topics {
            self.topic_ids.insert(topic, id);
        }
        self.topics_since_gc += txn.topics_inserted;
        self.unpersisted = [0; 4];
        self.appended_total += txn.inserted;
        self.acked_total += txn.acked;
        self.freed_since_vacuum += txn.freed_bytes;
        for reason in DropReason::ALL {
            let n = txn.dropped[reason.index()];
            self.dropped.add(reason, n);
            self.drop_log.record(reason, n, now);
        }
        let mut refusal = None;
        for ((p, (stored, refused)), last_id) in
            appends.into_iter().zip(txn.outcomes).zip(txn.last_ids)
        {
            let mut msgs = p.msgs;
            let refused = refused.map(|reason| {
                refusal = refusal.or(Some(reason));
                let rest = msgs.split_off(stored);
                Refused {
                    reason,
                    rows: match p.on_refusal {
                        OnRefusal::Return => rest,
                        OnRefusal::Count => Vec::new(),
                    },
                }
            });
            let _ = p.reply.send(Ok(AppendOutcome {
                stored,
                refused,
                last_id,
            }));
        }
        if txn.inserted > 0 {
            self.commit_seq += 1;
            self.channels.committed.send_replace(self.commit_seq);
        }
        // Refusing for the budget (drop_newest, or nothing evictable) ends once the backlog
        // has shrunk below it with a margin; a transaction that stored rows shows the disk
        // takes them again.
        match (refusal, &self.admission) {
            (Some(Refusal::StoreFull), _) => self.set_admission(Some(Refusal::StoreFull), None),
            (
                None,
                Admission::Refusing {
                    reason: Refusal::StoreFull,
                    ..
                },
            ) if self.budget_has_room() => self.set_admission(None, None),
            (
                None,
                Admission::Refusing {
                    reason: Refusal::StoreFull,
                    ..
                },
            ) => {}
            (None, Admission::Refusing { .. }) if txn.inserted > 0 => {
                self.set_admission(None, None)
            }
            _ => {}
        }
    }

    /// Whether the backlog is far enough below `max_bytes` to accept again after a refusal.
    fn budget_has_room(&self) -> bool {
        let margin = (self.settings.max_bytes / BUDGET_HYSTERESIS_DIV).max(64 * 1024);
        self.totals.bytes + margin <= self.settings.max_bytes
    }

    fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|source| StoreError::Sqlite {
                what: "checkpointing the write-ahead log at close",
                source,
            })
    }

    /// Up to `limit` rows after `cursor`, highest priority first. Rows whose acks are queued
    /// (`pending`, not yet committed) or stuck are not returned: their PUBACK came, and a
    /// forwarder that reconnects with a fresh cursor must not send them again.
    fn fetch(
        &mut self,
        cursor: &Cursor,
        limit: usize,
        pending: &[i64],
    ) -> rusqlite::Result<Vec<StoredMessage>> {
        let mut out = Vec::with_capacity(limit.min(1024));
        let priorities: Vec<u8> = self.totals.per_priority.keys().rev().copied().collect();
        let pending: HashSet<i64> = pending.iter().copied().collect();
        // Skipped rows must not shorten the answer (a short one reads as "caught up").
        let skippable = pending.len() + self.stuck_acks.len();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM queue WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3"
        ))?;
        for priority in priorities {
            let want = limit - out.len();
            if want == 0 {
                break;
            }
            let (lo, hi) = band(priority);
            let after = cursor.position(priority).max(lo - 1);
            let rows =
                stmt.query_map(params![after, hi, (want + skippable) as i64], read_message)?;
            for row in rows {
                let row = row?;
                if out.len() == limit {
                    break;
                }
                if !self.stuck_acks.contains(&row.id) && !pending.contains(&row.id) {
                    out.push(row);
                }
            }
        }
        Ok(out)
    }

    fn stats(&mut self) -> rusqlite::Result<StoreStats> {
        let priorities: Vec<u8> = self.totals.per_priority.keys().copied().collect();
        let oldest_created_ms = schema::oldest_created_ms(&self.conn, &priorities)?;
        Ok(StoreStats {
            rows: self.totals.rows,
            bytes: self.totals.bytes,
            oldest_created_ms,
            per_priority: self
                .totals
                .per_priority
                .iter()
                .rev()
                .map(|(&priority, &(rows, bytes))| PriorityStats {
                    priority,
                    rows,
                    bytes,
                })
                .collect(),
            appended_total: self.appended_total,
            acked_total: self.acked_total,
            dropped: self.dropped,
            file_bytes: super::file_bytes(&self.settings.path),
            free_disk_bytes: self.space.read(Instant::now()).map(|r| r.free),
            admission: self.admission.clone(),
            reserve_held: self.space.reserve_held(),
        })
    }
}

fn fail_command(cmd: Command, reason: &str) {
    let err = || StoreError::Failed(reason.to_string());
    match cmd {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Command::Fetch { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Command::Stats { reply } => {
            let _ = reply.send(Err(err()));
        }
        Command::Close { reply } => {
            let _ = reply.send(Err(err()));
        }
        Command::Ack(_) | Command::Hurry | Command::Dropped(..) => {}
    }
}
