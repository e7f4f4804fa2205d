//! The forward rules as the paths into the store use them: which rule a topic falls under
//! ([`RuleSettings`]) and the store row it makes, with the rules replaceable at a reload while
//! connections run ([`Rules`], whose generation tells caches to start over).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::UplinkConfig;
use crate::shared::now_ms;
use crate::store::NewMessage;

/// The uplink settings the front stores by, replaceable while connections run: each connection
/// caches topic → rule and drops its cache when the generation changes.
pub struct Rules {
    generation: std::sync::atomic::AtomicU64,
    uplink: std::sync::RwLock<Arc<UplinkConfig>>,
}

impl Rules {
    pub fn new(uplink: UplinkConfig) -> Rules {
        Rules {
            generation: std::sync::atomic::AtomicU64::new(0),
            uplink: std::sync::RwLock::new(Arc::new(uplink)),
        }
    }

    pub fn get(&self) -> Arc<UplinkConfig> {
        self.uplink
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn replace(&self, uplink: UplinkConfig) {
        *self.uplink.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(uplink);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// What a forward rule makes of a local message: the store row's settings. Shared by every
/// path into the store (the front, the local-link intake, the hardware readings), so all of
/// them queue identical rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSettings {
    priority: u8,
    qos: u8,
    retain: bool,
}

impl RuleSettings {
    /// The settings of the first forward rule matching `topic`, if any.
    pub fn for_topic(uplink: &UplinkConfig, topic: &str) -> Option<RuleSettings> {
        uplink.match_rule(topic).map(|(_, r)| RuleSettings {
            priority: r.priority,
            qos: r.qos,
            retain: r.retain,
        })
    }

    /// The store row for a message on `topic`, received now.
    pub fn row(&self, topic: String, payload: bytes::Bytes) -> NewMessage {
        NewMessage {
            priority: self.priority,
            qos: self.qos,
            retain: self.retain,
            topic,
            payload,
            created_ms: now_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink(forward: &str) -> UplinkConfig {
        let yaml = format!("gateway: {{id: t}}\nstore: {{path: unused.db}}\nuplink:\n  url: mqtt://127.0.0.1:1\n  forward:\n{forward}");
        crate::config::load_str(&yaml, std::path::Path::new("test.yaml"))
            .expect("a valid config")
            .uplink
            .expect("an uplink")
    }

    #[test]
    fn the_first_matching_rule_makes_the_row_and_a_reload_bumps_the_generation() {
        let rules = Rules::new(uplink(
            "    - {local: 'sensors/hot/#', priority: 5, qos: 0}\n    - {local: 'sensors/#', retain: true}\n",
        ));
        let g0 = rules.generation();
        let hot = RuleSettings::for_topic(&rules.get(), "sensors/hot/a").expect("a rule matches");
        let row = hot.row("sensors/hot/a".into(), bytes::Bytes::from_static(b"1"));
        assert_eq!((row.priority, row.qos, row.retain), (5, 0, false));
        let other = RuleSettings::for_topic(&rules.get(), "sensors/b").expect("a rule matches");
        let row = other.row("sensors/b".into(), bytes::Bytes::from_static(b"2"));
        assert_eq!((row.priority, row.qos, row.retain), (0, 1, true));
        assert!(row.created_ms > 0);
        assert_eq!(RuleSettings::for_topic(&rules.get(), "other/x"), None);

        rules.replace(uplink("    - {local: 'other/#'}\n"));
        assert!(rules.generation() > g0);
        assert_eq!(RuleSettings::for_topic(&rules.get(), "sensors/b"), None);
        assert!(RuleSettings::for_topic(&rules.get(), "other/x").is_some());
    }
}
