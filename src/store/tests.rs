//! Tests of the store against real SQLite files in temporary directories.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::readonly::{base64, rfc3339_utc};
use super::worker::Probes;
use super::*;
use crate::codec::time::Utc;
use crate::config::{ByteSize, HumanDuration, StoreConfig, SyncMode, WhenFull};
use crate::shared::now_ms;

type Opened = (StoreHandle, OpenReport, std::thread::JoinHandle<()>);

fn config(path: PathBuf) -> StoreConfig {
    StoreConfig {
        path,
        max_bytes: ByteSize(1 << 30),
        min_free_disk: ByteSize(0),
        when_full: WhenFull::DropOldest,
        max_age: None,
        commit_interval: HumanDuration::from_millis(5),
        commit_max_rows: 1000,
        sync: SyncMode::Normal,
    }
}

fn temp_config() -> (tempfile::TempDir, StoreConfig) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // A missing parent directory exercises create_dir_all.
    let cfg = config(dir.path().join("state").join("buffer.db"));
    (dir, cfg)
}

fn msg(topic: &str, priority: u8) -> NewMessage {
    NewMessage {
        topic: topic.to_string(),
        payload: Bytes::from(format!("payload of {topic}")),
        qos: 1,
        retain: false,
        priority,
        created_ms: now_ms(),
    }
}

/// A message charged exactly `row` bytes: topic `t/NNN`, payload padded to fit.
fn sized(n: usize, priority: u8, row: u64) -> NewMessage {
    let topic = format!("t/{n:03}");
    let payload_len = row - ROW_OVERHEAD_BYTES - topic.len() as u64;
    NewMessage {
        topic,
        payload: Bytes::from(vec![b'x'; payload_len as usize]),
        qos: 1,
        retain: false,
        priority,
        created_ms: now_ms(),
    }
}

async fn close(opened: Opened) {
    let (handle, _, join) = opened;
    handle.close().await.expect("clean close");
    join.join().expect("store thread exits without panicking");
}

async fn all_rows(handle: &StoreHandle) -> Vec<StoredMessage> {
    handle
        .fetch(&Cursor::default(), 100_000)
        .await
        .expect("fetch")
}

fn topics(rows: &[StoredMessage]) -> Vec<&str> {
    rows.iter().map(|m| m.topic.as_str()).collect()
}

fn ids(rows: &[StoredMessage]) -> Vec<i64> {
    rows.iter().map(|m| m.id).collect()
}

/// Polls `stats` until `done` holds, for at most `limit`.
async fn wait_for_stats(
    handle: &StoreHandle,
    limit: Duration,
    done: impl Fn(&StoreStats) -> bool,
) -> StoreStats {
    let start = Instant::now();
    loop {
        let stats = handle.stats().await.expect("stats");
        if done(&stats) || start.elapsed() > limit {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn appended_rows_are_fetched_highest_priority_first_and_oldest_first_within_a_priority() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let out = h
        .append(
            vec![
                msg("low-1", 0),
                msg("high-1", 5),
                msg("low-2", 0),
                msg("mid-1", 2),
            ],
            Durability::Now,
        )
        .await
        .expect("append");
    assert_eq!(out.stored, 4);
    assert!(out.all_stored());
    h.append(vec![msg("high-2", 5)], Durability::Linger)
        .await
        .expect("append");

    let rows = all_rows(&h).await;
    assert_eq!(
        topics(&rows),
        ["high-1", "high-2", "mid-1", "low-1", "low-2"]
    );
    assert_eq!(out.last_id, Some(rows[2].id));
    assert_eq!(rows[0].payload, Bytes::from("payload of high-1"));
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.rows, 5);
    assert_eq!(stats.appended_total, 5);
    assert_eq!(
        stats
            .per_priority
            .iter()
            .map(|p| (p.priority, p.rows))
            .collect::<Vec<_>>(),
        [(5, 2), (2, 1), (0, 2)]
    );
    let expected_bytes: u64 = rows.iter().map(|m| row_bytes(&m.topic, &m.payload)).sum();
    assert_eq!(stats.bytes, expected_bytes);
    close(opened).await;
}

#[tokio::test]
async fn cursor_advance_moves_past_fetched_rows_within_each_priority() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(
        vec![
            msg("a1", 1),
            msg("a2", 1),
            msg("b1", 0),
            msg("a3", 1),
            msg("b2", 0),
        ],
        Durability::Now,
    )
    .await
    .expect("append");

    let mut cursor = Cursor::default();
    let first = h.fetch(&cursor, 2).await.expect("fetch");
    assert_eq!(topics(&first), ["a1", "a2"]);
    first.iter().for_each(|m| cursor.advance(m));
    let second = h.fetch(&cursor, 2).await.expect("fetch");
    assert_eq!(topics(&second), ["a3", "b1"]);
    second.iter().for_each(|m| cursor.advance(m));

    // A newer, higher-priority row comes first even though the cursor is past lower ones.
    h.append(vec![msg("c1", 9), msg("a4", 1)], Durability::Now)
        .await
        .expect("append");
    let third = h.fetch(&cursor, 10).await.expect("fetch");
    assert_eq!(topics(&third), ["c1", "a4", "b2"]);
    close(opened).await;
}

#[tokio::test]
async fn acked_rows_are_deleted_and_counted() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(vec![msg("a", 0), msg("b", 0), msg("c", 0)], Durability::Now)
        .await
        .expect("append");
    let rows = all_rows(&h).await;
    h.ack(vec![rows[0].id, rows[2].id, 999_999]);
    let stats = wait_for_stats(&h, Duration::from_secs(5), |s| s.acked_total == 2).await;
    assert_eq!(stats.acked_total, 2);
    assert_eq!(stats.rows, 1);
    assert_eq!(topics(&all_rows(&h).await), ["b"]);
    close(opened).await;
}

#[tokio::test]
async fn a_fresh_cursor_skips_rows_whose_acks_are_queued_but_not_yet_committed() {
    let (_dir, mut cfg) = temp_config();
    // Acks wait ten commit intervals for a commit: long enough to fetch in between.
    cfg.commit_interval = HumanDuration::from_secs(5);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(
        vec![msg("a", 0), msg("b", 0), msg("c", 0), msg("d", 0)],
        Durability::Now,
    )
    .await
    .expect("append");
    let rows = all_rows(&h).await;
    // Acks linger before their commit; a reconnecting forwarder fetches meanwhile.
    h.ack(vec![rows[0].id, rows[1].id]);
    let again = h.fetch(&Cursor::default(), 2).await.expect("fetch");
    assert_eq!(topics(&again), ["c", "d"], "acknowledged rows sent again");
    assert_eq!(
        h.stats().await.expect("stats").acked_total,
        0,
        "the acks committed already: the test proves nothing"
    );
    close(opened).await;
}

#[tokio::test]
async fn reopening_keeps_unacked_rows_in_order_with_their_ids() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(
        vec![msg("a", 0), msg("b", 3), msg("c", 0), msg("d", 3)],
        Durability::Now,
    )
    .await
    .expect("append");
    let before = all_rows(&h).await;
    h.ack(vec![before[0].id]);
    drop(h);
    close(opened).await;

    let opened = Store::open(&cfg).expect("reopen");
    assert_eq!(opened.1.rows, 3);
    assert_eq!(opened.1.quarantined, None);
    let after = all_rows(&opened.0).await;
    assert_eq!(after, before[1..].to_vec());
    close(opened).await;
}

#[tokio::test]
async fn drop_oldest_evicts_the_lowest_priority_then_the_oldest_and_counts_exactly() {
    let (_dir, mut cfg) = temp_config();
    const ROW: u64 = 200;
    cfg.max_bytes = ByteSize(5 * ROW);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let first = [
        sized_fn(1, 1),
        sized_fn(2, 1),
        sized_fn(3, 1),
        sized_fn(4, 0),
        sized_fn(5, 0),
    ]
    .into_iter()
    .map(|f| f(ROW))
    .collect();
    let out = h.append(first, Durability::Now).await.expect("append");
    assert_eq!((out.stored, out.refusal()), (5, None));

    let more = (6..=8).map(|n| sized(n, 1, ROW)).collect();
    let out = h.append(more, Durability::Now).await.expect("append");
    assert_eq!((out.stored, out.refusal()), (3, None));

    let rows = all_rows(&h).await;
    assert_eq!(topics(&rows), ["t/002", "t/003", "t/006", "t/007", "t/008"]);
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.dropped.store_full, 3);
    assert_eq!(stats.bytes, 5 * ROW);

    // A new row below every queued priority may not evict them: it is refused (a device gets
    // no PUBACK for it), and counted since `append` was used.
    let out = h
        .append(vec![sized(9, 0, ROW)], Durability::Now)
        .await
        .expect("append");
    assert_eq!(
        (out.stored, out.refusal(), out.last_id),
        (0, Some(Refusal::StoreFull), None)
    );
    assert_eq!(ids(&all_rows(&h).await), ids(&rows));
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.dropped.store_full, 4);
    assert!(matches!(
        stats.admission,
        Admission::Refusing {
            reason: Refusal::StoreFull,
            ..
        }
    ));
    close(opened).await;
}

/// `sized` as a closure factory so a list of rows reads like a table.
fn sized_fn(n: usize, priority: u8) -> impl Fn(u64) -> NewMessage {
    move |row| sized(n, priority, row)
}

#[tokio::test]
async fn drop_newest_refuses_the_rows_that_do_not_fit_and_counts_exactly() {
    let (_dir, mut cfg) = temp_config();
    const ROW: u64 = 150;
    cfg.max_bytes = ByteSize(5 * ROW);
    cfg.when_full = WhenFull::DropNewest;
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let out = h
        .append((1..=8).map(|n| sized(n, 1, ROW)).collect(), Durability::Now)
        .await
        .expect("append");
    assert_eq!((out.stored, out.refusal()), (5, Some(Refusal::StoreFull)));

    let rows = all_rows(&h).await;
    assert_eq!(out.last_id, rows.last().map(|m| m.id));
    assert_eq!(topics(&rows), ["t/001", "t/002", "t/003", "t/004", "t/005"]);
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.dropped.store_full, 3);
    assert_eq!(stats.dropped.total(), 3);

    // Room made by an ack is usable again, the refusal still covers the rest of the append.
    h.ack(vec![rows[0].id]);
    let out = h
        .append(vec![sized(9, 1, ROW), sized(10, 1, ROW)], Durability::Now)
        .await
        .expect("append");
    assert_eq!((out.stored, out.refusal()), (1, Some(Refusal::StoreFull)));
    assert_eq!(h.stats().await.expect("stats").dropped.store_full, 4);
    close(opened).await;
}

#[tokio::test]
async fn a_message_bigger_than_max_bytes_is_refused_and_counted_under_either_policy() {
    for when_full in [WhenFull::DropOldest, WhenFull::DropNewest] {
        let (_dir, mut cfg) = temp_config();
        cfg.max_bytes = ByteSize(1000);
        cfg.when_full = when_full;
        let opened = Store::open(&cfg).expect("open");
        let h = opened.0.clone();
        h.append(vec![sized(1, 0, 500)], Durability::Now)
            .await
            .expect("append");
        let out = h
            .append(vec![sized(2, 9, 1001)], Durability::Now)
            .await
            .expect("append");
        assert_eq!(
            (out.stored, out.refusal()),
            (0, Some(Refusal::TooLarge)),
            "{when_full:?}"
        );
        assert_eq!(topics(&all_rows(&h).await), ["t/001"], "{when_full:?}");
        let dropped = h.stats().await.expect("stats").dropped;
        assert_eq!(dropped.store_full, 1, "{when_full:?}");
        close(opened).await;
    }
}

#[tokio::test]
async fn rows_older_than_max_age_expire_on_an_idle_store_and_are_counted_exactly() {
    let (_dir, mut cfg) = temp_config();
    cfg.max_age = Some(HumanDuration::from_secs(30));
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let mut batch = Vec::new();
    // Rows are created in id order (the intake stamps them as they arrive), oldest first.
    for (topic, age_ms) in [
        ("old-3", 90_000),
        ("old-1", 60_000),
        ("old-2", 31_000),
        ("fresh-1", 0),
    ] {
        let mut m = msg(topic, 1);
        m.created_ms -= age_ms;
        batch.push(m);
    }
    batch.push(msg("fresh-2", 0));
    h.append(batch, Durability::Now).await.expect("append");

    let stats = wait_for_stats(&h, Duration::from_secs(5), |s| s.dropped.expired >= 3).await;
    assert_eq!(stats.dropped.expired, 3);
    assert_eq!(stats.rows, 2);
    assert_eq!(topics(&all_rows(&h).await), ["fresh-1", "fresh-2"]);
    // Another sweep interval later nothing more has expired.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(h.stats().await.expect("stats").dropped.expired, 3);
    close(opened).await;
}

/// Expiry removes the oldest rows in id order and stops at the first one still fresh: after a
/// backwards clock jump a row stamped "old" behind a fresh one waits (it is never lost early).
#[tokio::test]
async fn after_a_backwards_clock_jump_an_old_stamp_behind_a_fresh_row_waits_its_turn() {
    let (_dir, mut cfg) = temp_config();
    cfg.max_age = Some(HumanDuration::from_secs(30));
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let mut batch = Vec::new();
    for (topic, age_ms) in [("old-1", 60_000), ("fresh", 0), ("old-2", 90_000)] {
        let mut m = msg(topic, 1);
        m.created_ms -= age_ms;
        batch.push(m);
    }
    h.append(batch, Durability::Now).await.expect("append");
    let stats = wait_for_stats(&h, Duration::from_secs(5), |s| s.dropped.expired >= 1).await;
    assert_eq!(stats.dropped.expired, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(h.stats().await.expect("stats").dropped.expired, 1);
    assert_eq!(topics(&all_rows(&h).await), ["fresh", "old-2"]);
    close(opened).await;
}

/// Writes `bytes` as the store file, opens it and checks it was moved aside intact.
async fn assert_quarantined(make: impl FnOnce(&Path)) {
    let (_dir, cfg) = temp_config();
    std::fs::create_dir_all(cfg.path.parent().expect("parent")).expect("mkdir");
    make(&cfg.path);
    let original = std::fs::read(&cfg.path).expect("read the bad file");

    let opened = Store::open(&cfg).expect("a corrupt file must not stop the gateway");
    let moved = opened
        .1
        .quarantined
        .clone()
        .expect("reported as quarantined");
    let name = moved
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert!(name.starts_with("buffer.db.corrupt-"), "{name}");
    let kept = std::fs::read(&moved).expect("quarantined file kept");
    assert!(
        kept == original,
        "the quarantined file must be byte-for-byte the original"
    );
    assert_eq!(opened.1.rows, 0);

    let h = opened.0.clone();
    let out = h
        .append(vec![msg("after", 0)], Durability::Now)
        .await
        .expect("the fresh store works");
    assert_eq!(out.stored, 1);
    assert_eq!(topics(&all_rows(&h).await), ["after"]);
    close(opened).await;
    assert!(moved.exists());
}

/// A real store with `rows` rows, closed (so everything is in the main file).
async fn filled_store(path: &Path, rows: usize) {
    let cfg = config(path.to_path_buf());
    let opened = Store::open(&cfg).expect("open");
    let msgs = (0..rows)
        .map(|n| sized(n, (n % 3) as u8, 300))
        .collect::<Vec<_>>();
    opened
        .0
        .append(msgs, Durability::Now)
        .await
        .expect("append");
    close(opened).await;
}

#[tokio::test]
async fn a_file_of_random_bytes_is_quarantined_and_a_fresh_store_starts() {
    assert_quarantined(|p| {
        let noise: Vec<u8> = (0..8192).map(|_| fastrand::u8(..)).collect();
        std::fs::write(p, noise).expect("write");
    })
    .await;
}

#[tokio::test]
async fn a_truncated_database_is_quarantined_and_a_fresh_store_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.db");
    filled_store(&good, 400).await;
    let bytes = std::fs::read(&good).expect("read");
    assert!(bytes.len() > 16 * 4096, "the store must span many pages");
    assert_quarantined(|p| std::fs::write(p, &bytes[..bytes.len() / 3]).expect("write")).await;
}

#[tokio::test]
async fn a_database_with_a_wrong_header_is_quarantined_and_a_fresh_store_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.db");
    filled_store(&good, 20).await;
    let mut bytes = std::fs::read(&good).expect("read");
    bytes[..16].copy_from_slice(b"NotSQLite fmt 3\0");
    assert_quarantined(|p| std::fs::write(p, &bytes).expect("write")).await;
}

#[tokio::test]
async fn a_database_of_another_application_is_quarantined_not_used() {
    assert_quarantined(|p| {
        let conn = rusqlite::Connection::open(p).expect("open");
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
            .expect("create");
    })
    .await;
}

/// Copies of a database and its WAL holding a committed, not yet checkpointed transaction.
fn database_with_live_wal(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let src = dir.join("src.db");
    let conn = rusqlite::Connection::open(&src).expect("open");
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
        .expect("wal");
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES ('committed in the wal');")
        .expect("write");
    let db = std::fs::read(&src).expect("read db");
    let wal = std::fs::read(schema::sidecar(&src, "-wal")).expect("read wal");
    assert!(!wal.is_empty());
    (db, wal)
}

#[tokio::test]
async fn the_wal_of_a_corrupt_file_is_moved_aside_with_it_unchanged() {
    let (dir, cfg) = temp_config();
    let (mut db, wal) = database_with_live_wal(dir.path());
    db[..16].copy_from_slice(b"NotSQLite fmt 3\0");
    std::fs::create_dir_all(cfg.path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&cfg.path, &db).expect("write db");
    std::fs::write(schema::sidecar(&cfg.path, "-wal"), &wal).expect("write wal");

    let opened = Store::open(&cfg).expect("open");
    let moved = opened.1.quarantined.clone().expect("quarantined");
    let kept = std::fs::read(schema::sidecar(&moved, "-wal")).expect("wal moved beside it");
    assert!(kept == wal, "the WAL must leave untouched");
    close(opened).await;
}

#[tokio::test]
async fn an_empty_database_file_beside_a_live_wal_is_quarantined_not_wiped() {
    let (dir, cfg) = temp_config();
    let (_, wal) = database_with_live_wal(dir.path());
    std::fs::create_dir_all(cfg.path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&cfg.path, b"").expect("write db");
    std::fs::write(schema::sidecar(&cfg.path, "-wal"), &wal).expect("write wal");

    let opened = Store::open(&cfg).expect("open");
    let moved = opened.1.quarantined.clone().expect("quarantined");
    let kept = std::fs::read(schema::sidecar(&moved, "-wal")).expect("wal moved beside it");
    assert!(kept == wal, "the WAL must leave untouched");
    assert_eq!(opened.1.rows, 0);
    close(opened).await;
}

#[tokio::test]
async fn a_schema_from_a_newer_edgegate_is_refused_and_left_untouched() {
    let (_dir, cfg) = temp_config();
    filled_store(&cfg.path, 1).await;
    {
        let conn = rusqlite::Connection::open(&cfg.path).expect("open");
        conn.execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .expect("update");
    }
    let err = Store::open(&cfg).expect_err("must refuse");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert!(cfg.path.exists());
}

#[tokio::test]
async fn a_new_store_uses_wal_no_auto_vacuum_and_our_schema_version() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let conn = rusqlite::Connection::open(&cfg.path).expect("second connection");
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("journal_mode");
    let vacuum: i64 = conn
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .expect("auto_vacuum");
    let version: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .expect("version");
    assert_eq!(
        (mode.as_str(), vacuum, version),
        ("wal", 0, schema::SCHEMA_VERSION)
    );
    drop(conn);
    close(opened).await;
}

#[tokio::test]
async fn a_read_only_open_beside_the_running_writer_sees_the_committed_rows() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(vec![msg("a", 0), msg("b", 4)], Durability::Now)
        .await
        .expect("append");

    let ro = ReadOnlyStore::open(&cfg.path).expect("read-only open");
    let stats = ro.stats().expect("stats");
    assert_eq!(stats.rows, 2);
    assert_eq!(stats.bytes, h.stats().await.expect("stats").bytes);
    assert_eq!(stats.per_priority[0].priority, 4);

    // The writer keeps committing while the reader is open, and the reader sees it.
    h.append(vec![msg("c", 0)], Durability::Now)
        .await
        .expect("append while a reader is open");
    assert_eq!(ro.stats().expect("stats").rows, 3);
    drop(ro);
    close(opened).await;
}

#[tokio::test]
async fn a_read_only_open_of_a_closed_store_reads_it_and_changes_nothing() {
    let (_dir, cfg) = temp_config();
    filled_store(&cfg.path, 7).await;
    let before = std::fs::read(&cfg.path).expect("read");
    let ro = ReadOnlyStore::open(&cfg.path).expect("read-only open");
    let stats = ro.stats().expect("stats");
    assert_eq!(stats.rows, 7);
    assert_eq!(stats.appended_total, 0, "counters live in the daemon");
    let mut out = Vec::new();
    assert_eq!(ro.export(&mut out, None).expect("export"), 7);
    drop(ro);
    assert!(std::fs::read(&cfg.path).expect("read") == before);
    let missing = ReadOnlyStore::open(&cfg.path.with_file_name("nope.db"));
    assert!(matches!(missing, Err(StoreError::NotAStore { .. })));
}

#[tokio::test]
async fn export_writes_one_valid_json_line_per_row_in_drain_order() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let mut binary = msg("bin", 0);
    binary.payload = Bytes::from_static(&[0xff, 0xfe, 0x00]);
    binary.created_ms = 1_764_237_600_123;
    let mut text = msg("txt", 7);
    text.payload = Bytes::from_static("21.4 °C".as_bytes());
    text.retain = true;
    h.append(vec![binary, text, msg("third", 0)], Durability::Now)
        .await
        .expect("append");

    let ro = ReadOnlyStore::open(&cfg.path).expect("read-only open");
    let mut out = Vec::new();
    assert_eq!(ro.export(&mut out, None).expect("export"), 3);
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["topic"], "txt");
    assert_eq!(lines[0]["payload"], "21.4 °C");
    assert_eq!(lines[0]["retain"], true);
    assert_eq!(lines[0]["priority"], 7);
    assert_eq!(lines[1]["topic"], "bin");
    assert_eq!(lines[1]["payload_base64"], "//4A");
    assert!(lines[1].get("payload").is_none());
    assert_eq!(lines[1]["created"], "2025-11-27T10:00:00.123Z");
    assert_eq!(lines[1]["qos"], 1);
    assert!(lines[1]["id"].as_i64().is_some());

    let mut limited = Vec::new();
    assert_eq!(ro.export(&mut limited, Some(1)).expect("export"), 1);
    drop(ro);
    close(opened).await;
}

#[tokio::test]
async fn ids_are_never_reused_after_deleting_everything_and_reopening() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(vec![msg("a", 0), msg("b", 0), msg("c", 0)], Durability::Now)
        .await
        .expect("append");
    let first = all_rows(&h).await;
    h.ack(ids(&first));
    wait_for_stats(&h, Duration::from_secs(5), |s| s.rows == 0).await;
    drop(h);
    close(opened).await;

    let opened = Store::open(&cfg).expect("reopen");
    assert_eq!(opened.1.rows, 0);
    let out = opened
        .0
        .append(vec![msg("d", 0)], Durability::Now)
        .await
        .expect("append");
    let max_before = first.iter().map(|m| m.id).max().expect("rows");
    assert!(out.last_id.expect("an id") > max_before);
    close(opened).await;
}

#[tokio::test]
async fn close_commits_lingering_appends_and_queued_acks() {
    let (_dir, mut cfg) = temp_config();
    cfg.commit_interval = HumanDuration::from_secs(60);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(vec![msg("a", 0), msg("b", 0)], Durability::Now)
        .await
        .expect("append");
    let a = all_rows(&h).await[0].id;
    h.ack(vec![a]);
    drop(h.append(vec![msg("lingering", 0)], Durability::Linger));
    drop(h);
    close(opened).await;

    let opened = Store::open(&cfg).expect("reopen");
    assert_eq!(topics(&all_rows(&opened.0).await), ["b", "lingering"]);
    close(opened).await;
}

#[tokio::test]
async fn dropping_every_handle_without_close_commits_nothing_more_like_a_crash() {
    let (_dir, mut cfg) = temp_config();
    cfg.commit_interval = HumanDuration::from_secs(60);
    let (h, _, join) = Store::open(&cfg).expect("open");
    h.append(vec![msg("committed", 0)], Durability::Now)
        .await
        .expect("append");
    let pending = h.append(vec![msg("uncommitted", 0)], Durability::Linger);
    drop(h);
    join.join().expect("thread exits");
    assert!(matches!(pending.await, Err(StoreError::Closed)));

    let opened = Store::open(&cfg).expect("reopen");
    assert_eq!(topics(&all_rows(&opened.0).await), ["committed"]);
    close(opened).await;
}

#[tokio::test]
async fn a_now_append_commits_without_waiting_for_the_linger() {
    let (_dir, mut cfg) = temp_config();
    cfg.commit_interval = HumanDuration::from_secs(60);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let lingering = h.append(vec![msg("linger", 0)], Durability::Linger);
    let now = h.append(vec![msg("now", 0)], Durability::Now);
    let both = async { (lingering.await, now.await) };
    let (a, b) = tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .expect("committed at once, not after the 60 s linger");
    assert_eq!(a.expect("linger").stored, 1);
    assert_eq!(b.expect("now").stored, 1);
    close(opened).await;
}

#[tokio::test]
async fn lingering_appends_commit_once_commit_max_rows_are_queued() {
    let (_dir, mut cfg) = temp_config();
    cfg.commit_interval = HumanDuration::from_secs(60);
    cfg.commit_max_rows = 10;
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let mut committed = h.committed();
    let before = *committed.borrow_and_update();
    let pending: Vec<_> = (0..10)
        .map(|n| h.append(vec![msg(&format!("m{n}"), 0)], Durability::Linger))
        .collect();
    tokio::time::timeout(Duration::from_secs(5), committed.changed())
        .await
        .expect("a full batch commits without the 60 s linger")
        .expect("watch open");
    assert!(*committed.borrow() > before);
    for p in pending {
        assert_eq!(p.await.expect("append").stored, 1);
    }
    close(opened).await;
}

#[tokio::test]
async fn hurry_commits_a_lingering_append_at_once() {
    let (_dir, mut cfg) = temp_config();
    cfg.commit_interval = HumanDuration::from_secs(60);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let lingering = h.append(vec![msg("linger", 0)], Durability::Linger);
    h.hurry();
    let out = tokio::time::timeout(Duration::from_secs(5), lingering)
        .await
        .expect("committed at once, not after the 60 s linger");
    assert_eq!(out.expect("append").stored, 1);
    close(opened).await;
}

#[tokio::test]
async fn a_within_append_waits_at_least_the_linger_and_at_most_ten_commit_intervals() {
    let (_dir, mut cfg) = temp_config();
    cfg.commit_interval = HumanDuration::from_millis(200);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    assert_eq!(
        h.linger(),
        Duration::from_millis(200),
        "a fast disk lingers commit_interval"
    );

    // Shorter than the linger: the linger.
    let started = Instant::now();
    h.append(
        vec![msg("short", 0)],
        Durability::Within(Duration::from_millis(1)),
    )
    .await
    .expect("append");
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );

    // Longer than ten commit intervals: ten commit intervals (2 s), not the hour asked for.
    let started = Instant::now();
    let long = h.append(
        vec![msg("long", 0)],
        Durability::Within(Duration::from_secs(3600)),
    );
    tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .expect("committed after ten commit intervals")
        .expect("append");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    close(opened).await;
}

#[tokio::test]
async fn acknowledged_rows_are_deleted_by_the_next_commit_of_new_rows() {
    let (_dir, mut cfg) = temp_config();
    cfg.commit_interval = HumanDuration::from_secs(60);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(vec![msg("a", 0), msg("b", 0)], Durability::Now)
        .await
        .expect("append");
    let a = all_rows(&h).await[0].id;
    h.ack(vec![a]);
    // The delete waits for company (ten lingers here): a crash now would only resend `a`.
    let stats = h.stats().await.expect("stats");
    assert_eq!((stats.rows, stats.acked_total), (2, 0));
    h.append(vec![msg("c", 0)], Durability::Now)
        .await
        .expect("append");
    let stats = h.stats().await.expect("stats");
    assert_eq!((stats.rows, stats.acked_total), (2, 1));
    assert_eq!(topics(&all_rows(&h).await), ["b", "c"]);
    close(opened).await;
}

/// A fake filesystem of 1 GiB whose free space the test sets.
fn fake_disk(free: Arc<AtomicU64>) -> Probes {
    Probes {
        disk: Some(Arc::new(move |_: &Path| {
            Some(super::space::DiskReading {
                free: free.load(Ordering::SeqCst),
                total: 1 << 30,
                read_only: false,
            })
        })),
        pragmas: Vec::new(),
    }
}

/// Waits until the store's admission satisfies `want` (the sweep rechecks once a second).
async fn wait_admission(h: &StoreHandle, want: impl Fn(&Admission) -> bool) -> Admission {
    let mut rx = h.admission();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|a| want(a)))
        .await
        .expect("admission changes within 5 s")
        .expect("store running")
        .clone();
    got
}

#[tokio::test]
async fn below_min_free_disk_rows_are_refused_offers_come_back_uncounted_and_acks_still_run() {
    let (_dir, mut cfg) = temp_config();
    cfg.min_free_disk = ByteSize(1_000_000);
    let free = Arc::new(AtomicU64::new(100_000_000));
    let opened = Store::open_with(&cfg, fake_disk(free.clone())).expect("open");
    let h = opened.0.clone();
    h.append(vec![msg("before", 0), msg("kept", 0)], Durability::Now)
        .await
        .expect("append");
    let before = all_rows(&h).await;

    // Every transaction that adds rows reads the filesystem again: no second of grace.
    free.store(500_000, Ordering::SeqCst);
    let out = h
        .offer(vec![msg("held-1", 0), msg("held-2", 0)], Durability::Now)
        .await
        .expect("an outcome");
    assert_eq!(out.stored, 0);
    let refused = out.refused.expect("refused");
    assert_eq!(refused.reason, Refusal::DiskFull);
    assert_eq!(
        topics_of(&refused.rows),
        ["held-1", "held-2"],
        "offered rows come back"
    );
    let stats = h.stats().await.expect("stats");
    assert_eq!(
        stats.dropped.disk_full, 0,
        "an offer's refusal is not a drop"
    );
    assert!(matches!(
        stats.admission,
        Admission::Refusing {
            reason: Refusal::DiskFull,
            ..
        }
    ));

    let out = h
        .append(vec![msg("dropped", 0)], Durability::Now)
        .await
        .expect("an outcome");
    assert_eq!(out.refusal(), Some(Refusal::DiskFull));
    h.ack(vec![before[0].id]);
    let stats = wait_for_stats(&h, Duration::from_secs(5), |s| s.rows == 1).await;
    assert_eq!(topics(&all_rows(&h).await), ["kept"]);
    assert_eq!(stats.dropped.disk_full, 1, "an append's refusal is");

    free.store(100_000_000, Ordering::SeqCst);
    wait_admission(&h, Admission::is_open).await;
    let out = h
        .offer(refused.rows, Durability::Now)
        .await
        .expect("append");
    assert_eq!(
        (out.stored, out.refusal()),
        (2, None),
        "the held rows fit now"
    );
    close(opened).await;
}

fn topics_of(rows: &[NewMessage]) -> Vec<&str> {
    rows.iter().map(|m| m.topic.as_str()).collect()
}

#[tokio::test]
async fn the_headroom_counts_the_log_and_the_growth_a_checkpoint_will_need() {
    let (_dir, mut cfg) = temp_config();
    cfg.min_free_disk = ByteSize(4 << 20);
    // Enough free space for the rows themselves, not for them plus the log's cap and reserve.
    let free = Arc::new(AtomicU64::new((4 << 20) + 300 * 1024));
    let opened = Store::open_with(&cfg, fake_disk(free.clone())).expect("open");
    let h = opened.0.clone();
    let rows: Vec<NewMessage> = (0..100).map(|n| sized(n, 0, 1000)).collect();
    let out = h.offer(rows, Durability::Now).await.expect("an outcome");
    assert_eq!(
        out.refusal(),
        Some(Refusal::DiskFull),
        "100 KB of rows with a 1 MiB log to grow into must not be admitted 300 KiB above the limit"
    );
    free.store(64 << 20, Ordering::SeqCst);
    wait_admission(&h, Admission::is_open).await;
    let out = h
        .offer(out.refused.expect("rows").rows, Durability::Now)
        .await
        .expect("an outcome");
    assert_eq!(out.stored, 100);
    close(opened).await;
}

#[tokio::test]
async fn the_store_takes_a_reserve_and_gives_it_back_when_the_disk_is_short() {
    let (_dir, mut cfg) = temp_config();
    cfg.min_free_disk = ByteSize(1 << 20);
    let free = Arc::new(AtomicU64::new(64 << 20));
    let opened = Store::open_with(&cfg, fake_disk(free.clone())).expect("open");
    let reserve = super::space::reserve_path(&cfg.path);
    let len = std::fs::metadata(&reserve).expect("a reserve file").len();
    assert!(len >= 128 * 1024, "reserve of {len} bytes");
    assert!(opened.0.stats().await.expect("stats").reserve_held);
    close(opened).await;
    assert!(reserve.exists(), "kept across a clean stop");
    // A restart releases it before opening (a full disk may need it to open at all) and takes
    // it again when there is room.
    let opened = Store::open_with(&cfg, fake_disk(free.clone())).expect("reopen");
    assert!(opened.0.stats().await.expect("stats").reserve_held);
    close(opened).await;
    free.store(100 * 1024, Ordering::SeqCst);
    let opened = Store::open_with(&cfg, fake_disk(free.clone())).expect("reopen on a full disk");
    assert!(
        !reserve.exists(),
        "no room for the reserve: it stays released"
    );
    let h = opened.0.clone();
    let out = h
        .offer(vec![msg("x", 0)], Durability::Now)
        .await
        .expect("outcome");
    assert_eq!(out.refusal(), Some(Refusal::DiskFull));
    free.store(64 << 20, Ordering::SeqCst);
    wait_admission(&h, Admission::is_open).await;
    assert!(reserve.exists(), "taken back once space returned");
    close(opened).await;
}

#[tokio::test]
async fn sqlite_full_during_a_commit_refuses_its_appends_and_the_store_keeps_going() {
    let (_dir, cfg) = temp_config();
    // A tiny page budget makes SQLite fail with SQLITE_FULL, exactly as ENOSPC would.
    let probes = Probes {
        disk: None,
        pragmas: vec![("max_page_count", 40)],
    };
    let opened = Store::open_with(&cfg, probes).expect("open");
    let h = opened.0.clone();
    let small = h
        .append(vec![sized(1, 0, 1000)], Durability::Now)
        .await
        .expect("append");
    assert_eq!(small.stored, 1);

    let huge: Vec<NewMessage> = (2..200).map(|n| sized(n, 0, 4000)).collect();
    let n = huge.len();
    let out = h
        .offer(huge, Durability::Now)
        .await
        .expect("an outcome, not an error");
    assert_eq!(out.stored, 0);
    let refused = out.refused.expect("refused");
    assert_eq!((refused.reason, refused.rows.len()), (Refusal::DiskFull, n));
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.rows, 1);
    assert!(!stats.admission.is_open());
    assert_eq!(topics(&all_rows(&h).await), ["t/001"]);

    let again = h
        .append(vec![sized(300, 0, 500)], Durability::Now)
        .await
        .expect("append");
    assert_eq!(again.stored, 1, "the store keeps accepting what fits");
    assert!(h.stats().await.expect("stats").admission.is_open());
    close(opened).await;
}

#[tokio::test]
async fn a_full_disk_refuses_only_the_appends_that_do_not_fit_not_their_whole_commit() {
    let (_dir, cfg) = temp_config();
    let probes = Probes {
        disk: None,
        pragmas: vec![("max_page_count", 40)],
    };
    let opened = Store::open_with(&cfg, probes).expect("open");
    let h = opened.0.clone();
    // Queued before the first commit, so both land in one group commit.
    let small = h.append(vec![sized(1, 0, 500)], Durability::Linger);
    let huge: Vec<NewMessage> = (2..200).map(|n| sized(n, 0, 4000)).collect();
    let n = huge.len();
    let huge = h.append(huge, Durability::Linger);
    let small = small.await.expect("an outcome");
    let huge = huge.await.expect("an outcome");
    assert_eq!(
        (small.stored, small.refusal()),
        (1, None),
        "the small one fits"
    );
    assert_eq!((huge.stored, huge.refusal()), (0, Some(Refusal::DiskFull)));
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.dropped.disk_full, n as u64);
    assert_eq!(topics(&all_rows(&h).await), ["t/001"]);
    close(opened).await;
}

#[tokio::test]
async fn drop_oldest_never_evicts_a_row_its_own_transaction_stored() {
    let (_dir, mut cfg) = temp_config();
    const ROW: u64 = 200;
    cfg.max_bytes = ByteSize(5 * ROW);
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    h.append(vec![sized(1, 0, ROW), sized(2, 0, ROW)], Durability::Now)
        .await
        .expect("append");
    // Seven rows into a budget of five with two committed: those two go, then the rows of this
    // append itself would have to, so the last two are refused instead (a PUBACK for a row
    // evicted in the same moment would be a lie).
    let out = h
        .offer((3..=9).map(|n| sized(n, 0, ROW)).collect(), Durability::Now)
        .await
        .expect("append");
    assert_eq!((out.stored, out.refusal()), (5, Some(Refusal::StoreFull)));
    assert_eq!(
        topics_of(&out.refused.expect("rows").rows),
        ["t/008", "t/009"]
    );
    assert_eq!(
        topics(&all_rows(&h).await),
        ["t/003", "t/004", "t/005", "t/006", "t/007"]
    );
    let stats = h.stats().await.expect("stats");
    assert_eq!(
        stats.dropped.store_full, 2,
        "the two evicted rows, not the offered ones"
    );
    close(opened).await;
}

#[tokio::test]
async fn after_drop_newest_refused_a_row_the_store_opens_again_once_the_backlog_shrank() {
    let (_dir, mut cfg) = temp_config();
    const ROW: u64 = 20_000;
    cfg.max_bytes = ByteSize(100 * ROW);
    cfg.when_full = WhenFull::DropNewest;
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let out = h
        .offer(
            (0..101).map(|n| sized(n, 0, ROW)).collect(),
            Durability::Now,
        )
        .await
        .expect("append");
    assert_eq!((out.stored, out.refusal()), (100, Some(Refusal::StoreFull)));
    assert!(!h.stats().await.expect("stats").admission.is_open());
    let rows = all_rows(&h).await;
    // One acknowledged row frees 20 kB: the refused row fits again, but the store stays
    // refusing (the next one would not), short of the hysteresis (64 KiB here).
    h.ack(vec![rows[0].id]);
    wait_for_stats(&h, Duration::from_secs(5), |s| s.rows == 99).await;
    let again = h
        .offer(out.refused.expect("rows").rows, Durability::Now)
        .await
        .expect("append");
    assert_eq!(again.stored, 1);
    assert!(!h.stats().await.expect("stats").admission.is_open());
    h.ack(rows[1..5].iter().map(|r| r.id).collect());
    wait_admission(&h, Admission::is_open).await;
    close(opened).await;
}

#[tokio::test]
async fn corruption_found_at_runtime_stops_the_store_and_wakes_the_supervisor() {
    let (_dir, cfg) = temp_config();
    filled_store(&cfg.path, 300).await;
    // A two-page cache forces reads from the file, where the damage is.
    let probes = Probes {
        disk: None,
        pragmas: vec![("cache_size", 2)],
    };
    let opened = Store::open_with(&cfg, probes).expect("open a healthy file");
    let h = opened.0.clone();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&cfg.path)
            .expect("open for damage");
        use std::io::{Seek, SeekFrom};
        for page in 2..40u64 {
            f.seek(SeekFrom::Start(page * 4096)).expect("seek");
            f.write_all(&[0xA5; 4096]).expect("damage");
        }
    }
    let fetched = h.fetch(&Cursor::default(), 10_000).await;
    assert!(fetched.is_err(), "corrupt pages must not read as rows");
    let reason = tokio::time::timeout(Duration::from_secs(5), h.failed())
        .await
        .expect("the supervisor is woken");
    assert!(matches!(reason, StoreError::Failed(_)), "{reason}");
    let after = h.append(vec![msg("x", 0)], Durability::Now).await;
    assert!(matches!(after, Err(StoreError::Failed(_))), "{after:?}");
    opened.2.join().expect("thread exits");

    let reopened = Store::open(&cfg).expect("next start recovers");
    assert!(reopened.1.quarantined.is_some());
    close(reopened).await;
}

#[test]
fn times_and_payloads_are_formatted_for_people() {
    assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_utc(1_764_237_600_123), "2025-11-27T10:00:00.123Z");
    assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(rfc3339_utc(-1000), "1969-12-31T23:59:59.000Z");
    assert_eq!(
        Utc::from_unix_ms(1_764_237_600_123).compact(),
        "20251127T100000"
    );
    assert_eq!(base64(b"Man"), "TWFu");
    assert_eq!(base64(b"Ma"), "TWE=");
    assert_eq!(base64(b"M"), "TQ==");
    assert_eq!(base64(b""), "");
    assert_eq!(base64(&[0xff, 0xfe]), "//4=");
}

#[test]
fn drop_counters_name_every_reason() {
    let c = DropCounters {
        store_full: 1,
        expired: 2,
        disk_full: 3,
        unwritable: 4,
    };
    assert_eq!(
        c.iter().collect::<Vec<_>>(),
        [
            ("store_full", 1),
            ("expired", 2),
            ("disk_full", 3),
            ("unwritable", 4)
        ]
    );
    assert_eq!(c.total(), 10);
}

// ---------------------------------------------------------------------------------------------
// Property test: append / fetch / ack / crash / reopen against a model.

#[derive(Clone, Debug)]
enum Op {
    Append {
        n: usize,
        priority: u8,
        now: bool,
        wait: bool,
    },
    Ack(Vec<prop::sample::Index>),
    Fetch,
    /// Drop the handle without close(), join the thread, reopen.
    Crash,
    /// close(), join, reopen.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..4, 0u8..3, any::<bool>(), any::<bool>())
            .prop_map(|(n, priority, now, wait)| Op::Append { n, priority, now, wait }),
        3 => prop::collection::vec(any::<prop::sample::Index>(), 0..4).prop_map(Op::Ack),
        1 => Just(Op::Fetch),
        1 => Just(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Appended, commit not yet observed: may be lost by a crash.
    Maybe,
    Committed,
    /// Ack sent, delete not yet observed: may come back after a crash.
    AckPending,
    /// Delete known to be committed: must never come back.
    Gone,
}

#[derive(Debug)]
struct ModelRow {
    priority: u8,
    id: Option<i64>,
    state: State,
}

#[derive(Default)]
struct Model {
    rows: BTreeMap<u64, ModelRow>,
    /// Every id ever observed, and the message it belonged to: ids are never reused.
    id_owner: HashMap<i64, u64>,
    next_seq: u64,
}

impl Model {
    /// Everything sent before a resolved append (or a close) is committed.
    fn barrier(&mut self) {
        for row in self.rows.values_mut() {
            row.state = match row.state {
                State::Maybe => State::Committed,
                State::AckPending | State::Gone => State::Gone,
                State::Committed => State::Committed,
            };
        }
    }

    /// Checks a full fetch against the model. `after_crash`: unconfirmed work may be lost.
    fn observe(&mut self, rows: &[StoredMessage], after_crash: bool) -> Result<(), TestCaseError> {
        let mut seen = HashMap::new();
        let mut last: Option<(u8, i64, u64)> = None;
        for m in rows {
            let seq: u64 = m
                .topic
                .strip_prefix("m/")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| TestCaseError::fail(format!("unknown row {m:?}")))?;
            let model = self
                .rows
                .get_mut(&seq)
                .ok_or_else(|| TestCaseError::fail(format!("phantom row {m:?}")))?;
            prop_assert_eq!(model.priority, m.priority);
            prop_assert!(model.state != State::Gone, "acked row came back: {:?}", m);
            prop_assert!(
                after_crash || model.state != State::AckPending,
                "a row whose ack is queued was fetched again: {:?}",
                m
            );
            if let Some(id) = model.id {
                prop_assert_eq!(id, m.id, "a row's id changed");
            }
            model.id = Some(m.id);
            if let Some(owner) = self.id_owner.insert(m.id, seq) {
                prop_assert_eq!(owner, seq, "id {} reused", m.id);
            }
            if let Some((p, id, s)) = last {
                prop_assert!(p >= m.priority, "priority order broken");
                if p == m.priority {
                    prop_assert!(id < m.id && s < seq, "order within a priority broken");
                }
            }
            last = Some((m.priority, m.id, seq));
            seen.insert(seq, ());
            if model.state == State::Maybe {
                model.state = State::Committed;
            }
        }
        for (seq, row) in self.rows.iter_mut() {
            if seen.contains_key(seq) {
                if after_crash && row.state == State::AckPending {
                    // The crash came before its delete committed: a duplicate, not a loss.
                    row.state = State::Committed;
                }
                continue;
            }
            match row.state {
                State::Committed => {
                    return Err(TestCaseError::fail(format!(
                        "committed, unacked message m/{seq} lost"
                    )))
                }
                // Hidden while its ack is queued; gone for sure once a crash did not bring it back.
                State::AckPending if after_crash => row.state = State::Gone,
                State::AckPending => {}
                State::Maybe if after_crash => row.state = State::Gone,
                State::Maybe | State::Gone => {}
            }
        }
        self.rows
            .retain(|_, r| r.state != State::Gone || r.id.is_some());
        Ok(())
    }
}

async fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path().join("buffer.db"));
    cfg.commit_interval = HumanDuration::from_millis(2);
    let mut model = Model::default();
    let (mut h, _, mut join) = Store::open(&cfg).expect("open");

    for op in ops {
        match op {
            Op::Append {
                n,
                priority,
                now,
                wait,
            } => {
                let mut msgs = Vec::new();
                for _ in 0..n {
                    let seq = model.next_seq;
                    model.next_seq += 1;
                    msgs.push(msg(&format!("m/{seq}"), priority));
                    model.rows.insert(
                        seq,
                        ModelRow {
                            priority,
                            id: None,
                            state: State::Maybe,
                        },
                    );
                }
                let durability = if now {
                    Durability::Now
                } else {
                    Durability::Linger
                };
                let pending = h.append(msgs, durability);
                if wait {
                    let out = pending.await.expect("append");
                    prop_assert_eq!((out.stored, out.refusal()), (n, None));
                    model.barrier();
                }
            }
            Op::Ack(picks) => {
                let rows = all_rows(&h).await;
                model.observe(&rows, false)?;
                if !rows.is_empty() {
                    let chosen: Vec<i64> =
                        picks.iter().map(|i| rows[i.index(rows.len())].id).collect();
                    for id in &chosen {
                        let seq = model.id_owner[id];
                        if let Some(row) = model.rows.get_mut(&seq) {
                            if row.state == State::Committed {
                                row.state = State::AckPending;
                            }
                        }
                    }
                    h.ack(chosen);
                }
            }
            Op::Fetch => {
                let rows = all_rows(&h).await;
                model.observe(&rows, false)?;
            }
            Op::Crash | Op::Reopen => {
                let crash = matches!(op, Op::Crash);
                if crash {
                    drop(h);
                } else {
                    h.close().await.expect("close");
                    drop(h);
                    model.barrier();
                }
                join.join().expect("thread exits");
                let opened = Store::open(&cfg).expect("reopen");
                prop_assert_eq!(opened.1.quarantined.clone(), None);
                (h, _, join) = opened;
                let rows = all_rows(&h).await;
                model.observe(&rows, crash)?;
            }
        }
    }
    h.close().await.expect("close");
    model.barrier();
    drop(h);
    join.join().expect("thread exits");
    let (h, _, join) = Store::open(&cfg).expect("final reopen");
    let rows = all_rows(&h).await;
    model.observe(&rows, false)?;
    h.close().await.expect("close");
    drop(h);
    join.join().expect("thread exits");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_committed_unacked_row_is_ever_lost_across_acks_crashes_and_reopens(
        ops in prop::collection::vec(op(), 1..30)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run_ops(ops))?;
    }
}

// ---------------------------------------------------------------------------------------------

/// Bytes this process has caused to be written to storage (Linux `/proc/self/io`).
fn write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `cargo test --lib store::tests::throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check: prints rows/s and bytes written per row"]
async fn throughput_of_100k_100_byte_rows_with_sync_full_and_linger() {
    const ROWS: usize = 100_000;
    let dir = tempfile::tempdir_in(std::env::current_dir().expect("cwd")).expect("tempdir");
    let mut cfg = config(dir.path().join("buffer.db"));
    cfg.sync = SyncMode::Full;
    cfg.commit_interval = HumanDuration::from_millis(10);
    cfg.commit_max_rows = 1000;
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let payload = Bytes::from(vec![b'x'; 100]);
    let created_ms = now_ms();

    let written_before = write_bytes();
    let start = Instant::now();
    let mut last = None;
    for n in 0..ROWS {
        let m = NewMessage {
            topic: "sensors/bench/temperature".to_string(),
            payload: payload.clone(),
            qos: 1,
            retain: false,
            priority: (n % 2) as u8,
            created_ms,
        };
        // One message per append, as the intake does it; only the last is awaited.
        last = Some(h.append(vec![m], Durability::Linger));
    }
    let out = last.expect("appended").await.expect("append");
    let elapsed = start.elapsed();
    let committed_written = write_bytes();
    let commits = *h.committed().borrow();
    assert_eq!(out.stored, 1);
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.rows, ROWS as u64);
    drop(h);
    close(opened).await;
    let closed_written = write_bytes();

    println!(
        "{ROWS} rows of 100 B, sync full, linger 10 ms, ≤1000 rows/txn: {:.0} rows/s ({:.2} s, \
         {commits} transactions, {:.0} rows each)",
        ROWS as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        ROWS as f64 / commits.max(1) as f64
    );
    if let (Some(a), Some(b), Some(c)) = (written_before, committed_written, closed_written) {
        println!(
            "bytes written per row: {:.0} until the last commit, {:.0} including the close checkpoint",
            (b - a) as f64 / ROWS as f64,
            (c - a) as f64 / ROWS as f64
        );
    } else {
        println!("bytes written per row: /proc/self/io unavailable");
    }
}

/// A store file as edgegate 0.1 (schema 1) wrote it: AUTOINCREMENT ids, a `(priority, id)`
/// index, the topic text in every row.
fn write_schema_1_store(path: &Path) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    let conn = rusqlite::Connection::open(path).expect("create");
    conn.execute_batch(
        "PRAGMA page_size = 4096;
         PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA journal_mode = WAL;
         PRAGMA application_id = 1162299220;
         CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
         CREATE TABLE messages (
             id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
             qos INTEGER NOT NULL, retain INTEGER NOT NULL, priority INTEGER NOT NULL,
             created_ms INTEGER NOT NULL, size INTEGER NOT NULL);
         CREATE INDEX messages_by_priority ON messages (priority, id);
         INSERT INTO meta VALUES ('schema_version', 1), ('dropped.expired', 7);
         INSERT INTO messages (topic, payload, qos, retain, priority, created_ms, size) VALUES
             ('a/low', x'01', 1, 0, 0, 1000, 70),
             ('a/high', x'02', 1, 1, 9, 1001, 71),
             ('a/low', x'03', 0, 0, 0, 1002, 70),
             ('a/acked', x'04', 1, 0, 0, 1003, 72),
             ('a/high', x'05', 2, 0, 9, 1004, 71);
         DELETE FROM messages WHERE topic = 'a/acked';",
    )
    .expect("writing a schema 1 store");
}

/// seq, topic, payload, qos, retain, priority, created_ms
type Row<'a> = (i64, &'a str, &'a [u8], u8, bool, u8, i64);

#[tokio::test]
async fn a_schema_1_store_is_migrated_at_open_keeping_rows_order_ids_and_counters() {
    let (_dir, cfg) = temp_config();
    write_schema_1_store(&cfg.path);
    let opened = Store::open(&cfg).expect("open migrates");
    assert_eq!((opened.1.rows, opened.1.bytes), (4, 282));
    assert_eq!(opened.1.quarantined, None);
    let h = opened.0.clone();
    let rows = all_rows(&h).await;
    let seen: Vec<Row<'_>> = rows
        .iter()
        .map(|m| {
            let (seq, t, p) = (m.seq(), m.topic.as_str(), &m.payload[..]);
            (seq, t, p, m.qos, m.retain, m.priority, m.created_ms)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (2, "a/high", &[2u8][..], 1, true, 9, 1001),
            (5, "a/high", &[5u8][..], 2, false, 9, 1004),
            (1, "a/low", &[1u8][..], 1, false, 0, 1000),
            (3, "a/low", &[3u8][..], 0, false, 0, 1002),
        ]
    );
    let stats = h.stats().await.expect("stats");
    assert_eq!(stats.dropped.expired, 7);
    assert_eq!(stats.oldest_created_ms, Some(1000));
    // Id 4 was used (and acked) before the upgrade: never handed out again.
    let out = h
        .append(vec![msg("a/new", 0)], Durability::Now)
        .await
        .expect("append");
    let new = all_rows(&h)
        .await
        .into_iter()
        .find(|m| Some(m.id) == out.last_id)
        .expect("the new row");
    assert_eq!((new.seq(), new.topic.as_str()), (6, "a/new"));
    h.ack(rows.iter().map(|m| m.id).collect());
    close(opened).await;

    let ro = ReadOnlyStore::open(&cfg.path).expect("read-only open of the migrated file");
    let mut out = Vec::new();
    assert_eq!(ro.export(&mut out, None).expect("export"), 1);
    let line = String::from_utf8(out).expect("utf-8");
    assert!(
        line.contains("\"id\":6") && line.contains("a/new"),
        "{line}"
    );
}

#[tokio::test]
async fn a_new_store_uses_1_kib_pages_and_keeps_each_topic_once() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let batch: Vec<NewMessage> = (0..50).map(|i| msg(&format!("t/{}", i % 3), 0)).collect();
    h.append(batch, Durability::Now).await.expect("append");
    h.append(vec![msg("t/1", 2)], Durability::Now)
        .await
        .expect("append");
    close(opened).await;

    let conn = rusqlite::Connection::open(&cfg.path).expect("open with sqlite");
    let page: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .expect("page_size");
    let topics: i64 = conn
        .query_row("SELECT count(*) FROM topics", [], |r| r.get(0))
        .expect("topics");
    assert_eq!((page, topics), (1024, 3));
}

#[tokio::test]
async fn unused_topics_are_deleted_once_the_queue_is_empty_and_new_ones_still_resolve() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    let count = |path: &Path| -> i64 {
        let conn = rusqlite::Connection::open(path).expect("open with sqlite");
        conn.query_row("SELECT count(*) FROM topics", [], |r| r.get(0))
            .expect("topics")
    };
    // A few topics stay while the queue is empty: a forwarder that keeps up would otherwise
    // make every device's topic be inserted again after each cleanup.
    h.append(vec![msg("kept/a", 0), msg("kept/b", 0)], Durability::Now)
        .await
        .expect("append");
    h.ack(ids(&all_rows(&h).await));
    // The sweep runs at least once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&cfg.path), 2, "a few topics were deleted at once");

    let many = super::worker::TOPIC_GC_EMPTY_AFTER as usize;
    h.append(
        (0..many).map(|i| msg(&format!("gone/{i}"), 0)).collect(),
        Durability::Now,
    )
    .await
    .expect("append");
    h.ack(ids(&all_rows(&h).await));
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&cfg.path) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&cfg.path), 0, "unused topics left in the table");
    h.append(vec![msg("gone/a", 0)], Durability::Now)
        .await
        .expect("append after cleanup");
    assert_eq!(topics(&all_rows(&h).await), ["gone/a"]);
    close(opened).await;
}

#[tokio::test]
async fn the_file_shrinks_after_a_large_backlog_drains() {
    let (_dir, cfg) = temp_config();
    let opened = Store::open(&cfg).expect("open");
    let h = opened.0.clone();
    for chunk in 0..20 {
        let batch: Vec<NewMessage> = (0..500).map(|i| sized(chunk * 500 + i, 0, 1000)).collect();
        h.append(batch, Durability::Now).await.expect("append");
    }
    let full = h.stats().await.expect("stats").file_bytes;
    assert!(full > 8 << 20, "10 000 rows of 1 000 B take {full} bytes");
    let mut cursor = Cursor::default();
    loop {
        let rows = h.fetch(&cursor, 2000).await.expect("fetch");
        if rows.is_empty() {
            break;
        }
        rows.iter().for_each(|m| cursor.advance(m));
        h.ack(ids(&rows));
    }
    let stats = wait_for_stats(&h, Duration::from_secs(10), |s| {
        s.rows == 0 && s.file_bytes < full / 4
    })
    .await;
    assert_eq!(stats.rows, 0);
    assert!(
        stats.file_bytes < full / 4,
        "file still {} bytes after draining (was {full})",
        stats.file_bytes
    );
    // Still usable after the VACUUM.
    h.append(vec![msg("after", 0)], Durability::Now)
        .await
        .expect("append after vacuum");
    assert_eq!(topics(&all_rows(&h).await), ["after"]);
    close(opened).await;
}
