//! Opening the database file: pragmas, schema, integrity check, quarantine of corrupt files.
//!
//! A file that is not a database, fails `quick_check`, or holds a schema that is not ours is never
//! deleted: it (and its `-wal`/`-shm`) is renamed to `<file>.corrupt-<UTC yyyymmddThhmmss>` and a
//! fresh store starts. The WAL keeps its suffix *after* the new name (`…corrupt-…-wal`) so that
//! opening the quarantined file with `sqlite3` still sees its last transactions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::{StoreError, StoredMessage};
use crate::codec::time::Utc;
use crate::config::SyncMode;

/// Bumped on any incompatible change; a newer file is refused, never quarantined. Version 1
/// files (AUTOINCREMENT ids, a `(priority, id)` index, the topic in every row) are migrated at
/// open, see [`migrate_v1`].
pub(super) const SCHEMA_VERSION: i64 = 2;

/// `PRAGMA application_id` of our files ("EGGT"), so `file(1)` and we can tell them apart.
const APPLICATION_ID: i64 = 0x4547_4754;

/// How long a statement waits for a lock held by another connection (`sqlite3` shell, a
/// read-only `edgegate buffer` running a checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page size of new files. Every commit rewrites the partly filled last page of the table, so
/// what a small transaction writes grows with the page size; measured with 100-byte messages in
/// commits of 50 rows (insert, checkpoint, delete): 1 KiB pages ~710 B per message, 4 KiB pages
/// ~1 070 B. A message of up to ~990 bytes still fits its page; longer ones continue on overflow
/// pages. Files created before schema 2 keep their 4 KiB pages (WAL mode cannot change it).
const PAGE_SIZE: i64 = 1024;

/// `meta` key: sequence numbers below this may have been used (see [`super::worker`]).
pub(super) const SEQ_RESERVED_KEY: &str = "seq_reserved";

const CREATE_SCHEMA: &str = "
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
    );
    -- Each distinct topic once: a queued row carries its id instead of the text.
    CREATE TABLE topics (
        id    INTEGER PRIMARY KEY,
        topic TEXT NOT NULL UNIQUE
    );
    -- id = ((255 - priority) << 48) | seq: rowid order is drain order (priority descending,
    -- FIFO within a priority) without an index, which would cost a second B-tree write per
    -- message. seq is never reused (meta.seq_reserved), it is the upstream message id.
    CREATE TABLE messages (
        id         INTEGER PRIMARY KEY,
        topic      INTEGER NOT NULL,
        payload    BLOB    NOT NULL,
        -- qos | retain << 2
        flags      INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        -- bytes charged against max_bytes (topic + payload + ROW_OVERHEAD_BYTES)
        size       INTEGER NOT NULL
    );
";

/// The rows as readers want them; rowid ranges on `id` pass through to `messages`.
const CREATE_VIEW: &str = "
    CREATE VIEW queue AS
        SELECT m.id AS id, t.topic AS topic, m.payload AS payload, m.flags & 3 AS qos,
               (m.flags >> 2) & 1 AS retain, 255 - (m.id >> 48) AS priority,
               m.created_ms AS created_ms, m.size AS size
        FROM messages m JOIN topics t ON t.id = m.topic;
";

/// Columns selected (from the `queue` view) wherever a [`super::StoredMessage`] is read, in
/// `read_message` order.
pub(super) const MESSAGE_COLUMNS: &str = "id, topic, payload, qos, retain, priority, created_ms";

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

/// Queued rows and charged bytes per priority, kept in memory by the writer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub per_priority: BTreeMap<u8, (u64, u64)>,
    pub rows: u64,
    pub bytes: u64,
}

impl Totals {
    pub fn add(&mut self, priority: u8, bytes: u64) {
        let e = self.per_priority.entry(priority).or_insert((0, 0));
        e.0 += 1;
        e.1 += bytes;
        self.rows += 1;
        self.bytes += bytes;
    }

    pub fn remove(&mut self, priority: u8, bytes: u64) {
        if let Some(e) = self.per_priority.get_mut(&priority) {
            e.0 = e.0.saturating_sub(1);
            e.1 = e.1.saturating_sub(bytes);
            if e.0 == 0 {
                self.per_priority.remove(&priority);
            }
        }
        self.rows = self.rows.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    pub fn load(conn: &Connection) -> rusqlite::Result<Totals> {
        let mut totals = Totals::default();
        let mut stmt = conn.prepare(
            "SELECT 255 - (id >> 48), count(*), coalesce(sum(size), 0) FROM messages GROUP BY 1",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let priority: i64 = row.get(0)?;
            let count: i64 = row.get(1)?;
            let bytes: i64 = row.get(2)?;
            let (count, bytes) = (count.max(0) as u64, bytes.max(0) as u64);
            totals
                .per_priority
                .insert(priority.clamp(0, 255) as u8, (count, bytes));
            totals.rows += count;
            totals.bytes += bytes;
        }
        Ok(totals)
    }
}

pub(super) struct Opened {
    pub conn: Connection,
    pub totals: Totals,
    /// The next unused sequence number.
    pub next_seq: i64,
    pub quarantined: Option<PathBuf>,
}

/// Why an existing file could not be used.
enum Problem {
    /// Not a database, corrupt, or not our schema: move it aside.
    Unusable(String),
    /// Anything else (permissions, I/O, a newer schema): refuse to start, touch nothing.
    Fatal(StoreError),
}

/// Opens the writer connection, creating the file (and its directory) if missing and moving a
/// corrupt file aside.
pub(super) fn open_writer(path: &Path, sync: SyncMode) -> Result<Opened, StoreError> {
    let dir = super::store_dir(path);
    std::fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    match try_open_writer(path, sync) {
        Ok((conn, totals, next_seq)) => Ok(Opened {
            conn,
            totals,
            next_seq,
            quarantined: None,
        }),
        Err(Problem::Fatal(e)) => Err(e),
        Err(Problem::Unusable(reason)) => {
            let moved = quarantine(path, &reason)?;
            tracing::error!(
                path = %path.display(),
                quarantined = %moved.display(),
                reason = %reason,
                "store file is corrupt: moved aside (nothing deleted) and starting an empty store; \
                 its unsent messages can be recovered from the quarantined file"
            );
            match try_open_writer(path, sync) {
                Ok((conn, totals, next_seq)) => Ok(Opened {
                    conn,
                    totals,
                    next_seq,
                    quarantined: Some(moved),
                }),
                Err(Problem::Fatal(e)) => Err(e),
                Err(Problem::Unusable(reason)) => Err(StoreError::NotAStore {
                    path: path.to_path_buf(),
                    reason: format!("a freshly created store is unusable: {reason}"),
                }),
            }
        }
    }
}

/// What the read-only inspection found.
enum Found {
    /// No file (or an empty one): create the schema.
    Nothing,
    /// A valid SQLite file without tables (a crash during our own creation): create the schema.
    EmptyDatabase,
    /// Our store, checked, with its schema version (1 is migrated).
    Store(i64),
}

fn try_open_writer(path: &Path, sync: SyncMode) -> Result<(Connection, Totals, i64), Problem> {
    let found = inspect(path)?;
    let open_err = |source: rusqlite::Error| classify(path, source);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(32);
    match found {
        Found::Nothing | Found::EmptyDatabase => {
            // page_size must be chosen before the first table exists. No auto-vacuum: the
            // worker compacts the file with VACUUM once a backlog has drained.
            conn.pragma_update(None, "page_size", PAGE_SIZE)
                .map_err(open_err)?;
            set_wal(&conn, path)?;
            create_schema(&conn).map_err(open_err)?;
        }
        Found::Store(version) => {
            set_wal(&conn, path)?;
            if version == 1 {
                migrate_v1(&conn).map_err(open_err)?;
            }
        }
    }
    let sync_value = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync_value)
        .map_err(open_err)?;
    let totals = Totals::load(&conn).map_err(open_err)?;
    let next_seq = next_seq(&conn, &totals).map_err(open_err)?;
    Ok((conn, totals, next_seq))
}

/// First row id of `priority`'s band and its last possible one.
pub(super) fn band(priority: u8) -> (i64, i64) {
    let lo = super::row_id(priority, 0);
    (lo, lo | super::SEQ_MASK)
}

/// One past the highest sequence number that may have been used: the highest in the table or
/// the persisted reservation, whichever is larger (acked rows are gone from the table, the
/// reservation still covers them).
fn next_seq(conn: &Connection, totals: &Totals) -> rusqlite::Result<i64> {
    let reserved: i64 = conn
        .query_row(
            &format!("SELECT value FROM meta WHERE key = '{SEQ_RESERVED_KEY}'"),
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(1);
    let mut stmt = conn.prepare("SELECT max(id) FROM messages WHERE id BETWEEN ?1 AND ?2")?;
    let mut next = reserved.max(1);
    for &priority in totals.per_priority.keys() {
        let (lo, hi) = band(priority);
        let max: Option<i64> = stmt.query_row([lo, hi], |r| r.get(0))?;
        if let Some(id) = max {
            next = next.max((id & super::SEQ_MASK) + 1);
        }
    }
    Ok(next)
}

/// Creation time of the oldest row (the first of each priority's band, which is FIFO).
pub(super) fn oldest_created_ms(
    conn: &Connection,
    priorities: &[u8],
) -> rusqlite::Result<Option<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT created_ms FROM messages WHERE id BETWEEN ?1 AND ?2 ORDER BY id LIMIT 1",
    )?;
    let mut oldest: Option<i64> = None;
    for &priority in priorities {
        let (lo, hi) = band(priority);
        let first: Option<i64> = stmt.query_row([lo, hi], |r| r.get(0)).optional()?;
        oldest = match (oldest, first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(oldest)
}

/// Rewrites a schema 1 store in place, in one transaction, keeping every row, its order and
/// its id (the seq of the new id is the old id, so a message re-sent after the upgrade keeps
/// its upstream message id).
fn migrate_v1(conn: &Connection) -> rusqlite::Result<()> {
    let rows: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE topics (
             id    INTEGER PRIMARY KEY,
             topic TEXT NOT NULL UNIQUE
         );
         INSERT INTO topics (topic) SELECT DISTINCT topic FROM messages;
         CREATE TABLE messages_v2 (
             id         INTEGER PRIMARY KEY,
             topic      INTEGER NOT NULL,
             payload    BLOB    NOT NULL,
             flags      INTEGER NOT NULL,
             created_ms INTEGER NOT NULL,
             size       INTEGER NOT NULL
         );
         INSERT INTO messages_v2 (id, topic, payload, flags, created_ms, size)
             SELECT ((255 - m.priority) << 48) | m.id, t.id, m.payload,
                    (m.qos & 3) | ((m.retain != 0) << 2), m.created_ms, m.size
             FROM messages m JOIN topics t ON t.topic = m.topic;
         INSERT INTO meta (key, value)
             SELECT '{SEQ_RESERVED_KEY}', coalesce(max(seq), 0) + 1 FROM sqlite_sequence
             WHERE name = 'messages';
         DROP TABLE messages;
         ALTER TABLE messages_v2 RENAME TO messages;
         {CREATE_VIEW}
         UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';
         COMMIT;"
    ))?;
    tracing::info!(rows, "store migrated from schema 1 to {SCHEMA_VERSION}");
    Ok(())
}

/// Checks an existing file without changing it.
///
/// Two SQLite behaviours shape this (both measured with the bundled 3.54): a read-write
/// connection to a corrupt file deletes its `-wal` when it closes, and any connection deletes
/// the `-wal` beside a zero-length database. Either would destroy the last committed
/// transactions of a damaged store, so the checks run on a read-only connection, and the
/// "empty file, non-empty WAL" case is decided here before SQLite sees it.
fn inspect(path: &Path) -> Result<Found, Problem> {
    let len = match std::fs::metadata(path) {
        Ok(m) => Some(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Problem::Fatal(StoreError::Io {
                what: "reading the store file's metadata",
                source: e,
            }))
        }
    };
    let wal_len = std::fs::metadata(sidecar(path, "-wal")).map_or(0, |m| m.len());
    match len {
        None | Some(0) if wal_len > 0 => {
            return Err(Problem::Unusable(format!(
            "the database file is missing or empty but its write-ahead log holds {wal_len} bytes"
        )))
        }
        None | Some(0) => return Ok(Found::Nothing),
        Some(_) => {}
    }

    let open_err = |source: rusqlite::Error| classify(path, source);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let check = quick_check(&conn).map_err(open_err)?;
    if check != "ok" {
        return Err(Problem::Unusable(format!("quick_check: {check}")));
    }
    if user_object_count(&conn).map_err(open_err)? > 0 {
        let version = verify_schema(&conn, path)?;
        return Ok(Found::Store(version));
    }
    let app_id = application_id(&conn).map_err(open_err)?;
    let pages: i64 = conn
        .pragma_query_value(None, "page_count", |r| r.get(0))
        .map_err(open_err)?;
    if pages == 0 || (app_id != 0 && app_id != APPLICATION_ID) {
        // Bytes SQLite reads as "no database", or another application's empty file: never
        // write a schema over something we did not create.
        return Err(Problem::Unusable(format!(
            "no tables (application_id {app_id:#x}, {pages} pages)"
        )));
    }
    Ok(Found::EmptyDatabase)
}

fn set_wal(conn: &Connection, path: &Path) -> Result<(), Problem> {
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| classify(path, e))?;
    if mode.eq_ignore_ascii_case("wal") {
        Ok(())
    } else {
        Err(Problem::Fatal(StoreError::NotAStore {
            path: path.to_path_buf(),
            reason: format!("SQLite refused WAL mode (journal_mode is {mode})"),
        }))
    }
}

fn application_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "application_id", |r| r.get(0))
}

/// Opens an existing store read-only and checks that it is ours; never creates or moves files.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    match verify_schema(&conn, path) {
        Ok(SCHEMA_VERSION) => Ok(conn),
        Ok(old) => Err(StoreError::NotAStore {
            path: path.to_path_buf(),
            reason: format!(
                "schema version {old}: start edgegate once to upgrade it (it is migrated at \
                 start, keeping every message)"
            ),
        }),
        Err(Problem::Fatal(e)) => Err(e),
        Err(Problem::Unusable(reason)) => Err(StoreError::NotAStore {
            path: path.to_path_buf(),
            reason,
        }),
    }
}

fn classify(path: &Path, source: rusqlite::Error) -> Problem {
    if is_corruption(&source) {
        Problem::Unusable(source.to_string())
    } else {
        Problem::Fatal(StoreError::Open {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// True for errors that mean the file's content is damaged (as opposed to I/O or locking).
pub(super) fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn quick_check(conn: &Connection) -> rusqlite::Result<String> {
    let mut stmt = conn.prepare("PRAGMA quick_check(10)")?;
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(lines.join("; "))
}

fn user_object_count(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'",
        [],
        |r| r.get(0),
    )
}

fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         PRAGMA application_id = {APPLICATION_ID};
         {CREATE_SCHEMA}
         {CREATE_VIEW}
         INSERT INTO meta (key, value) VALUES ('schema_version', {SCHEMA_VERSION});
         COMMIT;"
    ))
}

/// Checks that the file is ours and returns its schema version (1 or [`SCHEMA_VERSION`]).
fn verify_schema(conn: &Connection, path: &Path) -> Result<i64, Problem> {
    let unusable = |what: &str, e: rusqlite::Error| {
        if is_corruption(&e) {
            Problem::Unusable(format!("{what}: {e}"))
        } else if matches!(e.sqlite_error_code(), Some(ErrorCode::Unknown) | None) {
            // "no such table/column" and friends: readable file, foreign schema.
            Problem::Unusable(format!("{what}: {e}"))
        } else {
            Problem::Fatal(StoreError::Open {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    let app_id = application_id(conn).map_err(|e| unusable("reading application_id", e))?;
    if app_id != APPLICATION_ID {
        return Err(Problem::Unusable(format!(
            "application_id is {app_id:#x}, not edgegate's {APPLICATION_ID:#x}"
        )));
    }
    let version: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| unusable("reading the schema version", e))?;
    if version > SCHEMA_VERSION {
        return Err(Problem::Fatal(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        }));
    }
    // Preparing a statement naming every column proves the tables have the shape we expect.
    let probe = match version {
        1 => "SELECT id, topic, payload, qos, retain, priority, created_ms, size FROM messages \
              LIMIT 0"
            .to_string(),
        SCHEMA_VERSION => format!(
            "SELECT {MESSAGE_COLUMNS}, size FROM queue LIMIT 0; \
             SELECT id, topic, payload, flags, created_ms, size FROM messages LIMIT 0"
        ),
        _ => {
            return Err(Problem::Unusable(format!(
                "unknown schema version {version}"
            )))
        }
    };
    for sql in probe.split("; ") {
        conn.prepare(sql)
            .map_err(|e| unusable("checking the messages table", e))?;
    }
    Ok(version)
}

/// `<path><suffix>`, e.g. the `-wal` next to a database.
pub(super) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Renames the database and its `-wal`/`-shm` aside; returns the new database path.
fn quarantine(path: &Path, reason: &str) -> Result<PathBuf, StoreError> {
    let stamp = Utc::from_unix_ms(crate::shared::now_ms()).compact();
    let base = sidecar(path, &format!(".corrupt-{stamp}"));
    // Two quarantines in the same second must not overwrite each other.
    let target = (0..1000)
        .map(|n| {
            if n == 0 {
                base.clone()
            } else {
                sidecar(&base, &format!(".{n}"))
            }
        })
        .find(|t| {
            !t.exists()
                && ["-wal", "-shm", "-journal"]
                    .iter()
                    .all(|s| !sidecar(t, s).exists())
        })
        .ok_or_else(|| StoreError::Quarantine {
            path: path.to_path_buf(),
            reason: reason.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "no free quarantine name",
            ),
        })?;
    let fail = |source| StoreError::Quarantine {
        path: path.to_path_buf(),
        reason: reason.to_string(),
        source,
    };
    // Sidecars first: a fresh database next to an old WAL would replay its frames.
    for suffix in ["-wal", "-shm", "-journal"] {
        let from = sidecar(path, suffix);
        match std::fs::rename(&from, sidecar(&target, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
    }
    match std::fs::rename(path, &target) {
        Ok(()) => Ok(target),
        // Only a WAL was left (the database file is gone): report where the WAL went.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(sidecar(&target, "-wal")),
        Err(e) => Err(fail(e)),
    }
}
