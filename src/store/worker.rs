//! The `store` thread: owns the connection and turns queued commands into group commits.
//!
//! Each loop iteration collects queued appends and acks, then runs ONE transaction: inserts,
//! deletes for acks, eviction for `max_bytes`; then it replies to every waiter and bumps
//! `committed`. Reads (fetch, stats) are answered between transactions, so they only ever see
//! committed rows. Housekeeping (expiry, the free-disk probe, rate-limited drop logs, incremental
//! vacuum) runs on a sweep at most every second, idle or not.
//!
//! In-memory totals change only after a commit succeeds, so a rolled-back transaction cannot make
//! them drift from the file.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use tokio::sync::watch;

use super::schema::{self, band, is_corruption, Totals, MESSAGE_COLUMNS, SEQ_RESERVED_KEY};
use super::{
    row_bytes, AppendOutcome, Command, Cursor, DropCounters, DropReason, Durability, Health,
    NewMessage, PriorityStats, Reply, StoreError, StoreStats, StoredMessage,
};
use crate::config::{StoreConfig, WhenFull};

/// Longest pause between housekeeping sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The free-disk probe runs at most this often (statvfs is cheap, but not free on an SD card).
const DISK_PROBE_EVERY: Duration = Duration::from_secs(1);
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
/// Topic ids kept in memory; past this the cache starts over (the table answers misses).
const TOPIC_CACHE_MAX: usize = 4096;
/// Unused topics are deleted once this many new ones were added: all of them when the queue is
/// empty (cheap, and the usual state). Not at every empty moment: a queue that the forwarder
/// keeps empty would then re-insert its devices' topics after each cleanup.
pub(super) const TOPIC_GC_EMPTY_AFTER: u64 = 1024;
/// While rows stay queued, after this many new topics (a scan of the table).
const TOPIC_GC_AFTER: u64 = 1 << 16;

type FreeDiskProbe = Arc<dyn Fn(&std::path::Path) -> Option<u64> + Send + Sync>;

/// Seams for tests: a fake free-space reading, and pragmas applied after open (a
/// `max_page_count` makes SQLite report SQLITE_FULL; a tiny `cache_size` makes it re-read pages).
#[derive(Clone, Default)]
pub(crate) struct Probes {
    pub free_disk: Option<FreeDiskProbe>,
    pub pragmas: Vec<(&'static str, i64)>,
}

struct Settings {
    max_bytes: u64,
    when_full: WhenFull,
    max_age: Option<Duration>,
    commit_interval: Duration,
    commit_max_rows: usize,
    min_free_disk: u64,
    path: PathBuf,
    dir: PathBuf,
    sweep_every: Duration,
    /// `sync: full`: new rows are fsynced at commit.
    sync_full: bool,
}

/// Work queued for the next transaction.
#[derive(Default)]
struct Batch {
    appends: Vec<(Vec<NewMessage>, Reply<AppendOutcome>)>,
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
            && (self.now || self.rows >= max_rows || self.deadline.is_some_and(|d| now >= d))
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
    outcomes: Vec<AppendOutcome>,
    inserted: u64,
    acked: u64,
    dropped: [u64; 3],
    freed_bytes: u64,
}

/// A rate-limited WARN per drop reason.
#[derive(Default)]
struct DropLog {
    pending: [u64; 3],
    last: [Option<Instant>; 3],
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

/// Last free-space reading and whether it is below `min_free_disk`.
struct DiskGuard {
    probe: FreeDiskProbe,
    last_probe: Option<Instant>,
    free: Option<u64>,
    low: bool,
}

pub(super) struct Worker {
    conn: Connection,
    settings: Settings,
    totals: Totals,
    appended_total: u64,
    acked_total: u64,
    dropped: DropCounters,
    /// Drops counted while the disk was full, written to `meta` with the next transaction.
    unpersisted: [u64; 3],
    drop_log: DropLog,
    disk: DiskGuard,
    committed_tx: watch::Sender<u64>,
    commit_seq: u64,
    health_tx: watch::Sender<Health>,
    freed_since_vacuum: u64,
    next_sweep: Instant,
    next_seq: i64,
    seq_reserved: i64,
    /// topic → `topics.id`, for topics committed in the table.
    topic_ids: HashMap<String, i64>,
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
        committed_tx: watch::Sender<u64>,
        health_tx: watch::Sender<Health>,
        probes: Probes,
    ) -> Worker {
        let max_age = cfg.max_age.map(|d| d.get());
        // Short max_age values (tests, aggressive configs) need sweeps finer than a second.
        let sweep_every = max_age
            .map(|a| (a / 4).clamp(Duration::from_millis(20), SWEEP_EVERY))
            .unwrap_or(SWEEP_EVERY);
        let dropped = DropCounters::load(&conn).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the persisted drop counters; counting from 0");
            DropCounters::default()
        });
        let probe: FreeDiskProbe = probes
            .free_disk
            .unwrap_or_else(|| Arc::new(super::free_disk_bytes));
        Worker {
            conn,
            settings: Settings {
                max_bytes: cfg.max_bytes.get(),
                when_full: cfg.when_full,
                max_age,
                commit_interval: cfg.commit_interval.get(),
                commit_max_rows: cfg.commit_max_rows.max(1),
                min_free_disk: cfg.min_free_disk.get(),
                path: cfg.path.clone(),
                dir: super::store_dir(&cfg.path),
                sweep_every,
                sync_full: cfg.sync == crate::config::SyncMode::Full,
            },
            totals,
            appended_total: 0,
            acked_total: 0,
            dropped,
            unpersisted: [0; 3],
            drop_log: DropLog::default(),
            disk: DiskGuard {
                probe,
                last_probe: None,
                free: None,
                low: false,
            },
            committed_tx,
            commit_seq: 0,
            health_tx,
            freed_since_vacuum: 0,
            next_sweep: Instant::now(),
            next_seq,
            // Not yet persisted for this run: the first insert writes a reservation.
            seq_reserved: next_seq,
            topic_ids: HashMap::new(),
            // Leftovers of the last run are cleaned up at the first sweep with an empty queue.
            topics_since_gc: TOPIC_GC_EMPTY_AFTER,
        }
    }

    pub(super) fn rows(&self) -> u64 {
        self.totals.rows
    }

    pub(super) fn bytes(&self) -> u64 {
        self.totals.bytes
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut batch = Batch::default();
        let exit = self.serve(&rx, &mut batch);
        match exit {
            Exit::Closed(reply) => {
                let res = self.checkpoint();
                self.drop_log.flush(Instant::now() + DROP_LOG_EVERY);
                self.health_tx.send_replace(Health::Closed);
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
                self.health_tx.send_replace(Health::Closed);
            }
            Exit::Fatal(reason) => {
                tracing::error!(
                    path = %self.settings.path.display(),
                    error = %reason,
                    "store stopped: uncommitted messages were not accepted; committed ones stay \
                     in the file; restart edgegate (a corrupt file is moved aside at start)"
                );
                self.health_tx.send_replace(Health::Failed(reason.clone()));
                for (_, reply) in batch.appends.drain(..) {
                    let _ = reply.send(Err(StoreError::Failed(reason.clone())));
                }
                // Whatever is still queued gets a precise answer instead of a closed channel.
                while let Ok(cmd) = rx.try_recv() {
                    fail_command(cmd, &reason);
                }
            }
        }
    }

    fn serve(&mut self, rx: &mpsc::Receiver<Command>, batch: &mut Batch) -> Exit {
        loop {
            let now = Instant::now();
            if batch.due(self.settings.commit_max_rows, now) {
                // Take whatever else is already queued: that is what makes group commit cheap.
                while batch.rows < self.settings.commit_max_rows {
                    match rx.try_recv() {
                        Ok(cmd) => {
                            if let Some(exit) = self.accept(cmd, batch) {
                                return exit;
                            }
                        }
                        Err(_) => break,
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
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(cmd) => {
                    if let Some(exit) = self.accept(cmd, batch) {
                        return exit;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Exit::Disconnected,
            }
        }
    }

    /// Queues or answers one command; returns how to exit when the loop must end.
    fn accept(&mut self, cmd: Command, batch: &mut Batch) -> Option<Exit> {
        match cmd {
            Command::Append {
                msgs,
                durability,
                reply,
            } => {
                batch.rows += msgs.len();
                batch.appends.push((msgs, reply));
                if durability == Durability::Now {
                    batch.now = true;
                }
                batch
                    .deadline
                    .get_or_insert_with(|| Instant::now() + self.settings.commit_interval);
            }
            Command::Ack(ids) => {
                batch.acks.extend(ids);
                batch
                    .deadline
                    .get_or_insert_with(|| Instant::now() + self.settings.commit_interval);
            }
            Command::Fetch {
                cursor,
                limit,
                reply,
            } => match self.fetch(&cursor, limit) {
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

        let disk_low = !appends.is_empty() && self.disk_low(now);
        // A transaction that only deletes acknowledged rows need not wait for an fsync: in WAL
        // mode its frames are in the OS page cache at COMMIT, so a crash of edgegate keeps it,
        // and a power cut can only bring those rows back as duplicates, never lose one. The
        // next commit with new rows fsyncs the WAL, these frames included.
        let relax = self.settings.sync_full && appends.is_empty();
        if relax {
            self.conn
                .execute_batch("PRAGMA synchronous = NORMAL")
                .map_err(|e| format!("setting synchronous: {e}"))?;
        }
        let result = self.in_transaction(|w| w.write(&appends, &acks, disk_low));
        if relax {
            self.conn
                .execute_batch("PRAGMA synchronous = FULL")
                .map_err(|e| format!("setting synchronous: {e}"))?;
        }
        match result {
            Ok(txn) => {
                self.apply(txn, appends, now);
                Ok(())
            }
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::DiskFull) => {
                // ENOSPC (or max_page_count): nothing of this transaction happened.
                self.disk.last_probe = None;
                let mut acks = acks;
                // Deletes are what frees space: commit the acks on their own first.
                let mut freed = false;
                if !acks.is_empty() {
                    if let Ok(txn) = self.in_transaction(|w| w.write(&[], &acks, false)) {
                        freed = txn.acked > 0;
                        self.apply(txn, Vec::new(), now);
                        acks.clear();
                    }
                }
                // Then each append on its own, so what still fits is kept and only the rest
                // is refused; after the first one that does not fit, the rest are refused
                // without trying (the disk is full, not fragmented).
                let retry = freed || appends.len() > 1;
                let mut full = !retry;
                let mut fatal = None;
                for group in appends {
                    if full || fatal.is_some() {
                        self.refuse_disk_full(group, now, fatal.as_ref());
                        continue;
                    }
                    let one = vec![group];
                    match self.in_transaction(|w| w.write(&one, &[], disk_low)) {
                        Ok(txn) => self.apply(txn, one, now),
                        Err(e) => {
                            if e.sqlite_error_code() == Some(ErrorCode::DiskFull) {
                                full = true;
                            } else {
                                fatal = Some(format!("committing queued messages: {e}"));
                            }
                            for g in one {
                                self.refuse_disk_full(g, now, fatal.as_ref());
                            }
                        }
                    }
                }
                if !acks.is_empty() {
                    batch.acks = acks;
                    batch.deadline = Some(now + self.settings.commit_interval);
                }
                match fatal {
                    Some(reason) => Err(reason),
                    None => Ok(()),
                }
            }
            Err(e) => {
                let reason = format!("committing queued messages: {e}");
                for (_, reply) in appends {
                    let _ = reply.send(Err(StoreError::Failed(reason.clone())));
                }
                Err(reason)
            }
        }
    }

    /// Answers one append that could not be written: counted as `disk_full`, or failed with
    /// `fatal` when the store is stopping for another error.
    fn refuse_disk_full(
        &mut self,
        (msgs, reply): (Vec<NewMessage>, Reply<AppendOutcome>),
        now: Instant,
        fatal: Option<&String>,
    ) {
        if let Some(reason) = fatal {
            let _ = reply.send(Err(StoreError::Failed(reason.clone())));
            return;
        }
        let rows = msgs.len() as u64;
        self.dropped.add(DropReason::DiskFull, rows);
        self.unpersisted[DropReason::DiskFull.index()] += rows;
        self.drop_log.record(DropReason::DiskFull, rows, now);
        let _ = reply.send(Ok(AppendOutcome {
            accepted: 0,
            dropped: msgs.len(),
            last_id: None,
        }));
    }

    /// Runs `f` inside BEGIN IMMEDIATE … COMMIT, rolling back on any error.
    fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let res = f(self).and_then(|v| self.conn.execute_batch("COMMIT").map(|()| v));
        if res.is_err() && !self.conn.is_autocommit() {
            // SQLite may already have rolled back (it does on some SQLITE_FULL paths).
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "store rollback failed");
            }
        }
        res
    }

    /// The body of one group commit.
    fn write(
        &mut self,
        appends: &[(Vec<NewMessage>, Reply<AppendOutcome>)],
        acks: &[i64],
        disk_low: bool,
    ) -> rusqlite::Result<TxnResult> {
        let mut txn = TxnResult {
            totals: self.totals.clone(),
            next_seq: self.next_seq,
            reserved: None,
            new_topics: Vec::new(),
            topics_inserted: 0,
            outcomes: Vec::with_capacity(appends.len()),
            inserted: 0,
            acked: 0,
            dropped: [0; 3],
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

        // Ids inserted by each append, to report what survived eviction.
        let mut inserted_ids: Vec<Vec<i64>> = Vec::with_capacity(appends.len());
        let rows: i64 = appends.iter().map(|(m, _)| m.len() as i64).sum();
        if !disk_low && rows > 0 && txn.next_seq + rows > self.seq_reserved {
            let reserved = txn.next_seq + rows + SEQ_RESERVE_STEP;
            self.conn
                .prepare_cached(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![SEQ_RESERVED_KEY, reserved])?;
            txn.reserved = Some(reserved);
        }
        {
            let mut ins = self.conn.prepare_cached(
                "INSERT INTO messages (id, topic, payload, flags, created_ms, size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (msgs, _) in appends {
                let mut ids = Vec::with_capacity(msgs.len());
                let mut refused = 0usize;
                for m in msgs {
                    let size = row_bytes(&m.topic, &m.payload);
                    if disk_low {
                        txn.dropped[DropReason::DiskFull.index()] += 1;
                        refused += 1;
                        continue;
                    }
                    let too_big = size > self.settings.max_bytes;
                    let no_room = self.settings.when_full == WhenFull::DropNewest
                        && txn.totals.bytes + size > self.settings.max_bytes;
                    if too_big || no_room {
                        txn.dropped[DropReason::StoreFull.index()] += 1;
                        refused += 1;
                        continue;
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
                    ids.push(id);
                }
                txn.outcomes.push(AppendOutcome {
                    accepted: ids.len(),
                    dropped: refused,
                    last_id: ids.last().copied(),
                });
                inserted_ids.push(ids);
            }
        }

        if txn.totals.bytes > self.settings.max_bytes {
            let evicted = self.evict(&mut txn)?;
            if !evicted.is_empty() {
                for (outcome, ids) in txn.outcomes.iter_mut().zip(&inserted_ids) {
                    let kept: Vec<i64> = ids
                        .iter()
                        .copied()
                        .filter(|id| !evicted.contains(id))
                        .collect();
                    let lost = ids.len() - kept.len();
                    txn.inserted -= lost as u64;
                    outcome.accepted = kept.len();
                    outcome.dropped += lost;
                    outcome.last_id = kept.last().copied();
                }
            }
        }
        let mut to_persist = self.unpersisted;
        for (p, d) in to_persist.iter_mut().zip(txn.dropped) {
            *p += d;
        }
        self.persist_drops(&to_persist)?;
        Ok(txn)
    }

    /// The `topics.id` of `topic`, adding it to the table when it is new. What this
    /// transaction learns goes to the cache only after it commits.
    fn topic_id(&self, topic: &str, txn: &mut TxnResult) -> rusqlite::Result<i64> {
        if let Some(&id) = self.topic_ids.get(topic) {
            return Ok(id);
        }
        // A transaction rarely learns more than a few topics: a linear scan is cheapest.
        if let Some((_, id)) = txn.new_topics.iter().find(|(t, _)| t == topic) {
            return Ok(*id);
        }
        let found: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM topics WHERE topic = ?1")?
            .query_row([topic], |r| r.get(0))
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                self.conn
                    .prepare_cached("INSERT INTO topics (topic) VALUES (?1)")?
                    .execute([topic])?;
                txn.topics_inserted += 1;
                self.conn.last_insert_rowid()
            }
        };
        txn.new_topics.push((topic.to_string(), id));
        Ok(id)
    }

    /// Deletes topics no queued row uses (see [`TOPIC_GC_EMPTY_AFTER`], [`TOPIC_GC_AFTER`]).
    fn collect_topics(&mut self) -> rusqlite::Result<()> {
        let sql = if self.totals.rows == 0 && self.topics_since_gc >= TOPIC_GC_EMPTY_AFTER {
            "DELETE FROM topics"
        } else if self.topics_since_gc >= TOPIC_GC_AFTER {
            "DELETE FROM topics WHERE id NOT IN (SELECT topic FROM messages)"
        } else {
            return Ok(());
        };
        let removed = self.in_transaction(|w| w.conn.execute(sql, []))?;
        self.topic_ids.clear();
        self.topics_since_gc = 0;
        tracing::debug!(removed, "store dropped unused topics");
        Ok(())
    }

    /// Adds drop counts to the counters kept in `meta`, inside the caller's transaction. Only
    /// transactions that drop something pay for this write.
    fn persist_drops(&self, counts: &[u64; 3]) -> rusqlite::Result<()> {
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

    /// drop_oldest: deletes lowest-priority, oldest rows (new ones included) until the store
    /// fits `max_bytes`. Returns the evicted ids.
    fn evict(&mut self, txn: &mut TxnResult) -> rusqlite::Result<HashSet<i64>> {
        let mut evicted = HashSet::new();
        let mut pick = self.conn.prepare_cached(
            "SELECT id, size FROM messages WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
        )?;
        let mut del = self
            .conn
            .prepare_cached("DELETE FROM messages WHERE id = ?1")?;
        // Each pass deletes at least one row or stops, so the row count bounds the loop.
        let mut passes = txn.totals.rows + 1;
        let mut after: (u8, i64) = (0, 0);
        while txn.totals.bytes > self.settings.max_bytes && passes > 0 {
            passes -= 1;
            let Some(priority) = txn.totals.lowest_priority() else {
                break;
            };
            let (lo, hi) = band(priority);
            // Never below the band: ids under it belong to higher priorities.
            let start = if after.0 == priority {
                after.1.max(lo - 1)
            } else {
                lo - 1
            };
            let candidates: Vec<(i64, i64)> = pick
                .query_map(params![start, hi, EVICT_CHUNK], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            if candidates.is_empty() {
                // The totals claim rows the table does not have: trust the table.
                tracing::error!(
                    priority,
                    "store totals out of step with the file; recounting"
                );
                txn.totals = Totals::load(&self.conn)?;
                if txn.totals.lowest_priority() == Some(priority) {
                    break;
                }
                continue;
            }
            for (id, size) in candidates {
                if txn.totals.bytes <= self.settings.max_bytes {
                    break;
                }
                del.execute([id])?;
                txn.totals.remove(priority, size as u64);
                txn.dropped[DropReason::StoreFull.index()] += 1;
                txn.freed_bytes += size as u64;
                evicted.insert(id);
                after = (priority, id);
            }
        }
        Ok(evicted)
    }

    /// Applies a committed transaction to memory, answers waiters, wakes the forwarder.
    fn apply(
        &mut self,
        txn: TxnResult,
        appends: Vec<(Vec<NewMessage>, Reply<AppendOutcome>)>,
        now: Instant,
    ) {
        self.totals = txn.totals;
        self.next_seq = txn.next_seq;
        if let Some(r) = txn.reserved {
            self.seq_reserved = r;
        }
        if self.topic_ids.len() + txn.new_topics.len() > TOPIC_CACHE_MAX {
            self.topic_ids.clear();
        }
        self.topic_ids.extend(txn.new_topics);
        self.topics_since_gc += txn.topics_inserted;
        self.unpersisted = [0; 3];
        self.appended_total += txn.inserted;
        self.acked_total += txn.acked;
        self.freed_since_vacuum += txn.freed_bytes;
        for reason in DropReason::ALL {
            let n = txn.dropped[reason.index()];
            self.dropped.add(reason, n);
            self.drop_log.record(reason, n, now);
        }
        for ((_, reply), outcome) in appends.into_iter().zip(txn.outcomes) {
            let _ = reply.send(Ok(outcome));
        }
        if txn.inserted > 0 {
            self.commit_seq += 1;
            self.committed_tx.send_replace(self.commit_seq);
        }
    }

    /// True when free space is below `min_free_disk` (probing at most once per second).
    fn disk_low(&mut self, now: Instant) -> bool {
        if self.settings.min_free_disk == 0 {
            return false;
        }
        let stale = self
            .disk
            .last_probe
            .is_none_or(|t| now.duration_since(t) >= DISK_PROBE_EVERY);
        if stale {
            self.disk.last_probe = Some(now);
            self.disk.free = (self.disk.probe)(&self.settings.dir);
            // An unreadable filesystem status must not stop intake: SQLite's own ENOSPC
            // handling still protects the file.
            let low = self
                .disk
                .free
                .is_some_and(|f| f < self.settings.min_free_disk);
            if low != self.disk.low {
                if low {
                    tracing::warn!(
                        free_bytes = self.disk.free,
                        min_free_disk = self.settings.min_free_disk,
                        "disk nearly full: refusing new messages until space returns; \
                         queued ones are kept and still forwarded"
                    );
                } else {
                    tracing::info!(
                        free_bytes = self.disk.free,
                        "disk space back above min_free_disk: accepting messages again"
                    );
                }
                self.disk.low = low;
            }
        }
        self.disk.low
    }

    /// Housekeeping: expiry, drop-log flush, disk probe, incremental vacuum.
    fn sweep(&mut self, now: Instant) -> Result<(), String> {
        if let Some(max_age) = self.settings.max_age {
            let cutoff = super::now_ms().saturating_sub(max_age.as_millis() as i64);
            match self.expire(cutoff) {
                Ok(()) => {}
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DiskFull) => {
                    tracing::warn!(error = %e, "store expiry sweep postponed: disk full");
                }
                Err(e) if is_corruption(&e) => return Err(format!("expiry sweep: {e}")),
                Err(e) => tracing::warn!(error = %e, "store expiry sweep failed; will retry"),
            }
        }
        self.disk_low(now);
        self.drop_log.flush(now);
        if let Err(e) = self.vacuum_step() {
            if is_corruption(&e) {
                return Err(format!("incremental vacuum: {e}"));
            }
            tracing::debug!(error = %e, "store incremental vacuum skipped");
        }
        if let Err(e) = self.collect_topics() {
            if is_corruption(&e) {
                return Err(format!("removing unused topics: {e}"));
            }
            tracing::debug!(error = %e, "store topic cleanup skipped");
        }
        Ok(())
    }

    fn expire(&mut self, cutoff_ms: i64) -> rusqlite::Result<()> {
        // Within a priority, rows are created in id order, so its expired rows are a prefix of
        // its band: find where that ends by walking from its oldest row (cost: the rows about
        // to be deleted), then delete the prefix. No index on created_ms is needed — it would
        // cost a second B-tree write per message. After a backwards clock jump, newer rows with
        // older timestamps wait behind the first unexpired row; nothing expires early.
        let mut prefixes = Vec::new();
        for &priority in self.totals.per_priority.keys() {
            let (lo, hi) = band(priority);
            let boundary: Option<i64> = self
                .conn
                .prepare_cached(
                    "SELECT id FROM messages WHERE id BETWEEN ?1 AND ?2 AND created_ms >= ?3
                     ORDER BY id LIMIT 1",
                )?
                .query_row(params![lo, hi, cutoff_ms], |r| r.get(0))
                .optional()?;
            let end = boundary.unwrap_or(hi + 1);
            if end > lo {
                prefixes.push((lo, end));
            }
        }
        let gone = self.in_transaction(|w| {
            let mut del = w.conn.prepare_cached(
                "DELETE FROM messages WHERE id >= ?1 AND id < ?2 RETURNING id, size",
            )?;
            let mut rows: Vec<(i64, i64)> = Vec::new();
            for &(lo, end) in &prefixes {
                let part = del.query_map([lo, end], |r| Ok((r.get(0)?, r.get(1)?)))?;
                for row in part {
                    rows.push(row?);
                }
            }
            let mut counts = w.unpersisted;
            counts[DropReason::Expired.index()] += rows.len() as u64;
            w.persist_drops(&counts)?;
            Ok(rows)
        })?;
        self.unpersisted = [0; 3];
        for &(id, size) in &gone {
            self.totals.remove(super::priority_of(id), size as u64);
            self.freed_since_vacuum += size as u64;
        }
        let n = gone.len() as u64;
        self.dropped.add(DropReason::Expired, n);
        self.drop_log.record(DropReason::Expired, n, Instant::now());
        Ok(())
    }

    fn vacuum_step(&mut self) -> rusqlite::Result<()> {
        if self.freed_since_vacuum == 0 {
            return Ok(());
        }
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let total: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        if free < VACUUM_MIN_FREE_PAGES || free * 4 < total {
            if free < VACUUM_MIN_FREE_PAGES {
                self.freed_since_vacuum = 0;
            }
            return Ok(());
        }
        let auto_vacuum: i64 = self
            .conn
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
        if auto_vacuum == 2 {
            self.conn.execute_batch(&format!(
                "PRAGMA incremental_vacuum({VACUUM_PAGES_PER_SWEEP})"
            ))?;
        } else {
            // Auto-vacuum keeps a pointer map that costs a page write per transaction, and an
            // incremental step moves queued rows around; instead the file is compacted once
            // the backlog has (nearly) drained, when a full VACUUM has little to copy. Until
            // then SQLite reuses the free pages for new rows.
            let page_size: i64 = self
                .conn
                .pragma_query_value(None, "page_size", |r| r.get(0))?;
            if (total - free) * page_size > VACUUM_MAX_LIVE_BYTES {
                return Ok(());
            }
            self.conn.execute_batch("VACUUM")?;
            // The file shrinks when the WAL is checkpointed; that is small now, do it at once.
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            self.freed_since_vacuum = 0;
        }
        tracing::debug!(
            free_pages = free,
            "store returned free pages to the filesystem"
        );
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|source| StoreError::Sqlite {
                what: "checkpointing the write-ahead log at close",
                source,
            })
    }

    fn fetch(&mut self, cursor: &Cursor, limit: usize) -> rusqlite::Result<Vec<StoredMessage>> {
        let mut out = Vec::with_capacity(limit.min(1024));
        let priorities: Vec<u8> = self.totals.per_priority.keys().rev().copied().collect();
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
            let rows = stmt.query_map(params![after, hi, want as i64], read_message)?;
            for row in rows {
                out.push(row?);
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
            free_disk_bytes: (self.disk.probe)(&self.settings.dir),
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
        Command::Ack(_) => {}
    }
}

/// Maps a row selected with [`MESSAGE_COLUMNS`].
pub(super) fn read_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let payload = match r.get_ref(2)? {
        rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => {
            bytes::Bytes::copy_from_slice(b)
        }
        _ => bytes::Bytes::new(),
    };
    Ok(StoredMessage {
        id: r.get(0)?,
        topic: r.get(1)?,
        payload,
        qos: r.get(3)?,
        retain: r.get(4)?,
        priority: r.get(5)?,
        created_ms: r.get(6)?,
    })
}
