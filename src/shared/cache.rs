//! The bounded memo used per topic (route, topic id, upstream topic): devices publish to the same
//! few topics over and over, so a lookup beats matching every rule for every message, and with
//! unboundedly many topics the memo starts over instead of growing.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// A map that forgets everything when it would hold more than `max` entries.
#[derive(Debug)]
pub struct BoundedCache<K, V> {
    map: HashMap<K, V>,
    max: usize,
}

impl<K: Hash + Eq, V> BoundedCache<K, V> {
    pub fn new(max: usize) -> Self {
        BoundedCache {
            map: HashMap::new(),
            max: max.max(1),
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key)
    }

    /// Remembers `value`; when full, everything else is forgotten first.
    pub fn insert(&mut self, key: K, value: V) {
        if self.map.len() >= self.max && !self.map.contains_key(&key) {
            self.map.clear();
        }
        self.map.insert(key, value);
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_starts_over_instead_of_growing() {
        let mut c = BoundedCache::new(2);
        c.insert("a", 1);
        c.insert("b", 2);
        c.insert("a", 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a"), Some(&3));
        c.insert("c", 4);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get("a"), None);
        assert_eq!(c.get("c"), Some(&4));
    }
}
