//! The configuration file's shape: one struct per YAML section.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Defaults here match the annotated reference `config/edgegate.yaml`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::broker::BrokerConfig;
use super::gpio::GpioConfig;
use super::protocol::Protocol;
use super::secret::{Secret, SecretSource};
use super::serial::SerialConfig;
use super::store::StoreConfig;
use super::topic;
use super::units::{ByteSize, HumanDuration};
use super::url::{parse_endpoint, Endpoint};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// No uplink: edgegate is a local broker (and hardware adapter) only.
    #[serde(default)]
    pub uplink: Option<UplinkConfig>,
    #[serde(default)]
    pub log: LogConfig,
    /// GPIO inputs and outputs (see `GpioConfig`).
    #[serde(default)]
    pub gpio: GpioConfig,
    /// Serial sensors (see `SerialConfig`).
    #[serde(default)]
    pub serial: SerialConfig,
    // ─── Modbus and 1-Wire (config/modbus.rs) ───
    /// Modbus RTU lines and Modbus TCP endpoints (see `ModbusConfig`).
    #[serde(default)]
    pub modbus: super::modbus::ModbusConfig,
    /// DS18B20 probes through the kernel's w1 driver (see `OnewireConfig`).
    #[serde(default)]
    pub onewire: super::modbus::OnewireConfig,
    // ─── end Modbus and 1-Wire ───
    /// `edgegate status` socket and the periodic stats message (see `StatusConfig`).
    #[serde(default)]
    pub status: StatusConfig,
    /// Prometheus endpoint (opt-in).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Home Assistant MQTT discovery (opt-in).
    #[serde(default)]
    pub homeassistant: HomeAssistantConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// UNIX socket `edgegate status` asks; created mode 0660 (the `edgegate` group may read
    /// it). `null` turns it off.
    #[serde(default = "default_status_socket")]
    pub socket: Option<PathBuf>,
    /// Every this often a JSON stats message goes to `<status_topic>/stats`, locally and (QoS 0,
    /// while the link is up) upstream. `0s` turns it off.
    #[serde(default = "default_stats_interval")]
    pub stats_interval: HumanDuration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            socket: default_status_socket(),
            stats_interval: default_stats_interval(),
        }
    }
}

fn default_status_socket() -> Option<PathBuf> {
    Some(PathBuf::from("/run/edgegate/status.sock"))
}
fn default_stats_interval() -> HumanDuration {
    HumanDuration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// HTTP address serving `/metrics` in the Prometheus text format.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9883))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Home Assistant's discovery prefix (its MQTT integration's setting).
    #[serde(default = "default_ha_prefix")]
    pub prefix: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            enabled: false,
            prefix: default_ha_prefix(),
        }
    }
}

fn default_ha_prefix() -> String {
    "homeassistant".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Names this gateway upstream: default client id, `{gateway_id}` in templates, message ids.
    pub id: String,
    /// Retained status topic (birth `online`, will `offline`), locally and upstream.
    #[serde(default = "default_status_topic")]
    pub status_topic: String,
    /// How long a graceful stop may take before stragglers are abandoned.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
}

fn default_status_topic() -> String {
    "edgegate/{gateway_id}/status".to_string()
}
fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

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
    /// Keep the upstream session (and its queued downlink messages) across reconnects.
    pub clean_session: bool,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// error, warn, info, debug, trace, or a tracing filter such as `info,edgegate::forward=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// journald when started by systemd (JOURNAL_STREAM set), stderr otherwise.
    #[default]
    Auto,
    Journald,
    Stderr,
}

impl Config {
    /// The status topic with `{gateway_id}` expanded.
    pub fn status_topic(&self) -> String {
        topic::expand(
            &self.gateway.status_topic,
            &[("gateway_id", &self.gateway.id)],
        )
    }
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

    /// The first forward rule, in file order, whose `local` filter matches `topic`, with its index.
    pub fn match_rule(&self, topic: &str) -> Option<(usize, &ForwardRule)> {
        self.forward
            .iter()
            .enumerate()
            .find(|(_, rule)| topic::matches(&rule.local, topic))
    }

    /// The first downlink rule, in file order, whose expanded `remote` filter matches an upstream
    /// topic, with its index.
    pub fn match_downlink(
        &self,
        remote_topic: &str,
        gateway_id: &str,
    ) -> Option<(usize, &DownlinkRule)> {
        self.downlink
            .iter()
            .enumerate()
            .find(|(_, rule)| topic::matches(&rule.remote_filter(gateway_id), remote_topic))
    }

    /// The local filters to subscribe to so that each forwarded message arrives exactly once:
    /// the forward filters in file order, without duplicates and without any filter another one
    /// already covers (of two equivalent filters, such as `#` and `+/#`, the first is kept).
    pub fn local_subscriptions(&self) -> Vec<String> {
        let mut unique: Vec<&str> = Vec::with_capacity(self.forward.len());
        for rule in &self.forward {
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
    clean_session: bool,
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
    fn templates_expand_the_gateway_id_and_topic() {
        let cfg: Config = serde_yaml::from_str("gateway: {id: gw1}").expect("parses");
        assert_eq!(cfg.status_topic(), "edgegate/gw1/status");
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

    #[test]
    fn downlink_topics_swap_the_fixed_prefix_for_the_local_one() {
        let rule = |remote: &str, local: Option<&str>| DownlinkRule {
            remote: remote.to_string(),
            local: local.map(str::to_string),
        };
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
            let rule = DownlinkRule {
                remote: remote.to_string(),
                local: local.map(str::to_string),
            };
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
