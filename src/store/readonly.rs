//! Read-only access for `edgegate buffer stats|export`, safe next to a running daemon: WAL lets a
//! reader see the last committed state without blocking the writer.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::schema::{self, read_message, MESSAGE_COLUMNS};
use super::{PriorityStats, StoreError, StoreStats};
use crate::codec::time::Utc;

pub struct ReadOnlyStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for ReadOnlyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadOnlyStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ReadOnlyStore {
    /// Opens an existing store without creating, changing or moving anything.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::NotAStore {
                path: path.to_path_buf(),
                reason: "no such file".to_string(),
            });
        }
        Ok(ReadOnlyStore {
            conn: schema::open_reader(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Rows and bytes queued, per priority, and the drop counters kept in the file. The
    /// appended/acked totals live in the running daemon and are zero here.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let sql = |source| StoreError::Sqlite {
            what: "reading statistics",
            source,
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT 255 - (id >> 48), count(*), coalesce(sum(size), 0) FROM messages
                 GROUP BY 1 ORDER BY 1 DESC",
            )
            .map_err(sql)?;
        let per_priority: Vec<PriorityStats> = stmt
            .query_map([], |r| {
                Ok(PriorityStats {
                    priority: r.get(0)?,
                    rows: r.get::<_, i64>(1)?.max(0) as u64,
                    bytes: r.get::<_, i64>(2)?.max(0) as u64,
                })
            })
            .map_err(sql)?
            .collect::<rusqlite::Result<_>>()
            .map_err(sql)?;
        let priorities: Vec<u8> = per_priority.iter().map(|p| p.priority).collect();
        let oldest_created_ms = schema::oldest_created_ms(&self.conn, &priorities).map_err(sql)?;
        Ok(StoreStats {
            rows: per_priority.iter().map(|p| p.rows).sum(),
            bytes: per_priority.iter().map(|p| p.bytes).sum(),
            oldest_created_ms,
            per_priority,
            dropped: super::DropCounters::load(&self.conn).map_err(sql)?,
            file_bytes: super::file_bytes(&self.path),
            free_disk_bytes: super::space::statvfs_probe(&super::store_dir(&self.path))
                .map(|r| r.free),
            ..StoreStats::default()
        })
    }

    /// Writes queued rows in drain order (highest priority first, oldest first within it) as
    /// JSON lines: `{"id","topic","payload" | "payload_base64","qos","retain","priority",
    /// "created"}` — `payload` when it is valid UTF-8, else `payload_base64`; `created` is
    /// RFC 3339 UTC with milliseconds. Returns the number of rows written.
    pub fn export(&self, out: &mut dyn Write, limit: Option<u64>) -> Result<u64, StoreError> {
        let sql = |source| StoreError::Sqlite {
            what: "reading queued messages for export",
            source,
        };
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM queue ORDER BY id LIMIT ?1"
            ))
            .map_err(sql)?;
        let rows = stmt.query_map([limit], read_message).map_err(sql)?;
        let mut written = 0u64;
        for row in rows {
            let m = row.map_err(sql)?;
            let mut obj = serde_json::Map::new();
            obj.insert("id".into(), m.seq().into());
            obj.insert("topic".into(), m.topic.into());
            match std::str::from_utf8(&m.payload) {
                Ok(text) => obj.insert("payload".into(), text.into()),
                Err(_) => obj.insert("payload_base64".into(), base64(&m.payload).into()),
            };
            obj.insert("qos".into(), m.qos.into());
            obj.insert("retain".into(), m.retain.into());
            obj.insert("priority".into(), m.priority.into());
            obj.insert("created".into(), rfc3339_utc(m.created_ms).into());
            let io = |source| StoreError::Io {
                what: "writing the export",
                source,
            };
            serde_json::to_writer(&mut *out, &obj).map_err(|e| io(e.into()))?;
            out.write_all(b"\n").map_err(io)?;
            written += 1;
        }
        out.flush().map_err(|source| StoreError::Io {
            what: "writing the export",
            source,
        })?;
        Ok(written)
    }
}

/// `2026-11-27T10:00:00.123Z` (before 1970 too: an export shows what the row holds).
pub(super) fn rfc3339_utc(ms: i64) -> String {
    Utc::from_unix_ms(ms).rfc3339()
}

/// Standard base64 with padding (RFC 4648 §4).
pub(super) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
