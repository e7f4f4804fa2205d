//! Reconnect backoff with jitter and the publish-rate token bucket.

use std::time::{Duration, Instant};

/// Exponential backoff with full jitter in the upper half: min, ~2·min, ~4·min … up to max.
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(10));
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        // Half fixed, half random: many gateways coming back after a cloud outage do not
        // reconnect in lockstep, and no delay is shorter than half the step.
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Token bucket for `uplink.max_rate`: a burst of up to one second's worth, then the rate.
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64) -> Self {
        let rate = rate.max(0.001);
        let capacity = rate.max(1.0);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
    }

    pub fn try_take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Time until the next token.
    pub fn wait_time(&self) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / self.rate).max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bounds = [100u64, 200, 400, 800, 800, 800];
        for (got, hi) in d.iter().zip(bounds) {
            assert!(
                *got >= Duration::from_millis(hi / 2) && *got <= Duration::from_millis(hi),
                "{got:?} not in [{}, {hi}] ms",
                hi / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn token_bucket_allows_a_burst_then_paces() {
        let mut t = TokenBucket::new(10.0);
        let burst = (0..100).take_while(|_| t.try_take()).count();
        assert_eq!(burst, 10);
        assert!(!t.try_take());
        assert!(t.wait_time() <= Duration::from_millis(101));
    }
}
