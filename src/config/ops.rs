//! The operations sections: `log:`, `status:` (the `edgegate status` socket and stats message),
//! `metrics:` (Prometheus) and `homeassistant:` (MQTT discovery).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::Deserializer;
use serde::Deserialize;

use super::units::HumanDuration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// UNIX socket `edgegate status` asks; created mode 0660 (the `edgegate` group may read
    /// it). `null` turns it off; absent: chosen, see [`StatusSocket::Auto`].
    #[serde(default)]
    pub socket: StatusSocket,
    /// Every this often a JSON stats message goes to `<status_topic>/stats`, locally and (QoS 0,
    /// while the link is up) upstream. `0s` turns it off.
    #[serde(default = "default_stats_interval")]
    pub stats_interval: HumanDuration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            socket: StatusSocket::Auto,
            stats_interval: default_stats_interval(),
        }
    }
}

/// The directory systemd creates for the service (`RuntimeDirectory=edgegate`).
pub const RUN_DIR: &str = "/run/edgegate";

/// Where the status socket is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StatusSocket {
    /// `status.socket` absent: `/run/edgegate/status.sock` when the daemon can create it there
    /// (under systemd), otherwise `edgegate-status.sock` beside the store (a shell, `cargo
    /// run`). Derived from the config alone, so `edgegate status` finds it both ways (it tries
    /// both, and takes the daemon whose gateway id is the config's).
    #[default]
    Auto,
    /// `status.socket: null`: no socket.
    Off,
    /// `status.socket: <path>`: exactly there.
    Path(PathBuf),
}

impl<'de> Deserialize<'de> for StatusSocket {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<PathBuf>::deserialize(d)? {
            None => StatusSocket::Off,
            Some(p) => StatusSocket::Path(p),
        })
    }
}

impl StatusSocket {
    /// The places to try, in order (empty when off); `store_path` is `store.path`.
    pub fn candidates(&self, store_path: &Path) -> Vec<PathBuf> {
        match self {
            StatusSocket::Off => Vec::new(),
            StatusSocket::Path(p) => vec![p.clone()],
            StatusSocket::Auto => {
                let dir = match store_path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                vec![
                    Path::new(RUN_DIR).join("status.sock"),
                    dir.join("edgegate-status.sock"),
                ]
            }
        }
    }
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
