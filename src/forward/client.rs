//! The upstream MQTT connection, for MQTT 3.1.1 and 5 behind one small interface.
//!
//! Each connection attempt gets a fresh rumqttc client and event loop. rumqttc keeps unacked
//! publishes in its own `pending` list and silently discards it when the upstream answers
//! `session_present = false`; we never rely on it: after any error the old event loop is dropped
//! and the store, which still holds every unacked row, is the source of what to resend.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use super::ForwardError;
use crate::config::{Endpoint, Protocol, UplinkConfig, UplinkTlsConfig};

/// What the event loop reports, in our terms.
#[derive(Debug)]
pub enum UplinkEvent {
    ConnAck {
        session_present: bool,
        /// MQTT 5 Receive Maximum: how many QoS 1 publishes the upstream accepts in flight.
        receive_max: Option<u16>,
    },
    /// A PUBLISH was written to the connection with this packet id (0 for QoS 0). These come in
    /// the order the publishes were requested, which is how rows are matched to packet ids.
    Sent(u16),
    PubAck {
        pkid: u16,
        /// MQTT 5 reason when the upstream refused the message (reason code ≥ 0x80).
        refused: Option<String>,
    },
    Downlink {
        topic: String,
        payload: Bytes,
    },
    SubAck {
        refused: usize,
    },
    Other,
}

/// The upstream's last will and birth, on the retained status topic.
pub struct StatusMessages {
    pub topic: String,
    pub online: Bytes,
    pub offline: Bytes,
}

pub enum UplinkClient {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Capacity of the request channel: the in-flight window plus birth, subscriptions and slack,
/// so `publish()` never waits on it while we hold the window.
fn request_capacity(cfg: &UplinkConfig) -> usize {
    usize::from(cfg.max_inflight) + cfg.downlink.len() + 16
}

pub type EventRx = mpsc::Receiver<Result<UplinkEvent, String>>;

impl UplinkClient {
    /// Creates the client and spawns the task that polls its event loop. The TCP/TLS connection is
    /// made by that task; the first event is a `ConnAck` or an error.
    pub fn connect(
        cfg: &UplinkConfig,
        endpoint: &Endpoint,
        client_id: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        status: &StatusMessages,
    ) -> (UplinkClient, EventRx) {
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        let cap = request_capacity(cfg);
        let keep_alive = cfg.keep_alive.get().max(Duration::from_secs(5));
        let max_packet = usize::try_from(cfg.max_packet_size.get()).unwrap_or(usize::MAX);
        let password = cfg
            .password
            .resolved
            .as_ref()
            .map(|s| s.expose().to_string());
        match cfg.protocol {
            Protocol::V4 => {
                let mut o =
                    rumqttc::MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_session(cfg.clean_session)
                    .set_inflight(cfg.max_inflight.max(1))
                    .set_max_packet_size(max_packet, max_packet)
                    .set_last_will(rumqttc::LastWill::new(
                        status.topic.clone(),
                        status.offline.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                if let Some(user) = &cfg.username {
                    o.set_credentials(user.clone(), password.clone().unwrap_or_default());
                }
                if let Some(tls) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls),
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(o, cap);
                el.network_options.set_connection_timeout(10);
                tokio::spawn(async move {
                    loop {
                        let ev = match el.poll().await {
                            Ok(ev) => Ok(convert_v4(ev)),
                            Err(e) => Err(e.to_string()),
                        };
                        let failed = ev.is_err();
                        if ev_tx.send(ev).await.is_err() || failed {
                            break;
                        }
                    }
                });
                (UplinkClient::V4(client), ev_rx)
            }
            Protocol::V5 => {
                use rumqttc::v5;
                let mut o = v5::MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
                let will = v5::mqttbytes::v5::LastWill::new(
                    status.topic.clone(),
                    status.offline.clone(),
                    v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    None,
                );
                o.set_keep_alive(keep_alive)
                    .set_clean_start(cfg.clean_session)
                    .set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)))
                    .set_outgoing_inflight_upper_limit(cfg.max_inflight.max(1))
                    .set_last_will(will)
                    .set_connection_timeout(10);
                if !cfg.clean_session {
                    // Keep the session (and downlink messages queued for us) for a day offline.
                    o.set_session_expiry_interval(Some(86_400));
                }
                if let Some(user) = &cfg.username {
                    o.set_credentials(user.clone(), password.clone().unwrap_or_default());
                }
                if let Some(tls) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(tls),
                    ));
                }
                let (client, mut el) = v5::AsyncClient::new(o, cap);
                tokio::spawn(async move {
                    loop {
                        let ev = match el.poll().await {
                            Ok(ev) => Ok(convert_v5(ev)),
                            Err(e) => Err(e.to_string()),
                        };
                        let failed = ev.is_err();
                        if ev_tx.send(ev).await.is_err() || failed {
                            break;
                        }
                    }
                });
                (UplinkClient::V5(client), ev_rx)
            }
        }
    }

    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
        message_id: Option<String>,
    ) -> Result<(), ForwardError> {
        match self {
            UplinkClient::V4(c) => c
                .publish_bytes(topic, qos_v4(qos), retain, payload)
                .await
                .map_err(|e| ForwardError::Client(e.to_string())),
            UplinkClient::V5(c) => {
                let mut props = rumqttc::v5::mqttbytes::v5::PublishProperties::default();
                if let Some(id) = message_id {
                    props.user_properties.push(("edgegate-id".to_string(), id));
                }
                c.publish_with_properties(topic, qos_v5(qos), retain, payload, props)
                    .await
                    .map_err(|e| ForwardError::Client(e.to_string()))
            }
        }
    }

    pub async fn subscribe(&self, filter: String) -> Result<(), ForwardError> {
        match self {
            UplinkClient::V4(c) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| ForwardError::Client(e.to_string())),
            UplinkClient::V5(c) => c
                .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .map_err(|e| ForwardError::Client(e.to_string())),
        }
    }

    pub async fn disconnect(&self) {
        let _ = match self {
            UplinkClient::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            UplinkClient::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    if q == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

fn convert_v4(ev: rumqttc::Event) -> UplinkEvent {
    use rumqttc::{Event, Outgoing, Packet};
    match ev {
        Event::Incoming(Packet::ConnAck(ack)) => UplinkEvent::ConnAck {
            session_present: ack.session_present,
            receive_max: None,
        },
        Event::Incoming(Packet::PubAck(ack)) => UplinkEvent::PubAck {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Packet::Publish(p)) => UplinkEvent::Downlink {
            topic: p.topic,
            payload: p.payload,
        },
        Event::Incoming(Packet::SubAck(s)) => UplinkEvent::SubAck {
            refused: s
                .return_codes
                .iter()
                .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .count(),
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => UplinkEvent::Sent(pkid),
        _ => UplinkEvent::Other,
    }
}

fn convert_v5(ev: rumqttc::v5::Event) -> UplinkEvent {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    use rumqttc::v5::Event;
    use rumqttc::Outgoing;
    match ev {
        Event::Incoming(Packet::ConnAck(ack)) => UplinkEvent::ConnAck {
            session_present: ack.session_present,
            receive_max: ack.properties.as_ref().and_then(|p| p.receive_max),
        },
        Event::Incoming(Packet::PubAck(ack)) => UplinkEvent::PubAck {
            pkid: ack.pkid,
            refused: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                other => Some(format!("{other:?}")),
            },
        },
        Event::Incoming(Packet::Publish(p)) => UplinkEvent::Downlink {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
        },
        Event::Incoming(Packet::SubAck(s)) => UplinkEvent::SubAck {
            refused: s
                .return_codes
                .iter()
                .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .count(),
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => UplinkEvent::Sent(pkid),
        _ => UplinkEvent::Other,
    }
}

/// Builds the rustls client configuration (ring provider) for an `mqtts://` uplink: the given CA
/// bundle or the system's roots, and a client certificate for mutual TLS when configured.
pub fn tls_config(t: &UplinkTlsConfig) -> Result<Arc<rustls::ClientConfig>, ForwardError> {
    let tls_err = |what: String| ForwardError::Tls(what);
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(ca) => {
            let iter = CertificateDer::pem_file_iter(ca)
                .map_err(|e| tls_err(format!("cannot read CA file {}: {e}", ca.display())))?;
            for cert in iter {
                let cert =
                    cert.map_err(|e| tls_err(format!("bad certificate in {}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| tls_err(format!("unusable CA in {}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(tls_err(format!("no certificate found in {}", ca.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(tls_err(
                    "no system CA certificates found (install ca-certificates or set uplink.tls.ca_file)"
                        .to_string(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_err(format!("cannot read {}: {e}", cert.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err(format!("bad certificate in {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls_err(format!("cannot read private key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_err(format!("client certificate and key do not fit: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
