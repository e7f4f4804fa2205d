//! Which topics may have a local subscriber: the front skips rumqttd for the others.
//!
//! Every filter anything local subscribes with is registered here before rumqttd sees the
//! subscription: devices' SUBSCRIBEs (by the front, allowed filters only, `$share/<group>/`
//! removed) and the in-process subscribers on rumqttd's local links (registered by `app`). The
//! registry may over-approximate (a filter kept after its subscriber left only costs the direct
//! path for its topics) but must never miss a live subscription: a message the front acknowledges
//! itself never reaches rumqttd.
//!
//! Filters are kept in a trie of topic levels with a reference count per filter, so a lookup
//! walks the topic's levels (following the exact level, `+` and `#` children) rather than every
//! filter. The generation changes whenever the set of distinct filters does, so a connection's
//! cached verdicts can be dropped then, like its cached forward rules.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// The local subscription filters, shared by every front connection and `app`.
#[derive(Debug, Default)]
pub struct Subscriptions {
    generation: AtomicU64,
    root: RwLock<Node>,
}

#[derive(Debug, Default)]
struct Node {
    /// By level text; `+` and `#` are children like any other level.
    children: HashMap<Box<str>, Node>,
    /// How many registrations of the filter that ends at this node are live.
    count: u32,
}

impl Subscriptions {
    pub fn new() -> Subscriptions {
        Subscriptions::default()
    }

    /// Changes whenever a filter appears or disappears (not when only a count changes).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Registers one subscription with `filter` (a shared subscription by its inner filter).
    pub fn add(&self, filter: &str) {
        let filter = super::shared_filter(filter);
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let mut node = &mut *root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.count = node.count.saturating_add(1);
        if node.count == 1 {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Releases one registration of `filter`; a filter never added is ignored.
    pub fn remove(&self, filter: &str) {
        let filter = super::shared_filter(filter);
        let levels: Vec<&str> = filter.split('/').collect();
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        if remove_at(&mut root, &levels) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Whether a subscriber may exist for `topic`: `false` only when no registered filter
    /// matches it. Filters starting with a wildcard count for `$` topics too (more than MQTT
    /// delivers, which is allowed here).
    pub fn may_have_subscriber(&self, topic: &str) -> bool {
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        let levels: Vec<&str> = topic.split('/').collect();
        // Depth-first over (node, next level) without recursion: a topic may have thousands of
        // levels, and each trie node is reached at most once (its depth is its level).
        let mut todo: Vec<(&Node, usize)> = vec![(&root, 0)];
        while let Some((node, i)) = todo.pop() {
            // `a/#` matches `a` itself and everything below it.
            if node.children.contains_key("#") {
                return true;
            }
            let Some(level) = levels.get(i) else {
                if node.count > 0 {
                    return true;
                }
                continue;
            };
            if let Some(n) = node.children.get(*level) {
                todo.push((n, i + 1));
            }
            if let Some(n) = node.children.get("+") {
                todo.push((n, i + 1));
            }
        }
        false
    }
}

/// Decrements the filter at `levels` below `root`, pruning the branch it leaves empty; `true`
/// when the filter's count reached 0. Iterative, like the lookup.
fn remove_at(root: &mut Node, levels: &[&str]) -> bool {
    let mut node = &mut *root;
    for level in levels {
        match node.children.get_mut(*level) {
            Some(n) => node = n,
            None => return false,
        }
    }
    if node.count == 0 {
        return false;
    }
    node.count -= 1;
    if node.count > 0 {
        return false;
    }
    if !node.children.is_empty() {
        return true;
    }
    // The deepest ancestor that stays (the root, or one with its own filter or another
    // branch) loses the child on the path, with everything below it.
    let mut cut = 0;
    let mut node = &*root;
    for (depth, level) in levels.iter().enumerate() {
        if depth > 0 && (node.count > 0 || node.children.len() > 1) {
            cut = depth;
        }
        node = &node.children[*level];
    }
    let mut node = &mut *root;
    for level in &levels[..cut] {
        node = node
            .children
            .get_mut(*level)
            .expect("the path was walked just above");
    }
    node.children.remove(levels[cut]);
    true
}

impl Drop for Node {
    /// Without recursion: a filter may have thousands of levels, one nested node each.
    fn drop(&mut self) {
        let mut todo: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = todo.pop() {
            todo.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::topic;

    #[test]
    fn an_empty_registry_has_no_subscriber_for_any_topic() {
        let s = Subscriptions::new();
        assert!(!s.may_have_subscriber("sensors/a"));
        assert!(!s.may_have_subscriber("$SYS/x"));
    }

    #[test]
    fn plus_matches_exactly_one_level_and_hash_the_parent_and_everything_below() {
        let s = Subscriptions::new();
        s.add("sensors/+/temp");
        s.add("cmd/#");
        assert!(s.may_have_subscriber("sensors/dev1/temp"));
        assert!(!s.may_have_subscriber("sensors/dev1/hum"));
        assert!(!s.may_have_subscriber("sensors/dev1/temp/x"));
        assert!(!s.may_have_subscriber("sensors/temp"));
        assert!(s.may_have_subscriber("cmd"));
        assert!(s.may_have_subscriber("cmd/a/b/c"));
        assert!(!s.may_have_subscriber("cmdx/a"));
    }

    #[test]
    fn a_shared_subscription_registers_its_inner_filter() {
        let s = Subscriptions::new();
        s.add("$share/g/sensors/#");
        assert!(s.may_have_subscriber("sensors/a"));
        assert!(!s.may_have_subscriber("$share/g/sensors/a"));
        s.remove("$share/g/sensors/#");
        assert!(!s.may_have_subscriber("sensors/a"));
    }

    #[test]
    fn a_filter_stays_until_every_registration_of_it_is_released() {
        let s = Subscriptions::new();
        let g0 = s.generation();
        s.add("a/b");
        let g1 = s.generation();
        assert_ne!(g0, g1, "a new filter changes the generation");
        s.add("a/b");
        s.add("$share/x/a/b");
        assert_eq!(
            s.generation(),
            g1,
            "more references to a known filter do not"
        );
        s.remove("a/b");
        s.remove("a/b");
        assert!(s.may_have_subscriber("a/b"));
        assert_eq!(s.generation(), g1);
        s.remove("a/b");
        assert!(!s.may_have_subscriber("a/b"));
        assert_ne!(
            s.generation(),
            g1,
            "the last release changes the generation"
        );
        let g2 = s.generation();
        s.remove("a/b");
        s.remove("never/added");
        assert_eq!(
            s.generation(),
            g2,
            "releasing an unknown filter changes nothing"
        );
    }

    #[test]
    fn removing_a_filter_keeps_its_longer_and_shorter_neighbours() {
        let s = Subscriptions::new();
        s.add("a");
        s.add("a/b/c");
        s.add("a/b");
        s.remove("a/b");
        assert!(s.may_have_subscriber("a"));
        assert!(s.may_have_subscriber("a/b/c"));
        assert!(!s.may_have_subscriber("a/b"));
        s.remove("a/b/c");
        assert!(s.may_have_subscriber("a"));
        assert!(!s.may_have_subscriber("a/b/c"));
    }

    #[test]
    fn a_topic_with_thousands_of_levels_is_looked_up_without_recursion() {
        let s = Subscriptions::new();
        let deep = vec!["+"; 20_000].join("/");
        s.add(&deep);
        let topic = vec!["x"; 20_000].join("/");
        assert!(s.may_have_subscriber(&topic));
        assert!(!s.may_have_subscriber(&format!("{topic}/y")));
        s.remove(&deep);
        assert!(!s.may_have_subscriber(&topic));
    }

    #[test]
    fn the_lookup_never_misses_a_match_of_any_registered_filter() {
        // Every filter and topic over a small alphabet, against `topic::matches`: the registry
        // may say yes where MQTT would not deliver (`$` topics), never no where it would.
        let levels = ["a", "b", "$s", "+", "#"];
        let mut filters = Vec::new();
        for n in 1..=3 {
            let mut idx = vec![0usize; n];
            loop {
                let f: Vec<&str> = idx.iter().map(|&i| levels[i]).collect();
                let f = f.join("/");
                if topic::valid_filter(&f).is_ok() {
                    filters.push(f);
                }
                let mut k = 0;
                while k < n {
                    idx[k] += 1;
                    if idx[k] < levels.len() {
                        break;
                    }
                    idx[k] = 0;
                    k += 1;
                }
                if k == n {
                    break;
                }
            }
        }
        let topics: Vec<String> = filters
            .iter()
            .filter(|f| topic::valid_topic(f).is_ok())
            .cloned()
            .collect();
        assert!(topics.len() > 10 && filters.len() > 50);
        for f in &filters {
            let s = Subscriptions::new();
            s.add(f);
            for t in &topics {
                if topic::matches(f, t) {
                    assert!(s.may_have_subscriber(t), "{f} matches {t}");
                } else if !t.starts_with('$') {
                    assert!(!s.may_have_subscriber(t), "{f} does not match {t}");
                }
            }
        }
    }
}
