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

use super::downlink;
use super::pacing::{Backoff, TokenBucket};
use super::wire::{self, Codec, Incoming};
use super::{ForwardError, Forwarder, CONNECT_TIMEOUT};
use crate::config::{Endpoint, UplinkConfig};
use crate::shared::{BoundedCache, LinkState, RateLimited};
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
    /// The downlink SUBSCRIBE, until its SUBACK: its id is not free, but it takes no window
    /// slot (the window and Receive Maximum count PUBLISHes).
    Subscribe,
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
            clean: !self.uplink.persistent_session(),
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
            session_expiry_s: self.uplink.persistent_session().then_some(86_400),
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
        let mut stale_log = RateLimited::new(Duration::from_secs(10));
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
        let mut subscribes = 0usize;
        if !filters.is_empty() {
            let pkid = pkids.take(&inflight);
            codec.subscribe(pkid, &filters, &mut out)?;
            inflight.insert(pkid, Slot::Subscribe);
            subscribes += 1;
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
                while inflight.len() - subscribes < window {
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
                                Some(Slot::Subscribe) => {
                                    inflight.insert(pkid, Slot::Subscribe);
                                    tracing::debug!(pkid, "PUBACK for the SUBSCRIBE's packet id; ignored");
                                }
                                None => tracing::debug!(pkid, "PUBACK for an unknown packet id"),
                            },
                            Incoming::Publish { topic, payload, qos, pkid, retain, expiry_s } => {
                                self.downlink(&topic, payload, retain, expiry_s, &mut stale_log).await;
                                if qos == 1 {
                                    codec.puback(pkid, &mut out)?;
                                } else if qos == 2 {
                                    tracing::warn!(%topic, "QoS 2 downlink message (we subscribe at QoS 1); not acknowledged");
                                }
                            }
                            Incoming::SubAck { pkid, refused } => {
                                if matches!(inflight.get(&pkid), Some(Slot::Subscribe)) {
                                    inflight.remove(&pkid);
                                    subscribes -= 1;
                                }
                                if refused > 0 {
                                    tracing::warn!(refused, "upstream refused a downlink subscription (check its ACL/policy)");
                                }
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

    /// A message from the upstream: into the local broker under its mapped topic, unless it is
    /// stale (see [`downlink::judge`]): then counted and logged (at most one line per 10 s).
    async fn downlink(
        &self,
        topic: &str,
        payload: Bytes,
        retain: bool,
        expiry_s: Option<u32>,
        stale_log: &mut RateLimited,
    ) {
        let Some((index, rule)) = self.uplink.match_downlink(topic, &self.gateway_id) else {
            tracing::debug!(%topic, "upstream message matches no downlink rule");
            return;
        };
        let facts = downlink::Facts {
            payload: &payload,
            retained: retain,
            expiry_s,
        };
        if let downlink::Verdict::Stale(why) = downlink::judge(rule, facts, crate::shared::now_ms())
        {
            self.counters
                .downlink_stale
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if stale_log.allow() {
                tracing::warn!(
                    remote = %topic,
                    rule = format!("uplink.downlink[{index}]"),
                    skipped = stale_log.take_skipped(),
                    "a stale downlink command was dropped: {why}"
                );
            }
            return;
        }
        let local_topic = rule.local_topic(topic, &self.gateway_id);
        self.counters
            .downlink
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(remote = %topic, local = %local_topic, "downlink message");
        if !self.local.publish(local_topic, payload, false).await {
            tracing::error!("local broker link closed; downlink message not delivered");
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
struct TopicMap {
    map: BoundedCache<String, String>,
}

impl Default for TopicMap {
    fn default() -> Self {
        TopicMap {
            map: BoundedCache::new(Self::MAX),
        }
    }
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
        self.map.insert(local.to_string(), remote.clone());
        remote
    }
}

#[cfg(test)]
mod tests {
    //! The session against a scripted upstream over `tokio::io::duplex`, with a real store in a
    //! temporary directory. Every wait is bounded: a packet that does not come within `STEP`
    //! fails the test, and "nothing more is sent" is checked over `QUIET`.

    use std::sync::Arc;

    use bytes::{Bytes, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::broker::LocalPublisher;
    use crate::config::{ByteSize, HumanDuration, StoreConfig, SyncMode, WhenFull};
    use crate::forward::ForwardCounters;
    use crate::store::{Durability, NewMessage, Store, StoreHandle};

    const STEP: Duration = Duration::from_secs(5);
    const QUIET: Duration = Duration::from_millis(300);

    /// A client packet as the upstream sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Connect {
            keep_alive: u16,
        },
        Publish {
            topic: String,
            qos: u8,
            pkid: u16,
            payload: Bytes,
        },
        Subscribe {
            pkid: u16,
            filters: Vec<String>,
        },
        PubAck {
            pkid: u16,
        },
        PingReq,
        Disconnect,
        Other(String),
    }

    /// The scripted upstream broker: reads what the session writes, answers what the test says.
    struct Upstream {
        io: DuplexStream,
        buf: BytesMut,
        v5: bool,
    }

    impl Upstream {
        fn parse(&mut self) -> Option<Seen> {
            if self.buf.is_empty() {
                return None;
            }
            if self.v5 {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::mqttbytes::Error;
                match Packet::read(&mut self.buf, None) {
                    Err(Error::InsufficientBytes(_)) => None,
                    Err(e) => panic!("the session wrote a malformed packet: {e:?}"),
                    Ok(p) => Some(match p {
                        Packet::Connect(c, _, _) => Seen::Connect {
                            keep_alive: c.keep_alive,
                        },
                        Packet::Publish(p) => Seen::Publish {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            qos: p.qos as u8,
                            pkid: p.pkid,
                            payload: p.payload,
                        },
                        Packet::Subscribe(s) => Seen::Subscribe {
                            pkid: s.pkid,
                            filters: s.filters.into_iter().map(|f| f.path).collect(),
                        },
                        Packet::PubAck(a) => Seen::PubAck { pkid: a.pkid },
                        Packet::PingReq(_) => Seen::PingReq,
                        Packet::Disconnect(_) => Seen::Disconnect,
                        other => Seen::Other(format!("{other:?}")),
                    }),
                }
            } else {
                use rumqttc::mqttbytes::v4::Packet;
                use rumqttc::mqttbytes::Error;
                match Packet::read(&mut self.buf, 1 << 20) {
                    Err(Error::InsufficientBytes(_)) => None,
                    Err(e) => panic!("the session wrote a malformed packet: {e:?}"),
                    Ok(p) => Some(match p {
                        Packet::Connect(c) => Seen::Connect {
                            keep_alive: c.keep_alive,
                        },
                        Packet::Publish(p) => Seen::Publish {
                            topic: p.topic,
                            qos: p.qos as u8,
                            pkid: p.pkid,
                            payload: p.payload,
                        },
                        Packet::Subscribe(s) => Seen::Subscribe {
                            pkid: s.pkid,
                            filters: s.filters.into_iter().map(|f| f.path).collect(),
                        },
                        Packet::PubAck(a) => Seen::PubAck { pkid: a.pkid },
                        Packet::PingReq => Seen::PingReq,
                        Packet::Disconnect => Seen::Disconnect,
                        other => Seen::Other(format!("{other:?}")),
                    }),
                }
            }
        }

        /// The next packet within `within`; `None` if the session closed the stream.
        async fn recv_within(&mut self, within: Duration) -> Result<Option<Seen>, ()> {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                if let Some(p) = self.parse() {
                    return Ok(Some(p));
                }
                match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                    Err(_) => return Err(()),
                    Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                    Ok(Ok(_)) => {}
                }
            }
        }

        async fn expect(&mut self) -> Seen {
            match self.recv_within(STEP).await {
                Ok(Some(p)) => p,
                Ok(None) => panic!("the session closed the stream"),
                Err(()) => panic!("no packet from the session within {STEP:?}"),
            }
        }

        /// The next PUBLISH as (pkid, payload); anything else fails the test.
        async fn expect_publish(&mut self) -> (u16, String) {
            match self.expect().await {
                Seen::Publish { pkid, payload, .. } => {
                    (pkid, String::from_utf8_lossy(&payload).into_owned())
                }
                other => panic!("expected a PUBLISH, got {other:?}"),
            }
        }

        /// Nothing arrives for `QUIET`.
        async fn expect_quiet(&mut self) {
            if let Ok(p) = self.recv_within(QUIET).await {
                panic!("expected nothing more, got {p:?}");
            }
        }

        async fn send(&mut self, bytes: BytesMut) {
            self.io
                .write_all(&bytes)
                .await
                .expect("write to the session");
        }

        async fn connack(&mut self, session_present: bool, receive_max: Option<u16>) {
            let mut b = BytesMut::new();
            if self.v5 {
                use rumqttc::v5::mqttbytes::v5::{
                    ConnAck, ConnAckProperties, ConnectReturnCode, Packet,
                };
                let properties = receive_max.map(|r| ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: Some(r),
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: None,
                    assigned_client_identifier: None,
                    topic_alias_max: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                });
                Packet::ConnAck(ConnAck {
                    session_present,
                    code: ConnectReturnCode::Success,
                    properties,
                })
                .write(&mut b, None)
                .expect("encode CONNACK");
            } else {
                use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
                assert!(receive_max.is_none(), "MQTT 3.1.1 has no Receive Maximum");
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present))
                    .write(&mut b, usize::MAX)
                    .expect("encode CONNACK");
            }
            self.send(b).await;
        }

        /// Reads the CONNECT and accepts it.
        async fn accept(&mut self, session_present: bool, receive_max: Option<u16>) -> u16 {
            let keep_alive = match self.expect().await {
                Seen::Connect { keep_alive } => keep_alive,
                other => panic!("expected CONNECT, got {other:?}"),
            };
            self.connack(session_present, receive_max).await;
            keep_alive
        }

        async fn puback(&mut self, pkid: u16) {
            let mut b = BytesMut::new();
            if self.v5 {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAck};
                Packet::PubAck(PubAck::new(pkid, None))
                    .write(&mut b, None)
                    .expect("encode PUBACK");
            } else {
                use rumqttc::mqttbytes::v4::{Packet, PubAck};
                Packet::PubAck(PubAck::new(pkid))
                    .write(&mut b, usize::MAX)
                    .expect("encode PUBACK");
            }
            self.send(b).await;
        }

        async fn suback(&mut self, pkid: u16) {
            assert!(!self.v5, "only the v4 SUBACK is scripted");
            use rumqttc::mqttbytes::v4::{Packet, SubAck, SubscribeReasonCode};
            use rumqttc::mqttbytes::QoS;
            let mut b = BytesMut::new();
            Packet::SubAck(SubAck::new(
                pkid,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            ))
            .write(&mut b, usize::MAX)
            .expect("encode SUBACK");
            self.send(b).await;
        }

        async fn publish_qos1(&mut self, topic: &str, pkid: u16, payload: &'static [u8]) {
            assert!(!self.v5, "only the v4 PUBLISH is scripted");
            use rumqttc::mqttbytes::v4::{Packet, Publish};
            use rumqttc::mqttbytes::QoS;
            let mut p = Publish::new(topic, QoS::AtLeastOnce, Bytes::from_static(payload));
            p.pkid = pkid;
            let mut b = BytesMut::new();
            Packet::Publish(p)
                .write(&mut b, usize::MAX)
                .expect("encode PUBLISH");
            self.send(b).await;
        }

        async fn pingresp(&mut self) {
            let mut b = BytesMut::new();
            if self.v5 {
                use rumqttc::v5::mqttbytes::v5::{Packet, PingResp};
                Packet::PingResp(PingResp)
                    .write(&mut b, None)
                    .expect("encode PINGRESP");
            } else {
                use rumqttc::mqttbytes::v4::Packet;
                Packet::PingResp
                    .write(&mut b, usize::MAX)
                    .expect("encode PINGRESP");
            }
            self.send(b).await;
        }
    }

    /// A forwarder over a fresh store, and the sessions it runs.
    struct Rig {
        _dir: tempfile::TempDir,
        store: StoreHandle,
        store_thread: Option<std::thread::JoinHandle<()>>,
        fwd: Arc<Forwarder>,
        local: mpsc::Receiver<(Bytes, Bytes, bool)>,
        _stats: watch::Sender<Bytes>,
        v5: bool,
    }

    type Running = tokio::task::JoinHandle<Result<(), ForwardError>>;

    impl Rig {
        /// `uplink` is YAML added to the uplink section (its url is made up: nothing connects).
        fn new(uplink: &str) -> Rig {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let cfg = StoreConfig {
                path: dir.path().join("buffer.db"),
                max_bytes: ByteSize(1 << 30),
                min_free_disk: ByteSize(0),
                when_full: WhenFull::DropOldest,
                max_age: None,
                commit_interval: HumanDuration::from_millis(5),
                commit_max_rows: 1000,
                sync: SyncMode::Normal,
            };
            let (store, _, store_thread) = Store::open(&cfg).expect("open the store");
            let uplink: UplinkConfig =
                serde_yaml::from_str(&format!("url: mqtt://upstream.test:1883\n{uplink}"))
                    .expect("test uplink parses");
            let v5 = uplink.protocol == crate::config::Protocol::V5;
            let (local, local_rx) = LocalPublisher::for_tests();
            let (stats_tx, stats_rx) = watch::channel(Bytes::new());
            let fwd = Forwarder {
                uplink: Arc::new(uplink),
                gateway_id: "gw".to_string(),
                status_topic: "gw/status".to_string(),
                store: store.clone(),
                local,
                state: Arc::new(watch::channel(LinkState::Connecting).0),
                counters: Arc::new(ForwardCounters::default()),
                drain_timeout: Duration::from_secs(1),
                stats: stats_rx,
            };
            Rig {
                _dir: dir,
                store,
                store_thread: Some(store_thread),
                fwd: Arc::new(fwd),
                local: local_rx,
                _stats: stats_tx,
                v5,
            }
        }

        /// Stores `payloads` (QoS 1, in order) and returns their row ids.
        async fn append(&self, payloads: &[&str]) -> Vec<i64> {
            let before = self.rows().await;
            let msgs = payloads
                .iter()
                .map(|p| NewMessage {
                    topic: "t".to_string(),
                    payload: Bytes::from(p.to_string()),
                    qos: 1,
                    retain: false,
                    priority: 0,
                    created_ms: 0,
                })
                .collect();
            let out = self
                .store
                .append(msgs, Durability::Now)
                .await
                .expect("append");
            assert_eq!(out.stored, payloads.len());
            let ids: Vec<i64> = self
                .rows()
                .await
                .into_iter()
                .filter(|id| !before.contains(id))
                .collect();
            assert_eq!(ids.len(), payloads.len());
            ids
        }

        async fn rows(&self) -> Vec<i64> {
            self.store
                .fetch(&Cursor::default(), 10_000)
                .await
                .expect("fetch")
                .into_iter()
                .map(|m| m.id)
                .collect()
        }

        /// Waits (bounded) until the store holds exactly `want`, then checks it stays so.
        async fn expect_rows(&self, want: &[i64]) {
            let deadline = tokio::time::Instant::now() + STEP;
            while self.rows().await != want && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(self.rows().await, want);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(self.rows().await, want, "a later ack deleted another row");
        }

        /// Starts a session over a fresh duplex stream; the other end is the upstream.
        fn start(&self) -> (Upstream, Running) {
            let (client, server) = tokio::io::duplex(256 * 1024);
            let fwd = Arc::clone(&self.fwd);
            let running = tokio::spawn(async move {
                let endpoint = Endpoint {
                    host: "upstream.test".to_string(),
                    port: 1883,
                    tls: false,
                };
                let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
                let cancel = CancellationToken::new();
                fwd.session(client, &endpoint, "gw", &cancel, &mut backoff)
                    .await
                    .map(|SessionEnd::Shutdown| ())
            });
            let upstream = Upstream {
                io: server,
                buf: BytesMut::new(),
                v5: self.v5,
            };
            (upstream, running)
        }

        async fn close(mut self) {
            self.store.close().await.expect("clean close");
            if let Some(t) = self.store_thread.take() {
                t.join().expect("the store thread exits without panicking");
            }
        }
    }

    /// The birth message: retained `online` on the status topic, QoS 1, with this packet id.
    async fn expect_birth(up: &mut Upstream, pkid: u16) {
        assert_eq!(
            up.expect().await,
            Seen::Publish {
                topic: "gw/status".to_string(),
                qos: 1,
                pkid,
                payload: Bytes::from_static(b"online"),
            }
        );
    }

    async fn ended(running: Running) -> Result<(), ForwardError> {
        tokio::time::timeout(STEP, running)
            .await
            .expect("the session ends")
            .expect("the session task does not panic")
    }

    #[test]
    fn packet_ids_skip_zero_when_they_wrap_and_skip_ids_still_in_flight() {
        let mut pool = PkidPool { last: 65_533 };
        let mut inflight = HashMap::new();
        inflight.insert(65_535, Slot::Control);
        inflight.insert(1, Slot::Row(7));
        // An unanswered downlink SUBSCRIBE holds its id too.
        inflight.insert(3, Slot::Subscribe);
        let taken: Vec<u16> = (0..3).map(|_| pool.take(&inflight)).collect();
        assert_eq!(taken, vec![65_534, 2, 4]);
    }

    #[tokio::test]
    async fn a_puback_deletes_exactly_the_row_its_packet_id_names() {
        let rig = Rig::new("max_inflight: 10");
        let rows = rig.append(&["m0", "m1", "m2"]).await;
        let (mut up, running) = rig.start();
        up.accept(false, None).await;
        expect_birth(&mut up, 1).await;
        let mut sent = Vec::new();
        for _ in 0..3 {
            sent.push(up.expect_publish().await);
        }
        assert_eq!(
            sent,
            vec![(2, "m0".into()), (3, "m1".into()), (4, "m2".into())]
        );
        // Acknowledge the middle one: its row goes, not the oldest.
        up.puback(3).await;
        rig.expect_rows(&[rows[0], rows[2]]).await;
        up.puback(4).await;
        rig.expect_rows(&[rows[0]]).await;
        // A PUBACK for an id not in flight (the one just acknowledged) deletes nothing.
        up.puback(4).await;
        rig.expect_rows(&[rows[0]]).await;
        up.puback(2).await;
        rig.expect_rows(&[]).await;
        drop(up);
        assert!(matches!(
            ended(running).await,
            Err(ForwardError::Connection(_))
        ));
        rig.close().await;
    }

    #[tokio::test]
    async fn no_more_than_max_inflight_publishes_are_unacknowledged_at_once_the_birth_message_included(
    ) {
        let rig = Rig::new("max_inflight: 3");
        let rows = rig.append(&["m0", "m1", "m2", "m3", "m4", "m5"]).await;
        let (mut up, running) = rig.start();
        up.accept(false, None).await;
        expect_birth(&mut up, 1).await;
        assert_eq!(up.expect_publish().await, (2, "m0".into()));
        assert_eq!(up.expect_publish().await, (3, "m1".into()));
        up.expect_quiet().await;
        // Each PUBACK frees one slot, and exactly one more row goes out.
        up.puback(1).await;
        assert_eq!(up.expect_publish().await, (4, "m2".into()));
        up.expect_quiet().await;
        up.puback(2).await;
        assert_eq!(up.expect_publish().await, (5, "m3".into()));
        up.expect_quiet().await;
        rig.expect_rows(&rows[1..]).await;
        drop(up);
        assert!(ended(running).await.is_err());
        rig.close().await;
    }

    #[tokio::test]
    async fn a_v5_receive_maximum_below_max_inflight_bounds_the_window() {
        let rig = Rig::new("protocol: 5\nmax_inflight: 100");
        rig.append(&["m0", "m1", "m2", "m3", "m4"]).await;
        let (mut up, running) = rig.start();
        up.accept(false, Some(2)).await;
        expect_birth(&mut up, 1).await;
        assert_eq!(up.expect_publish().await, (2, "m0".into()));
        up.expect_quiet().await;
        up.puback(1).await;
        assert_eq!(up.expect_publish().await, (3, "m1".into()));
        up.expect_quiet().await;
        up.puback(2).await;
        up.puback(3).await;
        let mut next = vec![up.expect_publish().await, up.expect_publish().await];
        next.sort();
        assert_eq!(next, vec![(4, "m2".into()), (5, "m3".into())]);
        up.expect_quiet().await;
        drop(up);
        assert!(ended(running).await.is_err());
        rig.close().await;
    }

    #[tokio::test]
    async fn a_new_session_resends_every_unacked_row_from_a_fresh_cursor_whatever_session_present_says(
    ) {
        for session_present in [false, true] {
            let rig = Rig::new("max_inflight: 10");
            let rows = rig.append(&["m0", "m1", "m2"]).await;
            let (mut up, running) = rig.start();
            up.accept(false, None).await;
            expect_birth(&mut up, 1).await;
            for want in [(2, "m0"), (3, "m1"), (4, "m2")] {
                assert_eq!(up.expect_publish().await, (want.0, want.1.into()));
            }
            up.puback(2).await;
            rig.expect_rows(&rows[1..]).await;
            // The link drops with m1 and m2 unacknowledged.
            drop(up);
            assert!(matches!(
                ended(running).await,
                Err(ForwardError::Connection(_))
            ));

            let (mut up, running) = rig.start();
            up.accept(session_present, None).await;
            // Packet ids start over too; the acknowledged row is not sent again.
            expect_birth(&mut up, 1).await;
            assert_eq!(up.expect_publish().await, (2, "m1".into()));
            assert_eq!(up.expect_publish().await, (3, "m2".into()));
            up.expect_quiet().await;
            up.puback(3).await;
            rig.expect_rows(&[rows[1]]).await;
            drop(up);
            assert!(ended(running).await.is_err());
            rig.close().await;
        }
    }

    #[tokio::test]
    async fn the_downlink_subscribe_takes_its_own_packet_id_which_no_publish_of_the_window_reuses()
    {
        let mut rig = Rig::new(
            "max_inflight: 3\ndownlink:\n  - remote: \"cmd/{gateway_id}/#\"\n    local: \"cmd/\"",
        );
        let rows = rig.append(&["m0", "m1", "m2", "m3"]).await;
        let (mut up, running) = rig.start();
        up.accept(false, None).await;
        assert_eq!(
            up.expect().await,
            Seen::Subscribe {
                pkid: 1,
                filters: vec!["cmd/gw/#".to_string()],
            }
        );
        expect_birth(&mut up, 2).await;
        // The SUBSCRIBE holds its packet id until its SUBACK but takes no window slot: the
        // birth message and two rows fill a window of 3.
        assert_eq!(up.expect_publish().await, (3, "m0".into()));
        assert_eq!(up.expect_publish().await, (4, "m1".into()));
        up.expect_quiet().await;
        up.suback(1).await;
        up.puback(2).await;
        up.puback(3).await;
        let mut next = vec![up.expect_publish().await, up.expect_publish().await];
        next.sort();
        assert_eq!(next, vec![(5, "m2".into()), (6, "m3".into())]);
        rig.expect_rows(&rows[1..]).await;

        // A downlink command: PUBACKed with its own packet id and published locally, mapped.
        up.publish_qos1("cmd/gw/reboot", 1, b"now").await;
        assert_eq!(up.expect().await, Seen::PubAck { pkid: 1 });
        let local = tokio::time::timeout(STEP, rig.local.recv())
            .await
            .expect("the downlink message arrives locally")
            .expect("the local publisher is open");
        assert_eq!(&local.0[..], b"cmd/reboot");
        assert_eq!(&local.1[..], b"now");
        drop(up);
        assert!(ended(running).await.is_err());
        rig.close().await;
    }

    #[tokio::test]
    async fn an_idle_session_sends_pingreq_after_keep_alive_and_ends_when_no_pingresp_follows() {
        let rig = Rig::new("keep_alive: 5s");
        let (mut up, running) = rig.start();
        assert_eq!(up.accept(false, None).await, 5);
        expect_birth(&mut up, 1).await;
        up.puback(1).await;
        // The session has read the (empty) store and written everything: from here on only the
        // clock moves it, so virtual time is safe.
        tokio::time::pause();
        let keep_alive = Duration::from_secs(5);
        let long = Duration::from_secs(60);
        let t0 = tokio::time::Instant::now();
        assert_eq!(up.recv_within(long).await, Ok(Some(Seen::PingReq)));
        let first = t0.elapsed();
        // The timer wheel rounds up to the next millisecond.
        let slack = Duration::from_millis(10);
        assert!(first <= keep_alive + slack, "first PINGREQ after {first:?}");
        assert!(
            first >= keep_alive - Duration::from_secs(1),
            "first PINGREQ after {first:?}"
        );
        up.pingresp().await;
        let t1 = tokio::time::Instant::now();
        assert_eq!(up.recv_within(long).await, Ok(Some(Seen::PingReq)));
        let second = t1.elapsed();
        assert!(
            second >= keep_alive - slack && second <= keep_alive + slack,
            "second PINGREQ {second:?} after the first"
        );
        // No PINGRESP this time: the link counts as dead one keep-alive later.
        let t2 = tokio::time::Instant::now();
        let end = tokio::time::timeout(long, running)
            .await
            .expect("the session ends")
            .expect("no panic");
        assert!(t2.elapsed() <= keep_alive + slack);
        match end {
            Err(ForwardError::Connection(why)) => assert!(why.contains("no PINGRESP"), "{why}"),
            other => panic!("expected a dead-link error, got {other:?}"),
        }
        tokio::time::resume();
        rig.close().await;
    }
}
