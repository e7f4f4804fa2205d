//! Disk space: whether a transaction may add rows, and the reserve that lets deletes commit on a
//! full filesystem.
//!
//! # Why a reserve
//! In WAL mode a transaction that only deletes rows still appends pages to the write-ahead log,
//! and a checkpoint writes those pages into the database file, which grows when the log holds
//! pages past its end. On a filesystem at 0 bytes free (filled by us or by anyone else) neither
//! can happen: acknowledged rows could not be deleted, the backlog would never shrink and the
//! store would be wedged until an operator freed space. So the store keeps a file of its own,
//! `<store>.reserve`, allocated while space is plentiful. When a commit that deletes rows fails
//! for lack of space, the reserve is released, the log is checkpointed into the space it freed
//! and the deletes are committed; once free space is back the reserve is taken again. While the
//! reserve is released, no new rows are admitted.
//!
//! # The headroom is real
//! `min_free_disk` is judged against what the store will need, not only what the filesystem
//! reports now: the write-ahead log is capped ([`Layout::wal_cap`], by `wal_autocheckpoint`
//! and `journal_size_limit`), and the room it may still grow into, the pages the log holds past
//! the end of the database file (which a checkpoint will add) and an estimate of what the new
//! rows need beyond the database's free pages are all subtracted before comparing. Every
//! transaction that adds rows reads the filesystem again: one `statvfs`, answered from the
//! kernel's counters without disk I/O, so another program filling the disk is seen at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What one reading of the filesystem holding the store says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DiskReading {
    /// Bytes an unprivileged writer may still allocate.
    pub free: u64,
    /// Size of the filesystem.
    pub total: u64,
    /// Mounted (or remounted, after an error) read-only.
    pub read_only: bool,
}

/// Reads the filesystem holding a directory; `None` when it cannot be read.
pub(crate) type DiskProbe = Arc<dyn Fn(&Path) -> Option<DiskReading> + Send + Sync>;

/// The real probe: `statvfs(2)`.
pub(crate) fn statvfs_probe(dir: &Path) -> Option<DiskReading> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(DiskReading {
        free: s.f_bavail.saturating_mul(s.f_frsize),
        total: s.f_blocks.saturating_mul(s.f_frsize),
        read_only: s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY),
    })
}

/// Whether creating a file in `dir` fails with EROFS. Since Linux 6.9 an ext4 error remount
/// (`errors=remount-ro`) no longer shows in `statvfs`'s flags, but writes fail with EROFS; SQLite
/// reports those only as an I/O error. Only called after a write failed.
pub(crate) fn refuses_writes(dir: &Path) -> bool {
    let probe = dir.join(".edgegate-write-probe");
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe);
    match result {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            false
        }
        Err(e) => e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()),
    }
}

/// Bounds of the write-ahead log's cap: it scales with the filesystem (1/32 of it), so a tiny
/// data partition does not give most of itself to the log and the reserve.
const WAL_CAP_MIN: u64 = 128 * 1024;
const WAL_CAP_MAX: u64 = 1024 * 1024;
/// Bytes a new row costs in the file beyond its charged size, as a fraction (pages are not
/// full: interior pages, cell pointers, free space left by deletes).
const ROW_FILL_NUM: u64 = 3;
const ROW_FILL_DEN: u64 = 2;
/// Accepting resumes only with this much room beyond the limit, so the store does not flip
/// between refusing and accepting with every acknowledgement.
const HYSTERESIS_MIN: u64 = 64 * 1024;

/// Sizes chosen at open for this store's file and filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub page_size: u64,
    /// Most bytes the write-ahead log may hold before it is checkpointed and truncated.
    pub wal_cap: u64,
    /// Size of the reserve file: a whole log's worth of checkpoint growth, plus a margin.
    pub reserve: u64,
}

impl Layout {
    pub fn new(page_size: u64, fs_total: Option<u64>) -> Layout {
        let page_size = page_size.max(512);
        let scaled = fs_total.map_or(WAL_CAP_MAX, |t| t / 32);
        // At least 64 pages, whatever the page size: a log smaller than a few transactions
        // would be checkpointed after nearly every commit.
        let wal_cap = scaled.clamp(WAL_CAP_MIN, WAL_CAP_MAX).max(64 * page_size);
        Layout {
            page_size,
            wal_cap,
            reserve: wal_cap + wal_cap / 4,
        }
    }

    /// `wal_autocheckpoint`, in pages.
    pub fn autocheckpoint_pages(&self) -> i64 {
        (self.wal_cap / self.page_size).max(16) as i64
    }
}

/// What the database file and its log look like now (read by the worker only when a decision
/// is close: it runs a passive checkpoint).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FileState {
    /// Length of the `-wal` file.
    pub wal_len: u64,
    /// Bytes of the log the next transaction cannot overwrite (0 once every frame is
    /// checkpointed: the next writer starts the log again from its beginning).
    pub wal_used: u64,
    /// Bytes the next checkpoint adds to the database file (pages in the log past its end).
    pub pending_growth: u64,
    /// Bytes in the database's free pages, reusable without growing the file.
    pub free_pages: u64,
}

/// Why no new rows are admitted because of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Short {
    /// Below `min_free_disk`, counting what the store will still need.
    Headroom {
        free: u64,
    },
    /// The reserve is released (a full filesystem made us use it) and cannot be taken again.
    NoReserve {
        free: u64,
    },
    ReadOnly,
}

pub(crate) struct Space {
    probe: DiskProbe,
    dir: PathBuf,
    reserve_path: PathBuf,
    min_free: u64,
    layout: Layout,
    reserve_held: bool,
    last: Option<(Instant, DiskReading)>,
    /// Refusing because of the disk: accepting resumes only past the hysteresis.
    short: bool,
}

impl Space {
    pub fn new(
        probe: DiskProbe,
        db_path: &Path,
        dir: &Path,
        min_free: u64,
        layout: Layout,
    ) -> Space {
        Space {
            probe,
            dir: dir.to_path_buf(),
            reserve_path: reserve_path(db_path),
            min_free,
            layout,
            reserve_held: false,
            last: None,
            short: false,
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The directory holding the store (where the filesystem is probed).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn reserve_held(&self) -> bool {
        self.reserve_held
    }

    /// The last reading, fresh or not (for `status`).
    pub fn last_reading(&self) -> Option<DiskReading> {
        self.last.map(|(_, r)| r)
    }

    /// A fresh reading (also remembered).
    pub fn read(&mut self, now: Instant) -> Option<DiskReading> {
        let r = (self.probe)(&self.dir);
        if let Some(r) = r {
            self.last = Some((now, r));
        }
        r
    }

    /// How much of `wanted` (bytes charged for new rows, in their order) a transaction may add
    /// now: `wanted` itself when all of it fits, less when only a first part does, `Err` when
    /// not even a row would. `files` describes the database and its log; it is read only when
    /// the decision is close.
    ///
    /// Rows that need no space from the filesystem (they fit the database's free pages, the log
    /// has room within its file and no checkpoint growth is pending) are always admitted: they
    /// cannot fill the disk, so a store sharing a disk that something else filled keeps taking
    /// as much as it drains. Anything else needs the reserve held and `min_free_disk` left after
    /// what it may take.
    pub fn room(
        &mut self,
        wanted: u64,
        now: Instant,
        files: impl FnOnce() -> FileState,
    ) -> Result<u64, Short> {
        let Some(r) = self.read(now) else {
            // An unreadable filesystem status must not stop intake: SQLite's own ENOSPC
            // handling still protects the file.
            return Ok(wanted);
        };
        if r.read_only {
            return Err(Short::ReadOnly);
        }
        let page = self.layout.page_size;
        let need_of = |bytes: u64| bytes.saturating_mul(ROW_FILL_NUM) / ROW_FILL_DEN + 2 * page;
        let hysteresis = if self.short {
            HYSTERESIS_MIN.max(self.layout.wal_cap / 4)
        } else {
            0
        };
        // Cheap first: plenty of room whatever the files look like.
        let worst = 2 * need_of(wanted) + 2 * self.layout.wal_cap;
        if self.reserve_held && r.free >= self.min_free + hysteresis + worst {
            self.short = false;
            return Ok(wanted);
        }
        let f = files();
        let in_file = |need: u64| {
            f.pending_growth == 0 && need <= f.free_pages && f.wal_used + need <= f.wal_len
        };
        let mut free = r.free;
        if !self.reserve_held && !in_file(need_of(wanted)) {
            self.take_reserve(r);
            if self.reserve_held {
                free = free.saturating_sub(self.layout.reserve);
            }
        }
        let (reserve_held, limit, wal_cap) = (
            self.reserve_held,
            self.min_free + hysteresis,
            self.layout.wal_cap,
        );
        let fits = |bytes: u64| {
            let need = need_of(bytes);
            if in_file(need) {
                return true;
            }
            let growth = need.saturating_sub(f.free_pages) + f.pending_growth;
            let wal_room = (wal_cap + need).saturating_sub(f.wal_len);
            reserve_held && free >= limit + growth + wal_room
        };
        if fits(wanted) {
            self.short = false;
            return Ok(wanted);
        }
        // The largest first part that fits (both conditions shrink as the part grows).
        let (mut lo, mut hi) = (0u64, wanted);
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if lo > 0 && fits(lo) {
            return Ok(lo);
        }
        self.short = true;
        Err(if reserve_held {
            Short::Headroom { free }
        } else {
            Short::NoReserve { free: r.free }
        })
    }

    /// Whether a transaction adding rows charged `row_bytes` may run whole.
    #[cfg(test)]
    pub fn admit(
        &mut self,
        row_bytes: u64,
        now: Instant,
        files: impl FnOnce() -> FileState,
    ) -> Result<(), Short> {
        match self.room(row_bytes, now, files)? {
            got if got >= row_bytes => Ok(()),
            _ => {
                self.short = true;
                let free = self.last.map_or(0, |(_, r)| r.free);
                Err(Short::Headroom { free })
            }
        }
    }

    /// Whether new rows would be admitted now, at least the first part of a typical
    /// transaction (for the sweep: `Err` keeps the store refusing). A part is enough: a store
    /// sharing a disk that something else filled has only its free pages and the log file it
    /// already has, which may be smaller than a whole typical transaction needs, and appends
    /// are admitted in parts anyway.
    pub fn check(&mut self, now: Instant, files: impl FnOnce() -> FileState) -> Result<(), Short> {
        self.room(32 * self.layout.page_size, now, files)
            .map(|_| ())
    }

    /// Takes the reserve when there is room for it beyond the headroom; a failure leaves no
    /// partial file behind.
    pub fn take_reserve(&mut self, r: DiskReading) {
        if self.reserve_held {
            return;
        }
        if r.read_only || r.free < self.min_free + self.layout.reserve {
            tracing::debug!(
                free = r.free,
                need = self.min_free + self.layout.reserve,
                "no room to take the store's reserve back yet"
            );
            return;
        }
        match allocate(&self.reserve_path, self.layout.reserve) {
            Ok(()) => {
                self.reserve_held = true;
                self.last = None;
                tracing::debug!(path = %self.reserve_path.display(), bytes = self.layout.reserve, "store reserve taken");
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.reserve_path);
                tracing::debug!(error = %e, "store reserve not taken yet");
            }
        }
    }

    /// Gives the reserve's space back to the filesystem, so deletes and a checkpoint can
    /// commit; `true` when there was one to release.
    pub fn release_reserve(&mut self) -> bool {
        let existed = self.reserve_path.exists();
        if existed {
            if let Err(e) = std::fs::remove_file(&self.reserve_path) {
                tracing::warn!(error = %e, path = %self.reserve_path.display(), "cannot release the store's disk reserve");
                return false;
            }
        }
        self.reserve_held = false;
        self.last = None;
        existed
    }
}

/// Where the reserve of the store at `db_path` lives.
pub(crate) fn reserve_path(db_path: &Path) -> PathBuf {
    let mut s = db_path.as_os_str().to_os_string();
    s.push(".reserve");
    PathBuf::from(s)
}

/// Removes a reserve left by an earlier run, before the database is opened: opening needs a
/// little space (the `-shm` file, recovery of the log) that a full disk may not have.
pub(crate) fn release_leftover_reserve(db_path: &Path) {
    let p = reserve_path(db_path);
    match std::fs::remove_file(&p) {
        Ok(()) => {
            tracing::debug!(path = %p.display(), "released the store's disk reserve for opening")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(error = %e, path = %p.display(), "cannot remove the store's disk reserve")
        }
    }
}

/// Creates `path` with `len` bytes really allocated (tmpfs and ext4 support `fallocate`;
/// elsewhere zeros are written), then syncs it.
fn allocate(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::NOSPC => return Err(e.into()),
        // Not supported here (vfat, some FUSE filesystems): real zeros do the same.
        Err(_) => {
            let chunk = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
        }
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn space(free: Arc<AtomicU64>, min_free: u64) -> (tempfile::TempDir, Space) {
        let dir = tempfile::tempdir().expect("temp dir");
        let probe: DiskProbe = Arc::new(move |_: &Path| {
            Some(DiskReading {
                free: free.load(Ordering::SeqCst),
                total: 1 << 30,
                read_only: false,
            })
        });
        let db = dir.path().join("buffer.db");
        let s = Space::new(
            probe,
            &db,
            dir.path(),
            min_free,
            Layout::new(1024, Some(1 << 30)),
        );
        (dir, s)
    }

    #[test]
    fn the_log_cap_scales_with_the_filesystem_within_bounds() {
        assert_eq!(Layout::new(1024, Some(3 << 20)).wal_cap, WAL_CAP_MIN);
        assert_eq!(Layout::new(1024, Some(16 << 20)).wal_cap, 512 * 1024);
        assert_eq!(Layout::new(1024, Some(32 << 30)).wal_cap, WAL_CAP_MAX);
        assert_eq!(Layout::new(4096, Some(3 << 20)).wal_cap, 64 * 4096);
        let l = Layout::new(1024, None);
        assert!(l.reserve > l.wal_cap);
        assert_eq!(l.autocheckpoint_pages(), 1024);
    }

    #[test]
    fn rows_are_refused_when_the_log_and_the_checkpoint_would_eat_the_headroom() {
        let free = Arc::new(AtomicU64::new(10 << 20));
        let (_d, mut s) = space(free.clone(), 4 << 20);
        let now = Instant::now();
        assert_eq!(s.admit(1000, now, FileState::default), Ok(()));
        assert!(s.reserve_held());
        // 5 MiB free, 4 MiB headroom: a 1 MiB log still to grow and 1 MiB the checkpoint adds
        // leave too little.
        free.store(5 << 20, Ordering::SeqCst);
        let files = || FileState {
            wal_len: 0,
            wal_used: 0,
            pending_growth: 1 << 20,
            free_pages: 0,
        };
        assert!(matches!(
            s.admit(1000, now, files),
            Err(Short::Headroom { .. })
        ));
        // The same rows fit into free pages once a drained backlog left some and the log is
        // at its cap.
        let files = || FileState {
            wal_len: 1 << 20,
            wal_used: 0,
            pending_growth: 0,
            free_pages: 1 << 20,
        };
        free.store((4 << 20) + 300 * 1024, Ordering::SeqCst);
        assert_eq!(s.admit(1000, now, files), Ok(()));
    }

    #[test]
    fn only_the_first_part_that_fits_the_free_pages_is_admitted_when_the_disk_is_full() {
        let free = Arc::new(AtomicU64::new(0));
        let (_d, mut s) = space(free.clone(), 1 << 20);
        let now = Instant::now();
        let files = || FileState {
            wal_len: 1 << 20,
            wal_used: 0,
            pending_growth: 0,
            free_pages: 100 * 1024,
        };
        let got = s
            .room(1 << 20, now, files)
            .expect("a first part fits the free pages");
        assert!(got > 0 && got < 1 << 20, "{got}");
        // The part plus its page overhead fits the free pages; a little more would not.
        assert!(got * ROW_FILL_NUM / ROW_FILL_DEN + 2 * 1024 <= 100 * 1024);
        assert!((got + 64) * ROW_FILL_NUM / ROW_FILL_DEN + 2 * 1024 > 100 * 1024);
        assert!(s.admit(1 << 20, now, files).is_err());
        // Nothing fits when the pages are gone.
        let none = || FileState {
            free_pages: 0,
            ..files()
        };
        assert!(matches!(
            s.room(1000, now, none),
            Err(Short::NoReserve { .. })
        ));
    }

    #[test]
    fn a_store_that_drained_on_a_disk_filled_by_another_file_reopens_when_rows_fit_its_own_pages() {
        let free = Arc::new(AtomicU64::new(0));
        let (_d, mut s) = space(free.clone(), 1 << 20);
        let now = Instant::now();
        // Refusing: nothing fits.
        let full = || FileState {
            wal_len: 40 * 1024,
            wal_used: 40 * 1024,
            pending_growth: 0,
            free_pages: 0,
        };
        assert!(s.check(now, full).is_err());
        // Drained: plenty of free pages, a small log file checkpointed to its start, still
        // no byte free on the filesystem. A whole typical transaction would not fit the log,
        // a first part does: the store takes new rows again.
        let drained = || FileState {
            wal_len: 40 * 1024,
            wal_used: 0,
            pending_growth: 0,
            free_pages: 4 << 20,
        };
        assert!(s.admit(32 * 1024, now, drained).is_err());
        assert_eq!(s.check(now, drained), Ok(()));
    }

    #[test]
    fn accepting_resumes_only_past_the_hysteresis() {
        let free = Arc::new(AtomicU64::new(10 << 20));
        let (_d, mut s) = space(free.clone(), 1 << 20);
        let now = Instant::now();
        // No free pages inside the file: every new row needs filesystem space.
        let full_log = || FileState {
            wal_len: 2 << 20,
            wal_used: 0,
            pending_growth: 0,
            free_pages: 0,
        };
        assert_eq!(s.admit(100, now, full_log), Ok(()));
        free.store((1 << 20) - 1, Ordering::SeqCst);
        assert!(s.check(now, full_log).is_err());
        // Just above the limit is not enough after a refusal…
        free.store((1 << 20) + 8 * 1024, Ordering::SeqCst);
        assert!(s.check(now, full_log).is_err());
        // …past the hysteresis (a quarter of the 1 MiB log cap) plus the rows' own room it is.
        free.store((1 << 20) + 320 * 1024, Ordering::SeqCst);
        assert_eq!(s.check(now, full_log), Ok(()));
    }

    #[test]
    fn no_rows_are_admitted_while_the_reserve_cannot_be_taken_and_it_is_taken_back_later() {
        let free = Arc::new(AtomicU64::new(10 << 20));
        let (_d, mut s) = space(free.clone(), 0);
        let now = Instant::now();
        assert_eq!(s.admit(100, now, FileState::default), Ok(()));
        assert!(s.reserve_path.exists());
        assert!(s.release_reserve());
        assert!(!s.reserve_path.exists());
        free.store(1024, Ordering::SeqCst);
        assert!(matches!(
            s.admit(100, now, FileState::default),
            Err(Short::NoReserve { .. })
        ));
        free.store(10 << 20, Ordering::SeqCst);
        assert_eq!(s.admit(100, now, FileState::default), Ok(()));
        assert!(s.reserve_held() && s.reserve_path.exists());
    }

    #[test]
    fn a_read_only_filesystem_admits_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let probe: DiskProbe = Arc::new(|_: &Path| {
            Some(DiskReading {
                free: 1 << 30,
                total: 1 << 30,
                read_only: true,
            })
        });
        let mut s = Space::new(
            probe,
            &dir.path().join("b.db"),
            dir.path(),
            0,
            Layout::new(1024, None),
        );
        assert_eq!(
            s.admit(1, Instant::now(), FileState::default),
            Err(Short::ReadOnly)
        );
    }
}
