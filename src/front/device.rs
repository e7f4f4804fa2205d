//! Device → rumqttd: the device session half of a connection.
//!
//! A FIFO: each packet is an entry; a held PUBLISH's entry carries the [`PendingCommit`] of its
//! row, and no entry is written to rumqttd before every entry ahead of it. A direct entry
//! (stored, no local subscriber, see [`super::subs`]) leaves the FIFO in its turn as the front's
//! own PUBACK (QoS 1) or as nothing (QoS 0) instead of going to rumqttd. Topic aliases, ACLs,
//! the per-connection topic cache and the filters registered for local subscribers live here.
//!
//! [`PendingCommit`]: crate::store::PendingCommit

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::conn::{Close, Ended, Session};
use super::packet::{self, Frame, Malformed};
use super::relay::{Answer, Between, Fixup};
use super::rows::{Rows, RowsError, StoreEvent};
use super::{props, Acl, Refusal, Shared, Subscriptions};
use crate::intake::RuleSettings;
use crate::shared::BoundedCache;

/// Packets read from the device and not yet written to rumqttd: beyond this the front stops
/// reading, and TCP pushes back on the device.
pub(super) const MAX_QUEUED: usize = 1024;
/// The same bound in bytes (a few large held messages must not cost megabytes each).
pub(super) const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// Distinct topics whose route and ACL verdict a connection remembers.
const TOPIC_CACHE_MAX: usize = 1024;
/// rumqttd's topic alias maximum (its CONNACK announces 4096).
const MAX_TOPIC_ALIAS: u16 = 4096;
/// A packet on its way to rumqttd.
pub(super) struct Entry {
    bytes: Bytes,
    /// A QoS 1/2 PUBLISH whose row was offered to the store: it waits for the store's verdict
    /// (taken in order from [`Rows`]).
    held: Option<HeldId>,
    /// An answer of the front itself (a SUBACK refusing every filter): goes to the device.
    to_device: bool,
    /// A stored PUBLISH without a local subscriber: answered by the front, not passed on.
    direct: Option<Direct>,
}

/// What the front needs to answer a held PUBLISH itself when the store refuses it (MQTT 5).
#[derive(Clone, Copy)]
pub(super) struct HeldId {
    qos: u8,
    pkid: u16,
}

impl Entry {
    fn plain(bytes: Bytes) -> Entry {
        Entry {
            bytes,
            held: None,
            to_device: false,
            direct: None,
        }
    }
}

/// A stored, non-retained QoS 0/1 PUBLISH no local filter matched when it was read.
pub(super) struct Direct {
    /// QoS 1: the identifier to PUBACK.
    pkid: Option<u16>,
    /// The subscription generation of that verdict: if it changed by the time the entry leaves
    /// the FIFO, the topic is looked up again, so a subscription registered meanwhile gets it.
    generation: u64,
    topic: Bytes,
}

/// Route, ACL verdict and possible local subscriber of one topic, cached per connection.
#[derive(Clone, Copy)]
pub(super) struct TopicInfo {
    rule: Option<RuleSettings>,
    allowed: bool,
    subscribed: bool,
}

/// What one device packet becomes.
pub(super) enum Action {
    Forward(Entry),
    /// A QoS 1/2 PUBLISH whose row was queued in `DeviceState::rows`: held until it commits.
    Held(Bytes, Option<Direct>, HeldId),
    /// A packet that may overtake held ones (PINGREQ: the keep-alive is answered while
    /// messages wait for the store).
    Bypass(Bytes),
    /// DISCONNECT: forward it, then end (`true`: MQTT 5 reason 0x04, publish the will).
    Disconnect(Entry, bool),
}

/// The filters this connection registered in the front's [`Subscriptions`], released when it
/// ends unless rumqttd keeps its session.
pub(super) struct OwnFilters<'a> {
    subs: &'a Subscriptions,
    /// As the device wrote them (UNSUBSCRIBE names them so), `$share/` prefix included.
    filters: HashSet<String>,
    keep: bool,
}

impl OwnFilters<'_> {
    fn add(&mut self, filter: &str) {
        // A repeated SUBSCRIBE replaces the subscription: one registration per filter.
        if self.filters.insert(filter.to_string()) {
            self.subs.add(filter);
        }
    }

    fn remove(&mut self, filter: &str) {
        if self.filters.remove(filter) {
            self.subs.remove(filter);
        }
    }
}

impl Drop for OwnFilters<'_> {
    fn drop(&mut self) {
        // A persistent session's subscriptions live on in rumqttd (in memory, until this
        // process ends): so do their registrations.
        if !self.keep {
            for f in self.filters.drain() {
                self.subs.remove(&f);
            }
        }
    }
}

pub(super) struct DeviceState<'a> {
    shared: &'a Shared,
    level: u8,
    acl: &'a Acl,
    between: &'a Between,
    topics: BoundedCache<Bytes, TopicInfo>,
    /// The rules generation `topics` was filled under.
    rules_generation: Option<u64>,
    /// The subscription generation `topics` was filled under.
    subs_generation: u64,
    own: OwnFilters<'a>,
    aliases: HashMap<u16, Bytes>,
    /// The rows of this connection's stored messages and the store's answers (none without an
    /// uplink).
    rows: Option<Rows<'a>>,
}

/// The device's side of a connection, for `device_to_broker`.
pub(super) struct DeviceSide<'a, R> {
    pub(super) rd: &'a mut R,
    pub(super) rbuf: BytesMut,
    /// The front's own answers, written by `broker_to_device`.
    pub(super) answers: tokio::sync::mpsc::Sender<Answer>,
}

pub(super) async fn device_to_broker<R, W>(
    shared: &Shared,
    session: &Session,
    acl: &Acl,
    between: &Between,
    device: DeviceSide<'_, R>,
    broker_wr: &mut W,
) -> Result<Ended, Close>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let DeviceSide {
        rd: dev_rd,
        mut rbuf,
        answers,
    } = device;
    let mut st = DeviceState {
        shared,
        level: session.level,
        acl,
        between,
        topics: BoundedCache::new(TOPIC_CACHE_MAX),
        rules_generation: shared.durable.as_ref().map(|d| d.uplink.generation()),
        subs_generation: shared.subs.generation(),
        own: OwnFilters {
            subs: &shared.subs,
            filters: HashSet::new(),
            keep: session.persistent,
        },
        aliases: HashMap::new(),
        rows: shared
            .durable
            .as_ref()
            .map(|d| Rows::new(d.store.clone(), &shared.counters, session.level)),
    };
    let mut fifo: VecDeque<Entry> = VecDeque::new();
    let mut out = BytesMut::new();
    // The answers of one pass, as (bytes, PUBACKs from rumqttd before them): consecutive ones
    // with the same position share one write.
    let mut to_device: Vec<(Vec<u8>, u64)> = Vec::new();
    // QoS 1 PUBLISHes passed to rumqttd: each gets a PUBACK from it.
    let mut passed_qos1 = 0u64;
    // rumqttd cuts a client after 1.5 × keep-alive with nothing read; a device whose messages
    // all skip rumqttd is kept alive with PINGREQs, one at most every quarter keep-alive.
    let mut last_to_broker = Instant::now();
    let ping_every = session.keep_alive / 4;
    // Set once the device sent DISCONNECT or closed: the FIFO is drained, then the loop ends.
    let mut end: Option<Ended> = None;
    let mut queued_bytes = 0usize;
    loop {
        // Every packet already read is parsed; the rows among them go to the store as one
        // offer (see `rows`), whose answer the held PUBLISHes among them wait for.
        while end.is_none() && fifo.len() < MAX_QUEUED && queued_bytes < MAX_QUEUED_BYTES {
            let Some(f) = packet::frame(&rbuf, shared.max_remaining)? else {
                break;
            };
            let pkt = rbuf.split_to(f.len).freeze();
            match st.handle(pkt, &f).await? {
                Action::Forward(e) => {
                    queued_bytes += e.bytes.len();
                    fifo.push_back(e);
                }
                Action::Held(bytes, direct, id) => {
                    // Released only once the store has answered for its row, so nothing
                    // overtakes it.
                    queued_bytes += bytes.len();
                    fifo.push_back(Entry {
                        direct,
                        held: Some(id),
                        ..Entry::plain(bytes)
                    });
                }
                Action::Bypass(bytes) => out.extend_from_slice(&bytes),
                Action::Disconnect(e, with_will) => {
                    queued_bytes += e.bytes.len();
                    fifo.push_back(e);
                    end = Some(if with_will {
                        Ended::DisconnectWithWill
                    } else {
                        Ended::Disconnect
                    });
                }
            }
        }
        if let Some(rows) = st.rows.as_mut() {
            rows.offer();
            if let Some(r) = rows.poll_answer() {
                answered(rows, r)?;
                rows.offer();
            }
        }
        // Pass on everything ready at the head, in one write.
        let mut skipped = false;
        while let Some(head) = fifo.front() {
            let verdict = match head.held {
                None => None,
                Some(_) => match st.rows.as_mut().and_then(Rows::take_verdict) {
                    Some(v) => v,
                    None => break,
                },
            };
            let e = fifo.pop_front().expect("front exists");
            queued_bytes -= e.bytes.len();
            if e.to_device {
                push_answer(&mut to_device, &e.bytes, passed_qos1);
                continue;
            }
            if let (Some(reason), Some(id)) = (verdict, e.held) {
                // MQTT 5 only (3.1.1 messages are held instead): the store refused the row,
                // so rumqttd never sees the message and the device learns it was not taken.
                tracing::debug!(
                    reason = reason.name(),
                    "store refused a device message: answered 0x97"
                );
                let answer = packet::puback_v5_with_reason(id.pkid, id.qos, packet::QUOTA_EXCEEDED);
                push_answer(&mut to_device, &answer, passed_qos1);
                continue;
            }
            match e.direct {
                Some(d) if st.still_unsubscribed(&d) => {
                    skipped = true;
                    let counters = &shared.counters;
                    match d.pkid {
                        Some(id) => {
                            counters.acked_direct.fetch_add(1, Ordering::Relaxed);
                            push_answer(&mut to_device, &packet::puback(id), passed_qos1);
                        }
                        None => {
                            counters.skipped_qos0.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ => {
                    if is_qos1_publish(&e.bytes) {
                        passed_qos1 += 1;
                    }
                    out.extend_from_slice(&e.bytes);
                }
            }
        }
        if skipped && out.is_empty() && last_to_broker.elapsed() >= ping_every {
            between.pings.fetch_add(1, Ordering::AcqRel);
            out.extend_from_slice(&packet::PINGREQ_PACKET);
        }
        // The answers first: `broker_to_device` (polled by the same task) then knows them
        // before any PUBACK rumqttd sends for what follows, and can put each in its place.
        for (bytes, after_pubacks) in to_device.drain(..) {
            let answer = Answer {
                bytes: Bytes::from(bytes),
                after_pubacks,
            };
            // The broker-to-device side has ended when this fails: so does the connection.
            if answers.send(answer).await.is_err() {
                return Ok(Ended::BrokerGone);
            }
        }
        if !out.is_empty() {
            broker_wr.write_all(&out).await?;
            out.clear();
            last_to_broker = Instant::now();
        }
        if fifo.is_empty() {
            if let Some(e) = end.take() {
                // After a DISCONNECT the socket stays open until rumqttd closes it: a FIN right
                // behind the DISCONNECT can make rumqttd's link report a second disconnect for
                // its connection id after the router already handed that id to a new client,
                // which then gets cut (measured: a client lost its CONNACK'd connection in about
                // one run of six of the paho interop script).
                return Ok(e);
            }
        }
        if end.is_some() && st.rows.as_ref().is_some_and(|r| r.blocked().is_some()) {
            // The device disconnected or went away while its messages wait for the store: it
            // never got their PUBACKs, so they are its own again. What follows them (the
            // DISCONNECT) still goes to rumqttd.
            fifo.retain(|e| e.held.is_none());
            queued_bytes = fifo.iter().map(|e| e.bytes.len()).sum();
            if let Some(rows) = st.rows.as_mut() {
                rows.abandon();
            }
            continue;
        }
        let can_read = end.is_none() && fifo.len() < MAX_QUEUED && queued_bytes < MAX_QUEUED_BYTES;
        let rows = &mut st.rows;
        tokio::select! {
            ev = async { match rows.as_mut() { Some(r) => r.event().await, None => std::future::pending().await } } => {
                let rows = rows.as_mut().expect("an event comes only with rows");
                match ev {
                    StoreEvent::Answered(r) => answered(rows, r)?,
                    StoreEvent::Admitted => {
                        tracing::debug!("the store takes messages again: held ones are offered");
                        rows.admitted();
                    }
                    StoreEvent::Closed => return Err(Close::Refused(Refusal::StoreFailed)),
                }
            }
            n = dev_rd.read_buf(&mut rbuf), if can_read => {
                if n? == 0 {
                    // Held messages already committed are still passed on: local subscribers
                    // get what the store got.
                    end = Some(Ended::DeviceGone);
                }
            }
        }
    }
}

/// Applies the store's answer to a connection's offer; a store failure or a message that can
/// never be stored (MQTT 3.1.1 cannot be told) closes the connection without passing the
/// message on (the device never gets its PUBACK and sends it again).
fn answered(
    rows: &mut Rows<'_>,
    r: Result<crate::store::AppendOutcome, crate::store::StoreError>,
) -> Result<(), Close> {
    let was_blocked = rows.blocked().is_some();
    match rows.answered(r) {
        Ok(()) => {
            if let (false, Some(reason)) = (was_blocked, rows.blocked()) {
                tracing::info!(
                    reason = reason.name(),
                    "the store refuses new messages: this MQTT 3.1.1 device's messages are held unacknowledged until it takes them again"
                );
            }
            Ok(())
        }
        Err(RowsError::Store(e)) => {
            tracing::warn!(error = %e, "store append failed: device connection closed, its message not acknowledged");
            Err(Close::Refused(Refusal::StoreFailed))
        }
        Err(RowsError::Unstorable(reason)) => {
            tracing::warn!(
                reason = reason.name(),
                meaning = reason.meaning(),
                "an MQTT 3.1.1 device sent a message the store can never take: connection closed, the message not acknowledged"
            );
            Err(Close::Refused(Refusal::StoreRefused))
        }
    }
}

fn push_answer(to_device: &mut Vec<(Vec<u8>, u64)>, bytes: &[u8], after_pubacks: u64) {
    match to_device.last_mut() {
        Some((b, after)) if *after == after_pubacks => b.extend_from_slice(bytes),
        _ => to_device.push((bytes.to_vec(), after_pubacks)),
    }
}

/// Whether a whole packet is a QoS 1 PUBLISH (rumqttd answers it with a PUBACK).
fn is_qos1_publish(pkt: &[u8]) -> bool {
    pkt.first()
        .is_some_and(|h| h >> 4 == packet::PUBLISH && (h >> 1) & 0x03 == 1)
}

impl DeviceState<'_> {
    async fn handle(&mut self, pkt: Bytes, f: &Frame) -> Result<Action, Close> {
        let plain = |bytes| Action::Forward(Entry::plain(bytes));
        match f.kind() {
            packet::PUBLISH => self.publish(pkt, f),
            packet::SUBSCRIBE | packet::UNSUBSCRIBE => {
                let filters = packet::filters(&pkt, f, self.level)?;
                if f.kind() == packet::UNSUBSCRIBE {
                    // Released before rumqttd has the UNSUBSCRIBE: a message published until
                    // the UNSUBACK may or may not be delivered (MQTT-3.10.4), so skipping it
                    // from now on is allowed.
                    for (fl, _) in &filters {
                        self.own.remove(fl);
                    }
                    return Ok(plain(pkt));
                }
                let denied: Vec<usize> = (0..filters.len())
                    .filter(|&i| !self.acl.may_subscribe(filters[i].0))
                    .collect();
                // Registered before rumqttd gets the SUBSCRIBE: from now on no message on
                // these topics skips rumqttd (see `still_unsubscribed` for those read earlier
                // and still held).
                for (i, (fl, _)) in filters.iter().enumerate() {
                    if !denied.contains(&i) {
                        self.own.add(fl);
                    }
                }
                if self.level == 4 {
                    let mut new = false;
                    for (i, (fl, _)) in filters.iter().enumerate() {
                        if !denied.contains(&i) {
                            new |= self.shared.v4_filters.register(fl);
                        }
                    }
                    if new {
                        tokio::time::sleep(props::NEW_V4_FILTER_DELAY).await;
                    }
                }
                if denied.is_empty() {
                    return Ok(plain(pkt));
                }
                // Denied filters get a failure code in the SUBACK (3.1.1: 0x80, 5: 0x87 not
                // authorized); rumqttd sees only the allowed ones.
                let pkid = packet::packet_id(&pkt, f).ok_or(Malformed::Truncated)?;
                let code = packet::suback_denied_code(self.level);
                if denied.len() == filters.len() {
                    let codes = vec![code; filters.len()];
                    return Ok(Action::Forward(Entry {
                        to_device: true,
                        ..Entry::plain(Bytes::from(packet::suback(pkid, self.level, &codes)))
                    }));
                }
                let edits: Vec<(std::ops::Range<usize>, &[u8])> = denied
                    .iter()
                    .map(|&i| (filters[i].1.clone(), &[][..]))
                    .collect();
                let allowed = Bytes::from(packet::splice(&pkt, f, &edits));
                self.between
                    .fixups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        pkid,
                        Fixup {
                            total: filters.len(),
                            denied,
                        },
                    );
                Ok(plain(allowed))
            }
            packet::DISCONNECT => {
                packet::check_other(&pkt, f, self.level)?;
                let with_will = self.level == 5 && pkt.get(f.header_len) == Some(&0x04);
                Ok(Action::Disconnect(Entry::plain(pkt), with_will))
            }
            packet::PINGREQ => {
                packet::check_other(&pkt, f, self.level)?;
                Ok(Action::Bypass(pkt))
            }
            _ => {
                packet::check_other(&pkt, f, self.level)?;
                Ok(plain(pkt))
            }
        }
    }

    fn publish(&mut self, pkt: Bytes, f: &Frame) -> Result<Action, Close> {
        let p = packet::publish(&pkt, f, self.level)?;
        let alias = p.properties.as_ref().and_then(|pr| pr.topic_alias);
        if alias.is_some_and(|a| a > MAX_TOPIC_ALIAS) {
            return Err(Malformed::BadTopicAlias.into());
        }
        let topic: Bytes = match (p.topic.is_empty(), alias) {
            (false, Some(a)) => {
                let t = pkt.slice(p.topic.clone());
                self.aliases.insert(a, t.clone());
                t
            }
            (false, None) => pkt.slice(p.topic.clone()),
            (true, Some(a)) => self
                .aliases
                .get(&a)
                .cloned()
                .ok_or(Malformed::BadTopicAlias)?,
            (true, None) => return Err(Malformed::BadTopic.into()),
        };
        let info = self.topic_info(&topic);
        if !info.allowed {
            return Err(Close::Refused(Refusal::NotAuthorized));
        }
        let topic_str = std::str::from_utf8(&topic).map_err(|_| Malformed::BadTopic)?;

        // The bytes rumqttd gets: the original, unless properties must go (see `props`) or an
        // alias stands for the topic (rumqttd is given the topic, so it never depends on an
        // alias the front might have had to strip).
        let has_props = p.properties.as_ref().is_some_and(|pr| !pr.is_empty());
        let strip = props::must_strip(has_props, p.retain, || {
            self.shared.v4_filters.reaches_v4(topic_str)
        });
        let bytes = if strip || p.topic.is_empty() {
            let mut field = Vec::with_capacity(topic.len() + 2);
            field.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            field.extend_from_slice(&topic);
            let mut edits: Vec<(std::ops::Range<usize>, &[u8])> =
                vec![(p.topic_field.clone(), &field)];
            if strip {
                self.shared
                    .counters
                    .properties_stripped
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(pr) = &p.properties {
                    edits.push((pr.block.clone(), &[0]));
                }
            }
            Bytes::from(packet::splice(&pkt, f, &edits))
        } else {
            pkt.clone()
        };

        let (Some(rule), Some(rows)) = (info.rule, self.rows.as_mut()) else {
            return Ok(Action::Forward(Entry::plain(bytes)));
        };
        rows.push(
            rule.row(topic_str.to_string(), pkt.slice(p.payload.clone())),
            p.qos,
        );
        // Stored, and nobody local can receive it: the front answers the device itself. A
        // retained message must reach rumqttd (a later subscriber gets it), and QoS 2 keeps
        // rumqttd's exchange. Skipping a PUBLISH that sets a topic alias is safe: rumqttd is
        // always given the topic itself when a later packet uses only the alias (above).
        let pkid = (p.qos > 0).then(|| {
            let at = p.topic_field.end;
            u16::from_be_bytes([pkt[at], pkt[at + 1]])
        });
        let direct = (p.qos < 2 && !p.retain && !info.subscribed).then(|| Direct {
            pkid,
            generation: self.subs_generation,
            topic: topic.clone(),
        });
        if p.qos == 0 {
            self.shared
                .counters
                .stored_qos0
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Action::Forward(Entry {
                direct,
                ..Entry::plain(bytes)
            }));
        }
        self.shared.counters.held.fetch_add(1, Ordering::Relaxed);
        let id = HeldId {
            qos: p.qos,
            pkid: pkid.unwrap_or(0),
        };
        Ok(Action::Held(bytes, direct, id))
    }

    /// Whether a direct entry leaving the FIFO still has no local subscriber.
    fn still_unsubscribed(&self, d: &Direct) -> bool {
        let subs = &self.shared.subs;
        subs.generation() == d.generation
            || !subs.may_have_subscriber(std::str::from_utf8(&d.topic).unwrap_or(""))
    }

    fn topic_info(&mut self, topic: &Bytes) -> TopicInfo {
        // A reload may have changed the forward rules, a subscription the local subscribers:
        // cached verdicts are then stale.
        let generation = self.shared.durable.as_ref().map(|d| d.uplink.generation());
        let subs_generation = self.shared.subs.generation();
        if generation != self.rules_generation || subs_generation != self.subs_generation {
            self.topics.clear();
            self.rules_generation = generation;
            self.subs_generation = subs_generation;
        }
        if let Some(i) = self.topics.get(topic) {
            return *i;
        }
        let text = std::str::from_utf8(topic).unwrap_or("");
        let info = TopicInfo {
            rule: self
                .shared
                .durable
                .as_ref()
                .and_then(|d| RuleSettings::for_topic(&d.uplink.get(), text)),
            allowed: self.acl.may_publish(text),
            subscribed: self.shared.subs.may_have_subscriber(text),
        };
        // A copy: the key must not keep the whole packet's buffer alive.
        self.topics.insert(Bytes::copy_from_slice(topic), info);
        info
    }
}
