//! The embedded broker, seen from real clients (mosquitto_pub/sub and rumqttc), no uplink.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

/// A broker-only config (no uplink) on a fresh port; `extra_broker` lines go into `broker:`.
fn broker_only(extra_broker: &str) -> (tempfile::TempDir, String, u16) {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let port = free_port();
    let extra: String = extra_broker
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {l}\n"))
        .collect();
    let yaml = format!(
        "gateway:\n  id: test\n  shutdown_timeout: 3s\nbroker:\n  listen: 127.0.0.1:{port}\n{extra}store:\n  path: {}\n",
        dir.path().join("buffer.db").display()
    );
    (dir, yaml, port)
}

fn start_broker_only(extra_broker: &str) -> (tempfile::TempDir, Gateway) {
    let mut last = None;
    for _ in 0..3 {
        let (dir, yaml, _) = broker_only(extra_broker);
        match Gateway::try_start_with(dir.path(), &yaml) {
            Ok(gw) => return (dir, gw),
            Err(StartError::PortClash(log)) => last = Some(log),
            Err(StartError::Failed(log)) => panic!("gateway did not start:\n{log}"),
        }
    }
    panic!("port clash three times:\n{}", last.unwrap_or_default());
}

fn mosquitto_pub_and_sub_deliver_at(qos: u8) {
    let (_dir, gw) = start_broker_only("");
    let topic = format!("t/qos{qos}");
    let sub = Subscriber::start(gw.port(), &topic, &client_id("sub"), &ClientOpts::qos(qos));
    publish(gw.port(), &topic, &format!("hello-{qos}"), qos);
    let msgs = sub.wait_for(1, Duration::from_secs(10));
    assert_eq!(
        msgs,
        vec![(topic, format!("hello-{qos}"))],
        "log:\n{}",
        gw.log()
    );
}

#[test]
fn mosquitto_clients_exchange_a_message_at_qos_0() {
    mosquitto_pub_and_sub_deliver_at(0);
}

#[test]
fn mosquitto_clients_exchange_a_message_at_qos_1() {
    mosquitto_pub_and_sub_deliver_at(1);
}

#[test]
fn mosquitto_clients_exchange_a_message_at_qos_2() {
    mosquitto_pub_and_sub_deliver_at(2);
}

/// Subscribes with rumqttc, publishes `n` numbered messages with rumqttc, returns what arrived.
fn rumqttc_roundtrip(port: u16, qos: u8, n: usize) -> (usize, Vec<Msg>) {
    let topic = format!("rq/qos{qos}");
    let rt = runtime();
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(client_id("rsub"), "127.0.0.1", port), 10);
    rt.block_on(async {
        client
            .subscribe(topic.clone(), qos_of(qos))
            .await
            .expect("queueing SUBSCRIBE");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK from the embedded broker: {other:?}"),
            }
        }
    });
    let t = topic.clone();
    let acked = publish_each(port, n, qos, move |i| {
        (t.clone(), i.to_string().into_bytes())
    });
    let msgs = rt.block_on(async move {
        let mut msgs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while msgs.len() < n {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => msgs.push((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                )),
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        msgs
    });
    (acked, msgs)
}

fn rumqttc_clients_exchange_in_order_at(qos: u8) {
    let (_dir, gw) = start_broker_only("");
    let n = 500;
    let (acked, msgs) = rumqttc_roundtrip(gw.port(), qos, n);
    assert_eq!(acked, n, "publisher acknowledgements");
    let report = check_seq(&msgs, &format!("rq/qos{qos}"), n);
    assert!(
        report.missing.is_empty() && report.out_of_order == 0 && report.foreign == 0,
        "{}; log:\n{}",
        report.summary(),
        gw.log()
    );
    if qos == 2 {
        assert_eq!(report.duplicates, 0, "QoS 2 must not duplicate");
    }
}

#[test]
fn rumqttc_clients_exchange_500_messages_in_order_at_qos_0() {
    rumqttc_clients_exchange_in_order_at(0);
}

#[test]
fn rumqttc_clients_exchange_500_messages_in_order_at_qos_1() {
    rumqttc_clients_exchange_in_order_at(1);
}

#[test]
fn rumqttc_clients_exchange_500_messages_in_order_at_qos_2() {
    rumqttc_clients_exchange_in_order_at(2);
}

#[test]
fn a_retained_message_reaches_a_subscriber_that_arrives_later() {
    let (_dir, gw) = start_broker_only("");
    let out = publish_with(gw.port(), "state/door", "open", true, &ClientOpts::qos(1));
    assert!(out.status.success(), "{}", output_text(&out));
    let sub = Subscriber::start(
        gw.port(),
        "state/#",
        &client_id("late"),
        &ClientOpts::qos(1),
    );
    let msgs = sub.wait_for(1, Duration::from_secs(10));
    assert_eq!(msgs, vec![("state/door".to_string(), "open".to_string())]);
}

#[test]
fn with_users_configured_a_wrong_password_is_refused_and_the_right_one_works() {
    let (_dir, gw) = start_broker_only("users: [{username: dev, password: secret}]");
    let good = ClientOpts {
        qos: 1,
        username: Some("dev".into()),
        password: Some("secret".into()),
        ..ClientOpts::default()
    };
    let sub = Subscriber::start(gw.port(), "auth/#", &client_id("authsub"), &good);

    let wrong = ClientOpts {
        password: Some("wrong".into()),
        ..good.clone()
    };
    let out = publish_with(gw.port(), "auth/x", "from-wrong", false, &wrong);
    assert!(
        !out.status.success(),
        "wrong password accepted:\n{}",
        output_text(&out)
    );
    let anonymous = publish_with(
        gw.port(),
        "auth/x",
        "from-anonymous",
        false,
        &ClientOpts::qos(1),
    );
    assert!(
        !anonymous.status.success(),
        "anonymous client accepted:\n{}",
        output_text(&anonymous)
    );

    let out = publish_with(gw.port(), "auth/x", "from-dev", false, &good);
    assert!(
        out.status.success(),
        "right password refused:\n{}",
        output_text(&out)
    );
    let msgs = sub.wait_for(1, Duration::from_secs(10));
    // Give a refused publish that slipped through time to show up before judging.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sub.messages(),
        vec![("auth/x".to_string(), "from-dev".to_string())],
        "first seen: {msgs:?}"
    );
}

#[test]
fn the_mqtt5_listener_serves_mqtt5_clients() {
    let v5 = free_port();
    let (_dir, gw) = start_broker_only(&format!("listen_v5: 127.0.0.1:{v5}"));
    assert!(
        wait_until(Duration::from_secs(10), || port_accepts(v5)),
        "v5 port not open; log:\n{}",
        gw.log()
    );
    let opts = ClientOpts {
        qos: 1,
        v5: true,
        ..ClientOpts::default()
    };
    let sub = Subscriber::start(v5, "v5/#", &client_id("v5sub"), &opts);
    let out = publish_with(v5, "v5/hello", "five", false, &opts);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        sub.wait_for(1, Duration::from_secs(10)),
        vec![("v5/hello".to_string(), "five".to_string())]
    );
}

/// A gateway with a TLS listener; returns the certificates, the TLS port and the gateway.
fn start_tls_gateway() -> (
    tempfile::TempDir,
    certs::Certs,
    u16,
    tempfile::TempDir,
    Gateway,
) {
    let certdir = tempfile::tempdir().expect("creating a temp dir");
    let certs = certs::generate(certdir.path());
    let tls_port = free_port();
    let (dir, gw) = start_broker_only(&format!(
        "tls: {{listen: 127.0.0.1:{tls_port}, cert_file: {}, key_file: {}, client_ca_file: {}}}",
        certs.server_cert.display(),
        certs.server_key.display(),
        certs.ca_cert.display()
    ));
    assert!(
        wait_until(Duration::from_secs(10), || port_accepts(tls_port)),
        "TLS port not open; log:\n{}",
        gw.log()
    );
    (certdir, certs, tls_port, dir, gw)
}

#[test]
fn the_tls_listener_serves_clients_with_certificates_and_refuses_those_without() {
    let (_certdir, certs, tls_port, _dir, gw) = start_tls_gateway();
    let with_cert = ClientOpts {
        qos: 1,
        host: Some("localhost".into()),
        tls: Some((
            certs.ca_cert.clone(),
            Some(certs.client_cert.clone()),
            Some(certs.client_key.clone()),
        )),
        ..ClientOpts::default()
    };
    let sub = Subscriber::start(tls_port, "secure/#", &client_id("tlssub"), &with_cert);
    let out = publish_with(tls_port, "secure/a", "sealed", false, &with_cert);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        sub.wait_for(1, Duration::from_secs(10)),
        vec![("secure/a".to_string(), "sealed".to_string())],
        "log:\n{}",
        gw.log()
    );

    let no_cert = ClientOpts {
        qos: 1,
        host: Some("localhost".into()),
        tls: Some((certs.ca_cert.clone(), None, None)),
        ..ClientOpts::default()
    };
    let out = publish_with(tls_port, "secure/a", "unsigned", false, &no_cert);
    assert!(
        !out.status.success(),
        "client without certificate accepted:\n{}",
        output_text(&out)
    );
}

/// Devices on a LAN often connect by IP address; OpenSSL-based clients (mosquitto, paho-c)
/// then send the IP literal as SNI, which the TLS listener must tolerate.
#[test]
fn the_tls_listener_serves_a_client_that_connects_by_ip_address() {
    let (_certdir, certs, tls_port, _dir, gw) = start_tls_gateway();
    let by_ip = ClientOpts {
        qos: 1,
        tls: Some((
            certs.ca_cert.clone(),
            Some(certs.client_cert.clone()),
            Some(certs.client_key.clone()),
        )),
        ..ClientOpts::default()
    };
    let out = publish_with(tls_port, "secure/ip", "by-ip", false, &by_ip);
    assert!(
        out.status.success(),
        "client connecting to 127.0.0.1 refused:\n{}\nlog:\n{}",
        output_text(&out),
        gw.log()
    );
}

#[test]
fn a_taken_broker_port_makes_run_exit_70_naming_the_address() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("binding a port to hold");
    let port = holder
        .local_addr()
        .expect("bound socket has an address")
        .port();
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let config = dir.path().join("edgegate.yaml");
    std::fs::write(
        &config,
        format!(
            "gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:{port}\nstore:\n  path: {}\n",
            dir.path().join("buffer.db").display()
        ),
    )
    .expect("writing the config");
    let started = Instant::now();
    let out = run_bin(
        dir.path(),
        &["run", "--config", &config.display().to_string()],
        Duration::from_secs(20),
    );
    let text = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(70),
        "expected exit 70 within 20 s ({:?}):\n{text}",
        started.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{port}")),
        "stderr does not name the address:\n{text}"
    );
    drop(holder);
}

#[test]
fn sigterm_stops_the_gateway_with_exit_0_within_the_shutdown_timeout() {
    let (_dir, mut gw) = start_broker_only("");
    // A connected client must not hold the shutdown up.
    let _sub = Subscriber::start(gw.port(), "any/#", &client_id("idle"), &ClientOpts::qos(1));
    let started = Instant::now();
    // shutdown_timeout is 3 s in this config; allow the process a little time to exit after it.
    let status = gw.sigterm_and_wait(Duration::from_secs(6));
    assert_eq!(status.code(), Some(0), "log:\n{}", gw.log());
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(
        !port_accepts(gw.port()),
        "broker port still open after exit"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let out = run_bin(dir.path(), &["--version"], Duration::from_secs(10));
    assert!(out.status.success(), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "version missing:\n{}",
        output_text(&out)
    );
}
