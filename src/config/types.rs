//! The configuration file's shape: one struct per YAML section.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Defaults here match the annotated reference `config/edgegate.yaml`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::broker::BrokerConfig;
use super::gpio::GpioConfig;
use super::serial::SerialConfig;
use super::store::StoreConfig;
use super::topic;
use super::units::HumanDuration;
use super::uplink::UplinkConfig;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_topic_expands_the_gateway_id() {
        let cfg: Config = serde_yaml::from_str("gateway: {id: gw1}").expect("parses");
        assert_eq!(cfg.status_topic(), "edgegate/gw1/status");
    }
}
