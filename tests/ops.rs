//! Operations end to end: `edgegate status`, the Prometheus endpoint, the stats message, Home
//! Assistant discovery and SIGHUP, against the built binary and a real mosquitto upstream.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A gateway forwarding `sensors/#` to `up` (status socket in its dir), with `extra` YAML
/// appended at top level and `status_extra` lines added to the `status` section.
fn start(up: &Mosquitto, status_extra: &str, extra: &str) -> (Gateway, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let gw = retry_on_port_clash(5, || {
        let dir = tmp.path();
        let mut yaml = gateway_yaml(dir, free_port(), Some(&up.url()), "", "");
        yaml = yaml.replace("status:\n", &format!("status:\n{status_extra}"));
        yaml.push_str(&extra.replace("{dir}", &dir.display().to_string()));
        Gateway::try_start_with(dir, &yaml)
    });
    (gw, tmp)
}

/// `edgegate status --json`, parsed; panics with the output when it fails.
fn status(gw: &Gateway) -> serde_json::Value {
    // --socket: the config file may be broken on purpose (SIGHUP tests).
    let sock = gw.dir().join("status.sock").display().to_string();
    // The status socket is bound after the MQTT port the harness waits for: "not running"
    // (exit 3) right after the start means "not yet".
    let started = std::time::Instant::now();
    let out = loop {
        let out = run_bin(
            gw.dir(),
            &["status", "--json", "--socket", &sock],
            Duration::from_secs(20),
        );
        if out.status.code() != Some(3) || started.elapsed() > Duration::from_secs(10) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        out.status.success(),
        "status failed:\n{}",
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", output_text(&out)))
}

fn num(v: &serde_json::Value, path: &str) -> f64 {
    let mut x = v;
    for k in path.split('.') {
        x = &x[k];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("no number at {path} in {v:#}"))
}

/// GET `path` over plain HTTP/1.1; returns (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("setting a read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("sending the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading the response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of one sample (`name{labels}` exactly as printed) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn hup(gw: &Gateway) {
    let pid = gw.pid().expect("gateway running");
    let st = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(st.success());
}

#[test]
fn status_reports_a_backlog_that_grows_while_the_upstream_is_down_and_drains_after() {
    let mut up = Mosquitto::start(MosquittoOpts::default());
    let (gw, _tmp) = start(&up, "", "");
    assert!(wait_until(Duration::from_secs(10), || status(&gw)
        ["uplink"]["state"]
        == "up"));
    up.stop();
    assert!(wait_until(Duration::from_secs(10), || status(&gw)
        ["uplink"]["state"]
        == "down"));
    let before_publish = std::time::Instant::now();
    assert_eq!(publish_seq(gw.port(), "sensors/a", 40, 1), 40);
    let after_publish = std::time::Instant::now();
    let mut last = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = status(&gw);
            num(&last, "backlog.rows") == 40.0
        }),
        "backlog never reached 40: {last:#}"
    );
    assert_eq!(num(&last, "messages_in.mqtt"), 40.0);
    assert!(last["uplink"]["last_error"].is_string(), "{last:#}");
    // The oldest row was stored between `before_publish` and `after_publish`: its age, read
    // between `asked` and `answered`, lies between those bounds (1 ms rounding, 50 ms of clock
    // slack). Polled until it has grown past 1 s, so a constant or a wrong unit cannot pass.
    let mut bounds = (0.0, 0.0);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let asked = std::time::Instant::now();
            last = status(&gw);
            let answered = std::time::Instant::now();
            bounds = (
                (asked - after_publish).as_secs_f64() - 0.05,
                (answered - before_publish).as_secs_f64() + 0.05,
            );
            let age = num(&last, "backlog.oldest_age_s");
            assert!(
                bounds.0 <= age && age <= bounds.1,
                "oldest_age_s {age} outside {bounds:?}: {last:#}"
            );
            age >= 1.0
        }),
        "oldest_age_s never reached 1 s (last bounds {bounds:?}): {last:#}"
    );
    // The human form says the same.
    let text = output_text(&gw.cli(&["status"]));
    assert!(text.contains("uplink:   down"), "{text}");
    assert!(text.contains("backlog:  40 messages"), "{text}");

    up.restart();
    assert!(
        wait_until(Duration::from_secs(30), || {
            last = status(&gw);
            num(&last, "backlog.rows") == 0.0 && last["uplink"]["state"] == "up"
        }),
        "backlog never drained: {last:#}"
    );
    assert_eq!(num(&last, "uplink.forwarded"), 40.0, "{last:#}");
    assert!(num(&last, "uplink.reconnects") >= 1.0, "{last:#}");
}

#[test]
fn status_without_a_running_daemon_says_so_and_exits_3() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("status.sock");
    let out = run_bin(
        dir.path(),
        &["status", "--socket", &sock.display().to_string()],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("not running"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn metrics_count_what_the_test_sent_by_source_and_serial_result() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let pty = PtyPair::start(dir.path(), "usb");
    let mport = free_port();
    let (gw, _tmp) = start(
        &up,
        "",
        &format!(
            "metrics:\n  enabled: true\n  listen: 127.0.0.1:{mport}\nserial:\n  ports:\n    - name: usb\n      path: {}\n      format: value\n",
            pty.port.display()
        ),
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .log()
        .contains("serial port open")));
    assert_eq!(publish_seq(gw.port(), "sensors/dev", 30, 1), 30);
    pty.write(b"1.5\n2.5\nnope\n3.5\n");
    assert_eq!(
        upstream.wait_for(33, Duration::from_secs(20)).len(),
        33,
        "{}",
        gw.log()
    );
    // A device that stays connected while we scrape.
    let watcher = Subscriber::start(
        gw.port(),
        "nothing/here",
        &client_id("dev"),
        &ClientOpts::qos(0),
    );

    let mut body = String::new();
    let settled = wait_until(Duration::from_secs(10), || {
        let (status_line, b) = http_get(mport, "/metrics");
        assert!(status_line.contains("200"), "{status_line}");
        body = b;
        sample(&body, "edgegate_forwarded_total") == Some(33.0)
            && sample(&body, "edgegate_backlog_rows") == Some(0.0)
    });
    assert!(settled, "{body}\n{}", gw.log());
    assert_eq!(
        sample(&body, "edgegate_messages_in_total{source=\"mqtt\"}"),
        Some(30.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "edgegate_messages_in_total{source=\"serial\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "edgegate_serial_frames_total{port=\"usb\",result=\"ok\"}"
        ),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "edgegate_serial_frames_total{port=\"usb\",result=\"not_a_number\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "edgegate_uplink_connected"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "edgegate_dropped_total{reason=\"store_full\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(
        sample(&body, "edgegate_devices_connected").is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(
        body.contains("# TYPE edgegate_backlog_rows gauge"),
        "{body}"
    );
    // The log reported the same bad frame the counter has.
    assert!(gw.log().contains("not_a_number"), "{}", gw.log());
    let (nf, _) = http_get(mport, "/nope");
    assert!(nf.contains("404"), "{nf}");
    drop(watcher);
}

#[test]
fn the_stats_message_is_published_locally_and_upstream() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "edgegate/+/status/stats",
        &client_id("up"),
        &ClientOpts::qos(0),
    );
    let (gw, _tmp) = start(&up, "  stats_interval: 1s\n", "");
    let local = Subscriber::start(
        gw.port(),
        "edgegate/test/status/stats",
        &client_id("loc"),
        &ClientOpts::qos(0),
    );
    for sub in [&local, &upstream] {
        let msgs = sub.wait_for(1, Duration::from_secs(15));
        assert!(!msgs.is_empty(), "no stats message; log:\n{}", gw.log());
        let v: serde_json::Value = serde_json::from_str(&msgs[0].1).expect("stats are JSON");
        assert_eq!(v["gateway_id"], "test");
        assert!(v["backlog"]["rows"].is_u64(), "{v:#}");
    }
}

#[test]
fn home_assistant_discovery_is_retained_json_with_the_right_state_topics() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let (gw, _tmp) = start(
        &up,
        "",
        "homeassistant:\n  enabled: true\ngpio:\n  backend: sim\n  inputs:\n    - {name: door, pin: 17}\n  outputs:\n    - {name: pump, pin: 27}\nserial:\n  ports:\n    - {name: temp, sim: {lines: [\"20.5\"], interval: 1s}, format: value, unit: \"°C\"}\n",
    );
    // `%r` is the retain flag of the copy the subscriber received.
    let with_retain = ClientOpts {
        format: Some("%t %r|%p".into()),
        ..ClientOpts::qos(0)
    };
    // A first subscriber proves the discovery was published (live or retained copies)...
    let early = Subscriber::start(
        gw.port(),
        "homeassistant/#",
        &client_id("ha0"),
        &with_retain,
    );
    let seen = early.wait_for(5, Duration::from_secs(10));
    assert!(
        seen.len() >= 5,
        "no discovery: {seen:?}; log:
{}",
        gw.log()
    );
    // ...so a subscriber that comes after it gets only what the broker retained, and flagged so.
    let late = Subscriber::start(
        gw.port(),
        "homeassistant/#",
        &client_id("ha1"),
        &with_retain,
    );
    let msgs = late.wait_for(5, Duration::from_secs(10));
    let find = |topic: &str| -> serde_json::Value {
        let (_, rest) = msgs.iter().find(|(t, _)| t == topic).unwrap_or_else(|| {
            panic!(
                "no retained {topic} for a late subscriber; got {:?}",
                msgs.iter().map(|m| &m.0).collect::<Vec<_>>()
            )
        });
        let (retain, p) = rest.split_once('|').unwrap_or(("", rest));
        assert_eq!(
            retain, "1",
            "{topic} reached the late subscriber without retain: {rest}"
        );
        serde_json::from_str(p).unwrap_or_else(|e| panic!("{topic}: not JSON ({e}): {p}"))
    };
    let door = find("homeassistant/binary_sensor/test/door/config");
    assert_eq!(door["state_topic"], "sensors/door");
    assert_eq!(door["availability_topic"], "edgegate/test/status");
    let pump = find("homeassistant/switch/test/pump/config");
    assert_eq!(pump["command_topic"], "cmd/pump");
    let temp = find("homeassistant/sensor/test/temp/config");
    assert_eq!(temp["state_topic"], "sensors/temp");
    assert_eq!(temp["unit_of_measurement"], "°C");
    assert_eq!(temp["device_class"], "temperature");
}

fn rewrite(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("reading the config");
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    std::fs::write(path, text.replace(from, to)).expect("writing the config");
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one_running() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let (gw, _tmp) = start(&up, "", "");
    rewrite(gw.config_path(), "reconnect_max: 1s", "reconnect_max: soon");
    hup(&gw);
    assert!(
        wait_until(Duration::from_secs(10), || gw.log().contains("not applied")),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("uplink.reconnect_max"), "{}", gw.log());
    assert_eq!(publish_seq(gw.port(), "sensors/after", 10, 1), 10);
    assert_eq!(
        upstream.wait_for(10, Duration::from_secs(15)).len(),
        10,
        "{}",
        gw.log()
    );
    assert_eq!(status(&gw)["uplink"]["state"], "up");
}

#[test]
fn sighup_adding_a_serial_sensor_starts_it_and_forwarding_goes_on() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let pty = PtyPair::start(dir.path(), "usb");
    let (gw, _tmp) = start(&up, "", "");
    assert_eq!(publish_seq(gw.port(), "sensors/before", 5, 1), 5);
    assert_eq!(upstream.wait_for(5, Duration::from_secs(15)).len(), 5);

    let mut text = std::fs::read_to_string(gw.config_path()).expect("reading the config");
    text.push_str(&format!(
        "serial:\n  ports:\n    - name: usb\n      path: {}\n      format: value\n",
        pty.port.display()
    ));
    std::fs::write(gw.config_path(), text).expect("writing the config");
    // What `systemctl reload` runs, finding the daemon through its status socket.
    let sock = gw.dir().join("status.sock").display().to_string();
    let out = run_bin(
        gw.dir(),
        &["reload", "--socket", &sock],
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("serial port open")),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("configuration reloaded"), "{}", gw.log());
    pty.write(b"7.25\n");
    let msgs = upstream.wait_for(6, Duration::from_secs(15));
    assert!(
        msgs.iter()
            .any(|(t, p)| t == "sensors/usb" && p.contains("7.25")),
        "{msgs:?}\n{}",
        gw.log()
    );
    assert_eq!(publish_seq(gw.port(), "sensors/after", 5, 1), 5);
    let msgs = upstream.wait_for(11, Duration::from_secs(15));
    assert_eq!(check_seq(&msgs, "sensors/after", 5).missing.len(), 0);
    let st = status(&gw);
    assert!(
        st["sensors"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["name"] == "usb")),
        "{st:#}"
    );
}

#[test]
fn sighup_adding_a_forward_rule_makes_the_front_store_and_forward_that_topic() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(up.port(), "#", &client_id("up"), &ClientOpts::qos(1));
    let (gw, _tmp) = start(&up, "", "");
    // Not forwarded yet: nothing reaches the upstream.
    assert_eq!(publish_seq(gw.port(), "alerts/a", 3, 1), 3);
    assert_eq!(publish_seq(gw.port(), "sensors/mark", 1, 1), 1);
    let seen = upstream.wait_for(1, Duration::from_secs(15));
    assert!(
        seen.iter().all(|(t, _)| !t.starts_with("alerts/")),
        "{seen:?}"
    );

    rewrite(
        gw.config_path(),
        "  forward:\n    - local: \"sensors/#\"\n",
        "  forward:\n    - local: \"sensors/#\"\n    - local: \"alerts/#\"\n",
    );
    hup(&gw);
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("configuration reloaded")),
        "{}",
        gw.log()
    );
    assert_eq!(publish_seq(gw.port(), "alerts/b", 5, 1), 5);
    let mut msgs = Vec::new();
    let arrived = wait_until(Duration::from_secs(15), || {
        msgs = upstream.messages();
        check_seq(&msgs, "alerts/b", 5).missing.is_empty()
    });
    assert!(arrived, "{msgs:?}\n{}", gw.log());
    assert!(
        msgs.iter().all(|(t, _)| t != "alerts/a"),
        "alerts/a was not forwarded before the reload"
    );
}
