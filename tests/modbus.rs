//! Modbus end to end: the built binary polls a slave that is not our code (pymodbus, PyPI) over
//! real pseudo-terminals (socat) and over TCP on 127.0.0.1, with a mosquitto upstream. Faults
//! are injected by `tests/interop/pty_relay.py` between two pseudo-terminal pairs.
//!
//! pymodbus is installed on first use (as tests/ci.sh does) when `python3 -c "import pymodbus"`
//! fails.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SLAVE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/modbus_slave.py");
const RELAY_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/pty_relay.py");
/// The version the tests were written against (its SimDevice datastore is recent).
const PYMODBUS: &str = "pymodbus==3.16.1";

fn ensure_pymodbus() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let has = |cmd: &mut Command| {
            run_with_timeout(cmd.stdout(Stdio::null()), Duration::from_secs(300))
                .status
                .success()
        };
        if has(Command::new("python3").args(["-c", "import pymodbus, serial"])) {
            return;
        }
        // A Debian system Python refuses pip installs (PEP 668) unless told.
        let ok =
            has(Command::new("python3").args(["-m", "pip", "install", "-q", PYMODBUS, "pyserial"]))
                || has(Command::new("python3").args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--break-system-packages",
                    PYMODBUS,
                    "pyserial",
                ]));
        assert!(ok, "could not install {PYMODBUS} with pip");
    });
}

/// A Python helper (the pymodbus slave or the relay) that prints "ready"; killed on drop.
struct Helper {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Helper {
    fn start(script: &str, args: &[&str]) -> Helper {
        ensure_pymodbus();
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning python3");
        let out = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let o = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut o = o.lock().unwrap_or_else(|e| e.into_inner());
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let h = Helper { child, out };
        assert!(
            wait_until(Duration::from_secs(30), || h.output().contains("ready\n")),
            "{script} {args:?} did not start:\n{}",
            h.output()
        );
        h
    }

    fn output(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(5));
    }
}

fn rtu_slave(device: &Path) -> Helper {
    Helper::start(SLAVE_PY, &["--rtu", &device.display().to_string()])
}

/// A gateway forwarding `sensors/#` upstream with metrics on `mport` and `extra` appended.
fn start(up: &Mosquitto, mport: u16, extra: &str) -> Gateway {
    retry_on_port_clash(5, || {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut yaml = gateway_yaml(&dir, free_port(), Some(&up.url()), "", "");
        yaml.push_str(&format!(
            "metrics:\n  enabled: true\n  listen: 127.0.0.1:{mport}\n"
        ));
        yaml.push_str(extra);
        let gw = Gateway::try_start_with(&dir, &yaml)?;
        // The temp dir must outlive the gateway.
        std::mem::forget(tmp);
        Ok(gw)
    })
}

fn payloads(msgs: &[Msg], topic: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| serde_json::from_str(p).unwrap_or(Value::String(p.clone())))
        .collect()
}

fn metrics(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// A sample's value in Prometheus text (`name{labels}` as printed), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn requests(bus: &str, slave: &str, result: &str) -> String {
    format!("edgegate_modbus_requests_total{{bus=\"{bus}\",slave=\"{slave}\",result=\"{result}\"}}")
}

/// `edgegate status --json`.
fn status(gw: &Gateway) -> Value {
    let sock = gw.dir().join("status.sock").display().to_string();
    let out = run_bin(
        gw.dir(),
        &["status", "--json", "--socket", &sock],
        Duration::from_secs(20),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn sensor_errors(st: &Value, name: &str) -> Value {
    st["sensors"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|s| s["kind"] == "modbus" && s["name"] == name)
        })
        .map(|s| s["errors"].clone())
        .unwrap_or(Value::Null)
}

const ORDERS: [&str; 4] = ["ABCD", "CDAB", "BADC", "DCBA"];

/// The `types` slave (unit 1, one object per poll) and the `meter` (unit 2), as
/// tests/interop/modbus_slave.py holds them; `bus` is the YAML of the bus without its slaves.
fn types_and_meter(bus: &str) -> String {
    let mut points = String::from(
        "            - {name: u16, function: holding_register, address: 0}\n            - {name: i16, function: holding_register, address: 1, type: i16}\n            - {name: c0, function: coil, address: 0}\n            - {name: c1, function: coil, address: 1}\n            - {name: c2, function: coil, address: 2}\n            - {name: d0, function: discrete_input, address: 0}\n            - {name: volts, function: input_register, address: 0, scale: 0.1}\n            - {name: temp, function: input_register, address: 1, type: i16, scale: 0.1, offset: 40}\n            - {name: milli, function: input_register, address: 2, scale: 0.001}\n",
    );
    for (k, order) in ORDERS.iter().enumerate() {
        let base = 10 + 30 * k;
        for (ty, off, extra) in [
            ("u32", 0, ""),
            ("i32", 2, ""),
            ("f32", 4, ""),
            ("u64", 6, ""),
            ("i64", 10, ""),
            ("f64", 14, ""),
            ("i16", 18, ""),
            ("string", 19, ", count: 3"),
        ] {
            points.push_str(&format!(
                "            - {{name: {ty}_{o}, function: holding_register, address: {a}, type: {ty}, order: {order}{extra}}}\n",
                o = order.to_lowercase(),
                a = base + off
            ));
        }
    }
    format!(
        "modbus:\n  buses:\n{bus}      slaves:\n        - name: types\n          unit: 1\n          interval: 300ms\n          timeout: 300ms\n          max_gap: 10\n          publish: per_slave\n          points:\n{points}        - name: meter\n          unit: 2\n          interval: 300ms\n          timeout: 300ms\n          points:\n            - {{name: volts, function: input_register, address: 0, scale: 0.1, unit: V}}\n            - {{name: setpoint, function: holding_register, address: 0, type: i16, scale: 0.1, unit: \"°C\", writable: true, min: 5, max: 30}}\n            - {{name: relay, function: coil, address: 0, writable: true}}\n            - {{name: far, function: holding_register, address: 150}}\n"
    )
}

/// Every value of the `types` object, against what the pymodbus slave holds.
fn assert_types(doc: &Value) {
    assert_eq!(doc["u16"], 54321, "{doc}");
    assert_eq!(doc["i16"], -1234, "{doc}");
    assert_eq!(doc["c0"], true, "{doc}");
    assert_eq!(doc["c1"], false, "{doc}");
    assert_eq!(doc["c2"], true, "{doc}");
    assert_eq!(doc["d0"], true, "{doc}");
    assert_eq!(doc["volts"], 230.1, "{doc}");
    assert_eq!(doc["temp"], -0.5, "{doc}");
    assert_eq!(doc["milli"], 1.234, "{doc}");
    for order in ORDERS {
        let o = order.to_lowercase();
        let v = |ty: &str| doc[format!("{ty}_{o}")].clone();
        assert_eq!(v("u32"), 3_000_000_000u64, "{order}: {doc}");
        assert_eq!(v("i32"), -123_456_789, "{order}: {doc}");
        assert_eq!(v("f32"), 230.1, "{order}: {doc}");
        assert_eq!(v("u64"), 12_345_678_901_234_567_890u64, "{order}: {doc}");
        assert_eq!(v("i64"), -1_234_567_890_123i64, "{order}: {doc}");
        assert_eq!(v("f64"), -0.000123, "{order}: {doc}");
        assert_eq!(v("i16"), -2, "{order}: {doc}");
        assert_eq!(v("string"), "AB12c", "{order}: {doc}");
    }
    assert!(
        doc["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{doc}"
    );
}

/// Reads every type and order, the meter's scaled per-point reading, then writes the set point
/// and the relay from downlink commands and refuses an out-of-range one.
fn read_everything_then_write_from_commands(
    up: &Mosquitto,
    upstream: &Subscriber,
    gw: &Gateway,
    mport: u16,
) {
    let msgs = upstream.wait_for(2, Duration::from_secs(20));
    let types = payloads(&msgs, "sensors/line/types");
    assert!(!types.is_empty(), "no types object: {msgs:?}\n{}", gw.log());
    assert_types(&types[0]);
    let volts = payloads(&msgs, "sensors/line/meter/volts");
    assert!(!volts.is_empty(), "{msgs:?}");
    assert_eq!(volts[0]["value"], 230.1);
    assert_eq!(volts[0]["unit"], "V");
    let setpoint = payloads(&msgs, "sensors/line/meter/setpoint");
    assert_eq!(
        setpoint.first().map(|v| v["value"].clone()),
        Some(21.5.into()),
        "{msgs:?}"
    );

    // cloud → downlink → cmd/line/meter/setpoint → write → read back → state topic. The
    // downlink subscription may not be up yet: repeat the (idempotent) command, bounded.
    let confirmed = |value: Value| {
        move |s: &Subscriber| {
            payloads(&s.messages(), "sensors/line/meter/setpoint")
                .iter()
                .any(|v| v["value"] == value)
        }
    };
    let written = wait_until(Duration::from_secs(20), || {
        publish(
            up.port(),
            "edgegate/test/cmd/line/meter/setpoint",
            "22.5",
            1,
        );
        wait_until(Duration::from_millis(700), || {
            confirmed(22.5.into())(upstream)
        })
    });
    assert!(written, "set point not written:\n{}", gw.log());
    publish(up.port(), "edgegate/test/cmd/line/meter/relay", "on", 1);
    assert!(
        wait_until(Duration::from_secs(10), || payloads(
            &upstream.messages(),
            "sensors/line/meter/relay"
        )
        .iter()
        .any(|v| v["value"] == true)),
        "relay not switched: {:?}\n{}",
        upstream.messages(),
        gw.log()
    );
    publish(up.port(), "edgegate/test/cmd/line/meter/setpoint", "31", 1);
    assert!(
        wait_until(Duration::from_secs(10), || !payloads(
            &upstream.messages(),
            "sensors/line/meter/setpoint/refused"
        )
        .is_empty()),
        "out-of-range command not answered:\n{}",
        gw.log()
    );
    let refused = payloads(&upstream.messages(), "sensors/line/meter/setpoint/refused");
    assert_eq!(refused[0]["result"], "refused", "{refused:?}");
    // A retained command is carried out when it arrives, but never again when the bus
    // restarts (a reload that changes the bus reopens it; the retained command stays on the
    // broker, and a stage that subscribes again gets it back and ignores it).
    let out = publish_with(
        gw.port(),
        "cmd/line/meter/setpoint",
        "10",
        true,
        &ClientOpts::qos(1),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        wait_until(Duration::from_secs(10), || confirmed(10.0.into())(upstream)),
        "live retained command not written:\n{}",
        gw.log()
    );
    let mark = upstream.count();
    publish(
        up.port(),
        "edgegate/test/cmd/line/meter/setpoint",
        "22.5",
        1,
    );
    assert!(
        wait_until(Duration::from_secs(10), || payloads(
            &upstream.messages()[mark..],
            "sensors/line/meter/setpoint"
        )
        .iter()
        .any(|v| v["value"] == 22.5)),
        "{}",
        gw.log()
    );
    let yaml = std::fs::read_to_string(gw.config_path()).expect("config");
    std::fs::write(
        gw.config_path(),
        yaml.replacen("interval: 300ms", "interval: 250ms", 1),
    )
    .expect("config");
    let pid = gw.pid().expect("running");
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .log()
            .contains("Modbus bus `line` restarted with its new settings")),
        "the bus was not reopened by the reload:\n{}",
        gw.log()
    );
    let mark = upstream.count();
    assert!(wait_until(Duration::from_secs(10), || payloads(
        &upstream.messages()[mark..],
        "sensors/line/meter/setpoint"
    )
    .len()
        >= 3));
    let after = payloads(&upstream.messages()[mark..], "sensors/line/meter/setpoint");
    assert!(
        after.iter().all(|v| v["value"] == 22.5),
        "written again on reload: {after:?}"
    );

    let m = metrics(mport);
    let cmd = |point: &str, result: &str| {
        sample(
            &m,
            &format!("edgegate_modbus_commands_total{{bus=\"line\",slave=\"meter\",point=\"{point}\",result=\"{result}\"}}"),
        )
    };
    assert!(cmd("setpoint", "ok") >= 1.0, "{m}");
    assert_eq!(cmd("setpoint", "refused"), 1.0, "{m}");
    assert!(cmd("relay", "ok") >= 1.0, "{m}");
    assert!(sample(&m, &requests("line", "types", "ok")) >= 1.0, "{m}");
}

#[test]
fn rtu_reads_every_type_and_order_from_a_pymodbus_slave_and_writes_from_downlink_commands() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pty = PtyPair::start(dir.path(), "line");
    let _slave = rtu_slave(&pty.device);
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let mport = free_port();
    let gw = start(
        &up,
        mport,
        &types_and_meter(&format!(
            "    - name: line\n      path: {}\n      baud: 19200\n      parity: none\n",
            pty.port.display()
        )),
    );
    read_everything_then_write_from_commands(&up, &upstream, &gw, mport);
}

#[test]
fn tcp_reads_every_type_and_order_from_a_pymodbus_server_and_writes_from_downlink_commands() {
    let port = free_port();
    let _server = Helper::start(SLAVE_PY, &["--tcp", &port.to_string(), "--mute", "3"]);
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let mport = free_port();
    let mut yaml = types_and_meter(&format!("    - name: line\n      tcp: 127.0.0.1:{port}\n"));
    // A unit whose answers the server does not send: timeouts.
    yaml.push_str("        - {name: ghost, unit: 3, interval: 300ms, timeout: 200ms, retries: 0, points: [{name: x, function: holding_register, address: 0}]}\n");
    let gw = start(&up, mport, &yaml);
    read_everything_then_write_from_commands(&up, &upstream, &gw, mport);
    let m = metrics(mport);
    assert!(
        sample(&m, &requests("line", "ghost", "timeout")) >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, &requests("line", "meter", "illegal_data_address")) >= 1.0,
        "{m}"
    );
}

#[test]
fn rtu_faults_are_counted_per_slave_and_point_and_a_silent_slave_does_not_stop_the_others() {
    let dir = tempfile::tempdir().expect("temp dir");
    // gateway ── pair a ── relay ── pair b ── pymodbus
    let a = PtyPair::start(dir.path(), "a");
    let b = PtyPair::start(dir.path(), "b");
    let control: PathBuf = dir.path().join("faults");
    std::fs::write(&control, "").expect("control file");
    let _slave = rtu_slave(&b.device);
    let relay = Helper::start(
        RELAY_PY,
        &[
            "--gateway",
            &a.device.display().to_string(),
            "--slave",
            &b.port.display().to_string(),
            "--control",
            &control.display().to_string(),
        ],
    );
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let mport = free_port();
    let yaml = format!(
        "modbus:\n  buses:\n    - name: line\n      path: {}\n      parity: none\n      slaves:\n        - {{name: meter, unit: 2, interval: 200ms, timeout: 200ms, points: [{{name: volts, function: input_register, address: 0, scale: 0.1}}, {{name: far, function: holding_register, address: 150}}]}}\n        - {{name: spare, unit: 3, interval: 200ms, timeout: 200ms, retries: 1, points: [{{name: x, function: holding_register, address: 0}}]}}\n",
        a.port.display()
    );
    let gw = start(&up, mport, &yaml);
    let count = |topic: &str| payloads(&upstream.messages(), topic).len();
    assert!(
        wait_until(Duration::from_secs(20), || count("sensors/line/spare/x")
            >= 1
            && count("sensors/line/meter/volts") >= 1),
        "no readings: {:?}\n{}",
        upstream.messages(),
        gw.log()
    );
    assert_eq!(
        payloads(&upstream.messages(), "sensors/line/spare/x")[0]["value"],
        7
    );

    // The spare stops answering: timeouts counted for it, the meter keeps being read.
    std::fs::write(&control, "mute 3\n").expect("control file");
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("Modbus slave not answering")),
        "{}\n{}",
        gw.log(),
        relay.output()
    );
    let meter_then = count("sensors/line/meter/volts");
    let spare_then = count("sensors/line/spare/x");
    assert!(
        wait_until(Duration::from_secs(10), || count(
            "sensors/line/meter/volts"
        ) >= meter_then + 5),
        "the meter stopped with the spare:\n{}",
        gw.log()
    );
    assert!(count("sensors/line/spare/x") <= spare_then + 1);
    let m = metrics(mport);
    assert!(
        sample(&m, &requests("line", "spare", "timeout")) >= 2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, &requests("line", "meter", "timeout")),
        0.0,
        "{m}"
    );
    assert!(
        sensor_errors(&status(&gw), "line/spare")["timeout"].as_u64() >= Some(2),
        "{:#}",
        status(&gw)
    );

    // Answers with a broken CRC: counted as `crc`, never published.
    std::fs::write(&control, "corrupt 3\n").expect("control file");
    assert!(
        wait_until(Duration::from_secs(10), || sample(
            &metrics(mport),
            &requests("line", "spare", "crc")
        ) >= 2.0),
        "{}\n{}",
        gw.log(),
        relay.output()
    );
    let spare_corrupt = count("sensors/line/spare/x");

    // Back to normal: the spare answers again.
    std::fs::write(&control, "").expect("control file");
    assert!(
        wait_until(Duration::from_secs(10), || count("sensors/line/spare/x")
            > spare_corrupt),
        "{}",
        gw.log()
    );
    assert!(
        gw.log().contains("Modbus slave answers again"),
        "{}",
        gw.log()
    );
    let m = metrics(mport);
    assert!(
        sample(&m, &requests("line", "meter", "illegal_data_address")) >= 1.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "edgegate_modbus_point_errors_total{bus=\"line\",slave=\"meter\",point=\"far\",reason=\"illegal_data_address\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "edgegate_modbus_point_errors_total{bus=\"line\",slave=\"spare\",point=\"x\",reason=\"crc\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "edgegate_messages_in_total{source=\"modbus\"}") >= 1.0,
        "{m}"
    );
}

#[test]
fn the_rtu_port_is_reopened_after_an_unplug_and_polling_resumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut pty = PtyPair::start(dir.path(), "usb");
    let slave = rtu_slave(&pty.device);
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let yaml = format!(
        "modbus:\n  buses:\n    - name: usb\n      path: {}\n      parity: none\n      reopen_min: 100ms\n      reopen_max: 500ms\n      slaves:\n        - {{name: spare, unit: 3, interval: 200ms, timeout: 200ms, points: [{{name: x, function: holding_register, address: 0}}]}}\n",
        pty.port.display()
    );
    let gw = start(&up, free_port(), &yaml);
    let count = || payloads(&upstream.messages(), "sensors/usb/spare/x").len();
    assert!(
        wait_until(Duration::from_secs(20), || count() >= 1),
        "{}",
        gw.log()
    );
    drop(slave);
    pty.close();
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("Modbus bus lost")),
        "{}",
        gw.log()
    );
    pty.reopen();
    let _slave = rtu_slave(&pty.device);
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .log()
            .contains("Modbus bus reopened")),
        "{}",
        gw.log()
    );
    let before = count();
    assert!(
        wait_until(Duration::from_secs(15), || count() > before),
        "{}",
        gw.log()
    );
    assert_eq!(
        gw.log().matches("Modbus bus lost").count(),
        1,
        "{}",
        gw.log()
    );
}

#[test]
fn check_config_explains_a_bad_register_map_with_file_and_line_and_exits_78() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("edgegate.yaml");
    std::fs::write(
        &file,
        "gateway: {id: t}\nmodbus:\n  buses:\n    - name: line\n      path: /dev/ttyUSB0\n      slaves:\n        - name: meter\n          unit: 248\n          points:\n            - {name: v, function: input_register, address: 0, type: f32}\n            - {name: a, function: input_register, address: 1}\n            - name: sp\n              function: input_register\n              address: 10\n              writable: true\n            - {name: s, function: holding_register, address: 20, type: string, scale: 2}\n",
    )
    .expect("write");
    let out = run_bin(
        dir.path(),
        &["check-config", &file.display().to_string()],
        Duration::from_secs(20),
    );
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(78), "{text}");
    let f = file.display();
    for (line, field, says) in [
        (8, "slaves[0].unit", "unit ids are 1 to 247"),
        (11, "slaves[0].points[1].address", "overlaps point `v`"),
        (15, "slaves[0].points[2].writable", "read-only in Modbus"),
        (16, "slaves[0].points[3].count", "a string needs `count`"),
        (16, "slaves[0].points[3].scale", "a string is not scaled"),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{f}:{line}:"))
                && l.contains(&format!("modbus.buses[0].{field}"))
                && l.contains(says)),
            "no `{f}:{line}: …{field}: …{says}` in:\n{text}"
        );
    }
}
