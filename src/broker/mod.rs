//! The embedded broker: our settings → rumqttd, listeners on our runtime, local links.
//!
//! rumqttd's own `Broker::start()` blocks forever, cannot report a bind error and has no shutdown,
//! so we spawn its router ourselves and run each listener's `Server` as a task on our runtime:
//! a bind error comes back as the task's result, and the tasks end with the runtime.
//! rumqttd's config types never leave this module.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::Duration;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
    TlsConfig,
};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, Protocol};
use crate::front::{Durable, Front, FrontCounters, Internal, Transport};

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
    /// Device-facing listeners (the front's when it is on).
    listeners: Vec<ListenerSpec>,
    /// rumqttd's loopback listeners behind the front (empty without the front).
    internal: Vec<ListenerSpec>,
    front: Option<Front>,
}

impl Broker {
    /// Builds rumqttd's router from our settings and spawns one task per listener into `tasks`.
    /// Fails at once (before anything is spawned) when a listener address cannot be bound.
    ///
    /// With the MQTT front on (`broker.front`), the plain-TCP listeners are the front's and
    /// rumqttd listens on two internal loopback ports (3.1.1 and 5) that only the front uses;
    /// `durable` is what the front stores to. The front stops accepting when `front_cancel` is
    /// cancelled.
    pub fn start(
        cfg: &BrokerConfig,
        tasks: &mut JoinSet<ListenerExit>,
        durable: Option<Durable>,
        front_cancel: CancellationToken,
    ) -> Result<Broker, BrokerError> {
        let listeners = listener_specs(cfg);
        // rumqttd binds inside its task and can only report failure as a log line; try each address
        // ourselves first so a port held by another process is a clear error, not a silent hang.
        // The front keeps its bound sockets.
        let mut bound = Vec::new();
        for l in &listeners {
            let sock = StdListener::bind(l.addr).map_err(|source| BrokerError::Bind {
                addr: l.addr,
                what: l.what,
                source,
            })?;
            bound.push(sock);
        }
        let front = if cfg.front_enabled() {
            Some(start_front(
                cfg,
                &listeners,
                bound,
                tasks,
                durable,
                front_cancel,
            )?)
        } else {
            drop(bound);
            None
        };
        let (cfg, internal): (std::borrow::Cow<'_, BrokerConfig>, Vec<ListenerSpec>) = match &front
        {
            Some((_, internal)) => {
                // rumqttd serves only the front, on loopback, without TLS or WebSocket.
                let mut c = cfg.clone();
                c.listen = Some(internal.v4);
                c.listen_v5 = Some(internal.v5);
                c.tls = None;
                c.websocket = None;
                let specs = listener_specs(&c);
                (std::borrow::Cow::Owned(c), specs)
            }
            None => (std::borrow::Cow::Borrowed(cfg), Vec::new()),
        };
        let cfg = cfg.as_ref();

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
        Ok(Broker {
            link_factory,
            listeners,
            internal,
            front: front.map(|(f, _)| f),
        })
    }

    /// The front's counters, when the front is on.
    pub fn front_counters(&self) -> Option<Arc<FrontCounters>> {
        self.front.as_ref().map(Front::counters)
    }

    /// The front's local subscription registry, when the front is on: an in-process
    /// subscriber on a [`Broker::link`] registers its filters there first, or the front would
    /// acknowledge messages on them without passing them to rumqttd.
    pub fn front_subscriptions(&self) -> Option<Arc<crate::front::Subscriptions>> {
        self.front.as_ref().map(Front::subscriptions)
    }

    /// A local (in-process, QoS 0) connection to the router.
    pub fn link(&self, name: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.link_factory)(name).map_err(|reason| BrokerError::Link {
            name: name.to_string(),
            reason,
        })
    }

    /// A handle that publishes into the local broker (downlink, status, hardware readings).
    pub fn publisher(&self, name: &str) -> Result<LocalPublisher, BrokerError> {
        let (tx, rx) = self.link(name)?;
        Ok(LocalPublisher::spawn(name.to_string(), tx, rx))
    }

    pub fn listeners(&self) -> &[ListenerSpec] {
        &self.listeners
    }

    /// Waits until every listener accepts a TCP connection, or one of them has failed.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        for l in self.internal.iter().chain(&self.listeners) {
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
    fn from_result(addr: SocketAddr, what: &'static str, r: Result<(), String>) -> Self {
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

/// Picks rumqttd's internal loopback ports, binds nothing else and spawns the front's accept
/// loops on the already-bound device-facing sockets.
fn start_front(
    cfg: &BrokerConfig,
    listeners: &[ListenerSpec],
    bound: Vec<StdListener>,
    tasks: &mut JoinSet<ListenerExit>,
    durable: Option<Durable>,
    cancel: CancellationToken,
) -> Result<(Front, Internal), BrokerError> {
    let internal = Internal {
        v4: free_loopback_port("internal MQTT 3.1.1")?,
        v5: free_loopback_port("internal MQTT 5")?,
    };
    let front = Front::new(cfg, internal, durable);
    let acceptor = match &cfg.tls {
        Some(t) => Some((
            t.listen,
            crate::front::tls::acceptor(t).map_err(BrokerError::Tls)?,
        )),
        None => None,
    };
    for (spec, sock) in listeners.iter().zip(bound) {
        let (addr, what) = (spec.addr, spec.what);
        let transport = match (&acceptor, &cfg.websocket) {
            (Some((a, acc)), _) if *a == addr => Transport::Tls(acc.clone()),
            (_, Some(ws)) if ws.listen == addr => Transport::WebSocket,
            _ => Transport::Tcp,
        };
        let listener = sock
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(sock))
            .map_err(|source| BrokerError::Bind { addr, what, source })?;
        let front = front.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let r = front.run(listener, transport, cancel).await;
            ListenerExit::from_result(addr, what, r.map_err(|e| e.to_string()))
        });
    }
    Ok((front, internal))
}

/// A loopback port free right now (the kernel's pick), for one of rumqttd's internal listeners.
fn free_loopback_port(what: &'static str) -> Result<SocketAddr, BrokerError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    StdListener::bind(any)
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::Bind {
            addr: any,
            what,
            source,
        })
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

fn listener_specs(cfg: &BrokerConfig) -> Vec<ListenerSpec> {
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

/// Publishes into the local broker from any task. The link is driven by its own task, which also
/// re-arms it after `Notification::Unschedule` (without that the router stops serving the link).
#[derive(Clone)]
pub struct LocalPublisher {
    tx: tokio::sync::mpsc::Sender<Publish>,
}

impl LocalPublisher {
    fn spawn(name: String, mut link_tx: LinkTx, mut link_rx: LinkRx) -> LocalPublisher {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Publish>(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    p = rx.recv() => {
                        let Some(p) = p else { break };
                        if let Err(e) = link_tx.send(Packet::Publish(p, None)).await {
                            tracing::error!(link = %name, error = %e, "local broker link closed");
                            break;
                        }
                    }
                    n = link_rx.next() => match n {
                        Ok(Some(Notification::Unschedule)) => {
                            if link_rx.wake().await.is_err() { break; }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        });
        LocalPublisher { tx }
    }

    /// A publisher with no broker behind it: what it publishes arrives on the receiver.
    #[cfg(test)]
    pub(crate) fn for_tests() -> (LocalPublisher, tokio::sync::mpsc::Receiver<Publish>) {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        (LocalPublisher { tx }, rx)
    }

    /// Publishes at QoS 0 (the only QoS of rumqttd's local links). Waits only for queue space.
    pub async fn publish(
        &self,
        topic: impl Into<bytes::Bytes>,
        payload: impl Into<bytes::Bytes>,
        retain: bool,
    ) -> bool {
        let p = Publish::new(topic.into(), payload.into(), retain);
        self.tx.send(p).await.is_ok()
    }
}
