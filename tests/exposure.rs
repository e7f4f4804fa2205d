//! Who may reach the broker without a password (`broker.allow_anonymous`, `broker.anonymous`):
//! the shipped config, run in a network namespace this test creates, refuses anonymous clients
//! that come from a network address and admits them from loopback, and a configured user logs in
//! from the network; anonymous clients keep to their ACL.
//!
//! The check-config warnings about exposed brokers and outputs are in tests/check_config.rs.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A network namespace of our own with a veth pair: `10.77.<n>.1` on one end is an address of
/// this namespace that is not loopback, so a client connecting to it arrives from it. Nothing in
/// it reaches the machine's networks. Deleted on drop.
struct Netns {
    name: String,
    addr: String,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = std::process::id() % 250 + 1;
        let name = format!("edgegate-test-{}-{k}", std::process::id());
        let ns = Netns {
            name: name.clone(),
            addr: format!("10.77.{n}.1"),
        };
        let steps: [&[&str]; 6] = [
            &["netns", "add", &name],
            &["-n", &name, "link", "set", "lo", "up"],
            &[
                "-n", &name, "link", "add", "eg0", "type", "veth", "peer", "name", "eg1",
            ],
            &[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", ns.addr),
                "dev",
                "eg0",
            ],
            &["-n", &name, "link", "set", "eg0", "up"],
            &["-n", &name, "link", "set", "eg1", "up"],
        ];
        for args in steps {
            let out = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(10));
            if !out.status.success() {
                return Err(format!("ip {}: {}", args.join(" "), output_text(&out)));
            }
        }
        Ok(ns)
    }

    /// `program args…` inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `mosquitto_pub` inside the namespace to `host:1883`, one QoS 1 message.
    fn publish(&self, host: &str, topic: &str, extra: &[&str]) -> Output {
        let mut c = self.command("mosquitto_pub");
        c.args(["-h", host, "-p", "1883", "-q", "1", "-t", topic, "-m", "x"])
            .args(extra);
        run_with_timeout(&mut c, Duration::from_secs(10))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `config/edgegate.yaml` as shipped, with only its paths moved into `dir` (the store and the
/// status socket) and `users` replaced by `users`.
fn shipped_config(dir: &Path, users: &str) -> String {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/edgegate.yaml"))
            .expect("reading config/edgegate.yaml");
    let mut yaml = String::new();
    for line in shipped.lines() {
        let line = match line {
            "  path: /var/lib/edgegate/buffer.db" => {
                format!("  path: {}", dir.join("buffer.db").display())
            }
            "  socket: /run/edgegate/status.sock" => {
                format!("  socket: {}", dir.join("status.sock").display())
            }
            "  users: []" => users.to_string(),
            other => other.to_string(),
        };
        yaml.push_str(&line);
        yaml.push('\n');
    }
    for moved in ["/var/lib/edgegate/buffer.db", "/run/edgegate/status.sock"] {
        let setting = |l: &&str| !l.trim_start().starts_with('#') && l.contains(moved);
        assert!(
            !yaml.lines().any(|l| setting(&l)),
            "the shipped config's {moved} moved: update this test"
        );
    }
    yaml
}

/// `edgegate run` on `yaml` inside `ns`, logging to `dir/edgegate.log`; returns once it is ready.
fn start_in(ns: &Netns, dir: &Path, yaml: &str) -> std::process::Child {
    let config = dir.join("edgegate.yaml");
    std::fs::write(&config, yaml).expect("writing the config");
    let log = dir.join("edgegate.log");
    let out = std::fs::File::create(&log).expect("creating the log");
    let mut child = ns
        .command(env!("CARGO_BIN_EXE_edgegate"))
        .args(["run", "--config", &config.display().to_string()])
        .current_dir(dir)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("cloning the log handle"))
        .stderr(out)
        .spawn()
        .expect("spawning edgegate in the namespace");
    let ready = wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" ready"))
    });
    if !ready {
        let _ = child.kill();
        panic!(
            "edgegate did not become ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    child
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_shipped_config_refuses_anonymous_clients_from_the_network_and_admits_loopback_and_users() {
    const TEST: &str = "exposure::the_shipped_config_refuses_anonymous_clients_from_the_network";
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => return skip(TEST, &format!("no network namespace: {why}")),
    };
    let dir = tempfile::tempdir().expect("creating a temp dir");

    // As shipped: 0.0.0.0:1883 with allow_anonymous: loopback and no users.
    let gw = start_in(&ns, dir.path(), &shipped_config(dir.path(), "  users: []"));
    for version in ["mqttv311", "mqttv5"] {
        let out = ns.publish(&ns.addr, "sensors/a/temp", &["-V", version]);
        let text = output_text(&out);
        assert!(
            !out.status.success() && text.to_lowercase().contains("not authori"),
            "{version}: an anonymous client from {} was not refused as not authorized:\n{text}",
            ns.addr
        );
        let out = ns.publish("127.0.0.1", "sensors/a/temp", &["-V", version]);
        assert!(
            out.status.success(),
            "{version}: an anonymous client on loopback was refused:\n{}",
            output_text(&out)
        );
    }
    let log = std::fs::read_to_string(dir.path().join("edgegate.log")).unwrap_or_default();
    assert!(
        log.contains("a client without a user name was refused")
            && log.contains(&format!("peer={}", ns.addr)),
        "the journal does not say who was refused and why:\n{log}"
    );
    assert!(
        !log.contains("warning:"),
        "the shipped config started with a warning:\n{log}"
    );
    let config = dir.path().join("edgegate.yaml").display().to_string();
    let out = run_bin(
        dir.path(),
        &["status", "--json", "--config", &config],
        Duration::from_secs(20),
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        status["front"]["refused"]["anonymous"].as_u64(),
        Some(2),
        "status does not count the two refusals: {}",
        output_text(&out)
    );
    stop(gw);

    // With a user (a password file, as the config's comments show), that user logs in from the
    // network; a wrong password and no user name are still refused.
    let secret = dir.path().join("sensor-hub");
    std::fs::write(&secret, "s3cret-hub\n").expect("writing the password file");
    let users = format!(
        "  users:\n    - username: sensor-hub\n      password_file: {}",
        secret.display()
    );
    let gw = start_in(&ns, dir.path(), &shipped_config(dir.path(), &users));
    let sub_out = dir.path().join("sub.txt");
    let sub = ns
        .command("mosquitto_sub")
        .args([
            "-h",
            &ns.addr,
            "-p",
            "1883",
            "-q",
            "1",
            "-t",
            "sensors/#",
            "-C",
            "1",
        ])
        .args(["-u", "sensor-hub", "-P", "s3cret-hub", "-W", "15"])
        .stdout(std::fs::File::create(&sub_out).expect("creating the subscriber's output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning mosquitto_sub");
    let login = ["-u", "sensor-hub", "-P", "s3cret-hub"];
    // The subscriber may not be subscribed yet when the first publish arrives: publish until it
    // has one message (bounded).
    let mut delivered = false;
    for _ in 0..50 {
        let out = ns.publish(&ns.addr, "sensors/hub/temp", &login);
        assert!(
            out.status.success(),
            "the configured user was refused from the network:\n{}",
            output_text(&out)
        );
        if std::fs::read_to_string(&sub_out).is_ok_and(|s| s.contains('x')) {
            delivered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut sub = sub;
    let _ = sub.kill();
    let _ = sub.wait();
    assert!(
        delivered,
        "the user's message never reached the user's subscription"
    );
    let wrong = ns.publish(
        &ns.addr,
        "sensors/hub/temp",
        &["-u", "sensor-hub", "-P", "nope"],
    );
    assert!(!wrong.status.success(), "a wrong password was accepted");
    let anon = ns.publish(&ns.addr, "sensors/hub/temp", &[]);
    assert!(
        !anon.status.success() && output_text(&anon).to_lowercase().contains("not authori"),
        "with users configured, an anonymous network client was not refused:\n{}",
        output_text(&anon)
    );
    stop(gw);
}

#[test]
fn anonymous_clients_may_publish_only_where_broker_anonymous_allows() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let gw = retry_on_port_clash(3, || {
        let yaml = format!(
            "gateway:\n  id: test\n  shutdown_timeout: 3s\nbroker:\n  listen: 127.0.0.1:{}\n  allow_anonymous: loopback\n  anonymous:\n    publish: [\"sensors/#\"]\nstore:\n  path: {}\n",
            free_port(),
            dir.path().join("buffer.db").display()
        );
        Gateway::try_start_with(dir.path(), &yaml)
    });
    let port = gw.port().to_string();
    let pub_to = |topic: &str| {
        run_with_timeout(
            Command::new("mosquitto_pub").args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                "on",
                "-V",
                "mqttv5",
            ]),
            Duration::from_secs(10),
        )
    };
    let ok = pub_to("sensors/local/temp");
    assert!(
        ok.status.success(),
        "allowed topic refused:\n{}",
        output_text(&ok)
    );
    let denied = pub_to("cmd/pump");
    assert!(
        !denied.status.success(),
        "an anonymous client published to cmd/pump, outside broker.anonymous.publish:\n{}",
        output_text(&denied)
    );
    let status = gw.status_json();
    assert_eq!(
        status["front"]["refused"]["not_authorized"].as_u64(),
        Some(1),
        "the denial is not counted once: {status}"
    );
}

#[test]
fn a_broker_open_to_the_network_says_so_in_the_journal_at_start() {
    const TEST: &str = "exposure::a_broker_open_to_the_network_says_so_in_the_journal_at_start";
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => return skip(TEST, &format!("no network namespace: {why}")),
    };
    let dir = tempfile::tempdir().expect("creating a temp dir");
    // A 0.1-style config: a network listener, no users, no allow_anonymous. It still runs (an
    // upgrade keeps an edited config working) and admits the network, but says so.
    let yaml = format!(
        "gateway:\n  id: test\nbroker:\n  listen: 0.0.0.0:1883\ngpio:\n  backend: sim\n  outputs:\n    - name: pump\n      pin: GPIO27\nstatus:\n  socket: {}\nstore:\n  path: {}\n",
        dir.path().join("status.sock").display(),
        dir.path().join("buffer.db").display()
    );
    let gw = start_in(&ns, dir.path(), &yaml);
    let out = ns.publish(&ns.addr, "sensors/a/temp", &[]);
    let log = std::fs::read_to_string(dir.path().join("edgegate.log")).unwrap_or_default();
    stop(gw);
    assert!(
        out.status.success(),
        "a 0.1 config no longer admits its devices:\n{}",
        output_text(&out)
    );
    for want in [
        "edgegate.yaml:4: warning: broker.listen: anyone who can reach 0.0.0.0:1883",
        "warning: gpio.outputs[0].command_topic: GPIO output `pump` obeys `cmd/pump`",
    ] {
        assert!(log.contains(want), "no `{want}` in the log:\n{log}");
    }
}
