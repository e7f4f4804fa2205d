//! Starting the front: bind the device-facing listeners (a taken port is a clear start error),
//! pick rumqttd's two internal loopback ports, and spawn one accept loop per listener.

use std::net::{SocketAddr, TcpListener as StdListener};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Durable, Front, Internal, Transport};
use crate::broker::{BrokerError, ListenerExit, ListenerSpec};
use crate::config::BrokerConfig;

/// Binds every configured listener, then spawns the front's accept loops into `tasks`; they stop
/// accepting when `cancel` is cancelled. rumqttd is to be started behind the returned
/// [`Internal`] ports.
pub fn start(
    cfg: &BrokerConfig,
    tasks: &mut JoinSet<ListenerExit>,
    durable: Option<Durable>,
    cancel: CancellationToken,
) -> Result<(Front, Internal), BrokerError> {
    let listeners = ListenerSpec::of(cfg);
    let mut bound = Vec::new();
    for l in &listeners {
        let sock = bind(l.addr).map_err(|source| BrokerError::Bind {
            addr: l.addr,
            what: l.what,
            source,
        })?;
        bound.push(sock);
    }
    let internal = Internal {
        v4: free_loopback_port("internal MQTT 3.1.1")?,
        v5: free_loopback_port("internal MQTT 5")?,
    };
    let front = Front::new(cfg, internal, durable);
    let acceptor = match &cfg.tls {
        Some(t) => Some((t.listen, super::tls::acceptor(t).map_err(BrokerError::Tls)?)),
        None => None,
    };
    for (spec, sock) in listeners.iter().zip(bound) {
        let (addr, what) = (spec.addr, spec.what);
        let transport = match (&acceptor, &cfg.websocket) {
            (Some((a, acc)), _) if *a == addr => Transport::Tls(acc.clone()),
            (_, Some(ws)) if ws.listen == addr => Transport::WebSocket,
            _ => Transport::Tcp,
        };
        let listener =
            sock.listen(BACKLOG)
                .map_err(|source| BrokerError::Bind { addr, what, source })?;
        let front = front.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let r = front.run(listener, transport, cancel).await;
            ListenerExit::from_result(addr, what, r.map_err(|e| e.to_string()))
        });
    }
    Ok((front, internal))
}

/// Connections the kernel queues for a listener before our accept loop takes them (capped by
/// `net.core.somaxconn`, 4096 by default). When an access point reboots, every device connects
/// in the same second; with std's 128 the rest were dropped and retried by the devices' TCP
/// after 1, 3 and 7 s (measured: 1 000 devices had their CONNACKs only after 8 s).
const BACKLOG: u32 = 4096;

/// A socket bound to `addr` like std's `TcpListener::bind` (SO_REUSEADDR), not yet listening.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    Ok(sock)
}

/// A loopback port free right now (the kernel's pick), for one of rumqttd's internal listeners.
fn free_loopback_port(what: &'static str) -> Result<SocketAddr, BrokerError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    StdListener::bind(any)
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::Bind {
            addr: any,
            what,
            source,
        })
}
