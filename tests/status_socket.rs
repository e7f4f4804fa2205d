//! `edgegate status` finds a gateway started the way the README's run command starts it: from a
//! shell, with a config that does not name a status socket and a store path relative to the
//! working directory.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, BIN};

#[test]
fn status_answers_for_a_gateway_run_from_a_shell_on_a_config_without_a_status_socket() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let port = free_port();
    let up = free_port();
    let cfg = dir.path().join("gw.yaml");
    std::fs::write(
        &cfg,
        format!(
            "gateway: {{id: shell-gw, shutdown_timeout: 3s}}\nbroker: {{listen: '127.0.0.1:{port}'}}\nstore: {{path: data/buffer.db}}\nuplink:\n  url: mqtt://127.0.0.1:{up}\n  forward: [{{local: 'sensors/#'}}]\n"
        ),
    )
    .expect("the config is written");
    let mut gw = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the gateway starts");
    let status = || {
        Command::new(BIN)
            .args(["status", "--config"])
            .arg(&cfg)
            .current_dir(dir.path())
            .output()
            .expect("status runs")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = status();
    while !out.status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        out = status();
    }
    let _ = gw.kill();
    let _ = gw.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status exit {:?}: {}{}",
        out.status.code(),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("gateway shell-gw"), "{text}");
    // Outside systemd (no /run/edgegate here) the socket is beside the store.
    if !std::path::Path::new("/run/edgegate").exists() {
        assert!(dir.path().join("data/edgegate-status.sock").exists());
    }
}
