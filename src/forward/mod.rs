//! The forwarder: drains the store to the upstream broker and brings downlink commands home.
//!
//! Delivery rule: a row is deleted only after the upstream PUBACKs it. rumqttc's `publish()`
//! returns no packet id, so each request is queued in `requested` and matched with the
//! `Outgoing::Publish(pkid)` events, which arrive in request order; the PUBACK for that pkid then
//! acks the row. On any connection error the window is forgotten and everything unacked is read
//! again from the store (a fresh cursor), oldest first within each priority, so order survives
//! outages and restarts; duplicates are bounded by the in-flight window.

pub mod client;
mod pacing;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::LocalPublisher;
use crate::config::{Endpoint, UplinkConfig};
use crate::store::{Cursor, StoreHandle, StoredMessage};
use client::{StatusMessages, UplinkClient, UplinkEvent};
use pacing::{Backoff, TokenBucket};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("uplink TLS setup failed: {0}")]
    Tls(String),
    #[error("upstream client: {0}")]
    Client(String),
    #[error("upstream connection: {0}")]
    Connection(String),
    #[error("upstream refused the connection: {0}")]
    Refused(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("invalid uplink url: {0}")]
    Url(String),
}

/// What the rest of the gateway can see of the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Up { since: Instant },
    Down { since: Instant, error: String },
    Disabled,
}

impl LinkState {
    pub fn describe(&self) -> String {
        match self {
            LinkState::Connecting => "link connecting".to_string(),
            LinkState::Up { since } => format!("link up {}", human_age(since.elapsed())),
            LinkState::Down { since, .. } => format!("link down {}", human_age(since.elapsed())),
            LinkState::Disabled => "no uplink configured".to_string(),
        }
    }
}

pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86400 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    }
}

/// Counters other stages read (status line, later metrics).
#[derive(Debug, Default)]
pub struct ForwardCounters {
    pub forwarded: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    pub reconnects: std::sync::atomic::AtomicU64,
    pub downlink: std::sync::atomic::AtomicU64,
}

pub struct Forwarder {
    pub uplink: Arc<UplinkConfig>,
    pub gateway_id: String,
    pub status_topic: String,
    pub store: StoreHandle,
    pub local: LocalPublisher,
    pub state: watch::Sender<LinkState>,
    pub counters: Arc<ForwardCounters>,
    /// How long a graceful stop waits for PUBACKs of what is in flight.
    pub drain_timeout: Duration,
}

enum SessionEnd {
    Shutdown,
}

/// A request handed to rumqttc, waiting for its `Outgoing::Publish(pkid)`.
enum Requested {
    Row {
        id: i64,
        qos: u8,
    },
    /// Birth/status messages: not rows, but they take a place in the event order.
    Control,
}

impl Forwarder {
    pub async fn run(self, cancel: CancellationToken) -> Result<(), ForwardError> {
        let endpoint = self.uplink.endpoint().map_err(ForwardError::Url)?;
        let tls = if endpoint.tls {
            Some(client::tls_config(&self.uplink.tls)?)
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
            match self
                .session(&endpoint, &client_id, tls.clone(), &cancel, &mut backoff)
                .await
            {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Err(e @ ForwardError::Store(_)) => return Err(e),
                Err(e) => {
                    let msg = e.to_string();
                    let since = match &*self.state.borrow() {
                        LinkState::Down { since, .. } => *since,
                        _ => Instant::now(),
                    };
                    let backlog = self.store.stats().await.ok();
                    let delay = backoff.next_delay();
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

    async fn session(
        &self,
        endpoint: &Endpoint,
        client_id: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd, ForwardError> {
        let status = StatusMessages {
            topic: self.status_topic.clone(),
            online: Bytes::from_static(b"online"),
            offline: Bytes::from_static(b"offline"),
        };
        let (client, mut events) =
            UplinkClient::connect(&self.uplink, endpoint, client_id, tls, &status);

        // The first event is the CONNACK or the reason there is none.
        let receive_max = loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return Ok(SessionEnd::Shutdown),
                ev = events.recv() => ev,
            };
            match ev {
                Some(Ok(UplinkEvent::ConnAck {
                    receive_max,
                    session_present,
                })) => {
                    tracing::info!(
                        upstream = %format!("{}:{}", endpoint.host, endpoint.port),
                        session_present,
                        "uplink connected"
                    );
                    break receive_max;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ForwardError::Connection(e)),
                None => return Err(ForwardError::Connection("event loop ended".into())),
            }
        };
        backoff.reset();
        self.state.send_replace(LinkState::Up {
            since: Instant::now(),
        });

        let window = usize::from(self.uplink.max_inflight.max(1))
            .min(usize::from(receive_max.unwrap_or(u16::MAX).max(1)));
        let mut requested: VecDeque<Requested> = VecDeque::new();
        let mut inflight: HashMap<u16, i64> = HashMap::new();
        let mut buffer: VecDeque<StoredMessage> = VecDeque::new();
        let mut cursor = Cursor::default();
        let mut caught_up = false;
        let mut committed = self.store.committed();
        let mut bucket = self.uplink.max_rate.map(TokenBucket::new);
        let mut acks: Vec<i64> = Vec::new();

        for rule in &self.uplink.downlink {
            client
                .subscribe(rule.remote_filter(&self.gateway_id))
                .await?;
        }
        client
            .publish(status.topic.clone(), 1, true, status.online.clone(), None)
            .await?;
        requested.push_back(Requested::Control);

        let mut shutting_down: Option<tokio::time::Instant> = None;
        loop {
            // Fill the window from the store.
            if shutting_down.is_none() {
                while requested.len() + inflight.len() < window {
                    if buffer.is_empty() {
                        if caught_up {
                            break;
                        }
                        // Mark the current commit as seen before reading, so a commit that lands
                        // after this read wakes us.
                        committed.borrow_and_update();
                        let limit = window.max(64) * 2;
                        let rows = self.store.fetch(&cursor, limit).await?;
                        if rows.len() < limit {
                            caught_up = true;
                        }
                        for r in &rows {
                            cursor.advance(r);
                        }
                        buffer.extend(rows);
                        if buffer.is_empty() {
                            break;
                        }
                    }
                    if let Some(b) = bucket.as_mut() {
                        if !b.try_take() {
                            break;
                        }
                    }
                    let Some(row) = buffer.pop_front() else { break };
                    let Some(rule) = self.uplink.match_rule(&row.topic).map(|(_, r)| r) else {
                        // The forward rules changed since this row was stored: send it unchanged.
                        self.send_row(&client, &row, row.topic.clone()).await?;
                        requested.push_back(Requested::Row {
                            id: row.id,
                            qos: row.qos,
                        });
                        continue;
                    };
                    let remote = rule.remote_topic(&row.topic, &self.gateway_id);
                    self.send_row(&client, &row, remote).await?;
                    requested.push_back(Requested::Row {
                        id: row.id,
                        qos: row.qos,
                    });
                }
            } else if inflight.is_empty() && requested.is_empty() {
                client.disconnect().await;
                self.flush_acks(&mut acks);
                return Ok(SessionEnd::Shutdown);
            }

            let rate_wait = bucket
                .as_ref()
                .filter(|_| !buffer.is_empty() || !caught_up)
                .map(|b| b.wait_time());
            let drain_deadline = shutting_down;
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if shutting_down.is_none() => {
                    // Stop sending; give what is in flight a bounded time to be acknowledged.
                    shutting_down = Some(tokio::time::Instant::now() + self.drain_timeout);
                }
                _ = async { tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if drain_deadline.is_some() => {
                    tracing::warn!(in_flight = inflight.len() + requested.len(), "stopping with messages unacknowledged upstream; they stay in the store and are sent again at the next start");
                    self.flush_acks(&mut acks);
                    return Ok(SessionEnd::Shutdown);
                }
                ev = events.recv() => {
                    let ev = match ev {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => { self.flush_acks(&mut acks); return Err(ForwardError::Connection(e)); }
                        None => { self.flush_acks(&mut acks); return Err(ForwardError::Connection("event loop ended".into())); }
                    };
                    self.handle_event(ev, &mut requested, &mut inflight, &mut acks).await;
                    // Take every event that is already there before touching the store again.
                    while let Ok(ev) = events.try_recv() {
                        match ev {
                            Ok(ev) => self.handle_event(ev, &mut requested, &mut inflight, &mut acks).await,
                            Err(e) => { self.flush_acks(&mut acks); return Err(ForwardError::Connection(e)); }
                        }
                    }
                    self.flush_acks(&mut acks);
                }
                r = committed.changed(), if caught_up && shutting_down.is_none() => {
                    if r.is_err() {
                        return Err(ForwardError::Store(crate::store::StoreError::Closed));
                    }
                    caught_up = false;
                }
                _ = async { if let Some(w) = rate_wait { tokio::time::sleep(w).await } }, if rate_wait.is_some() && shutting_down.is_none() => {}
            }
        }
    }

    async fn send_row(
        &self,
        client: &UplinkClient,
        row: &StoredMessage,
        remote_topic: String,
    ) -> Result<(), ForwardError> {
        let id = format!("{}/{}", self.gateway_id, row.id);
        client
            .publish(
                remote_topic,
                row.qos,
                row.retain,
                row.payload.clone(),
                Some(id),
            )
            .await
    }

    async fn handle_event(
        &self,
        ev: UplinkEvent,
        requested: &mut VecDeque<Requested>,
        inflight: &mut HashMap<u16, i64>,
        acks: &mut Vec<i64>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        match ev {
            UplinkEvent::Sent(pkid) => {
                match requested.pop_front() {
                    Some(Requested::Row { id, qos }) => {
                        if qos == 0 || pkid == 0 {
                            // QoS 0 has no acknowledgement: written to the connection is all we get.
                            acks.push(id);
                            self.counters.forwarded.fetch_add(1, Relaxed);
                        } else if let Some(old) = inflight.insert(pkid, id) {
                            tracing::error!(pkid, old_row = old, new_row = id, "packet id reused while in flight; the older row will be sent again");
                        }
                    }
                    Some(Requested::Control) => {}
                    None => tracing::warn!(pkid, "publish event without a matching request"),
                }
            }
            UplinkEvent::PubAck { pkid, refused } => {
                if let Some(id) = inflight.remove(&pkid) {
                    if let Some(reason) = refused {
                        // Retrying a message the upstream refuses would block the queue forever.
                        self.counters.refused.fetch_add(1, Relaxed);
                        tracing::warn!(row = id, %reason, "upstream refused a message; it is dropped (counted as refused)");
                    } else {
                        self.counters.forwarded.fetch_add(1, Relaxed);
                    }
                    acks.push(id);
                }
            }
            UplinkEvent::Downlink { topic, payload } => {
                let local = self
                    .uplink
                    .match_downlink(&topic, &self.gateway_id)
                    .map(|(_, r)| r.local_topic(&topic, &self.gateway_id));
                match local {
                    Some(local_topic) => {
                        self.counters.downlink.fetch_add(1, Relaxed);
                        tracing::debug!(remote = %topic, local = %local_topic, "downlink message");
                        if !self.local.publish(local_topic, payload, false).await {
                            tracing::error!(
                                "local broker link closed; downlink message not delivered"
                            );
                        }
                    }
                    None => tracing::debug!(%topic, "upstream message matches no downlink rule"),
                }
            }
            UplinkEvent::SubAck { refused } if refused > 0 => {
                tracing::warn!(
                    refused,
                    "upstream refused a downlink subscription (check its ACL/policy)"
                );
            }
            _ => {}
        }
    }

    fn flush_acks(&self, acks: &mut Vec<i64>) {
        if !acks.is_empty() {
            self.store.ack(std::mem::take(acks));
        }
    }
}
