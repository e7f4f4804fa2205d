//! In-process clients of the embedded broker, in our terms.
//!
//! rumqttd's local links stop being served after `Notification::Unschedule` until they are woken
//! (without that, rumqttd silently stops delivering to a link after ~200 messages). [`LocalLink`]
//! does that in the one place: [`LocalLink::next`] wakes the link and goes on waiting, so callers
//! only ever see messages. Local links are QoS 0, rumqttd's only QoS for them.

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;

/// The router closed the link (it only does when rumqttd is going away).
#[derive(Debug, thiserror::Error)]
#[error("the embedded broker closed the local link `{link}`: {reason}")]
pub struct LinkClosed {
    pub link: String,
    pub reason: String,
}

/// A message the router delivered to a local link's subscription.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
    /// The message's offset in rumqttd's in-memory log of the filter it came through; within one
    /// subscription offsets are consecutive, so a jump means the log rolled over unread.
    pub offset: Option<u64>,
}

/// One in-process connection to the router: subscribe, publish, receive.
pub struct LocalLink {
    name: String,
    tx: LinkTx,
    rx: LinkRx,
    /// An `Unschedule` was seen and the wake-up not yet sent (kept across a cancelled `next`).
    needs_wake: bool,
    rearmed: u64,
}

impl LocalLink {
    pub(super) fn new(name: String, tx: LinkTx, rx: LinkRx) -> LocalLink {
        LocalLink {
            name,
            tx,
            rx,
            needs_wake: false,
            rearmed: 0,
        }
    }

    fn closed(&self, reason: impl ToString) -> LinkClosed {
        LinkClosed {
            link: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// Subscribes at QoS 0; takes effect in order with the link's other packets.
    pub fn subscribe(&mut self, filter: &str) -> Result<(), LinkClosed> {
        self.tx
            .subscribe(filter.to_string())
            .map(|_| ())
            .map_err(|e| self.closed(e))
    }

    pub async fn publish(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), LinkClosed> {
        let p = Publish::new(topic, payload, retain);
        match self.tx.send(Packet::Publish(p, None)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.closed(e)),
        }
    }

    /// The next delivered message. Cancel-safe: dropping the future loses nothing, and a
    /// wake-up it owed is sent by the next call.
    pub async fn next(&mut self) -> Result<Delivery, LinkClosed> {
        loop {
            if self.needs_wake {
                if let Err(e) = self.rx.wake().await {
                    return Err(self.closed(e));
                }
                self.needs_wake = false;
                self.rearmed += 1;
            }
            match self.rx.next().await {
                Ok(Some(Notification::Forward(f))) => {
                    return Ok(Delivery {
                        topic: f.publish.topic,
                        payload: f.publish.payload,
                        retain: f.publish.retain,
                        offset: f.cursor.map(|(_, offset)| offset),
                    })
                }
                Ok(Some(Notification::Unschedule)) => self.needs_wake = true,
                Ok(_) => {}
                Err(e) => return Err(self.closed(e)),
            }
        }
    }

    /// Messages already delivered to the link, without waiting for more than `quiet` for each:
    /// what a stopping reader still owes the store.
    pub async fn drain(&mut self, quiet: std::time::Duration, max: usize) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.len() < max {
            match tokio::time::timeout(quiet, self.next()).await {
                Ok(Ok(d)) => out.push(d),
                _ => break,
            }
        }
        out
    }

    /// How often the link was re-armed after `Unschedule`.
    pub fn rearmed(&self) -> u64 {
        self.rearmed
    }
}

/// Publishes into the local broker from any task. The link is driven by its own task, which also
/// keeps it armed.
#[derive(Clone)]
pub struct LocalPublisher {
    tx: tokio::sync::mpsc::Sender<(Bytes, Bytes, bool)>,
}

impl LocalPublisher {
    pub(super) fn spawn(mut link: LocalLink) -> LocalPublisher {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Bytes, Bytes, bool)>(1024);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    p = rx.recv() => {
                        let Some((topic, payload, retain)) = p else { break };
                        if let Err(e) = link.publish(topic, payload, retain).await {
                            tracing::error!(error = %e, "local broker link closed");
                            break;
                        }
                    }
                    // Nothing is subscribed on this link; reading keeps it armed.
                    r = link.next() => if r.is_err() { break },
                }
            }
        });
        LocalPublisher { tx }
    }

    /// A publisher whose messages land in the returned receiver instead of a broker.
    #[cfg(test)]
    pub(crate) fn for_tests() -> (
        LocalPublisher,
        tokio::sync::mpsc::Receiver<(Bytes, Bytes, bool)>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        (LocalPublisher { tx }, rx)
    }

    /// Publishes at QoS 0 (the only QoS of rumqttd's local links). Waits only for queue space.
    pub async fn publish(
        &self,
        topic: impl Into<Bytes>,
        payload: impl Into<Bytes>,
        retain: bool,
    ) -> bool {
        self.tx
            .send((topic.into(), payload.into(), retain))
            .await
            .is_ok()
    }
}
