//! The service contract with systemd, without systemd: the test plays the notify socket
//! (`NOTIFY_SOCKET`, a real unix datagram socket) and checks what the built binary tells it.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Collects every datagram sent to the socket until `until` matches one or the time is up.
fn collect(sock: &UnixDatagram, timeout: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&msg);
                got.push(msg);
                if done {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    got
}

/// One QoS 1 publish (CONNECT, PUBLISH, PUBACK) through each listener, the four at once, each a
/// single attempt: `mosquitto_pub` on plain 3.1.1, plain 5 and TLS, paho-mqtt on WebSocket.
/// Returns a line per listener that failed.
fn serve_once_on_every_listener(
    port: u16,
    v5_port: u16,
    tls_port: u16,
    ws_port: u16,
    certs: &certs::Certs,
) -> Vec<String> {
    let pubs = |p: u16, extra: &[&str]| {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", "localhost", "-p", &p.to_string()])
            .args(["-t", "ready/check", "-m", "up", "-q", "1"])
            .args(extra);
        cmd
    };
    let tls_args = [
        "--cafile",
        &certs.ca_cert.display().to_string(),
        "--cert",
        &certs.client_cert.display().to_string(),
        "--key",
        &certs.client_key.display().to_string(),
    ]
    .map(String::from);
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let script = format!(
        "import paho.mqtt.client as m\nfrom paho.mqtt.enums import CallbackAPIVersion as V\n\
         c = m.Client(V.VERSION2, client_id='ready-ws', transport='websockets')\n\
         c.connect('127.0.0.1', {ws_port}, 30)\nc.loop_start()\n\
         i = c.publish('ready/check', 'up', qos=1)\ni.wait_for_publish(5)\n\
         assert i.is_published()\nc.disconnect()\nc.loop_stop()\n"
    );
    let mut ws = Command::new("python3");
    ws.args(["-c", &script]);
    let checks = vec![
        (format!("plain {port}"), pubs(port, &["-V", "mqttv311"])),
        (format!("v5 {v5_port}"), pubs(v5_port, &["-V", "mqttv5"])),
        (format!("TLS {tls_port}"), pubs(tls_port, &tls_args)),
        (format!("WebSocket {ws_port}"), ws),
    ];
    let runs: Vec<_> = checks
        .into_iter()
        .map(|(name, mut cmd)| {
            std::thread::spawn(move || (name, run_with_timeout(&mut cmd, Duration::from_secs(15))))
        })
        .collect();
    runs.into_iter()
        .map(|t| t.join().expect("a listener check panicked"))
        .filter(|(_, out)| !out.status.success())
        .map(|(name, out)| format!("{name}: {}", output_text(&out)))
        .collect()
}

#[test]
fn the_gateway_reports_ready_status_watchdog_and_stopping_to_systemd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");

    let certs = certs::generate(dir.path());
    let port = free_port();
    let (v5_port, tls_port, ws_port) = (free_port(), free_port(), free_port());
    let dead = free_port(); // nothing listens: the uplink stays down, which STATUS must say
    let config = dir.path().join("gw.yaml");
    std::fs::write(
        &config,
        format!(
            "gateway:\n  id: sd\n  shutdown_timeout: 3s\nbroker:\n  listen: 127.0.0.1:{port}\n  listen_v5: 127.0.0.1:{v5_port}\n  tls: {{listen: 127.0.0.1:{tls_port}, cert_file: {}, key_file: {}, client_ca_file: {}}}\n  websocket: {{listen: 127.0.0.1:{ws_port}}}\nstore:\n  path: {}/buffer.db\nuplink:\n  url: mqtt://127.0.0.1:{dead}\n  forward:\n    - local: \"sensors/#\"\n",
            certs.server_cert.display(),
            certs.server_key.display(),
            certs.ca_cert.display(),
            dir.path().display()
        ),
    )
    .expect("write config");

    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        // A 2 s watchdog: the gateway must ping at least every second.
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn edgegate");

    let before_ready = collect(&sock, Duration::from_secs(15), |m| m.contains("READY=1"));
    let ready = before_ready
        .iter()
        .find(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 within 15 s; got {before_ready:?}"));
    assert!(
        ready.contains("STATUS="),
        "READY=1 should come with a STATUS line: {ready:?}"
    );
    // At that moment every listener serves a device: one attempt each, all at once, no retry.
    let failed = serve_once_on_every_listener(port, v5_port, tls_port, ws_port, &certs);
    assert!(
        failed.is_empty(),
        "READY=1 was sent before these listeners served a device:\n{}",
        failed.join("\n")
    );

    // While running: watchdog pings and a status line naming the link state and the backlog.
    let running = collect(&sock, Duration::from_secs(4), |_| false);
    assert!(
        running.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2,
        "expected watchdog pings every second or so; got {running:?}"
    );
    let status = running
        .iter()
        .rev()
        .find(|m| m.contains("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS update; got {running:?}"));
    assert!(
        status.contains("link down") && status.contains("queued"),
        "STATUS should say the link is down and how much is queued: {status:?}"
    );

    // SIGTERM: STOPPING=1, then exit 0.
    let pid = child.id() as i32;
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    let stopping = collect(&sock, Duration::from_secs(5), |m| m.contains("STOPPING=1"));
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1 after SIGTERM; got {stopping:?}"
    );
    let status = wait_child(&mut child, Duration::from_secs(10)).expect("exit within 10 s");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}
