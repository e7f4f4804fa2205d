//! The guard against rumqttd 0.20's v4-encoder panic.
//!
//! What triggers it (read in rumqttd's source and reproduced in `tests/front.rs`): rumqttd keeps
//! a PUBLISH's MQTT 5 properties as `Some(..)` whenever the packet carried any property — a
//! topic alias alone is enough, since the router takes the alias out but leaves an empty
//! `Some`. When such a publish (or a will with properties, or a retained one) is delivered to an
//! MQTT 3.1.1 subscriber, its v4 encoder reaches `unreachable!()`; with `panic = "abort"` the
//! whole gateway dies.
//!
//! The front removes a v5 PUBLISH's properties (keeping topic, packet id and payload) when:
//! - its topic matches a filter some MQTT 3.1.1 client has subscribed to since the start
//!   ([`V4Filters`], never forgotten: rumqttd keeps persistent sessions' subscriptions), or
//! - it is retained (a 3.1.1 client may subscribe later and receive it), and always from a
//!   v5 will (published later, to whoever subscribes then).
//!
//! Everything else keeps its properties, so v5-to-v5 traffic is unchanged. The remaining race —
//! a publish checked just before a 3.1.1 client's first SUBSCRIBE to a new filter reaches
//! rumqttd, but routed after it — is narrowed by holding such a SUBSCRIBE for
//! [`NEW_V4_FILTER_DELAY`] after registering its filters.

use std::sync::RwLock;
use std::time::Duration;

use crate::config::topic;

/// How long a 3.1.1 SUBSCRIBE with a filter new to the registry waits before rumqttd sees it.
pub const NEW_V4_FILTER_DELAY: Duration = Duration::from_millis(250);

/// Distinct filters remembered; past this every v5 publish with properties is stripped.
const MAX_FILTERS: usize = 10_000;

#[derive(Default)]
pub struct V4Filters {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    filters: Vec<String>,
    saturated: bool,
}

impl V4Filters {
    /// Records a 3.1.1 subscription; `true` when the filter was new.
    pub fn register(&self, filter: &str) -> bool {
        let filter = super::shared_filter(filter);
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.saturated || inner.filters.iter().any(|f| f == filter) {
            return false;
        }
        if inner.filters.len() >= MAX_FILTERS {
            inner.saturated = true;
        } else {
            inner.filters.push(filter.to_string());
        }
        true
    }

    /// Whether a publish on `topic_name` may reach an MQTT 3.1.1 subscriber.
    pub fn reaches_v4(&self, topic_name: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.saturated || inner.filters.iter().any(|f| topic::matches(f, topic_name))
    }
}

/// Whether a v5 PUBLISH's properties must be removed before rumqttd sees it.
pub fn must_strip(has_properties: bool, retain: bool, reaches_v4: impl FnOnce() -> bool) -> bool {
    has_properties && (retain || reaches_v4())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_go_only_where_a_v4_subscriber_or_a_retained_copy_could_meet_them() {
        let reg = V4Filters::default();
        assert!(!must_strip(true, false, || reg.reaches_v4("a/b")));
        assert!(must_strip(true, true, || reg.reaches_v4("a/b")));
        assert!(reg.register("$share/g/a/+"));
        assert!(!reg.register("a/+"));
        assert!(must_strip(true, false, || reg.reaches_v4("a/b")));
        assert!(!must_strip(false, true, || reg.reaches_v4("a/b")));
        assert!(!must_strip(true, false, || reg.reaches_v4("c")));
    }
}
