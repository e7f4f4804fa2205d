//! Hostile input and secrets: the embedded broker against malformed MQTT, floods and slowloris
//! clients (the offender goes, every other device keeps working, the process stays up);
//! passwords never in logs or command output; upstream TLS verified by default.
//!
//! Refusing unauthenticated clients when users are configured is tested in tests/broker.rs
//! (`with_users_configured_a_wrong_password_is_refused_and_the_right_one_works`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use rumqttc::{Connect, Packet, Publish, QoS};

/// The connect timeout the hostile-input gateways use (`broker.connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A broker-only gateway (no uplink) with `extra` lines in its `broker:` section.
fn start_broker(extra: &str) -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = retry_on_port_clash(3, || {
        let mut yaml = format!(
            "gateway:\n  id: test\n  shutdown_timeout: 3s\nbroker:\n  listen: 127.0.0.1:{}\n  connect_timeout: 2s\n",
            free_port()
        );
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            yaml.push_str(&format!("  {line}\n"));
        }
        yaml.push_str(&format!(
            "store:\n  path: {}\n",
            dir.path().join("buffer.db").display()
        ));
        Gateway::try_start_with(dir.path(), &yaml)
    });
    (dir, gw)
}

fn connect_to(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the gateway");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("setting a read timeout");
    s
}

fn encode(packet: Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    packet
        .write(&mut buf, 1 << 28)
        .expect("encoding a test packet");
    buf.to_vec()
}

fn connect_packet(id: &str) -> Vec<u8> {
    let mut c = Connect::new(id);
    c.keep_alive = 30;
    encode(Packet::Connect(c))
}

/// Reads until the peer closes (EOF or reset) or `timeout` passes; true when it closed. Bytes the
/// server sends on the way (a CONNACK) are ignored.
fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// Reads one CONNACK (bounded); true when the server accepted the connection.
fn connack(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while Instant::now() < deadline && got.len() < 4 {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return false,
        }
    }
    got.len() >= 4 && got[0] == 0x20 && got[3] == 0
}

/// A CONNECTed raw connection (panics when the broker refuses it).
fn mqtt_session(port: u16) -> TcpStream {
    let mut s = connect_to(port);
    s.write_all(&connect_packet(&client_id("raw")))
        .expect("sending CONNECT");
    assert!(connack(&mut s, Duration::from_secs(5)), "no CONNACK");
    s
}

/// A real mosquitto_sub/mosquitto_pub round trip through the gateway, and the process alive.
fn assert_others_still_served(gw: &mut Gateway, what: &str) {
    assert!(
        gw.is_running(),
        "gateway died after {what}; log:\n{}",
        gw.log()
    );
    let topic = format!("probe/{}", client_id("t"));
    let sub = Subscriber::start(gw.port(), &topic, &client_id("sub"), &ClientOpts::qos(1));
    publish(gw.port(), &topic, "still-here", 1);
    assert_eq!(
        sub.wait_for(1, Duration::from_secs(10)),
        vec![(topic.clone(), "still-here".to_string())],
        "after {what}; log:\n{}",
        gw.log()
    );
}

#[test]
fn an_oversized_publish_closes_only_the_offending_connection() {
    let (_dir, mut gw) = start_broker("max_payload_size: 1KiB");
    let bystander = Subscriber::start(gw.port(), "big/#", &client_id("by"), &ClientOpts::qos(1));

    let mut s = mqtt_session(gw.port());
    let mut big = Publish::new("big/x", QoS::AtLeastOnce, vec![b'x'; 64 * 1024]);
    big.pkid = 1;
    let _ = s.write_all(&encode(Packet::Publish(big)));
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "a 64 KiB publish over a 1 KiB limit did not close the connection"
    );

    // Only the header of a 256 MiB packet: refused from its length, without waiting for a body.
    let mut s = mqtt_session(gw.port());
    let _ = s.write_all(&[0x32, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x05]);
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "a declared 256 MiB publish did not close the connection"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        bystander.messages().is_empty(),
        "oversized data was delivered: {:?}",
        bystander.messages()
    );
    assert_others_still_served(&mut gw, "oversized packets");
}

#[test]
fn a_malformed_remaining_length_or_garbage_closes_the_connection_and_nothing_else() {
    let (_dir, mut gw) = start_broker("");
    // A fifth continuation byte: the remaining length can have at most four.
    let mut s = mqtt_session(gw.port());
    let _ = s.write_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00]);
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "a five-byte remaining length did not close the connection"
    );

    // Garbage instead of a CONNECT.
    let mut s = connect_to(gw.port());
    let garbage: Vec<u8> = (0..1024).map(|_| fastrand::u8(..)).collect();
    let _ = s.write_all(&garbage);
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "1 KiB of random bytes did not close the connection"
    );

    // A PUBLISH before any CONNECT.
    let mut s = connect_to(gw.port());
    let _ = s.write_all(&encode(Packet::Publish(Publish::new(
        "x",
        QoS::AtMostOnce,
        "no connect",
    ))));
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "a PUBLISH before CONNECT did not close the connection"
    );

    assert_others_still_served(&mut gw, "malformed packets");
}

#[test]
fn a_client_that_never_finishes_its_connect_is_dropped_after_the_connect_timeout() {
    let (_dir, mut gw) = start_broker("");
    // Silent: connects and sends nothing.
    let mut silent = connect_to(gw.port());
    // Slowloris: a valid CONNECT, one byte every 400 ms (it would take ~8 s to finish).
    let mut slow = connect_to(gw.port());
    let bytes = connect_packet("slowloris-client");
    let started = Instant::now();
    let mut closed_after = None;
    for b in &bytes {
        if slow.write_all(&[*b]).is_err() || closed_within(&mut slow, Duration::from_millis(400)) {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let limit = CONNECT_TIMEOUT + Duration::from_secs(2);
    let closed_after = closed_after.unwrap_or_else(|| {
        panic!(
            "a CONNECT sent one byte per 400 ms was not cut off ({} bytes sent in {:?})",
            bytes.len(),
            started.elapsed()
        )
    });
    assert!(
        closed_after <= limit,
        "slowloris held its slot {closed_after:?} (connect_timeout {CONNECT_TIMEOUT:?})"
    );
    assert!(
        closed_within(
            &mut silent,
            limit.saturating_sub(started.elapsed()) + Duration::from_millis(500)
        ),
        "a connection that sends nothing was not dropped within {limit:?}"
    );
    println!("slowloris cut off after {closed_after:?}");
    assert_others_still_served(&mut gw, "slow and silent connections");
}

/// Opens `count` connections, each sending a CONNECT, and keeps them open; returns them and how
/// many got a CONNACK.
fn flood_connections(port: u16, count: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::new();
    let mut accepted = 0usize;
    for _ in 0..count {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        if s.write_all(&connect_packet(&client_id("flood"))).is_ok()
            && connack(&mut s, Duration::from_millis(500))
        {
            accepted += 1;
        }
        held.push(s);
    }
    (held, accepted)
}

#[test]
fn a_flood_of_connections_beyond_max_connections_leaves_connected_devices_working() {
    let max = 20usize;
    let (_dir, mut gw) = start_broker(&format!("max_connections: {max}"));
    let sub = Subscriber::start(
        gw.port(),
        "steady/#",
        &client_id("steady"),
        &ClientOpts::qos(1),
    );
    let port = gw.port();
    let n = 150;
    // A device already connected publishes steadily through the flood (~3 s).
    let publisher =
        thread::spawn(move || publish_paced(port, "steady/x", n, Duration::from_millis(20)));
    assert!(
        wait_until(Duration::from_secs(10), || sub.count() >= 10),
        "the steady publisher never got through; log:\n{}",
        gw.log()
    );

    let flood = 3 * max;
    let (held, accepted) = flood_connections(port, flood);
    let acked = publisher.join().expect("publisher thread panicked");
    assert_eq!(
        acked,
        n,
        "the connected publisher was disturbed; log:\n{}",
        gw.log()
    );
    let report = check_seq(&sub.wait_for(n, Duration::from_secs(10)), "steady/x", n);
    assert!(
        report.missing.is_empty() && report.out_of_order == 0,
        "the connected subscriber lost messages during the flood: {}",
        report.summary()
    );
    println!("flood: {accepted} of {flood} extra connections got a CONNACK (max_connections {max}, 2 devices already connected)");
    // rumqttd counts our own local links against its limit; the config adds 8 for them.
    assert!(
        accepted + 2 <= max + 8,
        "{accepted} flood connections accepted beyond max_connections {max}"
    );
    drop(held);
    assert_others_still_served(&mut gw, "a connection flood");
}

/// Every secret the gateway is given, and a wrong password a device tried, must stay out of its
/// log at trace level and out of check-config, buffer stats and status output.
#[test]
fn passwords_never_appear_in_the_log_at_trace_level_or_in_command_output() {
    let upstream = Mosquitto::start(MosquittoOpts::default());
    let up_sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let secrets = [
        "Broker-Inline-S3cret-7f1c",
        "Broker-File-S3cret-99aa",
        "Uplink-S3cret-4e2d",
        "Wrong-Device-S3cret-0b0b",
    ];
    let secret_file = dir.path().join("hub.secret");
    std::fs::write(&secret_file, format!("{}\n", secrets[1])).expect("writing the secret file");
    let gw = retry_on_port_clash(3, || {
        let port = free_port();
        let yaml = format!(
            "gateway:\n  id: test\n  shutdown_timeout: 3s\nbroker:\n  listen: 127.0.0.1:{port}\n  users:\n    - {{username: dev, password: {}}}\n    - {{username: hub, password_file: {}}}\nstore:\n  path: {}\nuplink:\n  url: {}\n  username: gw\n  password: {}\n  forward:\n    - local: \"sensors/#\"\nlog:\n  level: \"trace,rumqttd=trace\"\nstatus:\n  socket: {}\n",
            secrets[0],
            secret_file.display(),
            dir.path().join("buffer.db").display(),
            upstream.url(),
            secrets[2],
            dir.path().join("status.sock").display(),
        );
        Gateway::try_start_with(dir.path(), &yaml)
    });
    let dev = ClientOpts {
        qos: 1,
        username: Some("dev".into()),
        password: Some(secrets[0].into()),
        ..ClientOpts::default()
    };
    let hub = ClientOpts {
        username: Some("hub".into()),
        password: Some(secrets[1].into()),
        ..dev.clone()
    };
    let wrong = ClientOpts {
        password: Some(secrets[3].into()),
        ..dev.clone()
    };
    for (who, opts) in [("dev", &dev), ("hub", &hub)] {
        let out = publish_with(gw.port(), &format!("sensors/{who}"), who, false, opts);
        assert!(
            out.status.success(),
            "{who} refused:\n{}",
            output_text(&out)
        );
    }
    let out = publish_with(gw.port(), "sensors/wrong", "x", false, &wrong);
    assert!(!out.status.success(), "wrong password accepted");
    assert_eq!(
        up_sub.wait_for(2, Duration::from_secs(15)).len(),
        2,
        "nothing forwarded; log:\n{}",
        gw.log()
    );

    let mut outputs = vec![("log (trace)".to_string(), gw.log())];
    for args in [
        vec!["check-config"],
        vec!["buffer", "stats", "--json"],
        vec!["status", "--json"],
        vec!["status"],
    ] {
        let out = gw.cli(&args);
        if args[0] == "status" {
            assert!(out.status.success(), "{}", output_text(&out));
        }
        outputs.push((args.join(" "), output_text(&out)));
    }
    // A config error next to the secrets: the message must not quote them.
    let broken = std::fs::read_to_string(gw.config_path())
        .expect("reading the config")
        .replace("  username: gw\n", "  username: gw\n  bogus: 1\n");
    let broken_path = dir.path().join("broken.yaml");
    std::fs::write(&broken_path, broken).expect("writing the broken config");
    let out = run_bin(
        dir.path(),
        &[
            "check-config",
            "--config",
            &broken_path.display().to_string(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(78), "{}", output_text(&out));
    outputs.push(("check-config (broken)".to_string(), output_text(&out)));

    let mut leaks = Vec::new();
    for (what, text) in &outputs {
        for secret in &secrets {
            if text.contains(secret) {
                let line = text.lines().find(|l| l.contains(secret)).unwrap_or("");
                leaks.push(format!("{what} contains {secret}: {line}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    let log = &outputs[0].1;
    let lines = log.lines().count();
    println!("trace log: {lines} lines, none with a secret");
    // The log must have seen the logins and the uplink connect, or it proves little.
    assert!(
        log.contains("rumqttd") && log.contains("uplink connected") && lines > 50,
        "the trace log is too thin to prove anything ({lines} lines):\n{log}"
    );
}

/// No `ca_file`: the upstream's certificate must chain to the system's roots. A test CA is not
/// among them, so nothing may be sent, and the log must say why: rustls's verification error
/// (`invalid peer certificate: UnknownIssuer`), not any line with "certificate" in it (a missing
/// system CA bundle also says "certificate"). The control: a second gateway, the same upstream,
/// with `ca_file` set to the test CA, delivers; while it does, the first still sends nothing.
#[test]
fn an_upstream_with_an_untrusted_certificate_is_refused_by_default_and_accepted_with_its_ca_file() {
    let certdir = tempfile::tempdir().expect("creating a temp dir");
    let certs = certs::generate(certdir.path());
    let upstream = Mosquitto::start(MosquittoOpts {
        tls: Some(MosquittoTls {
            ca_file: certs.ca_cert.clone(),
            cert_file: certs.server_cert.clone(),
            key_file: certs.server_key.clone(),
            require_certificate: false,
        }),
        ..MosquittoOpts::default()
    });
    let sub_opts = ClientOpts {
        qos: 1,
        tls: Some((certs.ca_cert.clone(), None, None)),
        ..ClientOpts::default()
    };
    let sub = Subscriber::start(upstream.port(), "sensors/#", &client_id("up"), &sub_opts);
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = start_gateway(dir.path(), &upstream.url(), "", "");
    let n = 20;
    assert_eq!(publish_seq(gw.port(), "sensors/tls", n, 1), n);
    wait_rows(&gw, n as u64, Duration::from_secs(10));
    let refused = wait_until(Duration::from_secs(10), || {
        gw.log()
            .to_lowercase()
            .contains("invalid peer certificate: unknownissuer")
    });
    assert!(
        refused,
        "no certificate verification error (UnknownIssuer) logged; log:\n{}",
        gw.log()
    );

    // The control: the same upstream, trusted through ca_file.
    let trusted_dir = tempfile::tempdir().expect("creating a temp dir");
    let trusted = start_gateway(
        trusted_dir.path(),
        &upstream.url(),
        "",
        &format!("tls: {{ca_file: {}}}", certs.ca_cert.display()),
    );
    assert_eq!(publish_seq(trusted.port(), "sensors/tls-trusted", n, 1), n);
    let delivered = wait_until(Duration::from_secs(20), || {
        sub.messages()
            .iter()
            .filter(|(t, _)| t == "sensors/tls-trusted")
            .count()
            >= n
    });
    assert!(
        delivered,
        "the control gateway with ca_file did not deliver {n}; its log:\n{}",
        trusted.log()
    );
    assert!(
        !sub.messages().iter().any(|(t, _)| t == "sensors/tls"),
        "sent to an unverified upstream"
    );
    assert_eq!(stat(&gw.buffer_stats(), "rows"), n as u64);
}

#[test]
fn no_more_devices_than_max_connections_are_admitted() {
    let max = 20usize;
    let (_dir, mut gw) = start_broker(&format!("max_connections: {max}"));
    let (held, accepted) = flood_connections(gw.port(), 2 * max);
    assert!(
        accepted <= max,
        "{accepted} devices admitted with max_connections {max}"
    );
    drop(held);
    assert_others_still_served(&mut gw, "a connection flood");
}

#[test]
fn a_second_connect_on_one_connection_closes_it() {
    let (_dir, mut gw) = start_broker("");
    let mut s = mqtt_session(gw.port());
    let _ = s.write_all(&connect_packet("second"));
    assert!(
        closed_within(&mut s, Duration::from_secs(3)),
        "a second CONNECT did not close the connection"
    );
    assert_others_still_served(&mut gw, "a second CONNECT");
}

/// Private keys (the broker's TLS listener key, the uplink's client key) never reach the log at
/// trace level: no line of either key's PEM body appears in it.
#[test]
fn private_keys_never_appear_in_the_log_at_trace_level() {
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
    let sub = Subscriber::start(
        upstream.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts {
            qos: 1,
            tls: Some((
                certs.ca_cert.clone(),
                Some(certs.client_cert.clone()),
                Some(certs.client_key.clone()),
            )),
            ..ClientOpts::default()
        },
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = retry_on_port_clash(3, || {
        let yaml = format!(
            "gateway:\n  id: test\n  shutdown_timeout: 3s\nbroker:\n  listen: 127.0.0.1:{}\n  tls:\n    listen: 127.0.0.1:{}\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}\nstore:\n  path: {}\nuplink:\n  url: {}\n  tls: {{ca_file: {}, cert_file: {}, key_file: {}}}\n  forward:\n    - local: \"sensors/#\"\nlog:\n  level: \"trace,rumqttd=trace\"\n",
            free_port(),
            free_port(),
            certs.server_cert.display(),
            certs.server_key.display(),
            certs.ca_cert.display(),
            dir.path().join("buffer.db").display(),
            upstream.url(),
            certs.ca_cert.display(),
            certs.client_cert.display(),
            certs.client_key.display(),
        );
        Gateway::try_start_with(dir.path(), &yaml)
    });
    assert_eq!(publish_seq(gw.port(), "sensors/keys", 5, 1), 5);
    assert_eq!(
        sub.wait_for(5, Duration::from_secs(15)).len(),
        5,
        "nothing forwarded over mutual TLS; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    assert!(
        log.contains("uplink connected"),
        "the uplink never connected; log:\n{log}"
    );
    for key in [&certs.server_key, &certs.client_key] {
        let pem = std::fs::read_to_string(key).expect("reading a test key");
        let body: Vec<&str> = pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 32)
            .collect();
        assert!(!body.is_empty(), "{} has no PEM body", key.display());
        let leaked: Vec<&&str> = body.iter().filter(|l| log.contains(**l)).collect();
        assert!(
            leaked.is_empty(),
            "{} leaked into the log: {leaked:?}",
            key.display()
        );
    }
}
