//! The MQTT front: a device's PUBACK means "on disk", strict validation, keep-alive 0, users and
//! ACLs, and the guard against rumqttd's v4-encoder panic. Real clients (rumqttc, mosquitto_pub/
//! sub, raw sockets for what no client sends), real mosquitto upstream, the built binary.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet};

/// A gateway forwarding `sensors/#` to `upstream_url`, front setting and extra broker lines as
/// given, retrying on a port clash.
fn start_gateway(dir: &Path, upstream_url: Option<&str>, extra_broker: &str) -> Gateway {
    retry_on_port_clash(3, || {
        let mut yaml = gateway_yaml(dir, free_port(), upstream_url, "", "");
        if !extra_broker.is_empty() {
            let lines: String = extra_broker.lines().map(|l| format!("  {l}\n")).collect();
            yaml = yaml.replacen("broker:\n", &format!("broker:\n{lines}"), 1);
        }
        Gateway::try_start_with(dir, &yaml)
    })
}

// ─── raw MQTT ────────────────────────────────────────────────────────────────────────────────

fn length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![header];
    length(body.len(), &mut v);
    v.extend_from_slice(body);
    v
}

fn field(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// An MQTT 3.1.1 CONNECT (clean session) with optional credentials and will.
fn connect_v4(
    client_id: &str,
    keep_alive: u16,
    login: Option<(&str, &str)>,
    will: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut flags = 0x02u8;
    if will.is_some() {
        flags |= 0x04 | 0x08; // will, QoS 1
    }
    if login.is_some() {
        flags |= 0xc0;
    }
    let mut body = field(b"MQTT");
    body.push(4);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend(field(client_id.as_bytes()));
    if let Some((t, p)) = will {
        body.extend(field(t.as_bytes()));
        body.extend(field(p.as_bytes()));
    }
    if let Some((u, p)) = login {
        body.extend(field(u.as_bytes()));
        body.extend(field(p.as_bytes()));
    }
    packet(0x10, &body)
}

fn publish_v4(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = field(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

fn subscribe_v4(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend(field(filter.as_bytes()));
    body.push(qos);
    packet(0x82, &body)
}

/// A raw TCP MQTT client.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn open(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the gateway");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("setting a read timeout");
        Raw { s }
    }

    fn send(&mut self, bytes: &[u8]) {
        // A closed connection shows in the next read; a write error here is the same news.
        let _ = self.s.write_all(bytes);
    }

    /// Reads one packet (bounded by the read timeout); `None` on EOF, reset or timeout.
    fn read_packet(&mut self) -> Option<Vec<u8>> {
        let mut head = [0u8; 1];
        self.s.read_exact(&mut head).ok()?;
        let mut len = 0usize;
        let mut hdr = vec![head[0]];
        for i in 0..4 {
            let mut b = [0u8; 1];
            self.s.read_exact(&mut b).ok()?;
            hdr.push(b[0]);
            len |= usize::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).ok()?;
        hdr.extend(body);
        Some(hdr)
    }

    /// CONNECT and return the CONNACK's bytes.
    fn connect(port: u16, connect: &[u8]) -> (Raw, Option<Vec<u8>>) {
        let mut r = Raw::open(port);
        r.send(connect);
        let ack = r.read_packet();
        (r, ack)
    }

    /// Whether the gateway closed this connection within `timeout` (reading whatever it sends).
    fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.s
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("setting a read timeout");
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

const CONNACK_OK: [u8; 4] = [0x20, 2, 0, 0];

// ─── the promise: PUBACK means on disk ───────────────────────────────────────────────────────

/// Publishes `sensors/<name>` QoS 1 messages with payload = sequence number through rumqttc
/// (100 in flight, or one every `pace`); records every sequence number that got its PUBACK.
/// Runs until `n` are acknowledged, the connection dies, or 60 s pass.
fn publisher(
    port: u16,
    name: String,
    n: usize,
    pace: Option<Duration>,
    acked: Arc<Mutex<BTreeSet<usize>>>,
    acked_count: Arc<AtomicUsize>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        runtime().block_on(async move {
            let mut opts = MqttOptions::new(client_id("crash"), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_inflight(100);
            let (client, mut eventloop) = AsyncClient::new(opts, 100);
            let topic = format!("sensors/{name}");
            tokio::spawn(async move {
                for i in 0..n {
                    if let Some(p) = pace {
                        tokio::time::sleep(p).await;
                    }
                    if client
                        .publish(topic.clone(), qos_of(1), false, i.to_string())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            // Outgoing::Publish(pkid) events come in request order: the k-th is sequence k.
            let mut next_seq = 0usize;
            let mut in_flight: HashMap<u16, usize> = HashMap::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut done = 0usize;
            while done < n {
                match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        in_flight.insert(pkid, next_seq);
                        next_seq += 1;
                    }
                    Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                        if let Some(seq) = in_flight.remove(&a.pkid) {
                            acked.lock().unwrap_or_else(|e| e.into_inner()).insert(seq);
                            acked_count.fetch_add(1, Ordering::SeqCst);
                            done += 1;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        })
    })
}

/// Sequence numbers per topic found in the store (read-only export, gateway stopped or not).
fn stored_seqs(gw: &Gateway) -> HashMap<String, BTreeSet<usize>> {
    let mut out: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for row in gw.buffer_export() {
        let topic = row["topic"].as_str().unwrap_or_default().to_string();
        if let Some(seq) = row["payload"].as_str().and_then(|p| p.parse().ok()) {
            out.entry(topic).or_default().insert(seq);
        }
    }
    out
}

#[derive(Debug)]
struct CrashRun {
    name: String,
    acked: usize,
    missing: Vec<usize>,
}

/// One crash run: a full-speed and a paced publisher; `kill -9` after `kill_after` PUBACKs
/// (`None`: right at the full-speed publisher's last PUBACK). Returns, per publisher, what was
/// acknowledged and which of those are not in the store.
fn crash_run(gw: &mut Gateway, run: usize, n: usize, kill_after: Option<usize>) -> Vec<CrashRun> {
    let fast_acked = Arc::new(Mutex::new(BTreeSet::new()));
    let slow_acked = Arc::new(Mutex::new(BTreeSet::new()));
    let fast_count = Arc::new(AtomicUsize::new(0));
    let slow_count = Arc::new(AtomicUsize::new(0));
    let fast_name = format!("crash{run}/fast");
    let slow_name = format!("crash{run}/paced");
    let fast = publisher(
        gw.port(),
        fast_name.clone(),
        n,
        None,
        fast_acked.clone(),
        fast_count.clone(),
    );
    let slow = publisher(
        gw.port(),
        slow_name.clone(),
        n,
        Some(Duration::from_millis(1)),
        slow_acked.clone(),
        slow_count.clone(),
    );
    let target = kill_after.unwrap_or(n);
    let reached = wait_until(Duration::from_secs(60), || {
        fast_count.load(Ordering::SeqCst) >= target
    });
    gw.kill9();
    assert!(
        reached,
        "publisher never reached {target} PUBACKs; log:\n{}",
        gw.log()
    );
    let _ = fast.join();
    let _ = slow.join();
    let stored = stored_seqs(gw);
    let empty = BTreeSet::new();
    [(fast_name, fast_acked), (slow_name, slow_acked)]
        .into_iter()
        .map(|(name, acked)| {
            let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let have = stored.get(&format!("sensors/{name}")).unwrap_or(&empty);
            CrashRun {
                missing: acked.difference(have).copied().collect(),
                acked: acked.len(),
                name,
            }
        })
        .collect()
}

/// Runs the crash scenario `runs` times (alternating mid-stream and last-PUBACK kills) against
/// one store; returns every run's result and the gateway (stopped).
fn crash_series(
    dir: &Path,
    upstream_url: &str,
    extra_broker: &str,
    runs: usize,
) -> (Vec<CrashRun>, Gateway) {
    let mut gw = start_gateway(dir, Some(upstream_url), extra_broker);
    let mut results = Vec::new();
    for run in 0..runs {
        if run > 0 {
            gw.restart();
        }
        let n = 20_000;
        let kill_after = if run % 2 == 0 { Some(10_000) } else { None };
        results.extend(crash_run(&mut gw, run, n, kill_after));
    }
    (results, gw)
}

#[test]
fn every_message_a_device_got_a_puback_for_survives_kill_9_and_reaches_the_upstream() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    // The uplink is down while devices publish: everything stays in the store.
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (results, mut gw) = crash_series(dir.path(), &url, "", 4);
    for r in &results {
        eprintln!(
            "{}: {} PUBACKed, {} missing",
            r.name,
            r.acked,
            r.missing.len()
        );
    }
    for r in &results {
        assert!(
            r.missing.is_empty(),
            "{}: {} of {} PUBACKed messages are not in the store (first: {:?}); log:\n{}",
            r.name,
            r.missing.len(),
            r.acked,
            r.missing.iter().take(10).collect::<Vec<_>>(),
            gw.log()
        );
    }
    assert!(
        results.iter().any(|r| r.acked > 1000),
        "the publishers hardly got going: {results:?}"
    );

    // Uplink back: after a restart everything acknowledged arrives upstream.
    upstream.restart();
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let stored: usize = stored_seqs(&gw).values().map(BTreeSet::len).sum();
    gw.restart();
    let msgs = sub.wait_for(stored, Duration::from_secs(60));
    let mut got: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for (t, p) in &msgs {
        if let Ok(seq) = p.parse() {
            got.entry(t.clone()).or_default().insert(seq);
        }
    }
    assert!(
        got.values().map(BTreeSet::len).sum::<usize>() >= stored,
        "upstream got {} distinct messages of {stored} stored; log:\n{}",
        got.values().map(BTreeSet::len).sum::<usize>(),
        gw.log()
    );
}

/// The same scenario through rumqttd's own listener and the local-link intake (`front: false`):
/// reports the loss the front fixes. Not part of the suite's pass/fail (the loss varies, 0
/// included); run with `--ignored --nocapture` to see the table.
#[test]
#[ignore = "measurement of the old intake path, for the report"]
fn without_the_front_kill_9_loses_messages_devices_got_a_puback_for() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (results, _gw) = crash_series(dir.path(), &url, "front: false", 6);
    for r in &results {
        eprintln!(
            "front off: {}: {} PUBACKed, {} missing",
            r.name,
            r.acked,
            r.missing.len()
        );
    }
}

#[test]
fn with_the_front_each_device_message_is_stored_exactly_once() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), Some(&url), "");
    let n = 300;
    assert_eq!(publish_seq(gw.port(), "sensors/once/q1", n, 1), n);
    assert_eq!(publish_seq(gw.port(), "sensors/once/q2", n, 2), n);
    assert_eq!(publish_seq(gw.port(), "sensors/once/q0", n, 0), n);
    publish(gw.port(), "other/not-forwarded", "x", 1);
    // QoS 0 rows are committed within commit_interval.
    let mut rows = Vec::new();
    wait_until(Duration::from_secs(10), || {
        rows = gw.buffer_export();
        rows.len() >= 3 * n
    });
    thread::sleep(Duration::from_millis(500));
    let rows = gw.buffer_export();
    let mut per: HashMap<String, Vec<usize>> = HashMap::new();
    for r in &rows {
        let t = r["topic"].as_str().unwrap_or_default().to_string();
        let seq = r["payload"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or(usize::MAX);
        per.entry(t).or_default().push(seq);
    }
    for q in ["q0", "q1", "q2"] {
        let seqs = per.remove(&format!("sensors/once/{q}")).unwrap_or_default();
        assert_eq!(
            seqs,
            (0..n).collect::<Vec<_>>(),
            "{q}: not each message once, in order; log:\n{}",
            gw.log()
        );
    }
    assert!(per.is_empty(), "unexpected rows: {per:?}");
}

// ─── keep-alive 0, limits, authentication ───────────────────────────────────────────────────

#[test]
fn a_keep_alive_0_client_is_accepted_and_stays_connected_while_idle_beyond_90_seconds() {
    // The one slow test (~95 s): rumqttd alone refuses keep-alive 0, and cuts a client with
    // keep-alive 60 after 90 s of silence.
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    let (mut idle, ack) = Raw::connect(gw.port(), &connect_v4("idle0", 0, None, None));
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]), "log:\n{}", gw.log());
    idle.send(&subscribe_v4(1, "idle/#", 0));
    let suback = idle.read_packet().expect("SUBACK");
    assert_eq!(suback[0], 0x90);
    assert!(
        !idle.closed_within(Duration::from_secs(95)),
        "the idle keep-alive-0 client was disconnected; log:\n{}",
        gw.log()
    );
    publish(gw.port(), "idle/x", "still here", 0);
    idle.s
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("setting a read timeout");
    let p = idle.read_packet().expect("the publish after the idle time");
    assert_eq!(p[0] & 0xf0, 0x30);
    assert!(p.ends_with(b"still here"));
}

#[test]
fn a_connection_that_sends_no_connect_is_closed_after_the_connect_timeout() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "connect_timeout: 1s");
    let mut silent = Raw::open(gw.port());
    let started = Instant::now();
    assert!(silent.closed_within(Duration::from_secs(5)));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn connections_beyond_max_connections_are_refused_and_the_others_keep_working() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "max_connections: 2");
    let (mut a, ack_a) = Raw::connect(gw.port(), &connect_v4("a", 30, None, None));
    let (mut b, ack_b) = Raw::connect(gw.port(), &connect_v4("b", 30, None, None));
    assert_eq!(ack_a.as_deref(), Some(&CONNACK_OK[..]));
    assert_eq!(ack_b.as_deref(), Some(&CONNACK_OK[..]));
    let (mut c, ack_c) = Raw::connect(gw.port(), &connect_v4("c", 30, None, None));
    assert_eq!(ack_c, None, "a third connection got a CONNACK");
    assert!(c.closed_within(Duration::from_secs(2)));
    // After the refusal both connections still subscribe, publish and receive, each way.
    delivers_after_refusal(&mut a, &mut b, "a", 1, &gw);
    delivers_after_refusal(&mut b, &mut a, "b", 2, &gw);
}

/// `sub` subscribes, `publ` publishes to it at QoS 1, and `sub` receives the message.
fn delivers_after_refusal(sub: &mut Raw, publ: &mut Raw, name: &str, pkid: u16, gw: &Gateway) {
    let filter = format!("keep/{name}/#");
    sub.send(&subscribe_v4(pkid, &filter, 1));
    assert_eq!(
        sub.read_packet().as_deref(),
        Some(&[0x90, 3, 0, pkid as u8, 1][..]),
        "{name}: no SUBACK after the refusal; log:\n{}",
        gw.log()
    );
    let topic = format!("keep/{name}/x");
    publ.send(&publish_v4(&topic, 1, 10 + pkid, b"still working"));
    assert_eq!(
        publ.read_packet().as_deref(),
        Some(&[0x40, 2, 0, 10 + pkid as u8][..]),
        "no PUBACK for the publish to {name}; log:\n{}",
        gw.log()
    );
    let got = sub.read_packet().unwrap_or_else(|| {
        panic!(
            "{name} received nothing after the refusal; log:\n{}",
            gw.log()
        )
    });
    assert_eq!(got[0] & 0xf0, 0x30, "{name}: not a PUBLISH: {got:?}");
    assert!(
        got.windows(topic.len()).any(|w| w == topic.as_bytes()) && got.ends_with(b"still working"),
        "{name}: {got:?}"
    );
}

const USERS: &str = "users:\n  - {username: dev1, password: pw1, publish: [\"sensors/dev1/#\"], subscribe: [\"cmd/dev1/#\"]}\n  - {username: admin, password: pw2}";

#[test]
fn a_wrong_password_gets_connack_bad_credentials_from_the_front() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, USERS);
    let (_r, ack) = Raw::connect(
        gw.port(),
        &connect_v4("x", 30, Some(("dev1", "nope")), None),
    );
    assert_eq!(ack.as_deref(), Some(&[0x20, 2, 0, 4][..]));
    // No user name at all is "not authorized" (5), as Mosquitto answers a refused anonymous
    // client: there was no user name or password to be bad.
    let (_r, ack) = Raw::connect(gw.port(), &connect_v4("x", 30, None, None));
    assert_eq!(ack.as_deref(), Some(&[0x20, 2, 0, 5][..]), "anonymous");
    let (_r, ack) = Raw::connect(gw.port(), &connect_v4("x", 30, Some(("dev1", "pw1")), None));
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
}

#[test]
fn topic_acls_allow_the_users_topics_and_refuse_the_others() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, USERS);
    let login = Some(("dev1", "pw1"));

    // Allowed: publish on its own topic (PUBACK), subscribe within its filter (SUBACK).
    let (mut ok, _) = Raw::connect(gw.port(), &connect_v4("ok", 30, login, None));
    ok.send(&publish_v4("sensors/dev1/t", 1, 1, b"1"));
    assert_eq!(ok.read_packet().as_deref(), Some(&[0x40, 2, 0, 1][..]));
    ok.send(&subscribe_v4(2, "cmd/dev1/+", 1));
    let suback = ok.read_packet().expect("SUBACK");
    assert_eq!(suback, vec![0x90, 3, 0, 2, 1]);

    // A denied subscription gets the failure code 0x80 in its SUBACK, in its place among the
    // allowed ones, and the connection goes on.
    ok.send(&subscribe_v4(3, "cmd/#", 1));
    assert_eq!(ok.read_packet(), Some(vec![0x90, 3, 0, 3, 0x80]));
    let mut body = 4u16.to_be_bytes().to_vec();
    for (filter, qos) in [("cmd/dev2/x", 1u8), ("cmd/dev1/x", 1), ("other", 0)] {
        body.extend(field(filter.as_bytes()));
        body.push(qos);
    }
    ok.send(&packet(0x82, &body));
    assert_eq!(ok.read_packet(), Some(vec![0x90, 5, 0, 4, 0x80, 1, 0x80]));

    // A denied publish disconnects (MQTT 3.1.1 has no refusal code for it).
    let (mut p, _) = Raw::connect(gw.port(), &connect_v4("p", 30, login, None));
    p.send(&publish_v4("sensors/dev2/t", 1, 1, b"1"));
    assert!(p.closed_within(Duration::from_secs(3)), "denied publish");
    // A will on a topic the user may not publish to: CONNACK not authorized.
    let (_w, ack) = Raw::connect(
        gw.port(),
        &connect_v4("w", 30, login, Some(("sensors/dev2/lwt", "gone"))),
    );
    assert_eq!(ack.as_deref(), Some(&[0x20, 2, 0, 5][..]));

    // MQTT 5: SUBACK reason 0x87 (not authorized) for the denied filter.
    let mut body = field(b"MQTT");
    body.extend_from_slice(&[5, 0xc2, 0, 30, 0]);
    body.extend(field(b"v5acl"));
    body.extend(field(b"dev1"));
    body.extend(field(b"pw1"));
    let (mut v5c, ack) = Raw::connect(gw.port(), &packet(0x10, &body));
    assert_eq!(
        ack.map(|a| (a[0], a[3])),
        Some((0x20, 0)),
        "CONNACK success"
    );
    let mut body = 5u16.to_be_bytes().to_vec();
    body.push(0); // no properties
    for filter in ["cmd/dev1/a", "cmd/#"] {
        body.extend(field(filter.as_bytes()));
        body.push(1);
    }
    v5c.send(&packet(0x82, &body));
    assert_eq!(v5c.read_packet(), Some(vec![0x90, 5, 0, 5, 0, 1, 0x87]));

    // A user without ACL lists may do anything; the first connection still works.
    let admin = ClientOpts {
        qos: 1,
        username: Some("admin".into()),
        password: Some("pw2".into()),
        ..ClientOpts::default()
    };
    let out = publish_with(gw.port(), "anything/at/all", "x", false, &admin);
    assert!(out.status.success(), "{}", output_text(&out));
    ok.send(&[0xc0, 0]);
    assert_eq!(ok.read_packet().as_deref(), Some(&[0xd0, 0][..]));
}

// ─── strict validation ──────────────────────────────────────────────────────────────────────

#[test]
fn each_malformed_packet_closes_only_its_own_connection() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    let bystander = Subscriber::start(
        gw.port(),
        "bystander/#",
        &client_id("by"),
        &ClientOpts::qos(1),
    );

    let mut reserved_connect = connect_v4("r", 30, None, None);
    reserved_connect[9] |= 0x01;
    let mut trailing_connect = connect_v4("t", 30, None, None);
    trailing_connect[1] += 1;
    trailing_connect.push(0);
    // (name, packets after a good CONNECT, or a whole bad CONNECT when `connect` is false)
    let cases: Vec<(&str, bool, Vec<u8>)> = vec![
        (
            "wildcard # in a PUBLISH topic",
            true,
            publish_v4("a/#", 0, 0, b"x"),
        ),
        (
            "wildcard + in a PUBLISH topic",
            true,
            publish_v4("a/+/b", 0, 0, b"x"),
        ),
        ("empty PUBLISH topic", true, publish_v4("", 0, 0, b"x")),
        ("PUBLISH QoS 3", true, packet(0x36, &[0, 1, b'a', 0, 1])),
        (
            "QoS 1 PUBLISH with packet id 0",
            true,
            publish_v4("a", 1, 0, b"x"),
        ),
        ("SUBSCRIBE with wrong reserved flags", true, {
            let mut s = subscribe_v4(1, "a", 0);
            s[0] = 0x80;
            s
        }),
        ("SUBSCRIBE without filters", true, packet(0x82, &[0, 1])),
        (
            "SUBSCRIBE with reserved option bits",
            true,
            subscribe_v4(1, "a", 0x04),
        ),
        (
            "SUBSCRIBE with a malformed filter",
            true,
            subscribe_v4(1, "a/#/b", 0),
        ),
        ("UNSUBSCRIBE with wrong reserved flags", true, {
            let mut body = vec![0, 1];
            body.extend(field(b"a"));
            packet(0xa0, &body)
        }),
        (
            "PUBREL with wrong reserved flags",
            true,
            packet(0x60, &[0, 1]),
        ),
        ("PINGREQ with flags", true, vec![0xc1, 0]),
        ("PINGREQ with a body", true, vec![0xc0, 1, 0]),
        (
            "a second CONNECT",
            true,
            connect_v4("again", 30, None, None),
        ),
        ("a server-only packet (CONNACK)", true, vec![0x20, 2, 0, 0]),
        ("reserved packet type 0", true, vec![0x00, 0]),
        (
            "a non-minimal remaining length",
            true,
            vec![0xc0, 0x80, 0x00],
        ),
        (
            "a remaining length over 4 bytes",
            true,
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "non-UTF-8 topic",
            true,
            packet(0x30, &[0, 2, 0xc3, 0x28, b'x']),
        ),
        ("CONNECT with the reserved flag", false, reserved_connect),
        ("CONNECT with trailing bytes", false, trailing_connect),
        ("first packet not CONNECT", false, vec![0xc0, 0]),
        ("CONNECT with a wrong protocol name", false, {
            let mut body = field(b"MQTX");
            body.extend_from_slice(&[4, 2, 0, 30]);
            body.extend(field(b"id"));
            packet(0x10, &body)
        }),
    ];
    for (name, after_connect, bytes) in cases {
        let mut r = Raw::open(gw.port());
        if after_connect {
            r.send(&connect_v4(&client_id("bad"), 30, None, None));
            assert_eq!(
                r.read_packet().as_deref(),
                Some(&CONNACK_OK[..]),
                "{name}: no CONNACK"
            );
        }
        r.send(&bytes);
        assert!(
            r.closed_within(Duration::from_secs(3)),
            "{name}: the connection stayed open"
        );
    }
    // The broker and the other client carry on.
    publish(gw.port(), "bystander/after", "alive", 1);
    let msgs = bystander.wait_for(1, Duration::from_secs(5));
    assert_eq!(
        msgs,
        vec![("bystander/after".to_string(), "alive".to_string())],
        "log:\n{}",
        gw.log()
    );
}

// ─── MQTT 5 properties and rumqttd's v4-encoder panic ───────────────────────────────────────

fn v5(qos: u8) -> ClientOpts {
    ClientOpts {
        qos,
        v5: true,
        ..ClientOpts::default()
    }
}

fn publish_v5_with_property(
    port: u16,
    topic: &str,
    payload: &str,
    retain: bool,
) -> std::process::Output {
    let mut cmd = std::process::Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-V", "mqttv5", "-q", "1", "-t", topic, "-m", payload])
        .args(["-D", "publish", "user-property", "k", "v"]);
    if retain {
        cmd.arg("-r");
    }
    run_with_timeout(&mut cmd, Duration::from_secs(10))
}

#[test]
fn a_v5_publish_with_properties_reaches_a_v4_subscriber_without_crashing_the_gateway() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    let v4_sub = Subscriber::start(gw.port(), "mix/#", &client_id("v4"), &ClientOpts::qos(1));
    let out = publish_v5_with_property(gw.port(), "mix/a", "hello", false);
    assert!(out.status.success(), "{}", output_text(&out));
    // Retained, with properties, then a v4 subscriber arriving later.
    let out = publish_v5_with_property(gw.port(), "late/a", "kept", true);
    assert!(out.status.success(), "{}", output_text(&out));
    let late = Subscriber::start(gw.port(), "late/#", &client_id("late"), &ClientOpts::qos(1));
    assert_eq!(
        v4_sub.wait_for(1, Duration::from_secs(5)),
        vec![("mix/a".to_string(), "hello".to_string())],
        "log:\n{}",
        gw.log()
    );
    assert_eq!(
        late.wait_for(1, Duration::from_secs(5)),
        vec![("late/a".to_string(), "kept".to_string())],
        "log:\n{}",
        gw.log()
    );
    // Still alive: a fresh round trip works.
    publish(gw.port(), "mix/b", "after", 1);
    assert_eq!(
        v4_sub.wait_for(2, Duration::from_secs(5)).len(),
        2,
        "log:\n{}",
        gw.log()
    );
}

#[test]
fn v5_properties_between_v5_clients_pass_through_unchanged() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    let opts = ClientOpts {
        format: Some("%t %P|%p".into()),
        ..v5(1)
    };
    let sub = Subscriber::start(gw.port(), "props/#", &client_id("v5"), &opts);
    let out = publish_v5_with_property(gw.port(), "props/a", "hello", false);
    assert!(out.status.success(), "{}", output_text(&out));
    let msgs = sub.wait_for(1, Duration::from_secs(5));
    assert_eq!(msgs.len(), 1, "log:\n{}", gw.log());
    assert!(
        msgs[0].1.contains("k:v") && msgs[0].1.ends_with("|hello"),
        "user property lost: {:?}",
        msgs[0]
    );
}

// ─── wills ──────────────────────────────────────────────────────────────────────────────────

#[test]
fn a_will_on_a_forwarded_topic_is_stored_when_the_device_vanishes_and_delivered_locally() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), Some(&url), "");
    let watcher = Subscriber::start(gw.port(), "sensors/#", &client_id("w"), &ClientOpts::qos(1));
    let (dev, ack) = Raw::connect(
        gw.port(),
        &connect_v4("dev-will", 30, None, Some(("sensors/dev/lwt", "gone"))),
    );
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
    drop(dev); // no DISCONNECT: the will is due
    let msgs = watcher.wait_for(1, Duration::from_secs(5));
    assert_eq!(
        msgs,
        vec![("sensors/dev/lwt".to_string(), "gone".to_string())]
    );
    let mut rows = Vec::new();
    wait_until(Duration::from_secs(5), || {
        rows = gw.buffer_export();
        !rows.is_empty()
    });
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["topic"], "sensors/dev/lwt");
    assert_eq!(rows[0]["payload"], "gone");

    // A clean DISCONNECT drops the will: nothing stored, nothing delivered.
    let (mut dev, _) = Raw::connect(
        gw.port(),
        &connect_v4("dev-clean", 30, None, Some(("sensors/dev/lwt2", "gone"))),
    );
    dev.send(&[0xe0, 0]);
    assert!(dev.closed_within(Duration::from_secs(3)));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(gw.buffer_export().len(), 1);
    assert_eq!(watcher.count(), 1);
}

// ─── sessions ───────────────────────────────────────────────────────────────────────────────

#[test]
fn a_persistent_session_receives_what_was_published_while_it_was_away() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    let id = client_id("persist");
    let sub = Subscriber::start(gw.port(), "away/#", &id, &ClientOpts::qos(1));
    drop(sub);
    publish(gw.port(), "away/x", "while-away", 1);
    let sub = Subscriber::start(gw.port(), "away/#", &id, &ClientOpts::qos(1));
    let msgs = sub.wait_for(1, Duration::from_secs(5));
    assert!(
        msgs.contains(&("away/x".to_string(), "while-away".to_string())),
        "{msgs:?}; log:\n{}",
        gw.log()
    );
}

#[test]
fn front_is_still_the_default_path_for_plain_tcp_listeners() {
    // A guard against turning the promise off by accident: the log names the front.
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    assert!(
        !gw.log().contains("the MQTT front is off"),
        "log:\n{}",
        gw.log()
    );
}

// ─── TLS at the front ───────────────────────────────────────────────────────────────────────

#[test]
fn the_front_serves_tls_with_client_certificates_by_ip_address_and_stores_before_the_puback() {
    let certdir = tempfile::tempdir().expect("creating a temp dir");
    let certs = certs::generate(certdir.path());
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let tls_port = free_port();
    let gw = start_gateway(
        dir.path(),
        Some(&url),
        &format!(
            "tls: {{listen: 127.0.0.1:{tls_port}, cert_file: {}, key_file: {}, client_ca_file: {}}}",
            certs.server_cert.display(),
            certs.server_key.display(),
            certs.ca_cert.display()
        ),
    );
    assert!(
        wait_until(Duration::from_secs(10), || port_accepts(tls_port)),
        "TLS port not open; log:\n{}",
        gw.log()
    );
    // By IP address: OpenSSL clients send the IP literal as SNI (rumqttd's TLS refused that).
    let with_cert = ClientOpts {
        qos: 1,
        tls: Some((
            certs.ca_cert.clone(),
            Some(certs.client_cert.clone()),
            Some(certs.client_key.clone()),
        )),
        ..ClientOpts::default()
    };
    let sub = Subscriber::start(tls_port, "sensors/#", &client_id("tlssub"), &with_cert);
    let out = publish_with(tls_port, "sensors/tls", "sealed", false, &with_cert);
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        output_text(&out),
        gw.log()
    );
    // mosquitto_pub exits after its PUBACK: the row is committed by then.
    let rows = gw.buffer_export();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["topic"], "sensors/tls");
    assert_eq!(
        sub.wait_for(1, Duration::from_secs(10)),
        vec![("sensors/tls".to_string(), "sealed".to_string())]
    );

    let no_cert = ClientOpts {
        qos: 1,
        tls: Some((certs.ca_cert.clone(), None, None)),
        ..ClientOpts::default()
    };
    let out = publish_with(tls_port, "sensors/tls", "unsigned", false, &no_cert);
    assert!(
        !out.status.success(),
        "client without certificate accepted:\n{}",
        output_text(&out)
    );
    assert_eq!(gw.buffer_export().len(), 1);
}

// ─── interoperability: paho-mqtt (PyPI) ─────────────────────────────────────────────────────

/// paho-mqtt through the front: keep-alive 0 (3.1.1 and 5), a persistent session, a will, a
/// retained message, overlapping subscriptions, QoS downgrade, an MQTT 5 user property.
/// tests/ci.sh installs paho-mqtt with pip when it is missing.
#[test]
fn paho_mqtt_clients_work_through_the_front() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_front.py");
    let probe = run_with_timeout(
        std::process::Command::new("python3").args(["-c", "import paho.mqtt"]),
        Duration::from_secs(20),
    );
    assert!(
        probe.status.success(),
        "paho-mqtt is not installed (tests/ci.sh installs it: python3 -m pip install paho-mqtt):\n{}",
        output_text(&probe)
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    let out = run_with_timeout(
        std::process::Command::new("python3")
            .arg(&script)
            .arg(gw.port().to_string()),
        Duration::from_secs(90),
    );
    let text = output_text(&out);
    assert!(
        out.status.success() && text.matches("PASS").count() == 8,
        "paho checks failed:\n{text}\ngateway log:\n{}",
        gw.log()
    );
}

/// An MQTT 5 CONNECT (clean start, no properties).
fn connect_v5(client_id: &str) -> Vec<u8> {
    let mut body = field(b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 30, 0]);
    body.extend(field(client_id.as_bytes()));
    packet(0x10, &body)
}

/// An MQTT 5 QoS 1 PUBLISH with the given property block (without its length).
fn publish_v5(topic: &str, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = field(topic.as_bytes());
    body.extend_from_slice(&[0, 1]);
    length(props.len(), &mut body);
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

#[test]
fn each_malformed_mqtt5_packet_closes_its_connection_and_valid_aliases_work() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), None, "");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "subscription identifier from a client",
            publish_v5("a", &[0x0b, 1], b"x"),
        ),
        ("topic alias 0", publish_v5("a", &[0x23, 0, 0], b"x")),
        ("topic alias never set", publish_v5("", &[0x23, 0, 9], b"x")),
        ("unknown property", publish_v5("a", &[0x7f, 0], b"x")),
        (
            "property running past its block",
            publish_v5("a", &[0x26, 0, 5, b'k'], b"x"),
        ),
        (
            "PUBACK with a broken property block",
            packet(0x40, &[0, 1, 0, 5, 0x1f]),
        ),
    ];
    for (name, bytes) in cases {
        let (mut r, ack) = Raw::connect(gw.port(), &connect_v5(&client_id("bad5")));
        assert_eq!(ack.map(|a| a[0]), Some(0x20), "{name}: no CONNACK");
        r.send(&bytes);
        assert!(
            r.closed_within(Duration::from_secs(3)),
            "{name}: the connection stayed open"
        );
    }
    // A topic alias set once and then used alone reaches a subscriber under its topic, and its
    // publish is acknowledged.
    let sub = Subscriber::start(gw.port(), "alias/#", &client_id("as"), &v5(1));
    let (mut r, _) = Raw::connect(gw.port(), &connect_v5(&client_id("alias")));
    r.send(&publish_v5("alias/t", &[0x23, 0, 3], b"one"));
    assert_eq!(r.read_packet().map(|p| p[0]), Some(0x40));
    let mut second = publish_v5("", &[0x23, 0, 3], b"two");
    second[5] = 2; // packet id 2 (after the header and the empty topic)
    r.send(&second);
    assert_eq!(r.read_packet().map(|p| p[0]), Some(0x40));
    let msgs = sub.wait_for(2, Duration::from_secs(5));
    assert_eq!(
        msgs,
        vec![
            ("alias/t".to_string(), "one".to_string()),
            ("alias/t".to_string(), "two".to_string())
        ],
        "log:\n{}",
        gw.log()
    );
}

#[test]
fn large_messages_pass_the_front_and_are_stored_whole() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), Some(&url), "");
    let n = 20;
    let acked = publish_each(gw.port(), n, 1, |i| {
        (
            "sensors/big".to_string(),
            vec![b'a' + (i % 26) as u8; 200_000],
        )
    });
    assert_eq!(acked, n, "log:\n{}", gw.log());
    let stats = gw.buffer_stats();
    assert_eq!(stat(&stats, "rows"), n as u64, "{stats:#}");
    assert!(stat(&stats, "bytes") >= 200_000 * n as u64, "{stats:#}");
}

#[test]
fn sigterm_with_devices_connected_stops_the_gateway_cleanly_and_keeps_what_was_acknowledged() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    // A long shutdown timeout: a connected device must not hold the exit until it runs out.
    let mut gw = retry_on_port_clash(3, || {
        let yaml = gateway_yaml(dir.path(), free_port(), Some(&url), "", "")
            .replace("shutdown_timeout: 5s", "shutdown_timeout: 60s");
        Gateway::try_start_with(dir.path(), &yaml)
    });
    let (mut dev, ack) = Raw::connect(gw.port(), &connect_v4("stay", 30, None, None));
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
    dev.send(&publish_v4("sensors/stay", 1, 7, b"kept"));
    assert_eq!(dev.read_packet().as_deref(), Some(&[0x40, 2, 0, 7][..]));
    let started = Instant::now();
    let status = gw.sigterm_and_wait(Duration::from_secs(90));
    assert!(status.success(), "exit {status:?}; log:\n{}", gw.log());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}: the connected device held the shutdown; log:\n{}",
        started.elapsed(),
        gw.log()
    );
    let rows = gw.buffer_export();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["payload"], "kept");
}

#[test]
fn websocket_clients_go_through_the_front_and_their_messages_are_stored_before_the_puback() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let ws_port = free_port();
    let gw = start_gateway(
        dir.path(),
        Some(&url),
        &format!("websocket: {{listen: 127.0.0.1:{ws_port}}}"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || port_accepts(ws_port)),
        "WebSocket port not open; log:\n{}",
        gw.log()
    );
    let sub = Subscriber::start(
        gw.port(),
        "sensors/#",
        &client_id("wsw"),
        &ClientOpts::qos(1),
    );
    // paho-mqtt over WebSocket: publish QoS 1 and wait for the PUBACK, then exit.
    let script = format!(
        "import paho.mqtt.client as m\nfrom paho.mqtt.enums import CallbackAPIVersion as V\n\
         c = m.Client(V.VERSION2, client_id='ws-dev', transport='websockets')\n\
         c.connect('127.0.0.1', {ws_port}, 30)\nc.loop_start()\n\
         i = c.publish('sensors/ws', 'over-ws', qos=1)\ni.wait_for_publish(5)\n\
         assert i.is_published()\nc.disconnect()\nc.loop_stop()\n"
    );
    let out = run_with_timeout(
        std::process::Command::new("python3").args(["-c", &script]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        output_text(&out),
        gw.log()
    );
    let rows = gw.buffer_export();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["payload"], "over-ws");
    assert_eq!(
        sub.wait_for(1, Duration::from_secs(5)),
        vec![("sensors/ws".to_string(), "over-ws".to_string())]
    );
}

/// `broker.front: false` keeps the old path: rumqttd's listener and a local-link intake. The
/// link must be re-armed after rumqttd's `Unschedule`, or rumqttd stops delivering to it after
/// ~200 messages while devices still get PUBACKs; 5 000 messages would show that as a gap.
#[test]
fn without_the_front_the_local_intake_stores_every_message_of_a_long_run() {
    let mut upstream = Mosquitto::start(MosquittoOpts::default());
    let url = upstream.url();
    upstream.stop();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), Some(&url), "front: false");
    assert!(
        gw.log().contains("the MQTT front is off"),
        "log:\n{}",
        gw.log()
    );
    let n = 5000;
    assert_eq!(publish_seq(gw.port(), "sensors/intake", n, 1), n);
    let mut seqs = BTreeSet::new();
    wait_until(Duration::from_secs(15), || {
        seqs = stored_seqs(&gw)
            .remove("sensors/intake")
            .unwrap_or_default();
        seqs.len() >= n
    });
    assert_eq!(seqs.len(), n, "log:\n{}", gw.log());
    assert_eq!(gw.buffer_export().len(), n, "a message stored twice");
}

// ─── direct acknowledgement: no local subscriber, no rumqttd ────────────────────────────────

/// The front's counters from `edgegate status --json`.
fn front_status(gw: &Gateway) -> serde_json::Value {
    let sock = gw.dir().join("status.sock").display().to_string();
    let out = run_bin(
        gw.dir(),
        &["status", "--json", "--socket", &sock],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "status failed:\n{}",
        output_text(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", output_text(&out)));
    v["front"].clone()
}

fn acked_direct(gw: &Gateway) -> u64 {
    let f = front_status(gw);
    f["acked_direct"]
        .as_u64()
        .unwrap_or_else(|| panic!("no front.acked_direct in {f:#}"))
}

fn unsubscribe_v4(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend(field(filter.as_bytes()));
    packet(0xa2, &body)
}

/// A gateway forwarding `sensors/#` to a fresh upstream, and a QoS 1 subscriber there.
fn gateway_with_upstream(dir: &Path) -> (Gateway, Mosquitto, Subscriber) {
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let gw = start_gateway(dir, Some(&up.url()), "");
    (gw, up, upstream)
}

#[test]
fn without_a_local_subscriber_the_front_acknowledges_stored_messages_itself_in_order() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, upstream) = gateway_with_upstream(dir.path());
    let n = 500;
    assert_eq!(
        publish_seq(gw.port(), "sensors/direct", n, 1),
        n,
        "log:\n{}",
        gw.log()
    );
    assert_complete_in_order(&upstream, "sensors/direct", n, &gw);
    assert_eq!(
        acked_direct(&gw),
        n as u64,
        "every PUBACK came from the front"
    );

    // QoS 0 too: stored, forwarded, never given to rumqttd.
    let m = 50;
    publish_seq(gw.port(), "sensors/direct0", m, 0);
    let skipped = wait_until(Duration::from_secs(10), || {
        front_status(&gw)["skipped_qos0"].as_u64() == Some(m as u64)
    });
    assert!(skipped, "front status: {:#}", front_status(&gw));
    assert_complete_in_order(&upstream, "sensors/direct0", m, &gw);

    // A device's PUBACKs come back in the order of its PUBLISHes when some go through rumqttd
    // (a subscriber on one topic) and some not: rumqttc checks nothing, so raw bytes.
    let local = Subscriber::start(
        gw.port(),
        "sensors/mixed/a",
        &client_id("l"),
        &ClientOpts::qos(1),
    );
    let (mut r, ack) = Raw::connect(gw.port(), &connect_v4(&client_id("mix"), 30, None, None));
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
    let mut burst = Vec::new();
    for id in 1..=40u16 {
        let topic = if id % 2 == 0 {
            "sensors/mixed/a"
        } else {
            "sensors/mixed/b"
        };
        burst.extend(publish_v4(topic, 1, id, id.to_string().as_bytes()));
    }
    r.send(&burst);
    for id in 1..=40u16 {
        let [hi, lo] = id.to_be_bytes();
        assert_eq!(r.read_packet(), Some(vec![0x40, 2, hi, lo]), "PUBACK {id}");
    }
    assert_eq!(local.wait_for(20, Duration::from_secs(5)).len(), 20);
    assert_eq!(acked_direct(&gw), n as u64 + 20);
}

#[test]
fn local_subscribers_by_wildcard_shared_and_persistent_session_still_get_every_message() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, upstream) = gateway_with_upstream(dir.path());
    let wild = Subscriber::start(
        gw.port(),
        "sensors/+/w",
        &client_id("wild"),
        &ClientOpts::qos(1),
    );
    let shared = Subscriber::start(
        gw.port(),
        "$share/g/sensors/shared",
        &client_id("share"),
        &ClientOpts::qos(1),
    );
    let away_id = client_id("away");
    let away = Subscriber::start(gw.port(), "sensors/away", &away_id, &ClientOpts::qos(1));
    drop(away); // killed: rumqttd keeps its persistent session and queues for it

    let n = 30;
    for topic in ["sensors/x/w", "sensors/shared", "sensors/away"] {
        assert_eq!(
            publish_seq(gw.port(), topic, n, 1),
            n,
            "{topic}; log:\n{}",
            gw.log()
        );
    }
    assert_eq!(acked_direct(&gw), 0, "every topic has a local subscriber");
    for (sub, topic) in [(&wild, "sensors/x/w"), (&shared, "sensors/shared")] {
        let report = check_seq(&sub.wait_for(n, Duration::from_secs(10)), topic, n);
        assert!(
            report.missing.is_empty() && report.out_of_order == 0,
            "{topic}: {}",
            report.summary()
        );
    }
    let back = Subscriber::start(gw.port(), "sensors/away", &away_id, &ClientOpts::qos(1));
    let report = check_seq(
        &back.wait_for(n, Duration::from_secs(10)),
        "sensors/away",
        n,
    );
    assert!(
        report.missing.is_empty(),
        "queued while away: {}",
        report.summary()
    );
    for topic in ["sensors/x/w", "sensors/shared", "sensors/away"] {
        assert_complete_in_order(&upstream, topic, n, &gw);
    }
}

#[test]
fn after_an_unsubscribe_or_a_clean_disconnect_messages_go_direct_again() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, _upstream) = gateway_with_upstream(dir.path());
    let port = gw.port();
    let subscribe = |id: &str| {
        let (mut r, ack) = Raw::connect(port, &connect_v4(id, 30, None, None));
        assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
        r.send(&subscribe_v4(1, "sensors/+/u", 1));
        assert_eq!(r.read_packet().map(|p| p[0]), Some(0x90), "SUBACK");
        r
    };
    let mut sub = subscribe(&client_id("u1"));
    publish_seq(port, "sensors/a/u", 5, 1);
    assert_eq!(acked_direct(&gw), 0);
    for _ in 0..5 {
        assert_eq!(
            sub.read_packet().map(|p| p[0] & 0xf0),
            Some(0x30),
            "PUBLISH"
        );
    }

    sub.send(&unsubscribe_v4(2, "sensors/+/u"));
    assert_eq!(sub.read_packet().map(|p| p[0]), Some(0xb0), "UNSUBACK");
    publish_seq(port, "sensors/a/u", 5, 1);
    assert_eq!(acked_direct(&gw), 5, "unsubscribed: direct again");

    let mut sub = subscribe(&client_id("u2"));
    publish_seq(port, "sensors/b/u", 5, 1);
    assert_eq!(acked_direct(&gw), 5);
    sub.send(&[0xe0, 0]);
    assert!(sub.closed_within(Duration::from_secs(3)));
    publish_seq(port, "sensors/b/u", 5, 1);
    assert_eq!(acked_direct(&gw), 10, "clean session gone: direct again");

    // A subscriber that vanishes without DISCONNECT (clean session) is released too.
    let sub = subscribe(&client_id("u3"));
    publish_seq(port, "sensors/c/u", 5, 1);
    assert_eq!(acked_direct(&gw), 10);
    drop(sub);
    let released = wait_until(Duration::from_secs(5), || {
        publish_seq(port, "sensors/c/u", 1, 1);
        acked_direct(&gw) > 10
    });
    assert!(released, "log:\n{}", gw.log());
}

#[test]
fn a_device_publishing_only_direct_messages_is_kept_alive_without_unsolicited_pingresps() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, upstream) = gateway_with_upstream(dir.path());
    // Keep-alive 2 s: rumqttd would cut the loopback connection after 3 s without a read.
    let (mut r, ack) = Raw::connect(gw.port(), &connect_v4(&client_id("ka"), 2, None, None));
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
    let start = Instant::now();
    let mut id = 0u16;
    while start.elapsed() < Duration::from_secs(7) {
        id += 1;
        r.send(&publish_v4(
            "sensors/ka",
            1,
            id,
            (id - 1).to_string().as_bytes(),
        ));
        let [hi, lo] = id.to_be_bytes();
        assert_eq!(
            r.read_packet(),
            Some(vec![0x40, 2, hi, lo]),
            "after {:?}: PUBACK {id} (and nothing else); log:\n{}",
            start.elapsed(),
            gw.log()
        );
        if id == 10 {
            // The device's own PINGREQ still gets its PINGRESP.
            r.send(&[0xc0, 0]);
            assert_eq!(r.read_packet(), Some(vec![0xd0, 0]), "PINGRESP");
        }
        thread::sleep(Duration::from_millis(300));
    }
    r.send(&[0xc0, 0]);
    assert_eq!(r.read_packet(), Some(vec![0xd0, 0]), "still connected");
    assert_eq!(acked_direct(&gw), u64::from(id));
    assert_complete_in_order(&upstream, "sensors/ka", usize::from(id), &gw);
    r.s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("setting a read timeout");
    assert_eq!(r.read_packet(), None, "no unsolicited packet");
}

#[test]
fn a_retained_message_without_a_subscriber_still_reaches_a_later_one() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, upstream) = gateway_with_upstream(dir.path());
    let out = publish_with(gw.port(), "sensors/ret", "kept", true, &ClientOpts::qos(1));
    assert!(out.status.success(), "{}", output_text(&out));
    let late = Subscriber::start(
        gw.port(),
        "sensors/ret",
        &client_id("late"),
        &ClientOpts::qos(1),
    );
    assert_eq!(
        late.wait_for(1, Duration::from_secs(5)),
        vec![("sensors/ret".to_string(), "kept".to_string())]
    );
    assert_eq!(acked_direct(&gw), 0);
    assert_eq!(upstream.wait_for(1, Duration::from_secs(10)).len(), 1);
}

#[test]
fn an_alias_set_by_a_direct_message_works_once_a_subscriber_appears() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, _upstream) = gateway_with_upstream(dir.path());
    let (mut r, _) = Raw::connect(gw.port(), &connect_v5(&client_id("alias")));
    // Sets alias 7 on a message rumqttd never sees.
    r.send(&publish_v5("sensors/al", &[0x23, 0, 7], b"one"));
    assert_eq!(r.read_packet(), Some(vec![0x40, 2, 0, 1]));
    assert_eq!(acked_direct(&gw), 1);
    let sub = Subscriber::start(gw.port(), "sensors/al", &client_id("as"), &v5(1));
    let mut second = publish_v5("", &[0x23, 0, 7], b"two");
    second[5] = 2; // packet id 2
    r.send(&second);
    assert_eq!(r.read_packet().map(|p| p[0]), Some(0x40));
    assert_eq!(
        sub.wait_for(1, Duration::from_secs(5)),
        vec![("sensors/al".to_string(), "two".to_string())],
        "log:\n{}",
        gw.log()
    );
    assert_eq!(acked_direct(&gw), 1);
}

#[test]
fn an_mqtt5_session_with_an_expiry_keeps_its_subscription_counted_after_it_vanishes() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, _upstream) = gateway_with_upstream(dir.path());
    let id = client_id("v5p");
    // CONNECT: clean start 0, session expiry 300 s.
    let mut body = field(b"MQTT");
    body.extend_from_slice(&[5, 0x00, 0, 30, 5, 0x11, 0, 0, 0x01, 0x2c]);
    body.extend(field(id.as_bytes()));
    let connect = packet(0x10, &body);
    let (mut r, ack) = Raw::connect(gw.port(), &connect);
    assert_eq!(ack.map(|a| a[0]), Some(0x20), "CONNACK");
    let mut sub = vec![0, 1, 0];
    sub.extend(field(b"sensors/v5p"));
    sub.push(1);
    r.send(&packet(0x82, &sub));
    assert_eq!(r.read_packet().map(|p| p[0]), Some(0x90), "SUBACK");
    drop(r); // gone without DISCONNECT; rumqttd keeps the session
    thread::sleep(Duration::from_millis(300));

    assert_eq!(publish_seq(gw.port(), "sensors/v5p", 3, 1), 3);
    assert_eq!(
        acked_direct(&gw),
        0,
        "the session's subscription still counts"
    );
    let (mut r, ack) = Raw::connect(gw.port(), &connect);
    assert_eq!(ack.map(|a| a[0]), Some(0x20), "CONNACK");
    for _ in 0..3 {
        assert_eq!(
            r.read_packet().map(|p| p[0] & 0xf0),
            Some(0x30),
            "a queued PUBLISH; log:\n{}",
            gw.log()
        );
    }
}

/// Reads one PUBACK for `id` on `r`, panicking with the gateway's log otherwise.
fn expect_puback(r: &mut Raw, id: u16, gw: &Gateway) {
    let [hi, lo] = id.to_be_bytes();
    assert_eq!(
        r.read_packet(),
        Some(vec![0x40, 2, hi, lo]),
        "PUBACK {id}; log:\n{}",
        gw.log()
    );
}

#[test]
fn a_lone_message_waits_for_company_but_a_device_that_waits_for_its_pubacks_does_not() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let up = Mosquitto::start(MosquittoOpts::default());
    // A linger long enough to tell apart from a commit at once on any machine.
    let linger = Duration::from_secs(2);
    let gw = retry_on_port_clash(3, || {
        let yaml = gateway_yaml(
            dir.path(),
            free_port(),
            Some(&up.url()),
            "commit_interval: 2s",
            "",
        );
        Gateway::try_start_with(dir.path(), &yaml)
    });
    let (mut r, ack) = Raw::connect(gw.port(), &connect_v4(&client_id("lone"), 30, None, None));
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
    r.s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("setting a read timeout");

    // A sensor's first message: nobody is known to wait, so it waits for others to share its
    // commit.
    let started = Instant::now();
    r.send(&publish_v4("sensors/lone", 1, 1, b"first"));
    expect_puback(&mut r, 1, &gw);
    let lone = started.elapsed();
    assert!(
        lone >= linger - Duration::from_millis(100),
        "PUBACK after {lone:?}"
    );

    // The device now publishes each message as soon as the last one is acknowledged: each is
    // committed at once. Ten lingers would take 20 s.
    let started = Instant::now();
    for id in 2..=11u16 {
        r.send(&publish_v4("sensors/lone", 1, id, b"next"));
        expect_puback(&mut r, id, &gw);
    }
    let ten = started.elapsed();
    assert!(ten < linger * 4, "ten PUBACKs took {ten:?}");

    // A new device that pipelines: its second message, arriving while the first waits for
    // company, hurries the first.
    let (mut p, ack) = Raw::connect(gw.port(), &connect_v4(&client_id("pipe"), 30, None, None));
    assert_eq!(ack.as_deref(), Some(&CONNACK_OK[..]));
    let started = Instant::now();
    p.send(&publish_v4("sensors/pipe", 1, 1, b"a"));
    std::thread::sleep(Duration::from_millis(50));
    p.send(&publish_v4("sensors/pipe", 1, 2, b"b"));
    expect_puback(&mut p, 1, &gw);
    expect_puback(&mut p, 2, &gw);
    let piped = started.elapsed();
    assert!(piped < linger, "two pipelined PUBACKs took {piped:?}");
}

/// The kernel's count of connections dropped because a listener's queue was full (this network
/// namespace, every listener).
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").expect("reading /proc/net/netstat");
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .expect("TcpExt ListenOverflows")
}

#[test]
fn nine_hundred_devices_connecting_at_once_are_all_accepted_without_a_dropped_connection() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let (gw, _up, _upstream) = gateway_with_upstream(dir.path());
    let port = gw.port();
    let devices = 900;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let before = listen_overflows();
    let accepted = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..devices {
            tasks.spawn(async move {
                let device = async {
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                    s.write_all(&connect_v4(&format!("storm-{i}"), 60, None, None))
                        .await?;
                    let mut ack = [0u8; 4];
                    s.read_exact(&mut ack).await?;
                    std::io::Result::Ok((s, ack))
                };
                match tokio::time::timeout(Duration::from_secs(60), device).await {
                    Ok(Ok((s, ack))) if ack == CONNACK_OK => Some(s),
                    _ => None,
                }
            });
        }
        let mut open = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(Some(s)) = r {
                open.push(s);
            }
        }
        open.len()
    });
    let dropped = listen_overflows() - before;
    assert_eq!(accepted, devices, "log:\n{}", gw.log());
    // Every drop would have cost its device a TCP retry 1, 3 or 7 s later.
    assert_eq!(
        dropped, 0,
        "connections the kernel dropped from a full listen queue"
    );
}
