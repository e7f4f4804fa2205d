//! One device connection: CONNECT handling (authentication, the keep-alive rewrite, the
//! connection to rumqttd's internal listener), then the two directions, `device` (device →
//! rumqttd) and `relay` (rumqttd → device), run side by side; the will is stored here when the
//! device goes away without DISCONNECT.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::device::{device_to_broker, DeviceSide};
use super::packet::{self, ConnectError, Frame, Malformed};
use super::relay::{broker_to_device, Between};
use super::{Refusal, Shared};
use crate::intake::RuleSettings;
use crate::store::Durability;

/// How long rumqttd gets to finish with a connection after the device's DISCONNECT.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// Keep-alive 0 ("never time out") becomes this: rumqttd refuses 0 and cuts a client after
/// 1.5 × keep-alive without traffic (65535 s: about 27 hours).
const KEEP_ALIVE_FOR_ZERO: u16 = u16::MAX;

/// Why a connection ended.
pub(super) enum Close {
    Malformed(Malformed),
    Refused(Refusal),
    Io(std::io::Error),
}

impl From<Malformed> for Close {
    fn from(m: Malformed) -> Self {
        Close::Malformed(m)
    }
}

impl From<std::io::Error> for Close {
    fn from(e: std::io::Error) -> Self {
        Close::Io(e)
    }
}

/// How the device side ended without an error.
#[derive(PartialEq, Eq)]
pub(super) enum Ended {
    /// DISCONNECT (normal: rumqttd drops the will).
    Disconnect,
    /// MQTT 5 DISCONNECT 0x04: the will is published.
    DisconnectWithWill,
    /// EOF without DISCONNECT: rumqttd publishes the will.
    DeviceGone,
    /// rumqttd closed its side.
    BrokerGone,
    Shutdown,
}

pub(super) async fn serve<R, W>(
    shared: &Shared,
    dev_rd: R,
    dev_wr: W,
    peer: SocketAddr,
    cancel: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A device stuck in a reconnect loop must not flood the journal: one line a second at most
    // (the counters count them all).
    let log_now = || {
        shared
            .log_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow()
    };
    match run(shared, dev_rd, dev_wr, peer, cancel).await {
        Ok(()) => {}
        Err(Close::Malformed(m)) => {
            shared.counters.count_malformed(m);
            if log_now() {
                tracing::info!(%peer, reason = m.name(), "malformed packet: connection closed");
            }
        }
        Err(Close::Refused(Refusal::Anonymous)) => {
            shared.counters.count_refused(Refusal::Anonymous);
            if log_now() {
                tracing::warn!(%peer, allow_anonymous = %shared.anonymous, "a client without a user name was refused: give it one of broker.users, or see broker.allow_anonymous");
            }
        }
        Err(Close::Refused(r)) => {
            shared.counters.count_refused(r);
            if log_now() {
                tracing::info!(%peer, reason = r.name(), "connection refused");
            }
        }
        Err(Close::Io(e)) => tracing::debug!(%peer, error = %e, "connection ended"),
    }
}

/// Reads one whole packet; `None` on EOF before it.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(Frame, Bytes)>, Close> {
    loop {
        if let Some(f) = packet::frame(buf, max)? {
            return Ok(Some((f, buf.split_to(f.len).freeze())));
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// The will rumqttd will publish if the device goes away, when it is on a forwarded topic.
struct StoredWill {
    topic: String,
    payload: Bytes,
    rule: RuleSettings,
}

async fn run<R, W>(
    shared: &Shared,
    mut dev_rd: R,
    mut dev_wr: W,
    peer: SocketAddr,
    cancel: CancellationToken,
) -> Result<(), Close>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut rbuf = BytesMut::with_capacity(1024);
    let first = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(shared.connect_timeout, read_frame(&mut dev_rd, &mut rbuf, shared.max_remaining)) => r,
    };
    let (f, pkt) = match first {
        Err(_) => return Err(Close::Refused(Refusal::ConnectTimeout)),
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
    };
    let c = match packet::connect(&pkt, &f) {
        Ok(c) => c,
        Err(ConnectError::Level(_)) => {
            let _ = dev_wr.write_all(packet::connack_refused(4, 1, 0)).await;
            return Err(Close::Refused(Refusal::UnsupportedProtocol));
        }
        Err(ConnectError::Malformed(m)) => return Err(m.into()),
    };
    let level = c.level;

    // Authentication: a configured user with its password, or no user name from where
    // `broker.allow_anonymous` admits one. With no users at all (0.1's open broker), a user name
    // is not checked: the client is anonymous.
    let anonymous = shared.anonymous.admits(peer.ip());
    let user = c.username.and_then(|u| shared.users.get(u));
    let acl = match (c.username, user) {
        (Some(_), Some(u)) => match c.password {
            Some(p) if same_secret(u.password.as_bytes(), p) => u.acl.clone(),
            _ => {
                let _ = dev_wr
                    .write_all(packet::connack_refused(level, 4, 0x86))
                    .await;
                return Err(Close::Refused(Refusal::BadCredentials));
            }
        },
        (Some(_), None) if !(anonymous && shared.users.is_empty()) => {
            let _ = dev_wr
                .write_all(packet::connack_refused(level, 4, 0x86))
                .await;
            return Err(Close::Refused(Refusal::BadCredentials));
        }
        _ if anonymous => shared.anonymous_acl.clone(),
        _ => {
            let _ = dev_wr
                .write_all(packet::connack_refused(level, 5, packet::NOT_AUTHORIZED))
                .await;
            return Err(Close::Refused(Refusal::Anonymous));
        }
    };
    if let Some(w) = &c.will {
        if !acl.may_publish(w.topic) {
            let _ = dev_wr
                .write_all(packet::connack_refused(level, 5, packet::NOT_AUTHORIZED))
                .await;
            return Err(Close::Refused(Refusal::NotAuthorized));
        }
    }
    let will = c.will.as_ref().and_then(|w| {
        let durable = shared.durable.as_ref()?;
        let rule = RuleSettings::for_topic(&durable.uplink.get(), w.topic)?;
        Some(StoredWill {
            topic: w.topic.to_string(),
            payload: Bytes::copy_from_slice(w.payload),
            rule,
        })
    });

    // The CONNECT as rumqttd gets it: will properties removed (see `props`), keep-alive 0 made
    // 65535 in place.
    let mut connect_bytes = match c.will.as_ref().and_then(|w| w.properties.clone()) {
        Some(block) => {
            shared
                .counters
                .properties_stripped
                .fetch_add(1, Ordering::Relaxed);
            packet::splice(&pkt, &f, &[(block.clone(), &[0])])
        }
        None => pkt.to_vec(),
    };
    if c.keep_alive == 0 {
        // The keep-alive sits before the will, at the same distance from the end of the fixed
        // header, whose length splicing may have changed.
        let at = c.keep_alive_at - f.header_len + packet::header_len(&connect_bytes);
        connect_bytes[at..at + 2].copy_from_slice(&KEEP_ALIVE_FOR_ZERO.to_be_bytes());
    }
    let internal = if level == 5 {
        shared.internal.v5
    } else {
        shared.internal.v4
    };
    // Held until rumqttd's first bytes (the CONNACK) arrive; the semaphore is never closed.
    let handshake = shared.handshakes.clone().acquire_owned().await.ok();
    let broker =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(internal)).await {
            Ok(Ok(s)) => s,
            _ => {
                let _ = dev_wr
                    .write_all(packet::connack_refused(level, 3, 0x88))
                    .await;
                return Err(Close::Refused(Refusal::BrokerUnavailable));
            }
        };
    let _ = broker.set_nodelay(true);
    let (mut broker_rd, mut broker_wr) = broker.into_split();
    broker_wr.write_all(&connect_bytes).await?;
    tracing::debug!(%peer, client_id = c.client_id, level, "device connected through the front");

    let between = Between::default();
    let session = Session {
        level,
        // rumqttd times a client out after 1.5 × the keep-alive it was given.
        keep_alive: Duration::from_secs(u64::from(if c.keep_alive == 0 {
            KEEP_ALIVE_FOR_ZERO
        } else {
            c.keep_alive
        })),
        // rumqttd keeps a session's subscriptions after the connection unless it is clean (it
        // ignores the session expiry; a v5 expiry > 0 is kept too, which is only more).
        persistent: !(c.clean && (level == 4 || c.session_expiry == 0)),
    };
    let (answers, answers_rx) = tokio::sync::mpsc::channel(16);
    let device = DeviceSide {
        rd: &mut dev_rd,
        rbuf,
        answers,
    };
    let mut d2b = std::pin::pin!(device_to_broker(
        shared,
        &session,
        &acl,
        &between,
        device,
        &mut broker_wr,
    ));
    let mut b2d = Box::pin(broker_to_device(
        &mut broker_rd,
        &mut dev_wr,
        level,
        &between,
        answers_rx,
        handshake,
    ));
    let ended = tokio::select! {
        r = &mut d2b => r,
        _ = &mut b2d => Ok(Ended::BrokerGone),
        _ = cancel.cancelled() => Ok(Ended::Shutdown),
    };
    let ended = match ended {
        Ok(e) => e,
        Err(Close::Refused(Refusal::NotAuthorized)) if level == 5 => {
            // Best effort: a v5 device learns why (DISCONNECT 0x87, not authorized). rumqttd
            // publishes the will, as for any connection closed without DISCONNECT.
            drop(b2d);
            let _ = dev_wr
                .write_all(&packet::disconnect_v5(packet::NOT_AUTHORIZED))
                .await;
            store_will(shared, will);
            return Err(Close::Refused(Refusal::NotAuthorized));
        }
        Err(e) => {
            store_will(shared, will);
            return Err(e);
        }
    };
    match ended {
        Ended::Disconnect => {
            // Let rumqttd read the DISCONNECT and close its side before ours goes away (see
            // `device_to_broker`).
            let _ = tokio::time::timeout(DISCONNECT_GRACE, &mut b2d).await;
        }
        Ended::DisconnectWithWill => {
            store_will(shared, will);
            let _ = tokio::time::timeout(DISCONNECT_GRACE, &mut b2d).await;
        }
        Ended::DeviceGone | Ended::BrokerGone => store_will(shared, will),
        Ended::Shutdown => {
            // The gateway is stopping: both sockets stay open until the process exits, as they
            // would without the front. Closing the loopback side now would make rumqttd publish
            // every device's will to local subscribers while the gateway shuts down.
            std::future::pending::<()>().await;
        }
    }
    Ok(())
}

/// Compares a password without an early exit on the first differing byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// rumqttd publishes the will of a device that went away; with the front on, nothing else
/// would store it.
fn store_will(shared: &Shared, will: Option<StoredWill>) {
    let (Some(w), Some(d)) = (will, shared.durable.as_ref()) else {
        return;
    };
    shared.counters.wills_stored.fetch_add(1, Ordering::Relaxed);
    drop(
        d.store
            .append(vec![w.rule.row(w.topic, w.payload)], Durability::Now),
    );
}

/// What the CONNECT settled about a connection.
pub(super) struct Session {
    pub(super) level: u8,
    /// As rumqttd got it (0 rewritten).
    pub(super) keep_alive: Duration,
    /// rumqttd keeps the session's subscriptions after the connection ends.
    pub(super) persistent: bool,
}
