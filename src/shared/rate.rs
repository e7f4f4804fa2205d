//! The log rate limiter: at most one line per period, and how many were held back.

use std::time::{Duration, Instant};

/// Allows one event per period and counts the ones it refused in between.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl RateLimited {
    pub fn new(every: Duration) -> RateLimited {
        RateLimited {
            every,
            last: None,
            skipped: 0,
        }
    }

    /// True when an event may be logged now (the period starts again); false counts it as
    /// skipped.
    pub fn allow(&mut self) -> bool {
        self.allow_or(false)
    }

    /// Like [`RateLimited::allow`], but `force` lets this event through whatever the period.
    pub fn allow_or(&mut self, force: bool) -> bool {
        let now = Instant::now();
        if !force
            && self
                .last
                .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.skipped += 1;
            return false;
        }
        self.last = Some(now);
        true
    }

    /// Events refused since the last one allowed; counting starts again at zero.
    pub fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_event_of_a_period_is_allowed_and_the_rest_are_counted() {
        let mut r = RateLimited::new(Duration::from_secs(3600));
        assert!(r.allow());
        assert!(!r.allow());
        assert!(!r.allow());
        assert_eq!(r.take_skipped(), 2);
        assert_eq!(r.take_skipped(), 0);
        assert!(r.allow_or(true));
        assert!(!r.allow());
        assert_eq!(r.take_skipped(), 1);
    }

    #[test]
    fn a_zero_period_allows_every_event() {
        let mut r = RateLimited::new(Duration::ZERO);
        assert!((0..5).all(|_| r.allow()));
        assert_eq!(r.take_skipped(), 0);
    }
}
