//! The root of the configuration file: `Config`, which holds one field per YAML section (each
//! section's structs are in their own file), and the `gateway:` section.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Defaults match the annotated reference `config/edgegate.yaml`.

use serde::Deserialize;

use super::broker::BrokerConfig;
use super::gpio::GpioConfig;
use super::ops::{HomeAssistantConfig, LogConfig, MetricsConfig, StatusConfig};
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
