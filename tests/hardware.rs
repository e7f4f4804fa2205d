//! Hardware adapters end to end: serial ports through real pseudo-terminals (socat), GPIO on the
//! sim backend, the built binary with a real mosquitto upstream.

mod common;

use std::time::Duration;

use common::*;

/// A gateway forwarding `sensors/#` upstream, with `hardware` YAML appended at top level.
fn start(up: &Mosquitto, hardware: &str) -> Gateway {
    retry_on_port_clash(5, || {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut yaml = gateway_yaml(&dir, free_port(), Some(&up.url()), "", "");
        yaml.push_str(&hardware.replace("{dir}", &dir.display().to_string()));
        // The temp dir must outlive the gateway: keep it by leaking its guard into the dir path.
        let gw = Gateway::try_start_with(&dir, &yaml)?;
        std::mem::forget(tmp);
        Ok(gw)
    })
}

fn payloads(msgs: &[Msg], topic: &str) -> Vec<serde_json::Value> {
    msgs.iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| serde_json::from_str(p).unwrap_or(serde_json::Value::String(p.clone())))
        .collect()
}

#[test]
fn serial_lines_reach_local_and_upstream_subscribers_once_and_bad_frames_are_counted_and_skipped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let climate = PtyPair::start(dir.path(), "climate");
    let gps = PtyPair::start(dir.path(), "gps");
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let gw = start(
        &up,
        &format!(
            "serial:\n  ports:\n    - name: climate\n      path: {}\n      baud: 115200\n      format: kv\n      max_frame: 64\n    - name: gps\n      path: {}\n      format: nmea\n",
            climate.port.display(),
            gps.port.display()
        ),
    );
    let local = Subscriber::start(
        gw.port(),
        "sensors/#",
        &client_id("local"),
        &ClientOpts::qos(0),
    );
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .matches("serial port open")
            .count()
            >= 2),
        "ports not open:\n{}",
        gw.log()
    );

    climate.write(b"T=21.5 H=40\r\n");
    climate.write(&[b'x'; 500]);
    climate.write(b"\n\xff\xfe=1\njunk without pairs\nT=22 H=41\n");
    gps.write(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48\r\n");
    gps.write(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n");

    let want = 3;
    let got_local = local.wait_for(want, Duration::from_secs(10));
    let got_up = upstream.wait_for(want, Duration::from_secs(10));
    for (who, msgs) in [("local", &got_local), ("upstream", &got_up)] {
        let climate = payloads(msgs, "sensors/climate");
        assert_eq!(climate.len(), 2, "{who}: {msgs:?}");
        assert_eq!(climate[0]["T"], 21.5, "{who}: {msgs:?}");
        assert_eq!(climate[0]["H"], 40);
        assert_eq!(climate[1]["T"], 22);
        assert!(climate[0]["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
        let gps = payloads(msgs, "sensors/gps");
        assert_eq!(gps.len(), 1, "{who}: {msgs:?}");
        assert_eq!(gps[0]["lat"], 48.1173);
        assert_eq!(gps[0]["alt"], 545.4);
    }
    // Stored exactly once (not again by the intake): nothing else arrives upstream.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(upstream.count(), want, "{:?}", upstream.messages());
    let log = gw.log();
    for reason in ["too_long", "not_utf8", "bad_kv", "nmea_checksum"] {
        assert!(
            log.contains(&format!("reason=\"{reason}\""))
                || log.contains(&format!("reason={reason}")),
            "no bad frame counted as {reason}:\n{log}"
        );
    }
}

#[test]
fn a_closed_and_recreated_pty_is_reopened_and_lines_flow_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut pty = PtyPair::start(dir.path(), "usb");
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let gw = start(
        &up,
        &format!(
            "serial:\n  ports:\n    - name: usb\n      path: {}\n      format: value\n      unit: \"°C\"\n      reopen_min: 100ms\n      reopen_max: 500ms\n",
            pty.port.display()
        ),
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .log()
        .contains("serial port open")));
    pty.write(b"21.5\n");
    assert_eq!(upstream.wait_for(1, Duration::from_secs(10)).len(), 1);

    pty.close();
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("serial port lost")),
        "{}",
        gw.log()
    );
    pty.reopen();
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("serial port reopened")),
        "{}",
        gw.log()
    );
    pty.write(b"22.5\n");
    let msgs = upstream.wait_for(2, Duration::from_secs(10));
    let values = payloads(&msgs, "sensors/usb");
    assert_eq!(values.len(), 2, "{msgs:?}\n{}", gw.log());
    assert_eq!(values[1]["value"], 22.5);
    assert_eq!(values[1]["unit"], "°C");
    // The outage is logged once, however many reopen attempts fail meanwhile.
    let log = gw.log();
    assert_eq!(log.matches("serial port lost").count(), 1, "{log}");
    assert_eq!(log.matches("serial port unavailable").count(), 0, "{log}");
}

#[test]
fn polling_writes_the_request_and_the_answer_is_published() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pty = PtyPair::start(dir.path(), "meter");
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let gw = start(
        &up,
        &format!(
            "serial:\n  ports:\n    - name: meter\n      path: {}\n      format: csv\n      fields: [volts, amps]\n      topic: sensors/power/meter\n      poll: {{request: \"READ?\\r\\n\", interval: 200ms}}\n",
            pty.port.display()
        ),
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .log()
        .contains("serial port open")));
    let asked = pty.read_for(7, Duration::from_secs(5));
    assert!(
        asked.windows(7).any(|w| w == b"READ?\r\n"),
        "request not written: {:?}",
        String::from_utf8_lossy(&asked)
    );
    pty.write(b"230.1,0.52\r\n");
    let msgs = upstream.wait_for(1, Duration::from_secs(10));
    let got = payloads(&msgs, "sensors/power/meter");
    assert_eq!(got.len(), 1, "{msgs:?}");
    assert_eq!(got[0]["volts"], 230.1);
    assert_eq!(got[0]["amps"], 0.52);
}

#[test]
fn an_output_follows_a_cloud_command_confirms_it_and_goes_fail_safe_on_sigterm() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let mut gw = start(
        &up,
        "gpio:\n  backend: sim\n  sim_state_file: {dir}/gpio.json\n  outputs:\n    - name: relay1\n      pin: GPIO27\n      initial: off\n      fail_safe: off\n",
    );
    let state_file = gw.dir().join("gpio.json");
    let level = || -> Option<u64> {
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_file).ok()?).ok()?;
        doc["GPIO27"].as_u64()
    };
    // The sim backend writes its state file just after the line is set; wait for it.
    assert!(
        wait_until(Duration::from_secs(5), || level() == Some(0)),
        "initial state off: {:?}",
        level()
    );
    let local = Subscriber::start(
        gw.port(),
        "sensors/relay1",
        &client_id("local"),
        &ClientOpts::qos(0),
    );
    // The retained confirmation of the initial state is there for a late subscriber.
    let first = local.wait_for(1, Duration::from_secs(5));
    assert_eq!(
        payloads(&first, "sensors/relay1")
            .first()
            .map(|v| v["state"].clone()),
        Some(0.into())
    );

    // cloud → downlink → local broker cmd/relay1 → pin. The downlink subscription may not be up
    // yet: repeat the command until the pin follows (bounded).
    let followed = wait_until(Duration::from_secs(15), || {
        publish(up.port(), "edgegate/test/cmd/relay1", "on", 1);
        wait_until(Duration::from_millis(500), || level() == Some(1))
    });
    assert!(
        followed,
        "relay did not follow the cloud command:\n{}",
        gw.log()
    );
    let confirmed = wait_until(Duration::from_secs(5), || {
        payloads(&local.messages(), "sensors/relay1")
            .iter()
            .any(|v| v["state"] == 1)
    });
    assert!(confirmed, "no state confirmation: {:?}", local.messages());

    publish(up.port(), "edgegate/test/cmd/relay1", "maybe", 1);
    assert!(wait_until(Duration::from_secs(5), || gw
        .log()
        .contains("command rejected")));
    assert_eq!(level(), Some(1), "a rejected command changes nothing");

    let status = gw.sigterm_and_wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", gw.log());
    assert_eq!(
        level(),
        Some(0),
        "fail-safe state not applied:\n{}",
        gw.log()
    );
    assert!(gw.log().contains("fail-safe state applied"));
}

#[tokio::test(start_paused = true)]
async fn bouncing_edges_are_debounced_into_one_event() {
    use edgegate::config::{EdgeKind, GpioInputConfig, HumanDuration, PinSpec, Pull};
    use edgegate::hw::gpio::GpioBackend;
    use edgegate::hw::gpio_sim::SimGpio;
    use edgegate::sources::gpio::{run_input, GpioInput};

    let mut sim = SimGpio::new(None);
    let pin = PinSpec::Number(17);
    let line = sim.input(&pin, Pull::Up).expect("sim input");
    let cfg = GpioInputConfig {
        name: "door".into(),
        pin: pin.clone(),
        pull: Pull::Up,
        active_low: true,
        debounce: HumanDuration::from_millis(20),
        edge: EdgeKind::Both,
        topic: None,
        interval: None,
        sim_waveform: Vec::new(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run_input(
        GpioInput { cfg, line },
        tx,
        std::sync::Arc::new(edgegate::hw::clock::SystemClock),
        cancel.clone(),
    ));
    let initial = rx.recv().await.expect("initial state");
    assert_eq!(initial.topic, "sensors/door");
    let doc: serde_json::Value = serde_json::from_slice(&initial.payload).expect("JSON");
    assert_eq!(doc["state"], 0, "pulled up, active low: off");

    // The contact bounces 6 times within 6 ms and ends low (door open → on).
    for i in 0..6 {
        sim.drive(&pin, i % 2 == 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sim.drive(&pin, false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ev = rx.try_recv().expect("one debounced event");
    let doc: serde_json::Value = serde_json::from_slice(&ev.payload).expect("JSON");
    assert_eq!(doc["state"], 1);
    assert_eq!(doc["edge"], "rising");
    assert!(
        rx.try_recv().is_err(),
        "bounces produced more than one event"
    );
    cancel.cancel();
    task.await.expect("input task");
}

#[test]
fn check_config_names_every_hardware_problem_with_its_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("hw.yaml");
    std::fs::write(
        &path,
        "gateway: {id: x}\nbroker: {listen: 127.0.0.1:1883}\ngpio:\n  backend: cdev\n  inputs:\n    - {name: a, pin: 17, sim_waveform: [{level: 1, hold: 1s}]}\n    - {name: a, pin: GPIO4}\n  outputs:\n    - {name: r, pin: 17, fail_safe_after: 1m}\nserial:\n  ports:\n    - {name: s, format: csv, baud: 7}\n",
    )
    .expect("writing the config");
    let out = run_bin(
        dir.path(),
        &["check-config", "--config", &path.display().to_string()],
        Duration::from_secs(20),
    );
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    for (line, field) in [
        (6, "gpio.inputs[0].sim_waveform"),
        (7, "gpio.inputs[1].name"),
        (9, "gpio.outputs[0].pin"),
        (9, "gpio.outputs[0].fail_safe_after"),
        (12, "serial.ports[0].path"),
        (12, "serial.ports[0].baud"),
        (12, "serial.ports[0].fields"),
    ] {
        assert!(
            text.contains(&format!("hw.yaml:{line}: {field}")),
            "`{field}` at line {line} not reported:\n{text}"
        );
    }
}

#[test]
fn an_output_goes_to_its_fail_safe_state_when_the_uplink_stays_down_too_long() {
    let mut up = Mosquitto::start(MosquittoOpts::default());
    let gw = start(
        &up,
        "gpio:\n  backend: sim\n  sim_state_file: {dir}/gpio.json\n  outputs:\n    - name: pump\n      pin: GPIO22\n      initial: on\n      fail_safe: off\n      fail_safe_after: 1s\n",
    );
    let state_file = gw.dir().join("gpio.json");
    let level = || -> Option<u64> {
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_file).ok()?).ok()?;
        doc["GPIO22"].as_u64()
    };
    assert!(
        wait_until(Duration::from_secs(5), || level() == Some(1)),
        "initial state on not applied:\n{}",
        gw.log()
    );
    // While the link is up the pump keeps running.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        level(),
        Some(1),
        "fail-safe applied while the uplink was up"
    );

    up.kill();
    assert!(
        wait_until(Duration::from_secs(10), || level() == Some(0)),
        "fail-safe state not applied after the uplink went down:\n{}",
        gw.log()
    );
    assert!(gw.log().contains("uplink down too long"));
}

#[test]
fn a_local_command_on_a_topic_a_forward_rule_also_takes_still_reaches_its_output() {
    // With the front, a stored message without a local subscriber never reaches rumqttd; the
    // output's command topic is subscribed in-process, so it must count as one.
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(up.port(), "cmd/#", &client_id("up"), &ClientOpts::qos(1));
    let mut gw = retry_on_port_clash(5, || {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let yaml = gateway_yaml(&dir, free_port(), Some(&up.url()), "", "")
            .replace("- local: \"sensors/#\"", "- local: \"#\"")
            .replace(
                "  downlink:\n    - remote: \"edgegate/{gateway_id}/cmd/#\"\n      local: \"cmd/\"\n",
                "",
            )
            + &format!(
                "gpio:\n  backend: sim\n  sim_state_file: {}/gpio.json\n  outputs:\n    - name: relay1\n      pin: GPIO27\n      initial: off\n      fail_safe: off\n",
                dir.display()
            );
        let gw = Gateway::try_start_with(&dir, &yaml)?;
        std::mem::forget(tmp);
        Ok(gw)
    });
    let state_file = gw.dir().join("gpio.json");
    let level = || -> Option<u64> {
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_file).ok()?).ok()?;
        doc["GPIO27"].as_u64()
    };
    assert!(
        wait_until(Duration::from_secs(5), || level() == Some(0)),
        "initial state off: {:?}\n{}",
        level(),
        gw.log()
    );
    publish(gw.port(), "cmd/relay1", "on", 1);
    assert!(
        wait_until(Duration::from_secs(5), || level() == Some(1)),
        "the relay did not follow a local QoS 1 command:\n{}",
        gw.log()
    );
    publish(gw.port(), "cmd/relay1", "off", 0);
    assert!(
        wait_until(Duration::from_secs(5), || level() == Some(0)),
        "the relay did not follow a local QoS 0 command:\n{}",
        gw.log()
    );
    // And the rule `#` stored and forwarded both.
    let got = upstream.wait_for(2, Duration::from_secs(10));
    assert_eq!(
        got,
        vec![
            ("cmd/relay1".to_string(), "on".to_string()),
            ("cmd/relay1".to_string(), "off".to_string())
        ]
    );
    let status = gw.sigterm_and_wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", gw.log());
}

// ─── SIGHUP: only what changed is reopened ───

/// `edgegate reload` (what `systemctl reload` runs) after `edit` changed the config file, then
/// waits for the `n`th "configuration reloaded" line.
fn reload(gw: &Gateway, n: usize, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(gw.config_path()).expect("reading the config");
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit changed nothing");
    std::fs::write(gw.config_path(), edited).expect("writing the config");
    let sock = gw.dir().join("status.sock").display().to_string();
    let out = run_bin(
        gw.dir(),
        &["reload", "--socket", &sock],
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .log()
            .matches("configuration reloaded")
            .count()
            >= n),
        "reload {n} not applied:\n{}",
        gw.log()
    );
}

/// Every level the sim gave `pin`'s output line, from its state file (`sets`).
fn sets(gw: &Gateway, pin: &str) -> Vec<u64> {
    let doc: serde_json::Value = std::fs::read(gw.dir().join("gpio.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    doc["sets"][pin]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn a_reload_reopens_only_what_changed_and_an_untouched_relay_never_switches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pty = PtyPair::start(dir.path(), "usb");
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let gw = start(
        &up,
        &format!(
            "gpio:\n  backend: sim\n  sim_state_file: {{dir}}/gpio.json\n  inputs:\n    - name: door\n      pin: GPIO17\n    - name: window\n      pin: GPIO18\n  outputs:\n    - name: relay1\n      pin: GPIO27\n      initial: off\n      fail_safe: off\nserial:\n  ports:\n    - name: usb\n      path: {}\n      format: value\n",
            pty.port.display()
        ),
    );
    let initial = |topic: &str| {
        upstream
            .messages()
            .iter()
            .filter(|(t, _)| t == topic)
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(15), || initial("sensors/door") == 1
            && initial("sensors/window") == 1),
        "no initial readings: {:?}",
        upstream.messages()
    );
    // From here on, readings as the local broker sees them: upstream, a forwarder restarted by
    // the uplink change may send a row again (at-least-once), which is no new reading.
    let local = Subscriber::start(
        gw.port(),
        "sensors/#",
        &client_id("local"),
        &ClientOpts::qos(0),
    );
    assert!(
        local.wait_subscribed(1, Duration::from_secs(10)),
        "{}",
        local.stderr()
    );
    let count = |topic: &str| local.messages().iter().filter(|(t, _)| t == topic).count();
    // The relay on, by command: a restart of its unit would pass it through `fail_safe: off`.
    publish(gw.port(), "cmd/relay1", "on", 1);
    assert!(
        wait_until(Duration::from_secs(10), || sets(&gw, "GPIO27") == [0, 0, 1]),
        "the relay did not switch on: {:?}",
        sets(&gw, "GPIO27")
    );

    // 1. An unrelated input changes (the door's debounce).
    reload(&gw, 1, |t| {
        t.replacen(
            "      pin: GPIO17\n",
            "      pin: GPIO17\n      debounce: 50ms\n",
            1,
        )
    });
    let log = gw.log();
    assert!(
        log.contains("GPIO input `door` restarted with its new settings"),
        "the journal does not say what was reopened:\n{log}"
    );
    for untouched in [
        "GPIO input `window`",
        "GPIO output `relay1`",
        "serial port `usb`",
    ] {
        assert!(
            !log.contains(&format!("{untouched} restarted")),
            "{untouched} was reopened:\n{log}"
        );
    }
    // The door, reopened, says its state again; the window, untouched, does not.
    assert!(
        wait_until(Duration::from_secs(10), || count("sensors/door") == 1),
        "the reopened door sent no reading: {:?}",
        local.messages()
    );
    assert_eq!(
        count("sensors/window"),
        0,
        "the untouched window sent a reading again"
    );
    assert_eq!(
        log.matches("serial port open").count(),
        1,
        "the port was reopened:\n{log}"
    );
    pty.write(b"4.5\n");
    assert!(
        wait_until(Duration::from_secs(10), || upstream
            .messages()
            .iter()
            .any(|(t, p)| t == "sensors/usb" && p.contains("4.5"))),
        "the untouched port stopped reading: {:?}",
        upstream.messages()
    );

    // 2. The uplink changes (a forward rule more): the hardware is not touched at all.
    reload(&gw, 2, |t| {
        t.replacen(
            "    - local: \"sensors/#\"\n",
            "    - local: \"sensors/#\"\n    - local: \"alerts/#\"\n",
            1,
        )
    });
    assert_eq!(
        sets(&gw, "GPIO27"),
        [0, 0, 1],
        "the relay switched during the reloads"
    );
    // Commands still reach the untouched relay.
    publish(gw.port(), "cmd/relay1", "off", 1);
    assert!(
        wait_until(Duration::from_secs(10), || sets(&gw, "GPIO27")
            == [0, 0, 1, 0]),
        "the relay no longer obeys: {:?}",
        sets(&gw, "GPIO27")
    );
    // Read after the command's round trip: a reopened input would have spoken by now.
    assert_eq!(
        count("sensors/window"),
        0,
        "an uplink change reopened the window"
    );
    assert_eq!(
        count("sensors/door"),
        1,
        "an uplink change reopened the door"
    );
}

#[test]
fn a_reload_that_moves_an_output_to_another_pin_leaves_the_old_pin_in_its_fail_safe_state() {
    let up = Mosquitto::start(MosquittoOpts::default());
    let gw = start(
        &up,
        "gpio:\n  backend: sim\n  sim_state_file: {dir}/gpio.json\n  outputs:\n    - name: heater\n      pin: GPIO27\n      initial: off\n      fail_safe: off\n    - name: lamp\n      pin: GPIO5\n      initial: on\n",
    );
    publish(gw.port(), "cmd/heater", "on", 1);
    assert!(
        wait_until(Duration::from_secs(10), || sets(&gw, "GPIO27") == [0, 0, 1]),
        "{:?}",
        sets(&gw, "GPIO27")
    );
    reload(&gw, 1, |t| {
        t.replacen("      pin: GPIO27\n", "      pin: GPIO22\n", 1)
    });
    // As documented: the changed output stops like at shutdown (its fail-safe state), and
    // starts on its new pin at `initial`; the lamp, untouched, was given nothing.
    assert!(
        wait_until(Duration::from_secs(10), || sets(&gw, "GPIO22") == [0, 0]),
        "the new pin: {:?}\n{}",
        sets(&gw, "GPIO22"),
        gw.log()
    );
    assert_eq!(sets(&gw, "GPIO27"), [0, 0, 1, 0], "the old pin");
    assert_eq!(sets(&gw, "GPIO5"), [1, 1], "the untouched lamp");
    assert!(
        gw.log()
            .contains("GPIO output `heater` restarted with its new settings"),
        "{}",
        gw.log()
    );
    // Its commands follow it to the new pin.
    publish(gw.port(), "cmd/heater", "on", 1);
    assert!(
        wait_until(Duration::from_secs(10), || sets(&gw, "GPIO22") == [0, 0, 1]),
        "{:?}",
        sets(&gw, "GPIO22")
    );
}
