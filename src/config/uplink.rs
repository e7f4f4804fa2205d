//! The `uplink:` section (crate::uplink, crate::forward): the upstream broker's URL, login, TLS,
//! session and rate settings, and its forward and downlink rules (those are in `forward.rs`,
//! the URL parser in `url.rs`).

use std::path::PathBuf;

use serde::Deserialize;

use super::forward::{self, DownlinkRule, ForwardRule};
use super::protocol::Protocol;
use super::secret::{Secret, SecretSource};
use super::units::{ByteSize, HumanDuration};
use super::url::{parse_endpoint, Endpoint};

// Flat in the file like `broker::UserConfig` (see there): parsed as `UplinkConfigFile`.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "UplinkConfigFile")]
pub struct UplinkConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (ports default to 1883 / 8883).
    pub url: String,
    /// Default: the gateway id.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: SecretSource,
    pub protocol: Protocol,
    pub tls: UplinkTlsConfig,
    pub keep_alive: HumanDuration,
    /// `Some(false)` keeps the upstream session (and its queued downlink messages) across
    /// reconnects, `Some(true)` does not; absent, see [`UplinkConfig::persistent_session`].
    pub clean_session: Option<bool>,
    /// QoS 1 publishes awaiting PUBACK at once.
    pub max_inflight: u16,
    /// Publishes per second at most (token bucket). Default: unlimited.
    pub max_rate: Option<f64>,
    /// First reconnect delay; doubles (with jitter) up to `reconnect_max`.
    pub reconnect_min: HumanDuration,
    pub reconnect_max: HumanDuration,
    /// Largest packet accepted from / sent to the upstream.
    pub max_packet_size: ByteSize,
    pub forward: Vec<ForwardRule>,
    pub downlink: Vec<DownlinkRule>,
}

fn default_keep_alive() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_uplink_max_inflight() -> u16 {
    100
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration::from_millis(250)
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_uplink_max_packet() -> ByteSize {
    ByteSize(1024 * 1024)
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkTlsConfig {
    /// CA bundle that signs the upstream's certificate. Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (AWS IoT Core needs them).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl UplinkConfig {
    /// The MQTT client id used upstream: `client_id` if set, else the gateway id.
    pub fn client_id_or(&self, gateway_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| gateway_id.to_string())
    }

    /// Parses `url`: `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883);
    /// an IPv6 host goes in brackets (`mqtt://[::1]:1883`). A trailing `/` is tolerated; paths,
    /// credentials in the URL and other schemes are refused.
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        parse_endpoint(&self.url)
    }

    /// Whether the upstream keeps our session (and queues downlink commands) while the link is
    /// down: as `clean_session` says, else only when a downlink rule says `while_offline: deliver`.
    pub fn persistent_session(&self) -> bool {
        match self.clean_session {
            Some(clean) => !clean,
            None => self
                .downlink
                .iter()
                .any(|r| r.while_offline == forward::WhileOffline::Deliver),
        }
    }

    /// The first forward rule, in file order, whose `local` filter matches `topic`, with its index.
    pub fn match_rule(&self, topic: &str) -> Option<(usize, &ForwardRule)> {
        forward::match_rule(&self.forward, topic)
    }

    /// The first downlink rule, in file order, whose expanded `remote` filter matches an upstream
    /// topic, with its index.
    pub fn match_downlink(
        &self,
        remote_topic: &str,
        gateway_id: &str,
    ) -> Option<(usize, &DownlinkRule)> {
        forward::match_downlink(&self.downlink, remote_topic, gateway_id)
    }

    /// The local filters to subscribe to so that each forwarded message arrives exactly once:
    /// the forward filters in file order, without duplicates and without any filter another one
    /// already covers (of two equivalent filters, such as `#` and `+/#`, the first is kept).
    pub fn local_subscriptions(&self) -> Vec<String> {
        forward::local_subscriptions(&self.forward)
    }
}

/// The `uplink` section as written in the file (see `UplinkConfig` for the meaning of each key).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UplinkConfigFile {
    url: String,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    tls: UplinkTlsConfig,
    #[serde(default = "default_keep_alive")]
    keep_alive: HumanDuration,
    #[serde(default)]
    clean_session: Option<bool>,
    #[serde(default = "default_uplink_max_inflight")]
    max_inflight: u16,
    #[serde(default)]
    max_rate: Option<f64>,
    #[serde(default = "default_reconnect_min")]
    reconnect_min: HumanDuration,
    #[serde(default = "default_reconnect_max")]
    reconnect_max: HumanDuration,
    #[serde(default = "default_uplink_max_packet")]
    max_packet_size: ByteSize,
    #[serde(default)]
    forward: Vec<ForwardRule>,
    #[serde(default)]
    downlink: Vec<DownlinkRule>,
}

impl From<UplinkConfigFile> for UplinkConfig {
    fn from(f: UplinkConfigFile) -> Self {
        UplinkConfig {
            url: f.url,
            client_id: f.client_id,
            username: f.username,
            password: SecretSource {
                password: f.password,
                password_file: f.password_file,
                password_env: f.password_env,
                resolved: None,
            },
            protocol: f.protocol,
            tls: f.tls,
            keep_alive: f.keep_alive,
            clean_session: f.clean_session,
            max_inflight: f.max_inflight,
            max_rate: f.max_rate,
            reconnect_min: f.reconnect_min,
            reconnect_max: f.reconnect_max,
            max_packet_size: f.max_packet_size,
            forward: f.forward,
            downlink: f.downlink,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink(yaml: &str) -> UplinkConfig {
        serde_yaml::from_str(yaml).expect("test uplink parses")
    }

    #[test]
    fn unknown_uplink_keys_list_the_expected_ones() {
        let err = serde_yaml::from_str::<UplinkConfig>("url: mqtt://h\npasswrd: x")
            .expect_err("typo")
            .to_string();
        assert!(
            err.contains("unknown field `passwrd`, expected one of"),
            "{err}"
        );
        assert!(err.contains("`password_env`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let up = uplink("url: mqtt://h\nusername: u\npassword: hunter2");
        assert_eq!(
            up.password.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{up:?}").contains("hunter2"));
    }
}
