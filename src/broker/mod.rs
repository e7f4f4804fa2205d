//! The embedded broker: our settings → rumqttd, listeners on our runtime, local links.
//!
//! rumqttd's own `Broker::start()` blocks forever, cannot report a bind error and has no shutdown,
//! so we spawn its router ourselves and run each listener's `Server` as a task on our runtime:
//! a bind error comes back as the task's result, and the tasks end with the runtime.
//! rumqttd's types never leave this folder: in-process clients get a [`LocalLink`] of ours
//! (`link.rs`), which owns the re-arm after `Unschedule` that rumqttd's local links need. This
//! folder imports only `config`; the MQTT front that sits in front of rumqttd (`crate::front`) is
//! started by `app`, which then starts rumqttd behind it with [`Broker::start_behind`].

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::Duration;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, TlsConfig,
};

use tokio::task::JoinSet;

use crate::config::{BrokerConfig, Protocol};

mod link;

pub use link::{Delivery, LinkClosed, LocalLink, LocalPublisher};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} ({what}): {source}; is another MQTT broker running there?")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("listener {addr} ({what}) stopped: {reason}")]
    ListenerFailed {
        addr: SocketAddr,
        what: &'static str,
        reason: String,
    },
    #[error("listener {addr} ({what}) does not accept connections after {waited:?}")]
    NotReady {
        addr: SocketAddr,
        what: &'static str,
        waited: Duration,
    },
    #[error("broker.tls: {0}")]
    Tls(String),
    #[error("the embedded broker refused an internal link `{name}`: {reason}")]
    Link { name: String, reason: String },
}

/// One configured listener, in our terms.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub what: &'static str,
}

// rumqttd's LinkError carries a whole router event (~840 bytes); only its text is kept.
type LinkFactory = Box<dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync>;

/// The running embedded broker. Dropping it does not stop rumqttd's router thread (rumqttd has
/// no way to); the listener tasks end when the set they were spawned on is dropped or aborted.
pub struct Broker {
    link_factory: LinkFactory,
    /// The listeners rumqttd serves: the device-facing ones, or, behind the front, its two
    /// internal loopback ports.
    listeners: Vec<ListenerSpec>,
}

impl Broker {
    /// Builds rumqttd's router from our settings and spawns one task per listener into `tasks`.
    /// Fails at once (before anything is spawned) when a listener address cannot be bound.
    pub fn start(
        cfg: &BrokerConfig,
        tasks: &mut JoinSet<ListenerExit>,
    ) -> Result<Broker, BrokerError> {
        let listeners = ListenerSpec::of(cfg);
        // rumqttd binds inside its task and can only report failure as a log line; try each
        // address ourselves first so a port held by another process is a clear error, not a
        // silent hang.
        for l in &listeners {
            StdListener::bind(l.addr).map_err(|source| BrokerError::Bind {
                addr: l.addr,
                what: l.what,
                source,
            })?;
        }
        Ok(Self::spawn(cfg, listeners, tasks))
    }

    /// rumqttd behind the MQTT front: it serves only the front, on the loopback ports `v4`
    /// (MQTT 3.1.1) and `v5`, without TLS or WebSocket; users and limits as configured.
    pub fn start_behind(
        cfg: &BrokerConfig,
        v4: SocketAddr,
        v5: SocketAddr,
        tasks: &mut JoinSet<ListenerExit>,
    ) -> Broker {
        let mut c = cfg.clone();
        c.listen = Some(v4);
        c.listen_v5 = Some(v5);
        c.tls = None;
        c.websocket = None;
        let listeners = ListenerSpec::of(&c);
        Self::spawn(&c, listeners, tasks)
    }

    fn spawn(
        cfg: &BrokerConfig,
        listeners: Vec<ListenerSpec>,
        tasks: &mut JoinSet<ListenerExit>,
    ) -> Broker {
        let router = Router::new(0, router_config(cfg));
        let router_tx = router.spawn();
        let conn = connection_settings(cfg);
        let mut n = 0usize;
        let mut settings = |addr: SocketAddr, tls: Option<TlsConfig>| {
            n += 1;
            ServerSettings {
                name: format!("listener-{n}"),
                listen: addr,
                tls,
                next_connection_delay_ms: 0,
                connections: conn.clone(),
            }
        };
        if let Some(addr) = cfg.listen {
            let mut server = Server::new(settings(addr, None), router_tx.clone(), V4);
            let what = "MQTT 3.1.1";
            tasks.spawn(async move {
                let r = server.start(LinkType::Remote).await;
                ListenerExit::from_result(addr, what, r.map_err(|e| e.to_string()))
            });
        }
        if let Some(addr) = cfg.listen_v5 {
            let mut server = Server::new(settings(addr, None), router_tx.clone(), V5);
            let what = "MQTT 5";
            tasks.spawn(async move {
                let r = server.start(LinkType::Remote).await;
                ListenerExit::from_result(addr, what, r.map_err(|e| e.to_string()))
            });
        }
        if let Some(tls) = &cfg.tls {
            let addr = tls.listen;
            let tls_cfg = TlsConfig::Rustls {
                capath: Some(tls.client_ca_file.display().to_string()),
                certpath: tls.cert_file.display().to_string(),
                keypath: tls.key_file.display().to_string(),
            };
            match tls.protocol {
                Protocol::V4 => {
                    let mut server =
                        Server::new(settings(addr, Some(tls_cfg)), router_tx.clone(), V4);
                    tasks.spawn(async move {
                        let r = server.start(LinkType::Remote).await;
                        ListenerExit::from_result(
                            addr,
                            "MQTT 3.1.1 TLS",
                            r.map_err(|e| e.to_string()),
                        )
                    });
                }
                Protocol::V5 => {
                    let mut server =
                        Server::new(settings(addr, Some(tls_cfg)), router_tx.clone(), V5);
                    tasks.spawn(async move {
                        let r = server.start(LinkType::Remote).await;
                        ListenerExit::from_result(addr, "MQTT 5 TLS", r.map_err(|e| e.to_string()))
                    });
                }
            }
        }
        if let Some(ws) = &cfg.websocket {
            let addr = ws.listen;
            let mut server = Server::new(settings(addr, None), router_tx.clone(), V4);
            tasks.spawn(async move {
                let r = server.start(LinkType::Websocket).await;
                ListenerExit::from_result(addr, "MQTT over WebSocket", r.map_err(|e| e.to_string()))
            });
        }

        let link_factory: LinkFactory = Box::new(move |name: &str| {
            let (tx, rx, _connack) = LinkBuilder::new(name, router_tx.clone())
                .dynamic_filters(true)
                .build()
                .map_err(|e: LinkError| e.to_string())?;
            Ok((tx, rx))
        });
        Broker {
            link_factory,
            listeners,
        }
    }

    /// A local (in-process, QoS 0) connection to the router.
    pub fn link(&self, name: &str) -> Result<LocalLink, BrokerError> {
        let (tx, rx) = (self.link_factory)(name).map_err(|reason| BrokerError::Link {
            name: name.to_string(),
            reason,
        })?;
        Ok(LocalLink::new(name.to_string(), tx, rx))
    }

    /// A handle that publishes into the local broker (downlink, status, hardware readings).
    pub fn publisher(&self, name: &str) -> Result<LocalPublisher, BrokerError> {
        Ok(LocalPublisher::spawn(self.link(name)?))
    }

    pub fn listeners(&self) -> &[ListenerSpec] {
        &self.listeners
    }

    /// Waits until every listener accepts a TCP connection, or one of them has failed.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        for l in &self.listeners {
            let probe = probe_addr(l.addr);
            loop {
                if tokio::net::TcpStream::connect(probe).await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(BrokerError::NotReady {
                        addr: l.addr,
                        what: l.what,
                        waited: timeout,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
}

/// How a listener task ended (they only end on error).
#[derive(Debug)]
pub struct ListenerExit {
    pub addr: SocketAddr,
    pub what: &'static str,
    pub error: String,
}

impl ListenerExit {
    pub fn from_result(addr: SocketAddr, what: &'static str, r: Result<(), String>) -> Self {
        ListenerExit {
            addr,
            what,
            error: match r {
                Ok(()) => "listener returned".to_string(),
                Err(e) => e,
            },
        }
    }

    pub fn into_error(self) -> BrokerError {
        BrokerError::ListenerFailed {
            addr: self.addr,
            what: self.what,
            reason: self.error,
        }
    }
}

/// A wildcard listen address is probed on loopback.
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

impl ListenerSpec {
    /// The listeners `cfg` configures, device-facing.
    pub fn of(cfg: &BrokerConfig) -> Vec<ListenerSpec> {
        let mut v = Vec::new();
        if let Some(addr) = cfg.listen {
            v.push(ListenerSpec {
                addr,
                what: "MQTT 3.1.1",
            });
        }
        if let Some(addr) = cfg.listen_v5 {
            v.push(ListenerSpec {
                addr,
                what: "MQTT 5",
            });
        }
        if let Some(tls) = &cfg.tls {
            v.push(ListenerSpec {
                addr: tls.listen,
                what: "MQTT TLS",
            });
        }
        if let Some(ws) = &cfg.websocket {
            v.push(ListenerSpec {
                addr: ws.listen,
                what: "MQTT over WebSocket",
            });
        }
        v
    }
}

fn router_config(cfg: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        max_connections: cfg.max_connections.saturating_add(8), // + our own local links
        max_outgoing_packet_count: 200,
        max_segment_size: usize::try_from(cfg.segment_size.get()).unwrap_or(usize::MAX),
        max_segment_count: cfg.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn connection_settings(cfg: &BrokerConfig) -> ConnectionSettings {
    let auth = if cfg.users.is_empty() {
        None
    } else {
        let mut m = HashMap::new();
        for u in &cfg.users {
            if let Some(p) = &u.password.resolved {
                m.insert(u.username.clone(), p.expose().to_string());
            }
        }
        Some(m)
    };
    ConnectionSettings {
        connection_timeout_ms: u16::try_from(cfg.connect_timeout.get().as_millis())
            .unwrap_or(u16::MAX),
        max_payload_size: usize::try_from(cfg.max_payload_size.get()).unwrap_or(usize::MAX),
        max_inflight_count: cfg.max_inflight,
        auth,
        external_auth: None,
        dynamic_filters: true,
    }
}
