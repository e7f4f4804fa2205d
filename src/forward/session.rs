//! One session with the upstream broker over a stream that is already open (TCP or TLS from
//! [`wire::open`], or anything else that reads and writes bytes): CONNECT and CONNACK, the
//! downlink SUBSCRIBE and the retained birth message, then the in-flight window until the link
//! fails or the gateway stops. [`Forwarder::run`] opens the stream and reconnects.
//!
//! The window: rows are read from the store in order (a fresh [`Cursor`] per session, whatever
//! the CONNACK's `session_present` says) and published at their QoS. Each QoS 1 publish gets a
//! packet id from [`PkidPool`], and the in-flight map remembers which row (or the birth message)
//! that id stands for, so a PUBACK deletes exactly its row. At most `uplink.max_inflight` QoS 1
//! publishes, and never more than the upstream's MQTT 5 Receive Maximum, the birth message
//! included, are unacknowledged at once. QoS 0 rows, and rows larger than the upstream's
//! Maximum Packet Size (counted as refused), are deleted once written. Acks reach the store in
//! batches of up to `ACK_BATCH`, at most `ACK_LINGER` after the first, and at once when nothing
//! is left in flight.
//!
//! Keep-alive: a PINGREQ after `keep_alive` (at least 5 s) without a write; no PINGRESP within
//! `keep_alive` after it ends the session. The stats message goes up at QoS 0 when it changes;
//! downlink PUBLISHes go into the local broker and are PUBACKed at QoS 1. On cancel the session
//! stops taking rows, waits up to `drain_timeout` for what is in flight, then sends DISCONNECT.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::pacing::{Backoff, TokenBucket};
use super::wire::{self, Codec, Incoming};
use super::{ForwardError, Forwarder, LinkState, CONNECT_TIMEOUT};
use crate::config::{Endpoint, UplinkConfig};
use crate::store::{Cursor, StoredMessage};

/// Acks handed to the store at once, at most `ACK_LINGER` after the first of them.
const ACK_BATCH: usize = 256;
const ACK_LINGER: Duration = Duration::from_millis(5);

pub(super) enum SessionEnd {
    Shutdown,
}

/// What a packet id in flight stands for.
enum Slot {
    Row(i64),
    /// The birth message: a QoS 1 publish that is not a row.
    Control,
}

/// Packet ids 1..=65535, handed out in turn, skipping those still in flight.
#[derive(Default)]
struct PkidPool {
    last: u16,
}

impl PkidPool {
    fn take(&mut self, inflight: &HashMap<u16, Slot>) -> u16 {
        // The window is far below 65535, so a free id is always found within a few steps.
        loop {
            self.last = self.last.wrapping_add(1).max(1);
            if !inflight.contains_key(&self.last) {
                return self.last;
            }
        }
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Forwarder {
    /// Runs one session over `stream`, already open to `endpoint` (named only in logs): CONNECT
    /// and CONNACK, then the window until the link fails or `cancel` stops it. `backoff` is reset
    /// once the upstream accepts the connection.
    pub(super) async fn session<S: wire::Io>(
        &self,
        stream: S,
        endpoint: &Endpoint,
        client_id: &str,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd, ForwardError> {
        let max_incoming = usize::try_from(self.uplink.max_packet_size.get()).unwrap_or(usize::MAX);
        let codec = Codec::new(self.uplink.protocol, max_incoming);
        let keep_alive = self.uplink.keep_alive.get().max(Duration::from_secs(5));
        let opts = wire::ConnectOptions {
            client_id: client_id.to_string(),
            keep_alive_s: u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX),
            clean: self.uplink.clean_session,
            username: self.uplink.username.clone(),
            password: self
                .uplink
                .password
                .resolved
                .as_ref()
                .map(|s| s.expose().to_string()),
            will_topic: self.status_topic.clone(),
            will_payload: Bytes::from_static(b"offline"),
            // Keep the session (and downlink messages queued for us) for a day offline.
            session_expiry_s: (!self.uplink.clean_session).then_some(86_400),
            max_packet: u32::try_from(max_incoming).unwrap_or(u32::MAX),
            receive_max: 100,
        };

        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut out = BytesMut::with_capacity(64 * 1024);
        let mut inb = BytesMut::with_capacity(64 * 1024);
        codec.connect(&opts, &mut out)?;
        let connack = tokio::select! {
            _ = cancel.cancelled() => return Ok(SessionEnd::Shutdown),
            r = tokio::time::timeout(CONNECT_TIMEOUT, async {
                wr.write_all(&out).await.map_err(|e| ForwardError::Connection(e.to_string()))?;
                out.clear();
                loop {
                    if let Some(p) = codec.decode(&mut inb)? {
                        return Ok::<_, ForwardError>(p);
                    }
                    if rd.read_buf(&mut inb).await.map_err(|e| ForwardError::Connection(e.to_string()))? == 0 {
                        return Err(ForwardError::Connection("the upstream closed the connection before CONNACK".into()));
                    }
                }
            }) => match r {
                Ok(r) => r?,
                Err(_) => return Err(ForwardError::Connection(format!("no CONNACK within {CONNECT_TIMEOUT:?}"))),
            },
        };
        let (receive_max, server_max_packet) = match connack {
            Incoming::ConnAck {
                refused: Some(reason),
                ..
            } => {
                return Err(ForwardError::Refused(reason));
            }
            Incoming::ConnAck {
                session_present,
                receive_max,
                max_packet,
                ..
            } => {
                tracing::info!(
                    upstream = %format!("{}:{}", endpoint.host, endpoint.port),
                    session_present,
                    "uplink connected"
                );
                (receive_max, max_packet)
            }
            other => {
                return Err(ForwardError::Connection(format!(
                    "expected CONNACK, got {other:?}"
                )))
            }
        };
        backoff.reset();
        self.state.send_replace(LinkState::Up {
            since: Instant::now(),
        });

        // Everything QoS 1 in flight counts (the birth message too): the upstream's Receive
        // Maximum covers all of it. Below 65535, so a free packet id always exists.
        let window = usize::from(self.uplink.max_inflight.max(1))
            .min(usize::from(receive_max.unwrap_or(u16::MAX).max(1)))
            .min(65_000);
        let max_out = server_max_packet.map(|m| m as usize).unwrap_or(usize::MAX);
        let mut pkids = PkidPool::default();
        let mut inflight: HashMap<u16, Slot> = HashMap::new();
        let mut rows_in_flight = 0usize;
        let mut buffer: VecDeque<StoredMessage> = VecDeque::new();
        let mut cursor = Cursor::default();
        let mut caught_up = false;
        let mut committed = self.store.committed();
        let mut bucket = self.uplink.max_rate.map(TokenBucket::new);
        let mut acks: Vec<i64> = Vec::new();
        let mut ack_deadline: Option<tokio::time::Instant> = None;
        let mut topics = TopicMap::default();
        let is_v5 = self.uplink.protocol == crate::config::Protocol::V5;
        let mut stats = self.stats.clone();
        stats.mark_unchanged();
        let mut stats_open = true;
        let stats_topic = format!("{}/stats", self.status_topic);

        // Downlink subscriptions and the retained birth message open the session.
        let filters: Vec<String> = self
            .uplink
            .downlink
            .iter()
            .map(|r| r.remote_filter(&self.gateway_id))
            .collect();
        if !filters.is_empty() {
            let pkid = pkids.take(&inflight);
            codec.subscribe(pkid, &filters, &mut out)?;
        }
        let pkid = pkids.take(&inflight);
        codec.publish(
            &self.status_topic,
            1,
            true,
            pkid,
            Bytes::from_static(b"online"),
            None,
            &mut out,
        )?;
        inflight.insert(pkid, Slot::Control);

        let mut last_write = tokio::time::Instant::now();
        let mut ping_sent: Option<tokio::time::Instant> = None;
        let mut shutting_down: Option<tokio::time::Instant> = None;
        loop {
            // Fill the window from the store; everything goes into `out`, written in one go.
            if shutting_down.is_none() {
                while inflight.len() < window {
                    if buffer.is_empty() {
                        if caught_up {
                            break;
                        }
                        // Mark the current commit as seen before reading, so a commit that lands
                        // after this read wakes us.
                        committed.borrow_and_update();
                        // Large reads: each one waits behind the store's current commit (an
                        // fsync), which on an SD card takes tens of milliseconds.
                        let limit = (window * 2).max(1000);
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
                    let remote = topics.remote_topic(&self.uplink, &self.gateway_id, &row.topic);
                    let id = is_v5.then(|| format!("{}/{}", self.gateway_id, row.seq()));
                    let pkid = if row.qos == 0 {
                        0
                    } else {
                        pkids.take(&inflight)
                    };
                    let mark = out.len();
                    let size = codec.publish(
                        &remote,
                        row.qos,
                        row.retain,
                        pkid,
                        row.payload.clone(),
                        id,
                        &mut out,
                    )?;
                    if size > max_out {
                        // The upstream would disconnect us for it, again after every reconnect.
                        out.truncate(mark);
                        self.counters
                            .refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(row = row.id, size, max = max_out, "message larger than the upstream's maximum packet size; dropped (counted as refused)");
                        acks.push(row.id);
                        continue;
                    }
                    if row.qos == 0 {
                        // QoS 0 has no acknowledgement: written is all we get.
                        acks.push(row.id);
                        self.counters
                            .forwarded
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        inflight.insert(pkid, Slot::Row(row.id));
                        rows_in_flight += 1;
                    }
                }
            } else if rows_in_flight == 0 {
                self.flush_acks(&mut acks);
                let _ = codec.disconnect(&mut out);
                let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
                return Ok(SessionEnd::Shutdown);
            }

            let rate_wait = bucket
                .as_ref()
                .filter(|_| !buffer.is_empty() || !caught_up)
                .map(|b| b.wait_time());
            let drain_deadline = shutting_down;
            // Keep-alive: a PINGREQ when nothing was written for keep_alive; no PINGRESP within
            // keep_alive after it means the link is dead even if TCP has not noticed.
            let ping_deadline = match ping_sent {
                Some(t) => t + keep_alive,
                None => last_write + keep_alive,
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if shutting_down.is_none() => {
                    // Stop sending; give what is in flight a bounded time to be acknowledged.
                    shutting_down = Some(tokio::time::Instant::now() + self.drain_timeout);
                }
                _ = sleep_until_opt(drain_deadline), if drain_deadline.is_some() => {
                    tracing::warn!(in_flight = rows_in_flight, "stopping with messages unacknowledged upstream; they stay in the store and are sent again at the next start");
                    self.flush_acks(&mut acks);
                    return Ok(SessionEnd::Shutdown);
                }
                r = wr.write_buf(&mut out), if !out.is_empty() => {
                    match r {
                        Ok(0) | Err(_) => {
                            self.flush_acks(&mut acks);
                            let why = r.err().map(|e| e.to_string()).unwrap_or_else(|| "connection closed".into());
                            return Err(ForwardError::Connection(format!("writing to the upstream: {why}")));
                        }
                        Ok(_) => last_write = tokio::time::Instant::now(),
                    }
                }
                r = rd.read_buf(&mut inb) => {
                    match r {
                        Ok(0) | Err(_) => {
                            self.flush_acks(&mut acks);
                            let why = r.err().map(|e| e.to_string()).unwrap_or_else(|| "the upstream closed the connection".into());
                            return Err(ForwardError::Connection(why));
                        }
                        Ok(_) => {}
                    }
                    loop {
                        let p = match codec.decode(&mut inb) {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(e) => { self.flush_acks(&mut acks); return Err(e.into()); }
                        };
                        match p {
                            Incoming::PubAck { pkid, refused } => match inflight.remove(&pkid) {
                                Some(Slot::Row(id)) => {
                                    rows_in_flight -= 1;
                                    if let Some(reason) = refused {
                                        // Retrying what the upstream refuses would block the queue.
                                        self.counters.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        tracing::warn!(row = id, %reason, "upstream refused a message; it is dropped (counted as refused)");
                                    } else {
                                        self.counters.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    }
                                    acks.push(id);
                                }
                                Some(Slot::Control) => {}
                                None => tracing::debug!(pkid, "PUBACK for an unknown packet id"),
                            },
                            Incoming::Publish { topic, payload, qos, pkid } => {
                                self.downlink(&topic, payload).await;
                                if qos == 1 {
                                    codec.puback(pkid, &mut out)?;
                                } else if qos == 2 {
                                    tracing::warn!(%topic, "QoS 2 downlink message (we subscribe at QoS 1); not acknowledged");
                                }
                            }
                            Incoming::SubAck { refused } if refused > 0 => {
                                tracing::warn!(refused, "upstream refused a downlink subscription (check its ACL/policy)");
                            }
                            Incoming::PingResp => ping_sent = None,
                            Incoming::Disconnect { reason } => {
                                self.flush_acks(&mut acks);
                                return Err(ForwardError::Connection(format!("the upstream disconnected us: {reason}")));
                            }
                            Incoming::ConnAck { .. } => {
                                self.flush_acks(&mut acks);
                                return Err(ForwardError::Connection("unexpected second CONNACK".into()));
                            }
                            _ => {}
                        }
                    }
                    // Acks go to the store in batches: each batch wakes the store thread, and the
                    // store commits them within commit_interval anyway.
                    if acks.len() >= ACK_BATCH || rows_in_flight == 0 {
                        self.flush_acks(&mut acks);
                        ack_deadline = None;
                    } else if !acks.is_empty() && ack_deadline.is_none() {
                        ack_deadline = Some(tokio::time::Instant::now() + ACK_LINGER);
                    }
                }
                _ = sleep_until_opt(ack_deadline), if ack_deadline.is_some() => {
                    self.flush_acks(&mut acks);
                    ack_deadline = None;
                }
                _ = tokio::time::sleep_until(ping_deadline) => {
                    if ping_sent.is_some() {
                        self.flush_acks(&mut acks);
                        return Err(ForwardError::Connection(format!("no PINGRESP within {keep_alive:?}: the link is dead")));
                    }
                    codec.pingreq(&mut out)?;
                    ping_sent = Some(tokio::time::Instant::now());
                }
                r = committed.changed(), if caught_up && shutting_down.is_none() => {
                    if r.is_err() {
                        return Err(ForwardError::Store(crate::store::StoreError::Closed));
                    }
                    caught_up = false;
                }
                _ = async { if let Some(w) = rate_wait { tokio::time::sleep(w).await } }, if rate_wait.is_some() && shutting_down.is_none() => {}
                r = stats.changed(), if stats_open && shutting_down.is_none() => {
                    if r.is_ok() {
                        let payload = stats.borrow_and_update().clone();
                        if !payload.is_empty() {
                            codec.publish(&stats_topic, 0, false, 0, payload, None, &mut out)?;
                        }
                    } else {
                        // The publisher is gone (shutdown or reload); never wake for it again.
                        stats_open = false;
                    }
                }
            }
        }
    }

    /// A message from the upstream: into the local broker under its mapped topic.
    async fn downlink(&self, topic: &str, payload: Bytes) {
        let local = self
            .uplink
            .match_downlink(topic, &self.gateway_id)
            .map(|(_, r)| r.local_topic(topic, &self.gateway_id));
        match local {
            Some(local_topic) => {
                self.counters
                    .downlink
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(remote = %topic, local = %local_topic, "downlink message");
                if !self.local.publish(local_topic, payload, false).await {
                    tracing::error!("local broker link closed; downlink message not delivered");
                }
            }
            None => tracing::debug!(%topic, "upstream message matches no downlink rule"),
        }
    }

    fn flush_acks(&self, acks: &mut Vec<i64>) {
        if !acks.is_empty() {
            self.store.ack(std::mem::take(acks));
        }
    }
}

/// Local topic → upstream topic, remembered: devices publish to the same few topics over and
/// over, and matching every rule and expanding the template for every row costs more than the
/// lookup. Bounded: past `MAX` distinct topics it starts over.
#[derive(Default)]
struct TopicMap {
    map: HashMap<String, String>,
}

impl TopicMap {
    const MAX: usize = 4096;

    fn remote_topic(&mut self, uplink: &UplinkConfig, gateway_id: &str, local: &str) -> String {
        if let Some(r) = self.map.get(local) {
            return r.clone();
        }
        // A row whose topic no rule matches any more (the rules changed since it was stored)
        // goes up unchanged.
        let remote = uplink
            .match_rule(local)
            .map(|(_, rule)| rule.remote_topic(local, gateway_id))
            .unwrap_or_else(|| local.to_string());
        if self.map.len() >= Self::MAX {
            self.map.clear();
        }
        self.map.insert(local.to_string(), remote.clone());
        remote
    }
}
