//! MQTT on the wire for the uplink: rumqttc's packet codecs (`mqttbytes`, v3.1.1 and v5) over a
//! TCP or TLS stream that the forwarder owns.
//!
//! Why not rumqttc's event loop: it flushes the socket after every single PUBLISH and reports
//! each packet as a separate event through a channel, and its `publish()` does not return the
//! packet id. Measured here, that cost the forwarder about as much CPU per message as everything
//! else in the gateway together. Owning the session lets the forwarder assign packet ids itself
//! (so a PUBACK names its row directly), write a whole window of PUBLISHes with one syscall and
//! read a burst of PUBACKs with another, all in one task, with no channel hop per message.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{Endpoint, Protocol};

/// The byte stream to the upstream: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed packet from the upstream: {0}")]
    Decode(String),
    #[error("cannot encode packet: {0}")]
    Encode(String),
}

/// What the upstream sent, in our terms.
#[derive(Debug)]
pub enum Incoming {
    ConnAck {
        session_present: bool,
        /// `None` when accepted, otherwise the refusal reason.
        refused: Option<String>,
        /// MQTT 5 Receive Maximum: QoS 1 publishes the upstream accepts in flight.
        receive_max: Option<u16>,
        /// MQTT 5 Maximum Packet Size the upstream accepts.
        max_packet: Option<u32>,
    },
    PubAck {
        pkid: u16,
        /// MQTT 5 reason when the upstream refused the message (reason code ≥ 0x80).
        refused: Option<String>,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        /// Set on a message the broker held retained from before our subscription.
        retain: bool,
        /// MQTT 5 Message Expiry Interval left, seconds.
        expiry_s: Option<u32>,
    },
    SubAck {
        pkid: u16,
        refused: usize,
    },
    PingResp,
    Disconnect {
        reason: String,
    },
    Other,
}

pub struct ConnectOptions {
    pub client_id: String,
    pub keep_alive_s: u16,
    pub clean: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will_topic: String,
    pub will_payload: Bytes,
    /// MQTT 5: keep the session this long after a disconnect.
    pub session_expiry_s: Option<u32>,
    /// Largest packet we accept.
    pub max_packet: u32,
    /// MQTT 5: downlink publishes we accept in flight.
    pub receive_max: u16,
}

/// Encodes and decodes packets for one protocol version.
pub struct Codec {
    v5: bool,
    max_incoming: usize,
}

fn enc<E: std::fmt::Debug>(e: E) -> WireError {
    WireError::Encode(format!("{e:?}"))
}

impl Codec {
    pub fn new(protocol: Protocol, max_incoming: usize) -> Self {
        Codec {
            v5: protocol == Protocol::V5,
            max_incoming,
        }
    }

    pub fn connect(&self, o: &ConnectOptions, buf: &mut BytesMut) -> Result<(), WireError> {
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::{Connect, ConnectProperties, LastWill, Login, Packet};
            use rumqttc::v5::mqttbytes::QoS;
            let props = ConnectProperties {
                session_expiry_interval: o.session_expiry_s,
                receive_maximum: Some(o.receive_max.max(1)),
                max_packet_size: Some(o.max_packet),
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            };
            let connect = Connect {
                keep_alive: o.keep_alive_s,
                client_id: o.client_id.clone(),
                clean_start: o.clean,
                properties: Some(props),
            };
            let will = LastWill {
                topic: Bytes::from(o.will_topic.clone()),
                message: o.will_payload.clone(),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: None,
            };
            let login = o.username.as_ref().map(|u| Login {
                username: u.clone(),
                password: o.password.clone().unwrap_or_default(),
            });
            Packet::Connect(connect, Some(will), login)
                .write(buf, None)
                .map_err(enc)?;
        } else {
            use rumqttc::mqttbytes::v4::{Connect, LastWill, Login, Packet};
            use rumqttc::mqttbytes::Protocol as P;
            use rumqttc::mqttbytes::QoS;
            let connect = Connect {
                protocol: P::V4,
                keep_alive: o.keep_alive_s,
                client_id: o.client_id.clone(),
                clean_session: o.clean,
                last_will: Some(LastWill {
                    topic: o.will_topic.clone(),
                    message: o.will_payload.clone(),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
                login: o.username.as_ref().map(|u| Login {
                    username: u.clone(),
                    password: o.password.clone().unwrap_or_default(),
                }),
            };
            Packet::Connect(connect)
                .write(buf, usize::MAX)
                .map_err(enc)?;
        }
        Ok(())
    }

    /// Appends one PUBLISH. `message_id` travels as the MQTT 5 user property `edgegate-id`
    /// (MQTT 3.1.1 has nowhere to put it).
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        pkid: u16,
        payload: Bytes,
        message_id: Option<String>,
        buf: &mut BytesMut,
    ) -> Result<usize, WireError> {
        let before = buf.len();
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
            let properties = message_id.map(|id| PublishProperties {
                user_properties: vec![("edgegate-id".to_string(), id)],
                ..Default::default()
            });
            let p = Publish {
                dup: false,
                qos: qos_v5(qos),
                retain,
                topic: Bytes::copy_from_slice(topic.as_bytes()),
                pkid: if qos == 0 { 0 } else { pkid },
                payload,
                properties,
            };
            Packet::Publish(p).write(buf, None).map_err(enc)?;
        } else {
            use rumqttc::mqttbytes::v4::{Packet, Publish};
            let p = Publish {
                dup: false,
                qos: qos_v4(qos),
                retain,
                topic: topic.to_string(),
                pkid: if qos == 0 { 0 } else { pkid },
                payload,
            };
            Packet::Publish(p).write(buf, usize::MAX).map_err(enc)?;
        }
        Ok(buf.len() - before)
    }

    pub fn puback(&self, pkid: u16, buf: &mut BytesMut) -> Result<(), WireError> {
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::{Packet, PubAck};
            Packet::PubAck(PubAck::new(pkid, None))
                .write(buf, None)
                .map_err(enc)?;
        } else {
            use rumqttc::mqttbytes::v4::{Packet, PubAck};
            Packet::PubAck(PubAck::new(pkid))
                .write(buf, usize::MAX)
                .map_err(enc)?;
        }
        Ok(())
    }

    /// SUBSCRIBE at QoS 1 to every filter, in one packet.
    pub fn subscribe(
        &self,
        pkid: u16,
        filters: &[String],
        buf: &mut BytesMut,
    ) -> Result<(), WireError> {
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Subscribe};
            use rumqttc::v5::mqttbytes::QoS;
            let s = Subscribe {
                pkid,
                filters: filters
                    .iter()
                    .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce))
                    .collect(),
                properties: None,
            };
            Packet::Subscribe(s).write(buf, None).map_err(enc)?;
        } else {
            use rumqttc::mqttbytes::v4::{Packet, Subscribe, SubscribeFilter};
            use rumqttc::mqttbytes::QoS;
            let s = Subscribe {
                pkid,
                filters: filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
                    .collect(),
            };
            Packet::Subscribe(s).write(buf, usize::MAX).map_err(enc)?;
        }
        Ok(())
    }

    pub fn pingreq(&self, buf: &mut BytesMut) -> Result<(), WireError> {
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::{Packet, PingReq};
            Packet::PingReq(PingReq).write(buf, None).map_err(enc)?;
        } else {
            use rumqttc::mqttbytes::v4::Packet;
            Packet::PingReq.write(buf, usize::MAX).map_err(enc)?;
        }
        Ok(())
    }

    pub fn disconnect(&self, buf: &mut BytesMut) -> Result<(), WireError> {
        if self.v5 {
            use rumqttc::v5::mqttbytes::v5::{Disconnect, DisconnectReasonCode, Packet};
            Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection))
                .write(buf, None)
                .map_err(enc)?;
        } else {
            use rumqttc::mqttbytes::v4::Packet;
            Packet::Disconnect.write(buf, usize::MAX).map_err(enc)?;
        }
        Ok(())
    }

    /// Takes the next complete packet out of `buf`; `None` until one is complete.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if self.v5 {
            self.decode_v5(buf)
        } else {
            self.decode_v4(buf)
        }
    }

    fn decode_v4(&self, buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
        use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
        use rumqttc::mqttbytes::Error;
        use rumqttc::SubscribeReasonCode;
        let packet = match Packet::read(buf, self.max_incoming) {
            Ok(p) => p,
            Err(Error::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(WireError::Decode(format!("{e:?}"))),
        };
        Ok(Some(match packet {
            Packet::ConnAck(a) => Incoming::ConnAck {
                session_present: a.session_present,
                refused: (a.code != ConnectReturnCode::Success).then(|| format!("{:?}", a.code)),
                receive_max: None,
                max_packet: None,
            },
            Packet::PubAck(a) => Incoming::PubAck {
                pkid: a.pkid,
                refused: None,
            },
            Packet::Publish(p) => Incoming::Publish {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                expiry_s: None,
            },
            Packet::SubAck(s) => Incoming::SubAck {
                pkid: s.pkid,
                refused: s
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, SubscribeReasonCode::Failure))
                    .count(),
            },
            Packet::PingResp => Incoming::PingResp,
            Packet::Disconnect => Incoming::Disconnect {
                reason: "DISCONNECT".to_string(),
            },
            _ => Incoming::Other,
        }))
    }

    fn decode_v5(&self, buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
        use rumqttc::v5::mqttbytes::v5::{
            ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode,
        };
        use rumqttc::v5::mqttbytes::Error;
        let max = u32::try_from(self.max_incoming).unwrap_or(u32::MAX);
        let packet = match Packet::read(buf, Some(max)) {
            Ok(p) => p,
            Err(Error::InsufficientBytes(_)) => return Ok(None),
            Err(e) => return Err(WireError::Decode(format!("{e:?}"))),
        };
        Ok(Some(match packet {
            Packet::ConnAck(a) => Incoming::ConnAck {
                session_present: a.session_present,
                refused: (a.code != ConnectReturnCode::Success).then(|| format!("{:?}", a.code)),
                receive_max: a.properties.as_ref().and_then(|p| p.receive_max),
                max_packet: a.properties.as_ref().and_then(|p| p.max_packet_size),
            },
            Packet::PubAck(a) => Incoming::PubAck {
                pkid: a.pkid,
                refused: match a.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => Some(format!("{other:?}")),
                },
            },
            Packet::Publish(p) => Incoming::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                expiry_s: p
                    .properties
                    .as_ref()
                    .and_then(|p| p.message_expiry_interval),
            },
            Packet::SubAck(s) => Incoming::SubAck {
                pkid: s.pkid,
                refused: s
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .count(),
            },
            Packet::PingResp(_) => Incoming::PingResp,
            Packet::Disconnect(d) => Incoming::Disconnect {
                reason: format!("{:?}", d.reason_code),
            },
            _ => Incoming::Other,
        }))
    }
}

fn qos_v4(q: u8) -> rumqttc::mqttbytes::QoS {
    if q == 0 {
        rumqttc::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::mqttbytes::QoS::AtLeastOnce
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

/// Opens TCP (and TLS for `mqtts://`) to the upstream.
/// Why [`open`] failed: `refused` when the host answered the TCP connect with a reset (nothing
/// listens on the port), which costs the server nothing to repeat.
#[derive(Debug)]
pub struct OpenError {
    pub message: String,
    pub refused: bool,
}

impl From<String> for OpenError {
    fn from(message: String) -> Self {
        OpenError {
            message,
            refused: false,
        }
    }
}

pub async fn open(
    endpoint: &Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Io>, OpenError> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| OpenError {
            message: format!("cannot connect to {}:{}: {e}", endpoint.host, endpoint.port),
            refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
        })?;
    // Batches are written whole; Nagle would only add latency to the last packet of each.
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Box::new(tcp)),
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                .map_err(|e| format!("`{}` is not a valid TLS server name: {e}", endpoint.host))?;
            let stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {} failed: {e}", endpoint.host))?;
            Ok(Box::new(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(protocol: Protocol) {
        let codec = Codec::new(protocol, 1 << 20);
        let mut buf = BytesMut::new();
        codec
            .publish(
                "sensors/a",
                1,
                false,
                7,
                Bytes::from_static(b"21.5"),
                Some("gw/7".into()),
                &mut buf,
            )
            .expect("encode");
        if protocol == Protocol::V5 {
            // The upstream's view of the same bytes: the message id is the `edgegate-id`
            // user property, and nothing else is added.
            use rumqttc::v5::mqttbytes::v5::Packet;
            let mut peer = buf.clone();
            match Packet::read(&mut peer, None).expect("a v5 peer decodes our PUBLISH") {
                Packet::Publish(p) => assert_eq!(
                    p.properties.map(|p| p.user_properties),
                    Some(vec![("edgegate-id".to_string(), "gw/7".to_string())])
                ),
                other => panic!("unexpected {other:?}"),
            }
        }
        // A peer's view of our bytes: decoding our own PUBLISH gives it back.
        let got = codec.decode(&mut buf).expect("decode").expect("complete");
        match got {
            Incoming::Publish {
                topic,
                payload,
                qos,
                pkid,
                retain,
                expiry_s,
            } => {
                assert_eq!((retain, expiry_s), (false, None));
                assert_eq!(topic, "sensors/a");
                assert_eq!(&payload[..], b"21.5");
                assert_eq!((qos, pkid), (1, 7));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn a_publish_round_trips_through_the_v4_codec() {
        roundtrip(Protocol::V4);
    }

    #[test]
    fn a_publish_round_trips_through_the_v5_codec() {
        roundtrip(Protocol::V5);
    }

    #[test]
    fn a_partial_packet_waits_for_more_bytes() {
        let codec = Codec::new(Protocol::V4, 1 << 20);
        let mut full = BytesMut::new();
        codec
            .publish(
                "t",
                1,
                false,
                1,
                Bytes::from_static(b"xyz"),
                None,
                &mut full,
            )
            .expect("encode");
        let mut part = full.split_to(full.len() - 1);
        assert!(codec.decode(&mut part).expect("no error").is_none());
        part.unsplit(full);
        assert!(codec.decode(&mut part).expect("no error").is_some());
    }

    #[test]
    fn garbage_from_the_upstream_is_an_error_not_a_panic() {
        let codec = Codec::new(Protocol::V4, 1 << 20);
        let mut buf = BytesMut::from(&[0xF0u8, 0x00][..]);
        assert!(codec.decode(&mut buf).is_err());
    }
}
