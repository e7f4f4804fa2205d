//! `drop_oldest`: making room inside one transaction by deleting committed rows, lowest
//! priority first and oldest first within it, of a priority no higher than the new row's.

use super::*;

/// drop_oldest within one transaction: deletes committed rows, lowest priority first and
/// oldest first within it, of a priority no higher than the row they make room for.
pub(super) struct Evictor {
    /// Sequence numbers from here on were inserted by this transaction.
    first_new_seq: i64,
    /// Candidates read for `band`, oldest first.
    queue: std::collections::VecDeque<(i64, i64)>,
    band: Option<u8>,
    /// Last id taken from `band` (the next read starts after it).
    after: i64,
}

impl Evictor {
    pub(super) fn new(first_new_seq: i64) -> Evictor {
        Evictor {
            first_new_seq,
            queue: std::collections::VecDeque::new(),
            band: None,
            after: 0,
        }
    }

    /// Evicts until `size` more bytes fit `max_bytes`; `false` when rows of priority at most
    /// `priority` committed before this transaction do not free enough.
    pub(super) fn make_room(
        &mut self,
        conn: &Connection,
        txn: &mut TxnResult,
        size: u64,
        priority: u8,
        max_bytes: u64,
    ) -> rusqlite::Result<bool> {
        let mut del = conn.prepare_cached("DELETE FROM messages WHERE id = ?1")?;
        // Each pass removes a row or moves to a higher band, so this ends.
        let mut passes = txn.totals.rows as usize + 257;
        while txn.totals.bytes + size > max_bytes && passes > 0 {
            passes -= 1;
            if self.queue.is_empty() && !self.refill(conn, txn, priority)? {
                return Ok(false);
            }
            let Some((id, bytes)) = self.queue.pop_front() else {
                continue;
            };
            del.execute([id])?;
            let p = crate::store::priority_of(id);
            txn.totals.remove(p, bytes as u64);
            txn.dropped[DropReason::StoreFull.index()] += 1;
            txn.freed_bytes += bytes as u64;
        }
        Ok(txn.totals.bytes + size <= max_bytes)
    }

    /// Reads the next candidates: the lowest band at or below `priority` with old rows left.
    pub(super) fn refill(
        &mut self,
        conn: &Connection,
        txn: &TxnResult,
        priority: u8,
    ) -> rusqlite::Result<bool> {
        let mut pick = conn.prepare_cached(
            "SELECT id, size FROM messages WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
        )?;
        let bands: Vec<u8> = txn
            .totals
            .per_priority
            .keys()
            .copied()
            .filter(|&p| p <= priority && self.band.is_none_or(|b| p >= b))
            .collect();
        for p in bands {
            let (lo, _) = band(p);
            let hi = crate::store::row_id(p, self.first_new_seq) - 1;
            let start = if self.band == Some(p) {
                self.after.max(lo - 1)
            } else {
                lo - 1
            };
            let rows: Vec<(i64, i64)> = pick
                .query_map(params![start, hi, EVICT_CHUNK], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            if let Some(&(last, _)) = rows.last() {
                self.band = Some(p);
                self.after = last;
                self.queue.extend(rows);
                return Ok(true);
            }
        }
        Ok(false)
    }
}
