//! The forwarder: drains the store to the upstream broker and brings downlink commands home.
//!
//! Delivery rule: a row is deleted only after the upstream PUBACKs it. The session owns the
//! connection (see `wire` for why not rumqttc's event loop) and assigns packet ids itself, so a
//! PUBACK names its row directly. On any connection error the window is forgotten and everything
//! unacked is read again from the store (a fresh cursor), oldest first within each priority, so
//! order survives outages and restarts — whatever the upstream remembers of the old session
//! (`session_present`), the store is the source of truth; rows already acknowledged whose delete
//! is not yet committed are not read again, so a reconnect resends at most the window. Duplicates
//! after a crash are bounded by
//! the in-flight window plus the acks not yet committed: a delete waits for the next commit of
//! new rows, at most ten store lingers (100 ms at the default `commit_interval`, up to 1 s on a
//! slow card) and not once 256 wait; with this module's own batch, never more than 768.

mod downlink;
mod pacing;
mod session;
mod tls;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::LocalPublisher;
use crate::config::{Endpoint, UplinkConfig};
use crate::shared::{ForwardCounters, LinkState};
use crate::store::StoreHandle;
use pacing::Backoff;
use session::SessionEnd;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("uplink TLS setup failed: {0}")]
    Tls(String),
    #[error("upstream client: {0}")]
    Client(String),
    #[error("upstream connection: {0}")]
    Connection(String),
    /// Nothing listens on the upstream's port (TCP reset): see [`REFUSED_RETRY_MAX`].
    #[error("upstream connection: {0}")]
    NoListener(String),
    #[error("upstream refused the connection: {0}")]
    Refused(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("invalid uplink url: {0}")]
    Url(String),
}

pub struct Forwarder {
    pub uplink: Arc<UplinkConfig>,
    pub gateway_id: String,
    pub status_topic: String,
    pub store: StoreHandle,
    pub local: LocalPublisher,
    pub state: Arc<watch::Sender<LinkState>>,
    pub counters: Arc<ForwardCounters>,
    /// How long a graceful stop waits for PUBACKs of what is in flight.
    pub drain_timeout: Duration,
    /// The latest stats message (empty until the first), sent upstream at QoS 0 to
    /// `<status_topic>/stats` whenever it changes while the link is up. Not stored: a newer one
    /// follows, and stale stats must not queue behind data.
    pub stats: watch::Receiver<Bytes>,
}

/// Longest wait before retrying after a connection refused by a reset: the host is up and its
/// broker is not, a retry costs it a reset packet, and the link is back within this of the
/// broker's restart instead of the full backoff step (up to `reconnect_max`).
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(1);

/// How long connecting (TCP, TLS, CONNECT/CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Forwarder {
    pub async fn run(self, cancel: CancellationToken) -> Result<(), ForwardError> {
        let endpoint = self.uplink.endpoint().map_err(ForwardError::Url)?;
        let tls = if endpoint.tls {
            Some(tls::tls_config(&self.uplink.tls)?)
        } else {
            None
        };
        let client_id = self.uplink.client_id_or(&self.gateway_id);
        let mut backoff = Backoff::new(
            self.uplink.reconnect_min.get(),
            self.uplink.reconnect_max.get(),
        );
        let mut first = true;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            if !first {
                self.counters
                    .reconnects
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            first = false;
            let ended = match self.open(&endpoint, tls.clone(), &cancel).await {
                Ok(None) => Ok(SessionEnd::Shutdown),
                Ok(Some(stream)) => {
                    self.session(stream, &endpoint, &client_id, &cancel, &mut backoff)
                        .await
                }
                Err(e) => Err(e),
            };
            match ended {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Err(e @ ForwardError::Store(_)) => return Err(e),
                Err(e) => {
                    let msg = e.to_string();
                    *self
                        .counters
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
                    let since = match &*self.state.borrow() {
                        LinkState::Down { since, .. } => *since,
                        _ => Instant::now(),
                    };
                    let backlog = self.store.stats().await.ok();
                    let mut delay = backoff.next_delay();
                    if matches!(e, ForwardError::NoListener(_)) {
                        delay = delay.min(REFUSED_RETRY_MAX);
                    }
                    tracing::warn!(
                        error = %msg,
                        queued_rows = backlog.as_ref().map(|s| s.rows).unwrap_or(0),
                        retry_in_ms = delay.as_millis() as u64,
                        "uplink down; messages stay queued in the store"
                    );
                    self.state
                        .send_replace(LinkState::Down { since, error: msg });
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Opens the stream to the upstream (TCP, and TLS for `mqtts://`) within `CONNECT_TIMEOUT`;
    /// `None` when `cancel` fires first.
    async fn open(
        &self,
        endpoint: &Endpoint,
        tls: Option<Arc<rustls::ClientConfig>>,
        cancel: &CancellationToken,
    ) -> Result<Option<Box<dyn wire::Io>>, ForwardError> {
        tokio::select! {
            _ = cancel.cancelled() => Ok(None),
            r = tokio::time::timeout(CONNECT_TIMEOUT, wire::open(endpoint, tls)) => match r {
                Ok(Ok(s)) => Ok(Some(s)),
                Ok(Err(e)) if e.refused => Err(ForwardError::NoListener(e.message)),
                Ok(Err(e)) => Err(ForwardError::Connection(e.message)),
                Err(_) => Err(ForwardError::Connection(format!("no connection to {}:{} within {CONNECT_TIMEOUT:?}", endpoint.host, endpoint.port))),
            },
        }
    }
}
