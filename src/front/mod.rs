//! The MQTT front: edgegate owns the device-facing ports, and a device's PUBACK means "on disk".
//!
//! rumqttd PUBACKs a QoS 1 PUBLISH as soon as its in-memory router has it, before any code of
//! ours could commit it; a crash in that window loses messages the device has already forgotten.
//! So devices connect here instead. Per device connection the front opens one loopback
//! connection to rumqttd (which now listens on 127.0.0.1 internal ports only) and forwards the
//! device's packets as their original bytes, in order:
//!
//! - a QoS 1/2 PUBLISH on a forwarded topic is appended to the store first and held until its
//!   transaction commits; only then are its bytes passed on, so the PUBACK/PUBREC rumqttd sends
//!   back follows the commit. Later packets of the same connection wait behind it (a FIFO), so
//!   nothing overtakes a held message. How soon the store commits depends on how the device
//!   sends (see [`rows`]): a device that waits for its PUBACKs (it pipelines, or sends the next
//!   message as soon as the last is acknowledged) is committed at once; a device that publishes
//!   now and then lets its message wait a small share of its own publishing interval, so that
//!   many devices share one transaction and one fsync.
//! - a QoS 0 PUBLISH on a forwarded topic is appended without waiting and passed on at once.
//! - **direct**: a non-retained QoS 0/1 PUBLISH on a forwarded topic that no local subscription
//!   filter matches ([`subs`]) is stored like the above but never passed on: rumqttd would only
//!   route it to nobody (its ingest is about a third of the CPU a message costs). For QoS 1 the
//!   front sends the PUBACK itself once the commit is done, in the FIFO's order; it reaches the
//!   device in the order of its PUBLISHes also relative to rumqttd's PUBACKs (the copy to the
//!   device counts those). The verdict is checked again when the message leaves the FIFO if a
//!   filter was added meanwhile, so a SUBSCRIBE read before the commit still gets it. QoS 2
//!   and retained messages always go to rumqttd. Filters: every allowed filter of a device's
//!   SUBSCRIBE (registered before rumqttd gets it; `$share/<group>/` removed), released at
//!   UNSUBSCRIBE or when a clean session ends (a persistent session's stay registered while the
//!   process runs, as rumqttd keeps them in memory), and the in-process subscribers (`app`
//!   registers the GPIO outputs' command topics). rumqttd drops a client after 1.5 × keep-alive
//!   without a read: while messages skip it, the front sends it a PINGREQ whenever nothing went
//!   to it for a quarter keep-alive, and drops as many PINGRESPs on their way to the device.
//! - everything else is passed on as it is, after the checks below.
//!
//! Packets from rumqttd to the device are copied byte for byte, undecoded, except the PINGRESPs
//! to the front's own PINGREQs and the SUBACKs the front completes.
//!
//! Every listener is the front's: plain TCP (`broker.listen`, `listen_v5`), TLS (`broker.tls`,
//! rustls, client certificates required, [`tls`]) and WebSocket (`broker.websocket`, subprotocol
//! `mqtt`). Each accepts MQTT 3.1.1 and 5 and sends the device to rumqttd's internal listener of
//! its version.
//!
//! What the front adds besides durability: strict validation (a malformed packet closes its
//! connection, counted by reason, see [`packet::Malformed`]), keep-alive 0 (rewritten in place to
//! 65535, which rumqttd accepts), the connection limit and the CONNECT timeout, authentication
//! (CONNACK "bad user name or password" instead of rumqttd's silent close), per-user topic ACLs,
//! and the guard against rumqttd's v4-encoder panic ([`props`]).
//!
//! Wills: rumqttd publishes a device's will itself, and with the front on no local link stores
//! device traffic, so the front stores a will on a forwarded topic when the device connection
//! ends without DISCONNECT (the case where rumqttd publishes it).
//!
//! Files: `listen` binds the listeners and starts the accept loops (`app` then starts rumqttd
//! behind the front); `conn` handles CONNECT and the will and runs the two directions: `device`
//! (the device session: the FIFO, ACLs, aliases, the topic cache, hold-until-commit through
//! `rows`) and `relay` (rumqttd → device, where rumqttd's quirks are undone); `packet` holds
//! every packet kind, reason code and encoder; `subs` the local subscription registry; `props`
//! the v4-encoder guard; `tls` the acceptor. Stored rows are built by `crate::intake`.

mod conn;
mod device;
mod listen;
pub mod packet;
pub mod props;
mod relay;
mod rows;
pub mod subs;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{topic, AllowAnonymous, BrokerConfig};
use crate::store::StoreHandle;

pub use listen::start;
pub use packet::Malformed;
pub use subs::Subscriptions;

#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("the front stopped accepting on {addr}: {source}")]
    Accept {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "the front on {addr} cannot reach the embedded broker's internal listeners after 10 s"
    )]
    Internal { addr: SocketAddr },
}

/// Where the front sends device connections: rumqttd's internal loopback listeners.
#[derive(Clone, Copy, Debug)]
pub struct Internal {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
}

/// Store-first settings: present when an uplink forwards something.
#[derive(Clone)]
pub struct Durable {
    /// The forward rules (replaced at SIGHUP).
    pub uplink: Arc<crate::intake::Rules>,
    pub store: StoreHandle,
}

/// A configured user: password and topic ACLs.
struct User {
    password: String,
    acl: Acl,
}

/// Topic filters a user may publish to / subscribe to; `None` allows everything.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
}

impl Acl {
    pub fn may_publish(&self, topic_name: &str) -> bool {
        self.publish
            .as_ref()
            .is_none_or(|fs| fs.iter().any(|f| topic::matches(f, topic_name)))
    }

    /// A subscription is allowed when one allowed filter covers it entirely (a shared
    /// subscription `$share/<group>/<filter>` is judged by its filter).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let filter = shared_filter(filter);
        self.subscribe
            .as_ref()
            .is_none_or(|fs| fs.iter().any(|f| topic::covers(f, filter)))
    }
}

/// The filter inside a shared subscription, or the filter itself.
pub fn shared_filter(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

/// Why the front closed a connection (besides malformed packets), for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    ConnectionLimit,
    ConnectTimeout,
    BadCredentials,
    /// A client without a user name, from where `broker.allow_anonymous` does not admit one.
    Anonymous,
    NotAuthorized,
    UnsupportedProtocol,
    BrokerUnavailable,
    StoreFailed,
    /// MQTT 3.1.1: a message the store can never take (larger than `store.max_bytes`); there
    /// is no negative PUBACK to say so.
    StoreRefused,
    /// TLS or WebSocket handshake failed.
    Handshake,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::ConnectionLimit,
        Refusal::ConnectTimeout,
        Refusal::BadCredentials,
        Refusal::Anonymous,
        Refusal::NotAuthorized,
        Refusal::UnsupportedProtocol,
        Refusal::BrokerUnavailable,
        Refusal::StoreFailed,
        Refusal::StoreRefused,
        Refusal::Handshake,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::BadCredentials => "bad_credentials",
            Refusal::Anonymous => "anonymous",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::UnsupportedProtocol => "unsupported_protocol",
            Refusal::BrokerUnavailable => "broker_unavailable",
            Refusal::StoreFailed => "store_failed",
            Refusal::StoreRefused => "store_refused",
            Refusal::Handshake => "handshake",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL
            .iter()
            .position(|r| *r == self)
            .expect("ALL lists every variant")
    }
}

/// Counters of the front, shared with status reporting and metrics.
#[derive(Debug, Default)]
pub struct FrontCounters {
    pub connections: AtomicU64,
    /// Open device connections right now.
    pub open: AtomicUsize,
    /// QoS 1/2 publishes held until their commit.
    pub held: AtomicU64,
    /// QoS 0 publishes stored without waiting.
    pub stored_qos0: AtomicU64,
    /// Held QoS 1 publishes the front acknowledged itself after their commit, without
    /// rumqttd (no local subscriber; counted in `held` too).
    pub acked_direct: AtomicU64,
    /// Stored QoS 0 publishes not passed to rumqttd (no local subscriber; counted in
    /// `stored_qos0` too).
    pub skipped_qos0: AtomicU64,
    /// Wills on forwarded topics stored when a device went away without DISCONNECT.
    pub wills_stored: AtomicU64,
    /// MQTT 5 publishes (or wills) whose properties were removed so rumqttd cannot crash.
    pub properties_stripped: AtomicU64,
    /// MQTT 3.1.1 connections whose messages wait unacknowledged because the store refuses
    /// new rows, right now.
    pub devices_held: AtomicUsize,
    /// QoS 1/2 messages of those connections waiting, right now.
    pub messages_held: AtomicUsize,
    malformed: [AtomicU64; Malformed::ALL.len()],
    refused: [AtomicU64; Refusal::ALL.len()],
    /// MQTT 5 QoS 1/2 messages answered with PUBACK/PUBREC 0x97, by the store's reason.
    rejected: [AtomicU64; crate::store::Refusal::ALL.len()],
}

impl FrontCounters {
    pub fn malformed(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Malformed::ALL
            .iter()
            .map(|m| (m.name(), self.malformed[m.index()].load(Ordering::Relaxed)))
    }

    pub fn refused(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL
            .iter()
            .map(|r| (r.name(), self.refused[r.index()].load(Ordering::Relaxed)))
    }

    /// MQTT 5 messages answered 0x97 (quota exceeded) because the store refused them.
    pub fn rejected(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        crate::store::Refusal::ALL
            .iter()
            .zip(&self.rejected)
            .map(|(r, n)| (r.name(), n.load(Ordering::Relaxed)))
    }

    fn count_rejected(&self, r: crate::store::Refusal) {
        if let Some(i) = crate::store::Refusal::ALL.iter().position(|x| *x == r) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_malformed(&self, m: Malformed) {
        self.malformed[m.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn count_refused(&self, r: Refusal) {
        self.refused[r.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// What every connection task shares.
pub(crate) struct Shared {
    internal: Internal,
    users: HashMap<String, User>,
    /// Who may connect without a user name (`broker.allow_anonymous`), and what they may do.
    anonymous: AllowAnonymous,
    anonymous_acl: Acl,
    max_connections: usize,
    connect_timeout: Duration,
    max_remaining: usize,
    durable: Option<Durable>,
    counters: Arc<FrontCounters>,
    /// Local subscription filters: topics without one skip rumqttd.
    subs: Arc<Subscriptions>,
    v4_filters: props::V4Filters,
    log_limit: std::sync::Mutex<crate::shared::RateLimited>,
    /// Connections to rumqttd whose CONNACK has not come yet (see [`HANDSHAKES`]).
    handshakes: Arc<tokio::sync::Semaphore>,
}

/// Most connections to rumqttd's internal listeners that may wait for their CONNACK at once.
/// rumqttd listens with a backlog of 128: when 1 000 devices connect in the same second (an
/// access point rebooted) and the front opened as many loopback connections, the kernel dropped
/// the excess and their SYNs were retried after 1, 3 and 7 s. Below the backlog, a connection
/// waits here instead, microseconds per connection ahead of it.
const HANDSHAKES: usize = 64;

/// The device-facing listener(s).
#[derive(Clone)]
pub struct Front {
    shared: Arc<Shared>,
}

impl Front {
    pub fn new(cfg: &BrokerConfig, internal: Internal, durable: Option<Durable>) -> Front {
        let users = cfg
            .users
            .iter()
            .filter_map(|u| {
                let password = u.password.secret()?.expose().to_string();
                Some((
                    u.username.clone(),
                    User {
                        password,
                        acl: Acl {
                            publish: u.publish.clone(),
                            subscribe: u.subscribe.clone(),
                        },
                    },
                ))
            })
            .collect();
        Front {
            shared: Arc::new(Shared {
                internal,
                users,
                anonymous: cfg.anonymous(),
                anonymous_acl: Acl {
                    publish: cfg.anonymous.publish.clone(),
                    subscribe: cfg.anonymous.subscribe.clone(),
                },
                max_connections: cfg.max_connections,
                connect_timeout: cfg.connect_timeout.get(),
                max_remaining: usize::try_from(cfg.max_payload_size.get()).unwrap_or(usize::MAX),
                durable,
                counters: Arc::new(FrontCounters::default()),
                subs: Arc::new(Subscriptions::new()),
                v4_filters: props::V4Filters::default(),
                log_limit: std::sync::Mutex::new(crate::shared::RateLimited::new(
                    Duration::from_secs(1),
                )),
                handshakes: Arc::new(tokio::sync::Semaphore::new(HANDSHAKES)),
            }),
        }
    }

    pub fn counters(&self) -> Arc<FrontCounters> {
        self.shared.counters.clone()
    }

    /// The local subscription registry: in-process subscribers on rumqttd's local links must
    /// register their filters here before subscribing (see [`subs`]).
    pub fn subscriptions(&self) -> Arc<Subscriptions> {
        self.shared.subs.clone()
    }

    /// Accepts device connections until `cancel`; each gets its own task. Returns only on an
    /// accept error that is not about one connection (those are logged and skipped).
    pub async fn run(
        self,
        listener: TcpListener,
        transport: Transport,
        cancel: CancellationToken,
    ) -> Result<(), FrontError> {
        let addr = listener.local_addr().map_err(|source| FrontError::Accept {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        // The device-facing socket is bound (and queues connections) before rumqttd's internal
        // listeners are up: accept only once they are, so no early device is refused.
        let internal = self.shared.internal;
        let up = async {
            for a in [internal.v4, internal.v5] {
                while tokio::net::TcpStream::connect(a).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(Duration::from_secs(10), up) => if r.is_err() {
                return Err(FrontError::Internal { addr });
            }
        }
        loop {
            let (socket, peer) = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = listener.accept() => match r {
                    Ok(x) => x,
                    // Per-connection failures (the peer reset before accept, out of file
                    // descriptors for a moment): wait a little and go on.
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(%addr, error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(source) => return Err(FrontError::Accept { addr, source }),
                },
            };
            let shared = self.shared.clone();
            let counters = &shared.counters;
            counters.connections.fetch_add(1, Ordering::Relaxed);
            if counters.open.fetch_add(1, Ordering::AcqRel) >= shared.max_connections {
                counters.open.fetch_sub(1, Ordering::AcqRel);
                counters.count_refused(Refusal::ConnectionLimit);
                let log = shared
                    .log_limit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .allow();
                if log {
                    tracing::warn!(%peer, limit = shared.max_connections, "connection refused: broker.max_connections reached");
                }
                drop(socket);
                continue;
            }
            let cancel = cancel.clone();
            let transport = transport.clone();
            tokio::spawn(async move {
                let _ = socket.set_nodelay(true);
                let timeout = shared.connect_timeout;
                match transport {
                    Transport::Tcp => {
                        let (rd, wr) = socket.into_split();
                        conn::serve(&shared, rd, wr, peer, cancel).await;
                    }
                    Transport::Tls(acceptor) => {
                        match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
                            Ok(Ok(stream)) => {
                                let (rd, wr) = tokio::io::split(stream);
                                conn::serve(&shared, rd, wr, peer, cancel).await;
                            }
                            Ok(Err(e)) => {
                                shared.counters.count_refused(Refusal::Handshake);
                                tracing::info!(%peer, error = %e, "TLS handshake failed");
                            }
                            Err(_) => shared.counters.count_refused(Refusal::ConnectTimeout),
                        }
                    }
                    Transport::WebSocket => {
                        let handshake =
                            async_tungstenite::tokio::accept_hdr_async(socket, MqttSubprotocol);
                        match tokio::time::timeout(timeout, handshake).await {
                            Ok(Ok(ws)) => {
                                let (rd, wr) =
                                    tokio::io::split(ws_stream_tungstenite::WsStream::new(ws));
                                conn::serve(&shared, rd, wr, peer, cancel).await;
                            }
                            Ok(Err(e)) => {
                                shared.counters.count_refused(Refusal::Handshake);
                                tracing::info!(%peer, error = %e, "WebSocket handshake failed");
                            }
                            Err(_) => shared.counters.count_refused(Refusal::ConnectTimeout),
                        }
                    }
                }
                shared.counters.open.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }
}

/// What a front listener speaks below MQTT.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(tokio_rustls::TlsAcceptor),
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt`), as rumqttd served it.
    WebSocket,
}

/// Answers the WebSocket handshake with the `mqtt` subprotocol, which MQTT clients ask for.
struct MqttSubprotocol;

impl async_tungstenite::tungstenite::handshake::server::Callback for MqttSubprotocol {
    fn on_request(
        self,
        _request: &async_tungstenite::tungstenite::handshake::server::Request,
        mut response: async_tungstenite::tungstenite::handshake::server::Response,
    ) -> Result<
        async_tungstenite::tungstenite::handshake::server::Response,
        async_tungstenite::tungstenite::handshake::server::ErrorResponse,
    > {
        response.headers_mut().insert(
            "sec-websocket-protocol",
            async_tungstenite::tungstenite::http::HeaderValue::from_static("mqtt"),
        );
        Ok(response)
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_allows_publishing_only_on_matching_topics() {
        let acl = Acl {
            publish: Some(vec!["sensors/dev1/#".into()]),
            subscribe: None,
        };
        assert!(acl.may_publish("sensors/dev1/temp"));
        assert!(!acl.may_publish("sensors/dev2/temp"));
        assert!(acl.may_subscribe("#"));
    }

    #[test]
    fn acl_allows_a_subscription_only_when_an_allowed_filter_covers_it() {
        let acl = Acl {
            publish: None,
            subscribe: Some(vec!["cmd/dev1/#".into()]),
        };
        assert!(acl.may_subscribe("cmd/dev1/+"));
        assert!(acl.may_subscribe("$share/g/cmd/dev1/relay"));
        assert!(!acl.may_subscribe("cmd/#"));
        assert!(!acl.may_subscribe("$share/g/cmd/+/relay"));
    }
}
