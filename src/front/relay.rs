//! rumqttd → device: the relay half of a connection and where rumqttd's quirks are undone.
//!
//! A byte copy that decodes only fixed headers: it keeps packet boundaries, counts rumqttd's
//! PUBACKs so the front's own answers ([`Answer`]) are written between them in the order of the
//! device's packets, drops the PINGRESPs to the PINGREQs the front sent to keep rumqttd's
//! keep-alive, and puts the failure codes of denied filters back into rumqttd's SUBACKs
//! ([`Fixup`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::packet;

/// Copies rumqttd's packets to the device, whole packets per write. Decodes only fixed headers
/// (to keep packet boundaries, count PUBACKs and drop the PINGRESPs to the front's own PINGREQs)
/// and the SUBACKs the front must complete ([`Fixup`]); writes the front's own answers between
/// packets, each once rumqttd has sent the PUBACKs that must precede it.
pub(super) async fn broker_to_device<R, W>(
    broker_rd: &mut R,
    dev_wr: &mut W,
    level: u8,
    between: &Between,
    mut answers: tokio::sync::mpsc::Receiver<Answer>,
    mut handshake: Option<tokio::sync::OwnedSemaphorePermit>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    // The front's answers waiting for rumqttd's PUBACKs, and how many PUBACKs were copied.
    let mut waiting: VecDeque<Answer> = VecDeque::new();
    let mut pubacks = 0u64;
    loop {
        tokio::select! {
            biased;
            Some(answer) = answers.recv() => waiting.push_back(answer),
            n = broker_rd.read_buf(&mut buf) => {
                // rumqttd has taken the connection: the next one may start (see `HANDSHAKES`).
                drop(handshake.take());
                if n? == 0 {
                    // Best effort: rumqttd is gone, the PUBACKs these waited for will not come.
                    for a in waiting.drain(..) {
                        dev_wr.write_all(&a.bytes).await?;
                    }
                    return Ok(());
                }
                // Whole packets go out as they are, up to the first SUBACK to complete or
                // PINGRESP to drop.
                let mut at = 0;
                loop {
                    let f = match packet::frame(&buf[at..], usize::MAX) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        // rumqttd does not send malformed packets; should it, they pass as bytes.
                        Err(_) => {
                            at = buf.len();
                            break;
                        }
                    };
                    match f.kind() {
                        packet::PUBACK => {
                            pubacks += 1;
                            // The front's answers due right after this PUBACK go out before
                            // rumqttd's next one.
                            if waiting.front().is_some_and(|a| a.after_pubacks <= pubacks) {
                                at += f.len;
                                dev_wr.write_all(&buf[..at]).await?;
                                let _ = buf.split_to(at);
                                at = 0;
                                release(&mut waiting, pubacks, dev_wr).await?;
                                continue;
                            }
                        }
                        packet::PINGRESP if take_one(&between.pings) => {
                            dev_wr.write_all(&buf[..at]).await?;
                            let _ = buf.split_to(at + f.len);
                            at = 0;
                            continue;
                        }
                        packet::SUBACK => {
                            let pkt = &buf[at..at + f.len];
                            let fix = packet::packet_id(pkt, &f).and_then(|id| {
                                between.fixups.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
                            });
                            if let Some(fix) = fix {
                                let code = packet::suback_denied_code(level);
                                dev_wr.write_all(&buf[..at]).await?;
                                let whole = packet::suback_with_denied(pkt, &f, level, fix.total, &fix.denied, code);
                                dev_wr.write_all(whole.as_deref().unwrap_or(pkt)).await?;
                                let _ = buf.split_to(at + f.len);
                                at = 0;
                                continue;
                            }
                        }
                        _ => {}
                    }
                    at += f.len;
                }
                if at > 0 {
                    dev_wr.write_all(&buf[..at]).await?;
                    let _ = buf.split_to(at);
                }
            }
        }
        release(&mut waiting, pubacks, dev_wr).await?;
    }
}

/// Writes the waiting answers that are due after `pubacks` PUBACKs from rumqttd.
async fn release<W: AsyncWrite + Unpin>(
    waiting: &mut VecDeque<Answer>,
    pubacks: u64,
    dev_wr: &mut W,
) -> std::io::Result<()> {
    while waiting.front().is_some_and(|a| a.after_pubacks <= pubacks) {
        let a = waiting.pop_front().expect("front exists");
        dev_wr.write_all(&a.bytes).await?;
    }
    Ok(())
}

/// Decrements `n` if it is above 0; whether it was.
pub(super) fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

/// One of the front's own packets for the device, written by `broker_to_device` once rumqttd
/// has sent its first `after_pubacks` PUBACKs: a device gets its PUBACKs in the order of its
/// PUBLISHes (MQTT-4.6.0-2) whether rumqttd or the front sends them.
pub(super) struct Answer {
    pub(super) bytes: Bytes,
    pub(super) after_pubacks: u64,
}

/// What the two directions of one connection share.
#[derive(Default)]
pub(super) struct Between {
    /// SUBSCRIBEs the front cut down, by packet identifier.
    pub(super) fixups: std::sync::Mutex<HashMap<u16, Fixup>>,
    /// PINGREQs the front sent rumqttd on its own: that many PINGRESPs are not the device's.
    pub(super) pings: AtomicU32,
}

/// A SUBSCRIBE the front cut down to its allowed filters: rumqttd's SUBACK gets the failure
/// codes of the denied ones back in their places.
pub(super) struct Fixup {
    pub(super) total: usize,
    pub(super) denied: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the relay over `from_broker` (then EOF) with `answers` queued first; what the
    /// device receives.
    async fn relay(
        level: u8,
        between: &Between,
        answers: Vec<Answer>,
        from_broker: &[u8],
    ) -> Vec<u8> {
        let (mut broker_side, mut broker_rd) = tokio::io::duplex(64 * 1024);
        let (mut dev_wr, mut dev_side) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for a in answers {
            tx.send(a).await.expect("the channel has room");
        }
        drop(tx);
        broker_side
            .write_all(from_broker)
            .await
            .expect("the duplex has room");
        drop(broker_side);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            broker_to_device(&mut broker_rd, &mut dev_wr, level, between, rx, None),
        )
        .await
        .expect("the relay ends at EOF")
        .expect("no I/O error");
        drop(dev_wr);
        let mut out = Vec::new();
        dev_side
            .read_to_end(&mut out)
            .await
            .expect("the device side reads");
        out
    }

    #[tokio::test]
    async fn an_answer_due_after_the_first_puback_goes_out_between_rumqttds_first_and_second() {
        let between = Between::default();
        let own = Answer {
            bytes: Bytes::from_static(&[0x40, 2, 0, 9]),
            after_pubacks: 1,
        };
        let out = relay(4, &between, vec![own], &[0x40, 2, 0, 1, 0x40, 2, 0, 2]).await;
        assert_eq!(out, [0x40, 2, 0, 1, 0x40, 2, 0, 9, 0x40, 2, 0, 2]);
    }

    #[tokio::test]
    async fn an_answer_whose_pubacks_never_come_is_still_written_when_rumqttd_goes_away() {
        let between = Between::default();
        let own = Answer {
            bytes: Bytes::from_static(&[0x40, 2, 0, 9]),
            after_pubacks: 3,
        };
        let out = relay(4, &between, vec![own], &[0x40, 2, 0, 1]).await;
        assert_eq!(out, [0x40, 2, 0, 1, 0x40, 2, 0, 9]);
    }

    #[tokio::test]
    async fn only_the_pingresps_to_the_fronts_own_pingreqs_are_dropped() {
        let between = Between::default();
        between.pings.store(1, Ordering::Release);
        let out = relay(4, &between, Vec::new(), &[0xd0, 0, 0x40, 2, 0, 1, 0xd0, 0]).await;
        assert_eq!(out, [0x40, 2, 0, 1, 0xd0, 0]);
        assert_eq!(between.pings.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_cut_down_subscribe_gets_its_denied_filters_failure_codes_back_in_place() {
        let between = Between::default();
        between
            .fixups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                5,
                Fixup {
                    total: 3,
                    denied: vec![1],
                },
            );
        // rumqttd granted QoS 0 and 1 to the two filters it saw; another SUBACK passes as is.
        let from_broker = [0x90, 4, 0, 5, 0, 1, 0x90, 3, 0, 6, 2];
        let out = relay(4, &between, Vec::new(), &from_broker).await;
        assert_eq!(out, [0x90, 5, 0, 5, 0, 0x80, 1, 0x90, 3, 0, 6, 2]);
        let v5 = Between::default();
        v5.fixups.lock().unwrap_or_else(|e| e.into_inner()).insert(
            5,
            Fixup {
                total: 2,
                denied: vec![0],
            },
        );
        // MQTT 5: an empty property block after the packet id.
        let out = relay(5, &v5, Vec::new(), &[0x90, 4, 0, 5, 0, 1]).await;
        assert_eq!(out, [0x90, 5, 0, 5, 0, 0x87, 1]);
    }
}
