//! The `broker:` section (crate::broker, crate::front): the local listeners (plain, MQTT 5, TLS,
//! WebSocket), users with their passwords and topic permissions, and the router's limits.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Visitor};
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
    /// Who may connect without a user name: see [`AllowAnonymous`]. `None`: as before the key
    /// existed (everyone without users, nobody with them); read it through [`Self::anonymous`].
    #[serde(default)]
    pub allow_anonymous: Option<AllowAnonymous>,
    /// Topic ACL of anonymous clients (MQTT front).
    #[serde(default)]
    pub anonymous: AnonymousConfig,
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

    /// Who may connect without a user name: the key, or, when it is absent, what 0.1 did
    /// (everyone when there are no users, nobody when there are).
    pub fn anonymous(&self) -> AllowAnonymous {
        self.allow_anonymous.unwrap_or(if self.users.is_empty() {
            AllowAnonymous::Everyone
        } else {
            AllowAnonymous::Nobody
        })
    }

    /// The device listeners that accept clients from other machines (not a loopback address),
    /// as `(key, address)`.
    pub fn network_listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("broker.listen", self.listen),
            ("broker.listen_v5", self.listen_v5),
            ("broker.tls.listen", self.tls.as_ref().map(|t| t.listen)),
            (
                "broker.websocket.listen",
                self.websocket.as_ref().map(|w| w.listen),
            ),
        ]
        .into_iter()
        .filter_map(|(key, addr)| addr.map(|a| (key, a)))
        .filter(|(_, a)| !a.ip().is_loopback())
        .collect()
    }
}

/// `broker.allow_anonymous`: who may connect without a user name (and password).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowAnonymous {
    /// `true`: anyone who reaches a listener.
    Everyone,
    /// `loopback`: programs on this machine (a peer address in 127.0.0.0/8 or ::1); clients from
    /// the network must log in as one of `users`.
    Loopback,
    /// `false`: nobody; every client logs in as one of `users`.
    Nobody,
}

impl AllowAnonymous {
    /// Whether an anonymous client from `peer` may connect.
    pub fn admits(self, peer: std::net::IpAddr) -> bool {
        match self {
            AllowAnonymous::Everyone => true,
            AllowAnonymous::Nobody => false,
            AllowAnonymous::Loopback => is_loopback(peer),
        }
    }
}

impl fmt::Display for AllowAnonymous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllowAnonymous::Everyone => "true",
            AllowAnonymous::Loopback => "loopback",
            AllowAnonymous::Nobody => "false",
        })
    }
}

/// A loopback peer, also when an IPv6 socket (`[::]`) reports an IPv4 one as `::ffff:127.x.y.z`.
pub fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

impl<'de> Deserialize<'de> for AllowAnonymous {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "true, false or loopback";
        impl Visitor<'_> for V {
            type Value = AllowAnonymous;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AllowAnonymous, E> {
                Ok(if v {
                    AllowAnonymous::Everyone
                } else {
                    AllowAnonymous::Nobody
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AllowAnonymous, E> {
                match v {
                    "loopback" => Ok(AllowAnonymous::Loopback),
                    "true" => Ok(AllowAnonymous::Everyone),
                    "false" => Ok(AllowAnonymous::Nobody),
                    other => Err(E::custom(format!("`{other}` is not one of {EXPECTED}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `broker.anonymous`: what anonymous clients may do (enforced by the MQTT front), like a user's
/// `publish` / `subscribe`. Missing: anything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnonymousConfig {
    #[serde(default)]
    pub publish: Option<Vec<String>>,
    #[serde(default)]
    pub subscribe: Option<Vec<String>>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: default_broker_listen(),
            listen_v5: None,
            tls: None,
            websocket: None,
            users: Vec::new(),
            allow_anonymous: None,
            anonymous: AnonymousConfig::default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("a test address")
    }

    #[test]
    fn loopback_admits_ipv4_and_ipv6_loopback_peers_also_when_mapped_and_nothing_else() {
        let l = AllowAnonymous::Loopback;
        for peer in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(l.admits(ip(peer)), "{peer} is loopback");
        }
        for peer in [
            "10.0.0.7",
            "192.168.1.20",
            "::ffff:10.0.0.7",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert!(!l.admits(ip(peer)), "{peer} is not loopback");
        }
        assert!(AllowAnonymous::Everyone.admits(ip("10.0.0.7")));
        assert!(!AllowAnonymous::Nobody.admits(ip("127.0.0.1")));
    }

    #[test]
    fn without_the_key_anonymous_access_is_what_0_1_did() {
        let mut b = BrokerConfig::default();
        assert_eq!(b.anonymous(), AllowAnonymous::Everyone);
        b.users.push(UserConfig {
            username: "u".into(),
            password: SecretSource::default(),
            publish: None,
            subscribe: None,
        });
        assert_eq!(b.anonymous(), AllowAnonymous::Nobody);
        b.allow_anonymous = Some(AllowAnonymous::Loopback);
        assert_eq!(b.anonymous(), AllowAnonymous::Loopback);
    }

    #[test]
    fn network_listeners_leave_out_loopback_addresses() {
        let mut b = BrokerConfig {
            listen: Some("127.0.0.1:1883".parse().expect("addr")),
            ..BrokerConfig::default()
        };
        assert!(b.network_listeners().is_empty());
        b.listen_v5 = Some("0.0.0.0:1884".parse().expect("addr"));
        b.websocket = Some(WebsocketConfig {
            listen: "[::1]:8083".parse().expect("addr"),
        });
        assert_eq!(
            b.network_listeners(),
            vec![("broker.listen_v5", "0.0.0.0:1884".parse().expect("addr"))]
        );
    }
}
