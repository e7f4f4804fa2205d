//! The worker's sweep (at most every second, idle or not): expiry, the disk check while
//! refusing (and releasing the reserve when a checkpoint cannot finish), rate-limited drop
//! logs, incremental vacuum; and what the database and its log look like to the disk check.

use super::*;

impl Worker {
    /// Housekeeping: expiry, drop-log flush, disk probe, incremental vacuum.
    pub(super) fn sweep(&mut self, now: Instant) -> Result<(), String> {
        if let Some(max_age) = self.settings.max_age {
            let cutoff = crate::shared::now_ms().saturating_sub(max_age.as_millis() as i64);
            match self.expire(cutoff) {
                Ok(()) => {}
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DiskFull) => {
                    tracing::warn!(error = %e, "store expiry sweep postponed: disk full");
                }
                Err(e) if is_corruption(&e) => return Err(format!("expiry sweep: {e}")),
                Err(e) => tracing::warn!(error = %e, "store expiry sweep failed; will retry"),
            }
        }
        self.recheck_admission(now);
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

    /// While refusing, whether the cause is gone; while open, takes the reserve back if it was
    /// released.
    pub(super) fn recheck_admission(&mut self, now: Instant) {
        let files = |w: &Self| file_state(&w.conn, &w.settings, w.space.layout());
        match self.admission.clone() {
            Admission::Open => {
                if !self.space.reserve_held() {
                    if let Some(r) = self.space.read(now) {
                        self.space.take_reserve(r);
                    }
                }
            }
            Admission::Refusing {
                reason: Refusal::StoreFull,
                ..
            } => {
                if self.budget_has_room() {
                    self.set_admission(None, None);
                }
            }
            Admission::Refusing {
                reason: Refusal::DiskFull,
                ..
            } => {
                if self.unwritable.is_some_and(|(_, at)| now < at) {
                    return;
                }
                let state = files(self);
                if self.space.check(now, || state).is_ok() {
                    self.unwritable = None;
                    self.set_admission(None, None);
                    return;
                }
                if state.pending_growth > 0 && self.space.reserve_held() {
                    // The log holds pages beyond the database file's end and the filesystem
                    // has no byte for them: the checkpoint cannot finish, the log is never
                    // reused from its start, and nothing fits even after the backlog drained.
                    // This is what the reserve is for.
                    if self.space.release_reserve() {
                        tracing::warn!(
                            growth = state.pending_growth,
                            "disk full: the store's reserve was released so its log could be checkpointed into the database; it is taken back once space returns"
                        );
                    }
                    if let Err(e) =
                        self.conn
                            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %e, "checkpoint on a full disk failed");
                    }
                    let state = files(self);
                    if self.space.check(now, || state).is_ok() {
                        self.unwritable = None;
                        self.set_admission(None, None);
                    }
                }
            }
            Admission::Refusing { reason, .. } => {
                if self.unwritable.is_some_and(|(_, at)| now < at) {
                    return;
                }
                if self.space.read(now).is_some_and(|r| r.read_only) {
                    self.unwritable = Some((Refusal::ReadOnly, now + UNWRITABLE_RETRY));
                    return;
                }
                // A write of one page says whether writing works again.
                let probe = self.in_transaction(|w| {
                    w.conn.execute(
                        "UPDATE meta SET value = value WHERE key = 'schema_version'",
                        [],
                    )
                });
                match probe {
                    Ok(_) => {
                        self.unwritable = None;
                        tracing::info!(was = reason.name(), "the store is writable again");
                        self.set_admission(None, None);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the store is still not writable");
                        self.unwritable = Some((reason, now + UNWRITABLE_RETRY));
                    }
                }
            }
        }
    }

    pub(super) fn expire(&mut self, cutoff_ms: i64) -> rusqlite::Result<()> {
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
        self.unpersisted = [0; 4];
        for &(id, size) in &gone {
            self.totals
                .remove(crate::store::priority_of(id), size as u64);
            self.freed_since_vacuum += size as u64;
        }
        let n = gone.len() as u64;
        self.dropped.add(DropReason::Expired, n);
        self.drop_log.record(DropReason::Expired, n, Instant::now());
        Ok(())
    }

    pub(super) fn vacuum_step(&mut self) -> rusqlite::Result<()> {
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
}

/// What the database file and its log look like now, for `space`.
pub(super) fn file_state(conn: &Connection, settings: &Settings, layout: Layout) -> FileState {
    let pages = |pragma: &str| -> u64 {
        conn.pragma_query_value(None, pragma, |r| r.get::<_, i64>(0))
            .map_or(0, |v| v.max(0) as u64)
    };
    let logical = pages("page_count") * layout.page_size;
    let file = std::fs::metadata(&settings.path).map_or(0, |m| m.len());
    // (busy, frames in the log, frames checkpointed): a passive checkpoint waits for nobody.
    let wal_used = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
        .map_or(u64::MAX / 4, |(log, done)| {
            if log >= 0 && log == done {
                0
            } else {
                (log.max(0) as u64) * (layout.page_size + 24) + 32
            }
        });
    FileState {
        wal_used,
        wal_len: std::fs::metadata(&settings.wal_path).map_or(0, |m| m.len()),
        pending_growth: logical.saturating_sub(file),
        free_pages: pages("freelist_count") * layout.page_size,
    }
}
