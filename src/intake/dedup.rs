//! Hardware readings the local-link intake must not store twice.
//!
//! With the MQTT front off, the local-link intake (`intake::local`) stores everything on forward
//! topics that passes through the broker, so it would store every hardware reading a second time.
//! Before publishing a reading it stored, the hardware stage registers it (a 64-bit keyed hash of
//! topic and payload) here; the intake consumes the entry when the reading comes by and skips it.
//! `app` makes one [`StoredReadings`] and hands it to both, only when the local-link intake runs.
//! Bounded (oldest entries evicted); costs the intake a single atomic load while empty.
//!
//! Why not a marker on the message: an MQTT 5 user property was the first design, but rumqttd
//! 0.20 panics (`unreachable!`) when it forwards a publish carrying properties to an MQTT 3.1.1
//! subscriber, and a QoS 0 publish has no other field the router passes through untouched. A
//! device that publishes byte-for-byte the same payload on the same topic within the same
//! moment would have that one message skipped; readings carry a millisecond timestamp (all but
//! `raw` serial frames), which makes this practically impossible.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Readings the hardware stage stored and published, waiting to be recognised by the intake.
pub struct StoredReadings {
    hasher: std::collections::hash_map::RandomState,
    inner: std::sync::Mutex<StoredInner>,
    len: AtomicUsize,
}

#[derive(Default)]
struct StoredInner {
    counts: std::collections::HashMap<u64, u32>,
    order: std::collections::VecDeque<u64>,
}

/// Entries kept at most: far more than can be in flight between our publish and the intake.
const STORED_MAX: usize = 8192;

impl StoredReadings {
    pub fn new() -> StoredReadings {
        StoredReadings {
            hasher: std::collections::hash_map::RandomState::new(),
            inner: std::sync::Mutex::new(StoredInner::default()),
            len: AtomicUsize::new(0),
        }
    }

    fn key(&self, topic: &[u8], payload: &[u8]) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.hasher.build_hasher();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoredInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called just before a stored reading enters the broker.
    pub fn register(&self, topic: &[u8], payload: &[u8]) {
        let k = self.key(topic, payload);
        let mut s = self.lock();
        *s.counts.entry(k).or_insert(0) += 1;
        s.order.push_back(k);
        while s.order.len() > STORED_MAX {
            if let Some(old) = s.order.pop_front() {
                consume(&mut s.counts, old);
            }
        }
        self.len.store(s.order.len(), Ordering::Release);
    }

    /// Whether a message arriving through the broker is a reading already stored (the intake
    /// must then not store it again). Consumes the registration.
    pub fn take(&self, topic: &[u8], payload: &[u8]) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let k = self.key(topic, payload);
        let mut s = self.lock();
        if !consume(&mut s.counts, k) {
            return false;
        }
        if let Some(i) = s.order.iter().position(|x| *x == k) {
            s.order.remove(i);
        }
        self.len.store(s.order.len(), Ordering::Release);
        true
    }
}

fn consume(counts: &mut std::collections::HashMap<u64, u32>, k: u64) -> bool {
    match counts.get_mut(&k) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            counts.remove(&k);
            true
        }
        None => false,
    }
}

impl Default for StoredReadings {
    fn default() -> Self {
        StoredReadings::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_reading_is_recognised_once_others_never_and_the_oldest_are_forgotten() {
        let s = StoredReadings::new();
        assert!(!s.take(b"sensors/x", b"1"));
        s.register(b"sensors/x", b"1");
        s.register(b"sensors/x", b"1");
        assert!(!s.take(b"sensors/x", b"2"));
        assert!(!s.take(b"sensors/y", b"1"));
        assert!(s.take(b"sensors/x", b"1"));
        assert!(s.take(b"sensors/x", b"1"));
        assert!(!s.take(b"sensors/x", b"1"));

        // Bounded: beyond STORED_MAX entries the oldest are forgotten.
        s.register(b"bound/first", b"x");
        for i in 0..STORED_MAX {
            s.register(b"bound/many", i.to_string().as_bytes());
        }
        assert!(!s.take(b"bound/first", b"x"));
        assert!(s.take(b"bound/many", (STORED_MAX - 1).to_string().as_bytes()));
    }
}
