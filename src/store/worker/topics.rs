//! Topic interning: each row names its topic by id; new topics are added in the row's
//! transaction, remembered once it commits, and unused ones deleted now and then.

use super::*;

impl Worker {
    /// The `topics.id` of `topic`, adding it to the table when it is new. What this
    /// transaction learns goes to the cache only after it commits.
    pub(super) fn topic_id(&self, topic: &str, txn: &mut TxnResult) -> rusqlite::Result<i64> {
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
    pub(super) fn collect_topics(&mut self) -> rusqlite::Result<()> {
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
}
