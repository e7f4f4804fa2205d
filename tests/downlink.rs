//! Downlink commands and their useful life, end to end: the built binary, a real mosquitto
//! upstream, and a GPIO output on the sim backend. A command the cloud queued while the gateway
//! was away is not applied unless the rule says `while_offline: deliver`; a command whose
//! timestamp is older than `max_age`, or a retained one, is dropped and counted; a fresh one is
//! applied; an MQTT 5 expiry is the cloud's own judgement.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const CMD: &str = "edgegate/test/cmd/relay1";
const START: &str = "===== harness: starting edgegate =====";

/// A gateway with one downlink rule (`rule` lines are added to it) and the output `relay1`
/// (GPIO27, initially off) obeying `cmd/relay1`.
fn start(up: &Mosquitto, dir: &Path, uplink: &str, rule: &str) -> Gateway {
    retry_on_port_clash(5, || {
        let mut yaml = gateway_yaml(dir, free_port(), None, "", "");
        yaml.push_str(&format!(
            "uplink:\n  url: {}\n  reconnect_min: 100ms\n  reconnect_max: 1s\n  forward:\n    - local: \"sensors/#\"\n  downlink:\n    - remote: \"edgegate/{{gateway_id}}/cmd/#\"\n      local: \"cmd/\"\n",
            up.url()
        ));
        for line in rule.lines() {
            yaml.push_str(&format!("      {line}\n"));
        }
        for line in uplink.lines() {
            yaml.push_str(&format!("  {line}\n"));
        }
        yaml.push_str(&format!(
            "gpio:\n  backend: sim\n  sim_state_file: {}\n  outputs:\n    - name: relay1\n      pin: GPIO27\n      initial: off\n      fail_safe: off\n",
            dir.join("gpio.json").display()
        ));
        Gateway::try_start_with(dir, &yaml)
    })
}

/// The states relay1 was commanded to since the gateway last started, from its `command` log
/// lines.
fn applied(gw: &Gateway) -> Vec<u8> {
    let log = gw.log();
    let run = log.rsplit(START).next().unwrap_or_default();
    run.lines()
        .filter(|l| l.contains(" command") && !l.contains("rejected") && l.contains("relay1"))
        .filter_map(|l| {
            if l.contains("state=1") {
                Some(1)
            } else if l.contains("state=0") {
                Some(0)
            } else {
                None
            }
        })
        .collect()
}

/// Publishes `payload` upstream until relay1 applies a command with `state` (the downlink
/// subscription follows the connection by a moment), bounded.
fn send_until_applied(up: &Mosquitto, gw: &Gateway, payload: &str, state: u8) {
    let done = wait_until(Duration::from_secs(20), || {
        publish(up.port(), CMD, payload, 1);
        wait_until(Duration::from_millis(500), || applied(gw).contains(&state))
    });
    assert!(
        done,
        "relay1 never applied `{payload}`: {:?}\n{}",
        applied(gw),
        gw.log()
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn stale_count(gw: &Gateway) -> u64 {
    gw.status_json()["uplink"]["downlink_stale"]
        .as_u64()
        .unwrap_or_else(|| panic!("no uplink.downlink_stale in status"))
}

/// Stops the gateway, has the cloud send `payload` while it is away, starts it again, and sends
/// the fresh command `fresh` (state `fresh_state`) until it is applied: whatever the cloud
/// queued arrives before that, at the connection.
fn outage(up: &Mosquitto, gw: &mut Gateway, payload: &str, fresh: &str, fresh_state: u8) {
    let status = gw.sigterm_and_wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", gw.log());
    publish(up.port(), CMD, payload, 1);
    gw.restart();
    send_until_applied(up, gw, fresh, fresh_state);
}

#[test]
fn a_command_queued_while_the_gateway_was_away_is_not_applied_when_it_returns() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut gw = start(&up, dir.path(), "", "");
    send_until_applied(&up, &gw, "off", 0);

    outage(&up, &mut gw, "on", "off", 0);
    assert!(
        !applied(&gw).contains(&1),
        "the command queued during the outage switched the relay: {:?}\n{}",
        applied(&gw),
        gw.log()
    );
    // And a fresh command still works.
    send_until_applied(&up, &gw, "on", 1);
}

#[test]
fn a_rule_that_says_deliver_applies_what_the_cloud_queued_during_the_outage() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut gw = start(&up, dir.path(), "", "while_offline: deliver");
    send_until_applied(&up, &gw, "off", 0);

    outage(&up, &mut gw, "on", "off", 0);
    let run = applied(&gw);
    assert_eq!(
        run.first(),
        Some(&1),
        "the queued command was not applied first: {run:?}\n{}",
        gw.log()
    );
}

#[test]
fn a_queued_command_older_than_max_age_by_its_timestamp_is_dropped_and_counted() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut gw = start(
        &up,
        dir.path(),
        "",
        "while_offline: deliver\ntimestamp: ts\nmax_age: 30s",
    );
    let fresh_off = || format!(r#"{{"state":"off","ts":{}}}"#, now_ms());
    send_until_applied(&up, &gw, &fresh_off(), 0);

    let stale_on = format!(r#"{{"state":"on","ts":"{}"}}"#, rfc3339(now_ms() - 120_000));
    outage(&up, &mut gw, &stale_on, &fresh_off(), 0);
    assert!(
        !applied(&gw).contains(&1),
        "a command two minutes old switched the relay: {:?}\n{}",
        applied(&gw),
        gw.log()
    );
    assert_eq!(stale_count(&gw), 1, "{}", gw.log());
    assert!(
        gw.log().contains("a stale downlink command was dropped"),
        "{}",
        gw.log()
    );
    // A fresh one, RFC 3339 too, is applied.
    let fresh_on = format!(r#"{{"state":"on","ts":"{}"}}"#, rfc3339(now_ms()));
    send_until_applied(&up, &gw, &fresh_on, 1);
}

#[test]
fn a_retained_command_is_dropped_unless_it_carries_an_mqtt5_expiry() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let retained = |expiry: Option<&str>| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &up.port().to_string()])
            .args(["-t", CMD, "-m", "on", "-q", "1", "-r", "-V", "mqttv5"]);
        if let Some(e) = expiry {
            cmd.args(["-D", "publish", "message-expiry-interval", e]);
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
        assert!(out.status.success(), "{}", output_text(&out));
    };

    // A retained "on" with no expiry: sent at a time nothing says, so not applied.
    retained(None);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut gw = start(&up, dir.path(), "protocol: 5", "");
    send_until_applied(&up, &gw, "off", 0);
    assert!(
        !applied(&gw).contains(&1),
        "the retained command switched the relay: {:?}\n{}",
        applied(&gw),
        gw.log()
    );
    assert_eq!(stale_count(&gw), 1, "{}", gw.log());

    // The cloud bounds the next one's life (an hour): it is applied at the subscription.
    let status = gw.sigterm_and_wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", gw.log());
    retained(Some("3600"));
    gw.restart();
    assert!(
        wait_until(Duration::from_secs(20), || applied(&gw).contains(&1)),
        "the retained command with an expiry was not applied: {:?}\n{}",
        applied(&gw),
        gw.log()
    );
}

fn rfc3339(ms: i64) -> String {
    edgegate::codec::time::rfc3339_ms(ms)
}
