//! Whether a downlink command is still worth applying. A command has a useful life: a relay
//! switched by an order the cloud queued an hour ago does harm. Judged, in this order:
//!
//! 1. an MQTT 5 Message Expiry Interval on the message: the cloud set the command's life and the
//!    broker delivers it only while that lasts, so it is applied;
//! 2. the rule's `timestamp` field in a JSON payload (RFC 3339, or Unix seconds or milliseconds):
//!    older than `max_age`, or more than `max_age` in the future (the clocks disagree), it is
//!    stale;
//! 3. a retained message was sent before we subscribed, at an unknown time: stale unless the
//!    rule says `while_offline: deliver`.
//!
//! Anything else is applied. Commands queued while the link was down never arrive unless a rule
//! says `while_offline: deliver`, because the session is clean then
//! ([`crate::config::UplinkConfig::persistent_session`]).

use crate::config::{DownlinkRule, WhileOffline};

/// What the upstream's PUBLISH says about a command besides its topic.
#[derive(Debug, Clone, Copy)]
pub(super) struct Facts<'a> {
    pub payload: &'a [u8],
    /// The retain flag as delivered: set only on messages sent before the subscription.
    pub retained: bool,
    /// MQTT 5 Message Expiry Interval left, seconds.
    pub expiry_s: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Apply,
    /// Dropped; the reason is for the log.
    Stale(String),
}

pub(super) fn judge(rule: &DownlinkRule, msg: Facts<'_>, now_ms: i64) -> Verdict {
    if msg.expiry_s.is_some() {
        return Verdict::Apply;
    }
    let max_age_ms = i64::try_from(rule.max_age.get().as_millis()).unwrap_or(i64::MAX);
    if let Some(sent_ms) = rule
        .timestamp
        .as_deref()
        .and_then(|field| sent_at_ms(msg.payload, field))
    {
        let age_ms = now_ms.saturating_sub(sent_ms);
        if age_ms > max_age_ms {
            return Verdict::Stale(format!(
                "sent {:.1} s ago, more than max_age ({})",
                age_ms as f64 / 1000.0,
                rule.max_age
            ));
        }
        if -age_ms > max_age_ms {
            return Verdict::Stale(format!(
                "its timestamp is {:.1} s in the future, more than max_age ({}): the clocks disagree",
                -age_ms as f64 / 1000.0,
                rule.max_age
            ));
        }
        return Verdict::Apply;
    }
    if msg.retained && rule.while_offline == WhileOffline::Drop {
        return Verdict::Stale(
            "retained upstream: sent before we subscribed, at a time nothing says (while_offline: drop)"
                .to_string(),
        );
    }
    Verdict::Apply
}

/// The time a JSON object's top-level `field` gives: an RFC 3339 string, or a number of Unix
/// seconds (below 10^11, i.e. before the year 5138) or milliseconds.
fn sent_at_ms(payload: &[u8], field: &str) -> Option<i64> {
    let doc: serde_json::Value = serde_json::from_slice(payload).ok()?;
    match doc.get(field)? {
        serde_json::Value::String(s) => crate::codec::time::parse_rfc3339(s),
        serde_json::Value::Number(n) => {
            let v = n.as_f64()?;
            if !v.is_finite() || v < 0.0 {
                None
            } else if v < 1e11 {
                Some((v * 1000.0) as i64)
            } else {
                Some(v as i64)
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000_000;

    fn rule(yaml: &str) -> DownlinkRule {
        serde_yaml::from_str(&format!("remote: \"c/#\"\n{yaml}")).expect("test rule parses")
    }

    fn facts(payload: &[u8]) -> Facts<'_> {
        Facts {
            payload,
            retained: false,
            expiry_s: None,
        }
    }

    #[test]
    fn a_command_whose_timestamp_is_older_than_max_age_is_stale_and_a_fresh_one_applies() {
        let r = rule("timestamp: ts\nmax_age: 30s");
        let old = format!(r#"{{"ts":{},"on":1}}"#, (NOW - 31_000) / 1000);
        let fresh = format!(r#"{{"ts":{},"on":1}}"#, NOW - 29_000);
        assert!(matches!(
            judge(&r, facts(old.as_bytes()), NOW),
            Verdict::Stale(_)
        ));
        assert_eq!(judge(&r, facts(fresh.as_bytes()), NOW), Verdict::Apply);
        let rfc = format!(
            r#"{{"ts":"{}"}}"#,
            crate::codec::time::rfc3339_ms(NOW - 120_000)
        );
        assert!(matches!(
            judge(&r, facts(rfc.as_bytes()), NOW),
            Verdict::Stale(_)
        ));
    }

    #[test]
    fn a_timestamp_far_in_the_future_is_stale_because_the_clocks_disagree() {
        let r = rule("timestamp: ts\nmax_age: 10s");
        let future = format!(r#"{{"ts":{}}}"#, NOW + 3_600_000);
        let Verdict::Stale(why) = judge(&r, facts(future.as_bytes()), NOW) else {
            panic!("a command an hour ahead was applied");
        };
        assert!(why.contains("future"), "{why}");
    }

    #[test]
    fn a_retained_command_is_applied_only_where_the_rule_says_deliver_or_its_time_says_fresh() {
        fn retained(payload: &[u8]) -> Facts<'_> {
            Facts {
                payload,
                retained: true,
                expiry_s: None,
            }
        }
        assert!(matches!(
            judge(&rule(""), retained(b"1"), NOW),
            Verdict::Stale(_)
        ));
        assert_eq!(
            judge(&rule("while_offline: deliver"), retained(b"1"), NOW),
            Verdict::Apply
        );
        let fresh = format!(r#"{{"ts":{NOW}}}"#);
        assert_eq!(
            judge(&rule("timestamp: ts"), retained(fresh.as_bytes()), NOW),
            Verdict::Apply
        );
    }

    #[test]
    fn an_mqtt5_expiry_is_the_clouds_judgement_and_wins_over_the_timestamp() {
        let r = rule("timestamp: ts\nmax_age: 1s");
        let old = format!(r#"{{"ts":{}}}"#, NOW - 600_000);
        let msg = Facts {
            payload: old.as_bytes(),
            retained: true,
            expiry_s: Some(30),
        };
        assert_eq!(judge(&r, msg, NOW), Verdict::Apply);
    }

    #[test]
    fn a_command_without_a_readable_timestamp_falls_back_to_the_session_rule() {
        let r = rule("timestamp: ts");
        for p in [
            &b"on"[..],
            br#"{"on":1}"#,
            br#"{"ts":"yesterday"}"#,
            br#"{"ts":-5}"#,
        ] {
            assert_eq!(judge(&r, facts(p), NOW), Verdict::Apply, "{p:?}");
        }
    }
}
