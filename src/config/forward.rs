//! Forward and downlink rules (`uplink.forward`, `uplink.downlink`) and rule matching: which rule
//! takes a topic, the upstream topic a local one maps to and back, and the local subscriptions
//! that deliver each forwarded message once. Topic filter semantics are in `topic.rs`.

use serde::Deserialize;

use super::topic;
use super::units::HumanDuration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRule {
    /// Local topic filter, e.g. `sensors/#`.
    pub local: String,
    /// Upstream topic template: `{topic}` is the local topic, `{gateway_id}` the gateway id.
    #[serde(default = "default_remote_template")]
    pub remote: String,
    /// Upstream QoS: 0 or 1 (stored either way; QoS 0 rows are deleted once written).
    #[serde(default = "default_forward_qos")]
    pub qos: u8,
    /// Higher drains first; first in, first out within a priority.
    #[serde(default)]
    pub priority: u8,
    /// Publish upstream with the retain flag.
    #[serde(default)]
    pub retain: bool,
}

fn default_remote_template() -> String {
    "{topic}".to_string()
}
fn default_forward_qos() -> u8 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkRule {
    /// Upstream filter subscribed at QoS 1, e.g. `edgegate/{gateway_id}/cmd/#`.
    pub remote: String,
    /// Local topic prefix that replaces the filter's fixed prefix, e.g. `cmd/`. Default: the
    /// upstream topic unchanged.
    #[serde(default)]
    pub local: Option<String>,
    /// A command older than this is dropped (counted, logged), where its age can be known: from
    /// its `timestamp` field. Default 60 s.
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// Top-level JSON field of the command that says when it was sent (RFC 3339, or Unix
    /// seconds or milliseconds). Default: none.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// Whether the cloud may queue commands for us while the link is down, and whether a
    /// retained command (sent before we subscribed) is applied. Default `drop`.
    #[serde(default)]
    pub while_offline: WhileOffline,
}

/// What happens to commands sent while the gateway was not listening.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhileOffline {
    /// Not queued for us (a clean upstream session); a retained command is not applied.
    #[default]
    Drop,
    /// Queued by the cloud (a persistent session) and applied on reconnect, retained ones too,
    /// unless their timestamp or MQTT 5 expiry says they are stale.
    Deliver,
}

fn default_max_age() -> HumanDuration {
    HumanDuration::from_secs(60)
}

impl ForwardRule {
    /// The upstream topic for a local topic: `remote` with `{topic}` and `{gateway_id}` expanded
    /// (in one pass, so a local topic containing `{gateway_id}` stays as it is).
    pub fn remote_topic(&self, local_topic: &str, gateway_id: &str) -> String {
        topic::expand(
            &self.remote,
            &[("topic", local_topic), ("gateway_id", gateway_id)],
        )
    }
}

impl DownlinkRule {
    /// The upstream filter with `{gateway_id}` expanded.
    pub fn remote_filter(&self, gateway_id: &str) -> String {
        topic::expand(&self.remote, &[("gateway_id", gateway_id)])
    }

    /// The local topic a downlink message is published on: the expanded `remote` filter's fixed
    /// prefix (the levels before its first wildcard; the whole filter if it has none) is replaced
    /// by `local`. `local` is a level prefix: `cmd` and `cmd/` both turn `…/cmd/relay1` into
    /// `cmd/relay1`. With `local: None` the topic is unchanged.
    ///
    /// A topic equal to the prefix without its final `/` (which `…/#` also matches) maps to `local`
    /// without its final `/`. A topic that does not start with the prefix at all (it cannot match
    /// the rule) keeps all its levels under `local`.
    pub fn local_topic(&self, remote_topic: &str, gateway_id: &str) -> String {
        let Some(local) = &self.local else {
            return remote_topic.to_string();
        };
        let filter = self.remote_filter(gateway_id);
        let prefix = topic::fixed_prefix(&filter);
        let rest = if let Some(rest) = remote_topic.strip_prefix(prefix) {
            rest
        } else if prefix.strip_suffix('/') == Some(remote_topic) {
            ""
        } else {
            remote_topic
        };
        join_level_prefix(local, rest)
    }

    /// A filter matching every local topic this rule can publish: `local` followed by the wildcard
    /// part of the expanded `remote` filter (`cmd/#` for `edgegate/{gateway_id}/cmd/#` → `cmd/`).
    /// Used to refuse forward rules that would send commands back upstream.
    pub fn local_filter(&self, gateway_id: &str) -> String {
        let filter = self.remote_filter(gateway_id);
        let Some(local) = &self.local else {
            return filter;
        };
        let rest = &filter[topic::fixed_prefix(&filter).len()..];
        join_level_prefix(local, rest)
    }
}

/// `prefix` then `rest` with exactly the `/` between them that levels need.
fn join_level_prefix(prefix: &str, rest: &str) -> String {
    if rest.is_empty() {
        prefix.strip_suffix('/').unwrap_or(prefix).to_string()
    } else if prefix.is_empty() || prefix.ends_with('/') {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}/{rest}")
    }
}

/// The first rule, in file order, whose `local` filter matches `topic`, with its index.
pub(super) fn match_rule<'a>(
    rules: &'a [ForwardRule],
    topic: &str,
) -> Option<(usize, &'a ForwardRule)> {
    rules
        .iter()
        .enumerate()
        .find(|(_, rule)| topic::matches(&rule.local, topic))
}

/// The first rule, in file order, whose expanded `remote` filter matches an upstream
/// topic, with its index.
pub(super) fn match_downlink<'a>(
    rules: &'a [DownlinkRule],
    remote_topic: &str,
    gateway_id: &str,
) -> Option<(usize, &'a DownlinkRule)> {
    rules
        .iter()
        .enumerate()
        .find(|(_, rule)| topic::matches(&rule.remote_filter(gateway_id), remote_topic))
}

/// The local filters to subscribe to so that each forwarded message arrives exactly once:
/// the rules' filters in file order, without duplicates and without any filter another one
/// already covers (of two equivalent filters, such as `#` and `+/#`, the first is kept).
pub(super) fn local_subscriptions(rules: &[ForwardRule]) -> Vec<String> {
    let mut unique: Vec<&str> = Vec::with_capacity(rules.len());
    for rule in rules {
        if !unique.contains(&rule.local.as_str()) {
            unique.push(&rule.local);
        }
    }
    unique
        .iter()
        .enumerate()
        .filter(|&(i, f)| {
            !unique
                .iter()
                .enumerate()
                .any(|(j, g)| j != i && topic::covers(g, f) && (j < i || !topic::covers(f, g)))
        })
        .map(|(_, f)| f.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::uplink::UplinkConfig;

    fn uplink(yaml: &str) -> UplinkConfig {
        serde_yaml::from_str(yaml).expect("test uplink parses")
    }

    #[test]
    fn templates_expand_the_gateway_id_and_topic() {
        let up = uplink("url: mqtt://h\nforward:\n  - {local: \"a/#\", remote: \"site/{gateway_id}/{topic}\"}\n  - {local: \"b/#\"}");
        assert_eq!(up.forward[0].remote_topic("a/x", "gw1"), "site/gw1/a/x");
        assert_eq!(
            up.forward[1].remote_topic("b/{gateway_id}", "gw1"),
            "b/{gateway_id}"
        );
        assert_eq!(up.client_id_or("gw1"), "gw1");
        assert_eq!(
            uplink("url: mqtt://h\nclient_id: c").client_id_or("gw1"),
            "c"
        );
    }

    #[test]
    fn the_first_matching_forward_rule_wins() {
        let up = uplink("url: mqtt://h\nforward:\n  - {local: sensors/+/alarm, priority: 9}\n  - {local: \"sensors/#\"}\n  - {local: \"#\"}");
        assert_eq!(up.match_rule("sensors/k/alarm").map(|(i, _)| i), Some(0));
        assert_eq!(
            up.match_rule("sensors/k/temp")
                .map(|(i, r)| (i, r.priority)),
            Some((1, 0))
        );
        assert_eq!(up.match_rule("sensors").map(|(i, _)| i), Some(1));
        assert_eq!(up.match_rule("other").map(|(i, _)| i), Some(2));
        assert!(up.match_rule("$SYS/x").is_none());
    }

    #[test]
    fn local_subscriptions_drop_duplicates_and_covered_filters_in_order() {
        let up = uplink("url: mqtt://h\nforward:\n  - {local: sensors/+/alarm}\n  - {local: status/x}\n  - {local: \"sensors/#\"}\n  - {local: status/x}\n  - {local: \"status/+\"}\n  - {local: \"+/#\"}\n  - {local: \"#\"}\n  - {local: \"$SYS/#\"}");
        assert_eq!(up.local_subscriptions(), vec!["+/#", "$SYS/#"]);
        let up = uplink("url: mqtt://h\nforward:\n  - {local: b/+}\n  - {local: \"a/#\"}\n  - {local: b/+}\n  - {local: a/x}");
        assert_eq!(up.local_subscriptions(), vec!["b/+", "a/#"]);
        assert!(uplink("url: mqtt://h").local_subscriptions().is_empty());
    }

    fn downlink_rule(remote: &str, local: Option<&str>) -> DownlinkRule {
        DownlinkRule {
            remote: remote.to_string(),
            local: local.map(str::to_string),
            max_age: default_max_age(),
            timestamp: None,
            while_offline: WhileOffline::Drop,
        }
    }

    #[test]
    fn downlink_topics_swap_the_fixed_prefix_for_the_local_one() {
        let rule = downlink_rule;
        let r = rule("edgegate/{gateway_id}/cmd/#", Some("cmd/"));
        assert_eq!(
            r.local_topic("edgegate/gw1/cmd/relay1", "gw1"),
            "cmd/relay1"
        );
        assert_eq!(r.local_topic("edgegate/gw1/cmd/a/b", "gw1"), "cmd/a/b");
        assert_eq!(r.local_topic("edgegate/gw1/cmd", "gw1"), "cmd");
        assert_eq!(r.local_filter("gw1"), "cmd/#");
        assert_eq!(r.remote_filter("gw1"), "edgegate/gw1/cmd/#");

        let no_slash = rule("edgegate/{gateway_id}/cmd/#", Some("cmd"));
        assert_eq!(
            no_slash.local_topic("edgegate/gw1/cmd/relay1", "gw1"),
            "cmd/relay1"
        );
        assert_eq!(no_slash.local_filter("gw1"), "cmd/#");

        let middle = rule("devices/+/set", Some("local/"));
        assert_eq!(middle.local_topic("devices/d1/set", "gw1"), "local/d1/set");
        assert_eq!(middle.local_filter("gw1"), "local/+/set");
        let leading = rule("+/set", Some("local/"));
        assert_eq!(leading.local_topic("d1/set", "gw1"), "local/d1/set");
        assert_eq!(leading.local_filter("gw1"), "local/+/set");

        let exact = rule("edgegate/{gateway_id}/reboot", Some("system/reboot"));
        assert_eq!(
            exact.local_topic("edgegate/gw1/reboot", "gw1"),
            "system/reboot"
        );
        assert_eq!(exact.local_filter("gw1"), "system/reboot");

        let unchanged = rule("edgegate/{gateway_id}/cmd/#", None);
        assert_eq!(
            unchanged.local_topic("edgegate/gw1/cmd/x", "gw1"),
            "edgegate/gw1/cmd/x"
        );
        assert_eq!(unchanged.local_filter("gw1"), "edgegate/gw1/cmd/#");
    }

    #[test]
    fn every_local_topic_a_downlink_produces_matches_its_local_filter() {
        let rules = [
            ("edgegate/{gateway_id}/cmd/#", Some("cmd/")),
            ("a/+/b/#", Some("x")),
            ("+/c", Some("y/")),
            ("fixed/topic", Some("z/")),
            ("q/#", None),
        ];
        let topics = [
            "edgegate/gw/cmd",
            "edgegate/gw/cmd/r",
            "a/1/b",
            "a/1/b/2/3",
            "k/c",
            "fixed/topic",
            "q",
            "q/r/s",
        ];
        for (remote, local) in rules {
            let rule = downlink_rule(remote, local);
            let filter = rule.local_filter("gw");
            for t in topics
                .iter()
                .filter(|t| topic::matches(&rule.remote_filter("gw"), t))
            {
                let local_topic = rule.local_topic(t, "gw");
                assert!(
                    topic::matches(&filter, &local_topic),
                    "{remote}: {t} -> {local_topic} not in {filter}"
                );
            }
        }
    }
}
