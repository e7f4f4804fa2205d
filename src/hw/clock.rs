//! Wall-clock time for timestamps. Intervals and debounce use tokio's monotonic clock instead, so
//! `tokio::time::pause()` drives them in tests; a wall clock that steps (NTP) moves only `ts`.

/// Unix time in milliseconds.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::shared::now_ms()
    }
}

/// A clock that stands still unless set (tests).
#[derive(Debug, Default)]
pub struct FixedClock(pub std::sync::atomic::AtomicI64);

impl Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
