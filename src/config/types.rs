//! The configuration file's shape: one struct per YAML section.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Defaults here match the annotated reference `config/edgegate.yaml`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::broker::BrokerConfig;
use super::forward::{self, DownlinkRule, ForwardRule};
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

    #[test]
    fn the_status_topic_expands_the_gateway_id() {
        let cfg: Config = serde_yaml::from_str("gateway: {id: gw1}").expect("parses");
        assert_eq!(cfg.status_topic(), "edgegate/gw1/status");
    }

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
