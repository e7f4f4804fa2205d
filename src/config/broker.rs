//! The `broker:` section (crate::broker, crate::front): the local listeners (plain, MQTT 5, TLS,
//! WebSocket), users with their passwords and topic permissions, and the router's limits.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::protocol::Protocol;
use super::secret::{Secret, SecretSource};
use super::units::{ByteSize, HumanDuration};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Plain-TCP MQTT 3.1.1 listener. `null` turns it off.
    #[serde(default = "default_broker_listen")]
    pub listen: Option<SocketAddr>,
    /// Optional plain-TCP MQTT 5 listener.
    #[serde(default)]
    pub listen_v5: Option<SocketAddr>,
    /// Optional TLS listener (rumqttd requires client certificates on it, see the reference).
    #[serde(default)]
    pub tls: Option<BrokerTlsConfig>,
    /// Optional MQTT-over-WebSocket listener (MQTT 3.1.1).
    #[serde(default)]
    pub websocket: Option<WebsocketConfig>,
    /// When non-empty, every client must log in as one of these users.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_payload_size")]
    pub max_payload_size: ByteSize,
    /// QoS 1/2 messages in flight per client connection.
    #[serde(default = "default_broker_max_inflight")]
    pub max_inflight: usize,
    /// Time a new connection has to send its CONNECT.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Size of one segment of a topic filter's in-memory log.
    #[serde(default = "default_segment_size")]
    pub segment_size: ByteSize,
    /// Segments kept per filter; memory per filter is at most segment_size × segment_count.
    #[serde(default = "default_segment_count")]
    pub segment_count: usize,
    // ─── MQTT front (src/front/) ───
    /// The MQTT front on every listener (a device's PUBACK means "on disk"). Default: on.
    #[serde(default = "default_front")]
    pub front: bool,
}

impl BrokerConfig {
    /// Whether the MQTT front serves the listeners (see `front`).
    pub fn front_enabled(&self) -> bool {
        self.front
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: default_broker_listen(),
            listen_v5: None,
            tls: None,
            websocket: None,
            users: Vec::new(),
            max_connections: default_max_connections(),
            max_payload_size: default_max_payload_size(),
            max_inflight: default_broker_max_inflight(),
            connect_timeout: default_connect_timeout(),
            segment_size: default_segment_size(),
            segment_count: default_segment_count(),
            front: default_front(),
        }
    }
}

fn default_front() -> bool {
    true
}
fn default_broker_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 1883)))
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_payload_size() -> ByteSize {
    ByteSize(256 * 1024)
}
fn default_broker_max_inflight() -> usize {
    100
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_segment_size() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_segment_count() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsConfig {
    pub listen: SocketAddr,
    /// 4 (MQTT 3.1.1) or 5.
    #[serde(default)]
    pub protocol: Protocol,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA that signs device certificates; rumqttd requires client certificates on TLS listeners.
    pub client_ca_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketConfig {
    pub listen: SocketAddr,
}

// The password keys sit beside `username` in the file. `#[serde(flatten)]` would express that, but
// serde then buffers the map: unknown keys lose the list of expected ones and errors lose their
// line. So the file form is a flat private struct (`UserConfigFile`) converted with `from`.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "UserConfigFile")]
pub struct UserConfig {
    pub username: String,
    pub password: SecretSource,
    /// Topic filters this user may publish to (enforced by the MQTT front); `None`: any topic.
    pub publish: Option<Vec<String>>,
    /// Topic filters this user may subscribe within (MQTT front); `None`: any filter.
    pub subscribe: Option<Vec<String>>,
}

/// The `users` entry as written in the file: password keys beside `username`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserConfigFile {
    username: String,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    subscribe: Option<Vec<String>>,
}

impl From<UserConfigFile> for UserConfig {
    fn from(f: UserConfigFile) -> Self {
        UserConfig {
            username: f.username,
            password: SecretSource {
                password: f.password,
                password_file: f.password_file,
                password_env: f.password_env,
                resolved: None,
            },
            publish: f.publish,
            subscribe: f.subscribe,
        }
    }
}
