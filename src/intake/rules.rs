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
