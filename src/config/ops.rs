//! The operations sections: `log:`, `status:` (the `edgegate status` socket and stats message),
//! `metrics:` (Prometheus) and `homeassistant:` (MQTT discovery).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::units::HumanDuration;

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
