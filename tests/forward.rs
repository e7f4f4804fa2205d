//! Store-and-forward against a real mosquitto upstream: outages, crashes, TLS, downlink, limits.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;

#[test]
fn messages_published_to_the_gateway_arrive_upstream_in_order_at_qos_1() {
    let upstream = Mosquitto::start(MosquittoOpts {
        verbose_log: true,
        ..MosquittoOpts::default()
    });
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), &upstream.url(), "", "");

    let n = 2000;
    let acked = publish_seq(gw.port(), "sensors/e2e", n, 1);
    assert_eq!(
        acked,
        n,
        "gateway acknowledged {acked} of {n}; log:\n{}",
        gw.log()
    );
    assert_complete_in_order(&sub, "sensors/e2e", n, &gw);
    let forwarded: Vec<Received> = upstream
        .received_from("test")
        .into_iter()
        .filter(|r| r.topic == "sensors/e2e")
        .collect();
    assert!(
        forwarded.len() >= n,
        "upstream logged {} publishes",
        forwarded.len()
    );
    assert!(
        forwarded.iter().all(|r| r.qos == 1 && !r.retain),
        "not all forwarded at QoS 1 without retain: {:?}",
        forwarded.iter().find(|r| r.qos != 1 || r.retain)
    );
}

#[test]
fn an_mqtt5_uplink_tags_every_message_with_a_distinct_gateway_scoped_id() {
    let upstream = Mosquitto::start(MosquittoOpts::default());
    let opts = ClientOpts {
        qos: 1,
        v5: true,
        format: Some("%t %P|%p".into()),
        ..ClientOpts::default()
    };
    let sub = Subscriber::start(upstream.port(), "sensors/#", &client_id("up5"), &opts);
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), &upstream.url(), "", "protocol: 5");
    let n = 200;
    assert_eq!(publish_seq(gw.port(), "sensors/v5", n, 1), n);
    let msgs = sub.wait_for(n, Duration::from_secs(20));
    assert_eq!(msgs.len(), n, "log:\n{}", gw.log());
    let mut ids = std::collections::HashSet::new();
    let mut payloads = Vec::new();
    for (topic, rest) in &msgs {
        assert_eq!(topic, "sensors/v5");
        let (props, payload) = rest.split_once('|').unwrap_or(("", rest));
        let id = props
            .split(' ')
            .find_map(|p| p.strip_prefix("edgegate-id:"))
            .unwrap_or_else(|| panic!("no edgegate-id user property in {rest:?}"));
        assert!(
            id.starts_with("test/"),
            "id {id} is not scoped by the gateway id"
        );
        assert!(ids.insert(id.to_string()), "id {id} used twice");
        payloads.push((topic.clone(), payload.to_string()));
    }
    let report = check_seq(&payloads, "sensors/v5", n);
    assert!(
        report.missing.is_empty() && report.out_of_order == 0,
        "{}",
        report.summary()
    );
}

// ─── The message id across a resend ──────────────────────────────────────────────────────────

/// One `sensors/…` PUBLISH as the upstream received it.
#[derive(Clone, Debug)]
struct Tagged {
    connection: usize,
    payload: String,
    id: Option<String>,
}

#[derive(Default)]
struct V5State {
    connections: usize,
    seen: Vec<Tagged>,
}

/// A scripted MQTT 5 upstream (rumqttc's v5 codec) on 127.0.0.1 recording the `edgegate-id` of
/// every `sensors/…` PUBLISH. Its first connection acknowledges none of them and, with
/// `drop_after: Some(n)`, closes once it holds `n`; later connections acknowledge everything.
struct V5Upstream {
    port: u16,
    state: Arc<Mutex<V5State>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl V5Upstream {
    fn start(drop_after: Option<usize>) -> V5Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake upstream");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("fake upstream address").port();
        let state = Arc::new(Mutex::new(V5State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            // Bounded: the test's own timeouts end long before this.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !sp.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => serve_v5(stream, &st, &sp, drop_after, deadline),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        V5Upstream {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Tagged> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .clone()
    }

    /// Distinct payloads received on `connection`.
    fn payloads_on(&self, connection: usize) -> BTreeSet<String> {
        self.seen()
            .into_iter()
            .filter(|t| t.connection == connection)
            .map(|t| t.payload)
            .collect()
    }
}

impl Drop for V5Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_v5(
    mut stream: TcpStream,
    state: &Mutex<V5State>,
    stop: &AtomicBool,
    drop_after: Option<usize>,
    deadline: Instant,
) {
    use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnectReturnCode, Packet, PubAck, SubAck, SubscribeReasonCode,
    };
    use rumqttc::v5::mqttbytes::QoS;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let connection = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.connections += 1;
        s.connections
    };
    let mut held = 0usize;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
        loop {
            let packet = match Packet::read(&mut buf, None) {
                Ok(p) => p,
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => panic!("fake upstream cannot decode the gateway's packet: {e:?}"),
            };
            let reply = match packet {
                Packet::Connect(..) => Some(Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::Success,
                    properties: None,
                })),
                Packet::Subscribe(s) => Some(Packet::SubAck(SubAck {
                    pkid: s.pkid,
                    return_codes: s
                        .filters
                        .iter()
                        .map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce))
                        .collect(),
                    properties: None,
                })),
                Packet::PingReq(_) => Some(Packet::PingResp(rumqttc::v5::mqttbytes::v5::PingResp)),
                Packet::Disconnect(_) => return,
                Packet::Publish(p) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if !topic.starts_with("sensors/") || connection > 1 {
                        if topic.starts_with("sensors/") {
                            record(state, connection, &p);
                        }
                        Some(Packet::PubAck(PubAck::new(p.pkid, None)))
                    } else {
                        record(state, connection, &p);
                        held += 1;
                        if drop_after.is_some_and(|n| held >= n) {
                            // Gone before any PUBACK: the gateway must send them all again.
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        None
                    }
                }
                _ => None,
            };
            if let Some(reply) = reply {
                let mut out = BytesMut::new();
                reply
                    .write(&mut out, None)
                    .expect("encoding a control packet");
                if stream.write_all(&out).is_err() {
                    return;
                }
            }
        }
    }
}

fn record(state: &Mutex<V5State>, connection: usize, p: &rumqttc::v5::mqttbytes::v5::Publish) {
    let id = p.properties.as_ref().and_then(|props| {
        props
            .user_properties
            .iter()
            .find(|(k, _)| k == "edgegate-id")
            .map(|(_, v)| v.clone())
    });
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .seen
        .push(Tagged {
            connection,
            payload: String::from_utf8_lossy(&p.payload).into_owned(),
            id,
        });
}

/// Every payload 0..n was received on connection 1 and again on connection 2, and every copy
/// of one payload carried the same `edgegate-id`.
fn assert_same_id_on_each_copy(up: &V5Upstream, n: usize, gw: &Gateway) {
    let all: BTreeSet<String> = (0..n).map(|i| i.to_string()).collect();
    assert!(
        wait_until(Duration::from_secs(30), || up.payloads_on(2) == all),
        "the resend never completed: {:?}; log:\n{}",
        up.seen(),
        gw.log()
    );
    let mut ids: BTreeMap<String, BTreeSet<Option<String>>> = BTreeMap::new();
    for t in up.seen() {
        ids.entry(t.payload).or_default().insert(t.id);
    }
    assert_eq!(up.payloads_on(1), all, "first sends: {:?}", up.seen());
    for (payload, ids) in &ids {
        assert_eq!(ids.len(), 1, "payload {payload} was sent with ids {ids:?}");
        let id = ids.iter().next().cloned().flatten();
        assert!(
            id.as_deref().is_some_and(|id| id.starts_with("test/")),
            "payload {payload}: id {id:?}"
        );
    }
}

#[test]
fn a_message_resent_after_the_upstream_dropped_the_connection_before_its_puback_keeps_its_id() {
    let n = 20;
    let up = V5Upstream::start(Some(n));
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), &up.url(), "", "protocol: 5");
    assert_eq!(publish_seq(gw.port(), "sensors/retry", n, 1), n);
    assert_same_id_on_each_copy(&up, n, &gw);
}

#[test]
fn a_message_resent_after_kill_9_and_a_restart_keeps_its_id() {
    let n = 20;
    let up = V5Upstream::start(None);
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let mut gw = start_gateway(dir.path(), &up.url(), "", "protocol: 5");
    assert_eq!(publish_seq(gw.port(), "sensors/crash", n, 1), n);
    let all: BTreeSet<String> = (0..n).map(|i| i.to_string()).collect();
    assert!(
        wait_until(Duration::from_secs(20), || up.payloads_on(1) == all),
        "the first sends never arrived: {:?}; log:\n{}",
        up.seen(),
        gw.log()
    );
    // None was acknowledged upstream: all are still in the store, sent again by the next run.
    gw.kill9();
    gw.restart();
    assert_same_id_on_each_copy(&up, n, &gw);
}

#[test]
fn sigterm_with_the_upstream_down_exits_0_in_time_and_keeps_the_backlog_for_the_next_run() {
    let mut upstream = persistent_upstream();
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let mut gw = start_gateway(dir.path(), &upstream.url(), "", "");

    upstream.stop();
    let n = 500;
    assert_eq!(publish_seq(gw.port(), "sensors/graceful", n, 1), n);
    wait_rows(&gw, n as u64, Duration::from_secs(20));
    // gateway.shutdown_timeout is 5 s in these configs; allow 2 s beyond it for the exit.
    let started = std::time::Instant::now();
    let status = gw.sigterm_and_wait(Duration::from_secs(7));
    assert_eq!(status.code(), Some(0), "log:\n{}", gw.log());
    assert!(started.elapsed() < Duration::from_secs(7));

    gw.restart();
    upstream.restart();
    assert_complete_in_order(&sub, "sensors/graceful", n, &gw);
}

#[test]
fn a_backlog_built_while_the_upstream_is_down_arrives_in_order_when_it_returns() {
    let mut upstream = persistent_upstream();
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), &upstream.url(), "", "");

    upstream.stop();
    let n = 2000;
    let acked = publish_seq(gw.port(), "sensors/backlog", n, 1);
    assert_eq!(acked, n, "log:\n{}", gw.log());
    let stats = wait_rows(&gw, n as u64, Duration::from_secs(20));
    assert!(stat(&stats, "rows") > 0);

    upstream.restart();
    assert_complete_in_order(&sub, "sensors/backlog", n, &gw);
    assert!(
        wait_until(Duration::from_secs(10), || stat(&gw.buffer_stats(), "rows")
            == 0),
        "store not empty after delivery: {:#}",
        gw.buffer_stats()
    );
}

#[test]
fn kill_9_with_a_committed_backlog_loses_nothing_after_restart() {
    let mut upstream = persistent_upstream();
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let mut gw = start_gateway(dir.path(), &upstream.url(), "", "");

    upstream.stop();
    let n = 2000;
    let acked = publish_seq(gw.port(), "sensors/crash", n, 1);
    assert_eq!(acked, n, "log:\n{}", gw.log());
    // rumqttd PUBACKs before our commit; wait for the commit so "accepted" means "on disk".
    wait_rows(&gw, n as u64, Duration::from_secs(20));
    gw.kill9();

    gw.restart();
    upstream.restart();
    let report = assert_complete_in_order(&sub, "sensors/crash", n, &gw);
    assert_eq!(report.foreign, 0, "{}", report.summary());
}

#[test]
fn kill_9_while_draining_loses_nothing_and_duplicates_at_most_the_window_and_the_uncommitted_acks()
{
    let max_inflight = 20;
    // The README's bound: what is in flight, plus what the upstream acknowledged but the store
    // had not yet deleted (see `uncommitted_acks_bound`), at max_rate 1000/s.
    let uncommitted_acks = uncommitted_acks_bound(1000);
    let mut upstream = persistent_upstream();
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    // A rate limit stretches the drain to a few seconds so the kill lands in the middle of it.
    let mut gw = start_gateway(
        dir.path(),
        &upstream.url(),
        "",
        &format!("max_inflight: {max_inflight}\nmax_rate: 1000"),
    );

    upstream.stop();
    let n = 3000;
    assert_eq!(
        publish_seq(gw.port(), "sensors/drain", n, 1),
        n,
        "log:\n{}",
        gw.log()
    );
    wait_rows(&gw, n as u64, Duration::from_secs(20));

    upstream.restart();
    // The token bucket starts full (one second's worth): the first 1 000 go out as fast as the
    // window allows. Kill after them, when max_rate paces the drain.
    assert!(
        wait_until(Duration::from_secs(20), || sub.count() >= 1300),
        "drain did not start; got {}; log:\n{}",
        sub.count(),
        gw.log()
    );
    gw.kill9();
    let at_kill = sub.count();
    assert!(
        at_kill < n,
        "the whole backlog drained before the kill; nothing was tested"
    );

    gw.restart();
    let report = assert_complete_in_order(&sub, "sensors/drain", n, &gw);
    assert!(
        report.duplicates <= max_inflight + uncommitted_acks,
        "{} duplicates > max_inflight {max_inflight} + {uncommitted_acks} (killed after {at_kill} \
         arrived)",
        report.duplicates
    );
}

#[test]
fn an_upstream_restart_without_persistence_while_messages_flow_loses_nothing() {
    let mut upstream = Mosquitto::start(MosquittoOpts {
        verbose_log: true,
        ..MosquittoOpts::default()
    });
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), &upstream.url(), "", "");

    let n = 2000;
    let port = gw.port();
    // One topic per message, so the upstream's log of received PUBLISHes is the witness: a
    // subscriber could miss messages that the upstream accepted while it was reconnecting.
    let publisher = thread::spawn(move || {
        publish_each(port, n, 1, |i| {
            thread::sleep(Duration::from_micros(1500));
            (format!("sensors/flow/{i}"), i.to_string().into_bytes())
        })
    });
    let flowing = wait_until(Duration::from_secs(20), || {
        upstream.received_topics_from("test").len() >= 300
    });
    assert!(flowing, "nothing reached the upstream; log:\n{}", gw.log());
    upstream.kill();
    upstream.restart();
    let acked = publisher.join().expect("publisher thread panicked");
    assert_eq!(acked, n, "log:\n{}", gw.log());

    let mut report = None;
    wait_until(Duration::from_secs(30), || {
        let topics = upstream.received_topics_from("test");
        let r = check_numbers(
            topics
                .iter()
                .filter_map(|t| t.strip_prefix("sensors/flow/"))
                .map(|s| s.parse().ok()),
            n,
        );
        let done = r.missing.is_empty();
        report = Some(r);
        done
    });
    let report = report.expect("checked at least once");
    assert!(
        report.missing.is_empty(),
        "upstream never received: {}\ngateway log:\n{}",
        report.summary(),
        gw.log()
    );
}

#[test]
fn a_mutual_tls_upstream_receives_forwarded_messages() {
    let certdir = tempfile::tempdir().expect("creating a temp dir");
    let certs = certs::generate(certdir.path());
    let upstream = Mosquitto::start(MosquittoOpts {
        tls: Some(MosquittoTls {
            ca_file: certs.ca_cert.clone(),
            cert_file: certs.server_cert.clone(),
            key_file: certs.server_key.clone(),
            require_certificate: true,
        }),
        ..MosquittoOpts::default()
    });
    // The subscriber reuses the server's CA with the client certificate.
    let sub_opts = ClientOpts {
        qos: 1,
        tls: Some((
            certs.ca_cert.clone(),
            Some(certs.client_cert.clone()),
            Some(certs.client_key.clone()),
        )),
        ..ClientOpts::default()
    };
    let sub = Subscriber::start(upstream.port(), "sensors/#", &client_id("up"), &sub_opts);
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(
        dir.path(),
        &upstream.url(),
        "",
        &format!(
            "tls: {{ca_file: {}, cert_file: {}, key_file: {}}}",
            certs.ca_cert.display(),
            certs.client_cert.display(),
            certs.client_key.display()
        ),
    );
    let n = 200;
    assert_eq!(publish_seq(gw.port(), "sensors/tls", n, 1), n);
    assert_complete_in_order(&sub, "sensors/tls", n, &gw);
}

#[test]
fn a_command_published_upstream_reaches_a_local_subscriber_under_the_mapped_topic() {
    let upstream = Mosquitto::start(MosquittoOpts::default());
    let status = Subscriber::start(
        upstream.port(),
        "edgegate/test/status",
        &client_id("status"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), &upstream.url(), "", "");
    let local = Subscriber::start(gw.port(), "cmd/#", &client_id("local"), &ClientOpts::qos(1));
    assert!(
        !status.wait_for(1, Duration::from_secs(15)).is_empty(),
        "gateway never announced itself upstream; log:\n{}",
        gw.log()
    );
    // The downlink SUBSCRIBE may follow the birth message by a moment: repeat, bounded.
    for _ in 0..20 {
        publish(upstream.port(), "edgegate/test/cmd/relay1", "on", 1);
        if !local.wait_for(1, Duration::from_millis(500)).is_empty() {
            break;
        }
    }
    let msgs = local.messages();
    assert!(
        !msgs.is_empty(),
        "no command arrived locally; log:\n{}",
        gw.log()
    );
    assert!(
        msgs.iter()
            .all(|m| m == &("cmd/relay1".to_string(), "on".to_string())),
        "{msgs:?}"
    );
}

#[test]
fn the_upstream_status_is_online_while_connected_and_offline_after_a_crash() {
    let upstream = Mosquitto::start(MosquittoOpts::default());
    let status = Subscriber::start(
        upstream.port(),
        "edgegate/test/status",
        &client_id("status"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let mut gw = start_gateway(dir.path(), &upstream.url(), "", "");
    let msgs = status.wait_for(1, Duration::from_secs(15));
    assert_eq!(
        msgs.first().map(|m| m.1.as_str()),
        Some("online"),
        "log:\n{}",
        gw.log()
    );
    gw.kill9();
    let msgs = status.wait_for(2, Duration::from_secs(15));
    assert_eq!(
        msgs.last().map(|m| m.1.as_str()),
        Some("offline"),
        "{msgs:?}"
    );

    // A late subscriber sees the retained state.
    let late = Subscriber::start(
        upstream.port(),
        "edgegate/test/status",
        &client_id("late"),
        &ClientOpts::qos(1),
    );
    assert_eq!(
        late.wait_for(1, Duration::from_secs(10)),
        vec![("edgegate/test/status".to_string(), "offline".to_string())]
    );
}

/// QoS 0 messages the budget cannot take under `drop_newest` are dropped and counted exactly
/// (QoS 1/2 ones would be held or refused with 0x97, never acknowledged: tests/full_disk.rs).
#[test]
fn a_full_store_with_drop_newest_counts_every_refused_qos0_message_exactly() {
    // Nothing listens there: the store only fills.
    let dead_upstream = format!("mqtt://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let max_bytes = 1024 * 1024;
    let gw = start_gateway(
        dir.path(),
        &dead_upstream,
        &format!("max_bytes: {max_bytes}\nwhen_full: drop_newest"),
        "",
    );
    let n = 2000;
    let payload = "x".repeat(1000);
    let sent = publish_each(gw.port(), n, 0, move |i| {
        (
            "sensors/full".to_string(),
            format!("{i} {payload}").into_bytes(),
        )
    });
    assert_eq!(sent, n, "log:\n{}", gw.log());

    // The daemon's own counters: the file gets refusals with the next commit.
    let mut stats = serde_json::Value::Null;
    let mut status = serde_json::Value::Null;
    let settled = wait_until(Duration::from_secs(10), || {
        stats = gw.buffer_stats();
        status = gw.status_json();
        let dropped = status["dropped"]["store_full"].as_u64().unwrap_or(0);
        stat(&stats, "rows") + dropped == n as u64
    });
    assert!(
        settled,
        "rows + dropped.store_full never reached {n}:\n{stats:#}\n{status:#}\nlog:\n{}",
        gw.log()
    );
    let rows = stat(&stats, "rows");
    assert!(rows > 0 && rows < n as u64, "{stats:#}");
    assert!(stat(&stats, "bytes") <= max_bytes, "{stats:#}");
    assert_eq!(status["dropped"]["expired"].as_u64(), Some(0), "{status:#}");
    assert_eq!(
        status["dropped"]["disk_full"].as_u64(),
        Some(0),
        "{status:#}"
    );
    // drop_newest keeps the oldest rows: export holds exactly them, numbers 0..rows in order
    // (drop_oldest would keep the newest, a tail ending at n - 1).
    let exported = gw.buffer_export();
    assert_eq!(exported.len() as u64, rows, "export disagrees with stats");
    let kept: Vec<u64> = exported
        .iter()
        .map(|r| {
            r["payload"]
                .as_str()
                .and_then(|p| p.split(' ').next())
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("not a numbered row: {r}"))
        })
        .collect();
    let oldest: Vec<u64> = (0..rows).collect();
    assert!(
        kept == oldest,
        "drop_newest must keep the first {rows} of {n} messages; kept {} rows, first {:?}, last {:?}",
        kept.len(),
        &kept[..kept.len().min(5)],
        &kept[kept.len().saturating_sub(5)..]
    );
}

#[test]
fn a_corrupt_store_file_is_moved_aside_and_forwarding_still_works() {
    let upstream = Mosquitto::start(MosquittoOpts::default());
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let mut gw = start_gateway(dir.path(), &upstream.url(), "", "");
    let status = gw.sigterm_and_wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "log:\n{}", gw.log());

    let db = dir.path().join("buffer.db");
    assert!(db.exists(), "the store file was not created");
    let garbage: Vec<u8> = (0..64 * 1024).map(|_| fastrand::u8(..)).collect();
    std::fs::write(&db, garbage).expect("overwriting the store with garbage");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("buffer.db{suffix}")));
    }

    gw.restart();
    let quarantined: Vec<String> = std::fs::read_dir(dir.path())
        .expect("listing the gateway dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("buffer.db.corrupt-"))
        .collect();
    assert!(
        !quarantined.is_empty(),
        "no buffer.db.corrupt-* file; log:\n{}",
        gw.log()
    );

    let n = 100;
    assert_eq!(publish_seq(gw.port(), "sensors/after", n, 1), n);
    assert_complete_in_order(&sub, "sensors/after", n, &gw);
}

#[test]
fn a_refused_upstream_is_retried_at_least_every_second_whatever_the_backoff_step() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    // Nothing listens on the port any more: each connect is refused with a reset.
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = retry_on_port_clash(3, || {
        let yaml = gateway_yaml(dir.path(), free_port(), Some(&url), "", "")
            .replace("reconnect_min: 100ms", "reconnect_min: 1s")
            .replace("reconnect_max: 1s", "reconnect_max: 30s");
        Gateway::try_start_with(dir.path(), &yaml)
    });
    // Each failed attempt logs the delay before the next. Six attempts take about 5 s when
    // each waits at most 1 s, 31 s with backoff steps of 1, 2, 4, 8, 16 s: 20 s is generous
    // for the first and short of the second, and the logged delays must all be ≤ 1 s anyway.
    let delays = |log: &str| -> Vec<u64> {
        log.split("retry_in_ms")
            .skip(1)
            .filter_map(|rest| {
                let digits: String = rest
                    .trim_start_matches(|c: char| !c.is_ascii_digit())
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().ok()
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(20), || delays(&gw.log()).len() >= 6),
        "fewer than 6 attempts in 20 s; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    let delays = delays(&log);
    assert!(
        delays.iter().all(|&d| d <= 1000),
        "retry delays {delays:?}; log:\n{log}"
    );
}

#[test]
fn after_an_outage_a_priority_9_rule_drains_before_the_priority_0_backlog_queued_ahead_of_it() {
    let mut upstream = Mosquitto::start(MosquittoOpts {
        verbose_log: true,
        ..MosquittoOpts::default()
    });
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = retry_on_port_clash(3, || {
        let mut yaml = gateway_yaml(dir.path(), free_port(), None, "", "");
        yaml.push_str(&format!(
            "uplink:\n  url: {}\n  reconnect_min: 100ms\n  reconnect_max: 1s\n  forward:\n    - {{local: \"sensors/alarm\", priority: 9}}\n    - {{local: \"sensors/#\", priority: 0}}\n",
            upstream.url()
        ));
        Gateway::try_start_with(dir.path(), &yaml)
    });
    upstream.stop();
    let (readings, alarms) = (300, 20);
    assert_eq!(
        publish_seq(gw.port(), "sensors/temp", readings, 1),
        readings
    );
    assert_eq!(publish_seq(gw.port(), "sensors/alarm", alarms, 1), alarms);
    wait_rows(&gw, (readings + alarms) as u64, Duration::from_secs(20));

    upstream.restart();
    let total = readings + alarms;
    let mut got = Vec::new();
    let arrived = wait_until(Duration::from_secs(30), || {
        got = upstream
            .received_topics_from("test")
            .into_iter()
            .filter(|t| t.starts_with("sensors/"))
            .collect();
        got.len() >= total
    });
    assert!(arrived, "{} of {total} arrived:\n{}", got.len(), gw.log());
    assert!(
        got[..alarms].iter().all(|t| t == "sensors/alarm"),
        "the priority-9 alarms did not drain first: {:?}",
        &got[..alarms + 5]
    );
    assert!(got[alarms..].iter().all(|t| t == "sensors/temp"), "{got:?}");
}
