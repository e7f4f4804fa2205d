//! `edgegate check-config`: the shipped configs pass; broken ones exit 78 naming line and field.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn check(dir: &Path, config: &Path) -> (Option<i32>, String) {
    let out = run_bin(
        dir,
        &["check-config", "--config", &config.display().to_string()],
        Duration::from_secs(20),
    );
    (out.status.code(), output_text(&out))
}

/// Writes `yaml` to a temp file and runs check-config on it.
fn check_yaml(yaml: &str) -> (Option<i32>, String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).expect("writing the config");
    let (code, text) = check(dir.path(), &path);
    (code, text, path, dir)
}

/// The message must point at `file:line:` (the column follows) and name the field path.
fn assert_names_line_and_field(text: &str, file: &Path, line: usize, fields: &[&str]) {
    let at = format!("{}:{line}:", file.display());
    assert!(text.contains(&at), "message does not name `{at}`:\n{text}");
    assert!(
        fields.iter().any(|f| text.contains(f)),
        "message names none of {fields:?}:\n{text}"
    );
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files = vec![root.join("edgegate.yaml"), root.join("dev.yaml")];
    if let Ok(entries) = std::fs::read_dir(root.join("examples")) {
        let mut examples: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        examples.sort();
        files.extend(examples);
    }
    files
}

#[test]
fn every_shipped_config_passes_check_config() {
    let files = shipped_configs();
    let mut failures = Vec::new();
    for file in &files {
        assert!(
            file.exists(),
            "shipped config {} is missing",
            file.display()
        );
        let dir = file.parent().expect("a config file has a parent dir");
        // Examples are written for other machines (their certificates and secrets are not
        // here): --offline checks everything else.
        let (code, text) = if dir.ends_with("examples") {
            let out = run_bin(
                dir,
                &["check-config", "--offline", &file.display().to_string()],
                Duration::from_secs(20),
            );
            (out.status.code(), output_text(&out))
        } else {
            check(dir, file)
        };
        // A shipped config is what people copy: it must not be one check-config warns about
        // (an anonymous broker on the network).
        if code != Some(0) || !text.contains("configuration OK") || text.contains("warning:") {
            failures.push(format!("{}:\n{text}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_minimal_config_is_reported_ok() {
    let (code, text, _path, _dir) = check_yaml(
        "gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:1883\nstore:\n  path: /tmp/edgegate-check/buffer.db\n",
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    assert!(
        !text.contains("warning:"),
        "a loopback broker exposes nothing:\n{text}"
    );
}

// ─── anonymous access (broker.allow_anonymous) ───
const OPEN_BROKER: &str = "gateway:\n  id: test\nbroker:\n  listen: 0.0.0.0:1883\n";

#[test]
fn an_anonymous_broker_on_the_network_is_a_warning_naming_its_line_not_an_error() {
    // No users and no allow_anonymous: 0.1's open broker, still accepted.
    let (code, text, path, _dir) = check_yaml(OPEN_BROKER);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    let want = format!(
        "{}:4: warning: broker.listen: anyone who can reach 0.0.0.0:1883",
        path.display()
    );
    assert!(text.contains(&want), "no `{want}` in:\n{text}");
    // Said explicitly, the warning points at the key.
    let (code, text, path, _dir) = check_yaml(&format!(
        "{OPEN_BROKER}  listen_v5: 127.0.0.1:1884\n  allow_anonymous: true\n"
    ));
    assert_eq!(code, Some(0), "{text}");
    let want = format!(
        "{}:6: warning: broker.allow_anonymous: anyone who can reach 0.0.0.0:1883 may",
        path.display()
    );
    assert!(text.contains(&want), "no `{want}` in:\n{text}");
    assert!(
        !text.contains("127.0.0.1:1884"),
        "a loopback listener is not exposed:\n{text}"
    );
}

#[test]
fn a_broker_that_admits_anonymous_clients_from_loopback_only_is_not_warned_about() {
    let (code, text, _path, _dir) =
        check_yaml(&format!("{OPEN_BROKER}  allow_anonymous: loopback\n"));
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("warning:"), "{text}");
}

#[test]
fn outputs_that_anonymous_network_clients_may_command_are_warned_about_each() {
    let gpio = "gpio:\n  backend: sim\n  outputs:\n    - name: pump\n      pin: GPIO27\n    - name: lamp\n      pin: GPIO22\n      command_topic: house/lamp/set\n";
    let (code, text, path, _dir) = check_yaml(&format!("{OPEN_BROKER}{gpio}"));
    assert_eq!(code, Some(0), "{text}");
    let pump = format!(
        "{}:8: warning: gpio.outputs[0].command_topic: GPIO output `pump` obeys `cmd/pump`",
        path.display()
    );
    assert!(text.contains(&pump), "no `{pump}` in:\n{text}");
    assert!(
        text.contains("GPIO output `lamp` obeys `house/lamp/set`"),
        "{text}"
    );
    // An anonymous ACL that keeps them off the command topics silences those two, not the
    // warning about the open broker.
    let acl = "  anonymous:\n    publish: [\"sensors/#\"]\n";
    let (code, text, _path, _dir) = check_yaml(&format!("{OPEN_BROKER}{acl}{gpio}"));
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("obeys"), "{text}");
    assert!(text.contains("warning: broker.listen: anyone"), "{text}");
}

#[test]
fn allow_anonymous_false_without_users_exits_78_because_nobody_could_connect() {
    let (code, text, path, _dir) = check_yaml(&format!("{OPEN_BROKER}  allow_anonymous: false\n"));
    assert_eq!(code, Some(78), "{text}");
    assert_names_line_and_field(&text, &path, 5, &["broker.allow_anonymous"]);
    assert!(text.contains("no client could connect"), "{text}");
}

#[test]
fn allow_anonymous_loopback_without_the_front_on_a_network_listener_exits_78() {
    // rumqttd alone cannot tell a loopback client from a network one.
    let (code, text, path, _dir) = check_yaml(&format!(
        "{OPEN_BROKER}  allow_anonymous: loopback\n  front: false\n"
    ));
    assert_eq!(code, Some(78), "{text}");
    assert_names_line_and_field(&text, &path, 5, &["broker.allow_anonymous"]);
    assert!(text.contains("needs the MQTT front"), "{text}");
}

#[test]
fn allow_anonymous_takes_true_false_or_loopback_and_names_them_otherwise() {
    let (code, text, path, _dir) = check_yaml(&format!("{OPEN_BROKER}  allow_anonymous: lan\n"));
    assert_eq!(code, Some(78), "{text}");
    assert_names_line_and_field(&text, &path, 5, &["broker.allow_anonymous"]);
    assert!(text.contains("true, false or loopback"), "{text}");
}

#[test]
fn an_unknown_key_exits_78_naming_its_line_and_section() {
    let (code, text, path, _dir) =
        check_yaml("gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:1883\n  bogus_key: 1\n");
    assert_eq!(code, Some(78), "{text}");
    assert_names_line_and_field(&text, &path, 5, &["broker.bogus_key", "broker"]);
    assert!(text.contains("bogus_key"), "{text}");
}

#[test]
fn a_value_of_the_wrong_type_exits_78_naming_its_line_and_field() {
    let (code, text, path, _dir) = check_yaml(
        "gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:1883\n  max_connections: lots\n",
    );
    assert_eq!(code, Some(78), "{text}");
    assert_names_line_and_field(&text, &path, 5, &["broker.max_connections"]);
}

#[test]
fn a_bad_topic_filter_exits_78_naming_its_line_and_field() {
    let (code, text, path, _dir) = check_yaml(
        "gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:1883\nuplink:\n  url: mqtt://127.0.0.1:1\n  forward:\n    - local: \"sensors/#/x\"\n",
    );
    assert_eq!(code, Some(78), "{text}");
    assert_names_line_and_field(
        &text,
        &path,
        8,
        &["uplink.forward[0].local", "uplink.forward.0.local"],
    );
}

#[test]
fn a_missing_gateway_id_exits_78_naming_the_field() {
    let (code, text, path, _dir) =
        check_yaml("gateway:\n  status_topic: x/status\nbroker:\n  listen: 127.0.0.1:1883\n");
    assert_eq!(code, Some(78), "{text}");
    // serde reports a missing field at its parent mapping, so any line of that file will do.
    let file = path.display().to_string();
    assert!(
        text.contains(&format!("{file}:")),
        "file not named:\n{text}"
    );
    assert!(
        text.contains("gateway.id") || (text.contains("gateway") && text.contains("`id`")),
        "field not named:\n{text}"
    );
}

#[test]
fn a_missing_file_exits_78_naming_the_path() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let path = dir.path().join("does-not-exist.yaml");
    let (code, text) = check(dir.path(), &path);
    assert_eq!(code, Some(78), "{text}");
    assert!(
        text.contains(&path.display().to_string()),
        "path not named:\n{text}"
    );
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let (code, text, path, _dir) = check_yaml(
        "gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:1883\nuplink:\n  url: mqtt://127.0.0.1:1\n  forward:\n    - local: \"a/#/b\"\n    - local: \"c/+x\"\n",
    );
    assert_eq!(code, Some(78), "{text}");
    assert_names_line_and_field(&text, &path, 8, &["forward[0]", "forward.0"]);
    assert_names_line_and_field(&text, &path, 9, &["forward[1]", "forward.1"]);
}

#[test]
fn offline_checking_skips_missing_certificates_but_not_mistakes() {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let path = dir.path().join("cloud.yaml");
    let base = "gateway:\n  id: t\nbroker:\n  listen: 127.0.0.1:1883\nuplink:\n  url: mqtts://h:8883\n  password_env: EDGEGATE_TEST_UNSET_VARIABLE\n  username: u\n  tls: {cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}\n  forward: [{local: \"sensors/#\"}]\n";
    std::fs::write(&path, base).expect("writing the config");
    let p = path.display().to_string();
    let online = run_bin(dir.path(), &["check-config", &p], Duration::from_secs(20));
    assert_eq!(online.status.code(), Some(78), "{}", output_text(&online));
    assert!(
        output_text(&online).contains("uplink.tls.cert_file"),
        "{}",
        output_text(&online)
    );
    let offline = run_bin(
        dir.path(),
        &["check-config", "--offline", &p],
        Duration::from_secs(20),
    );
    assert_eq!(offline.status.code(), Some(0), "{}", output_text(&offline));
    std::fs::write(&path, base.replace("sensors/#", "sensors/#/x")).expect("writing the config");
    let broken = run_bin(
        dir.path(),
        &["check-config", "--offline", &p],
        Duration::from_secs(20),
    );
    assert_eq!(broken.status.code(), Some(78), "{}", output_text(&broken));
    assert!(
        output_text(&broken).contains("uplink.forward[0].local"),
        "{}",
        output_text(&broken)
    );
}

/// One broken config: what check-config must point at.
struct Mistake {
    kind: &'static str,
    yaml: &'static str,
    /// The line the message must name (`file:line:`), when the mistake has one.
    line: Option<usize>,
    /// Words the message must contain (the field path and what is wrong).
    needles: &'static [&'static str],
}

const HEAD: &str = "gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:1883\n";

#[test]
fn every_kind_of_config_mistake_exits_78_with_a_message_naming_where_and_what() {
    let mistakes = [
        Mistake {
            kind: "bad duration",
            yaml: "gateway:\n  id: test\n  shutdown_timeout: 10 parsecs\nbroker:\n  listen: 127.0.0.1:1883\n",
            line: Some(3),
            needles: &["gateway.shutdown_timeout", "parsecs"],
        },
        Mistake {
            kind: "bad size",
            yaml: "store:\n  path: /tmp/x.db\n  max_bytes: 12 potatoes\n",
            line: Some(7),
            needles: &["store.max_bytes", "potatoes"],
        },
        Mistake {
            kind: "bad enum value",
            yaml: "store:\n  path: /tmp/x.db\n  when_full: drop_random\n",
            line: Some(7),
            needles: &["store.when_full", "drop_random", "drop_oldest"],
        },
        Mistake {
            kind: "duplicate user name",
            yaml: "  users:\n    - {username: a, password: x}\n    - {username: a, password: y}\n",
            line: Some(7),
            needles: &["broker.users[1].username", "twice"],
        },
        Mistake {
            kind: "duplicate key",
            yaml: "gateway:\n  id: a\n  id: b\n",
            line: Some(2),
            needles: &["gateway", "duplicate", "id"],
        },
        Mistake {
            kind: "port clash",
            yaml: "  listen_v5: 127.0.0.1:1883\n",
            line: Some(5),
            needles: &["broker.listen_v5", "clashes", "broker.listen"],
        },
        Mistake {
            kind: "missing certificate file",
            yaml: "  tls:\n    listen: 127.0.0.1:8883\n    cert_file: /nonexistent/broker.crt\n    key_file: /nonexistent/broker.key\n    client_ca_file: /nonexistent/ca.crt\n",
            line: Some(7),
            needles: &["broker.tls.cert_file", "/nonexistent/broker.crt"],
        },
        Mistake {
            kind: "tab indentation",
            yaml: "gateway:\n\tid: test\nbroker:\n  listen: 127.0.0.1:1883\n",
            line: Some(2),
            needles: &["cannot start any token"],
        },
        Mistake {
            kind: "unclosed quote",
            yaml: "gateway:\n  id: test\nbroker:\n  listen: \"127.0.0.1:1883\n",
            line: Some(5),
            needles: &["quoted scalar", "line 4"],
        },
        Mistake {
            kind: "bad address",
            yaml: "gateway:\n  id: test\nbroker:\n  listen: 127.0.0.1:99999\n",
            line: Some(4),
            needles: &["broker.listen", "ip:port"],
        },
        Mistake {
            kind: "number out of range",
            yaml: "  max_inflight: 70000\n",
            line: Some(5),
            needles: &["broker.max_inflight", "70000", "65535"],
        },
        Mistake {
            kind: "unsupported url scheme",
            yaml: "uplink:\n  url: http://example.com\n  forward:\n    - local: \"a/#\"\n",
            line: Some(6),
            needles: &["uplink.url", "http://", "mqtts://"],
        },
        Mistake {
            kind: "empty file",
            yaml: "",
            line: None,
            needles: &["gateway"],
        },
    ];
    let mut failures = Vec::new();
    for m in &mistakes {
        // Mistakes that start with a space continue the `broker:` section of HEAD; those that
        // start with a top-level key follow HEAD; whole files start with `gateway:` or are empty.
        let yaml = if m.yaml.is_empty() || m.yaml.starts_with("gateway:") {
            m.yaml.to_string()
        } else {
            format!("{HEAD}{}", m.yaml)
        };
        let (code, text, path, _dir) = check_yaml(&yaml);
        let mut wrong = Vec::new();
        if code != Some(78) {
            wrong.push(format!("exit {code:?}, not 78"));
        }
        let file = path.display().to_string();
        let at = match m.line {
            Some(line) => format!("{file}:{line}:"),
            None => format!("{file}:"),
        };
        if !text.contains(&at) {
            wrong.push(format!("does not name `{at}`"));
        }
        for needle in m.needles {
            if !text.contains(needle) {
                wrong.push(format!("does not say `{needle}`"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}\n{yaml}\n{text}", m.kind, wrong.join(", ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
