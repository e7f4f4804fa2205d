//! Checks of a parsed configuration that serde cannot express. [`validate`] is pure (no file
//! system, network or environment) and collects every problem rather than stopping at the first;
//! [`check_files`] is the one part that looks at the disk (referenced certificates, keys, password
//! files), kept apart so callers and tests can choose.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

mod exposure;
mod modbus;

use crate::config::broker::BrokerConfig;
use crate::config::forward::WhileOffline;
use crate::config::gpio::GpioBackendKind;
use crate::config::problem::Problem;
use crate::config::protocol::Protocol;
use crate::config::root::Config;
use crate::config::serial::SerialFormat;
use crate::config::topic;
use crate::config::uplink::UplinkConfig;

/// Smallest rumqttd log segment we accept: smaller ones make the router rotate constantly.
const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
/// Smallest store budget: below this a short outage already evicts.
const MIN_STORE_BYTES: u64 = 1024 * 1024;
/// Longest group-commit delay: a message waits this long before it is durable.
const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(10);
const MAX_COMMIT_ROWS: usize = 100_000;
/// MQTT keep-alive is a 16-bit number of seconds; below a few seconds it mostly measures jitter.
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(65_535);

/// Every problem in `cfg`, in file order as far as possible. Empty means valid.
pub fn validate(cfg: &Config) -> Vec<Problem> {
    let mut p = Problems(Vec::new());
    check_gateway(cfg, &mut p);
    check_broker(cfg, &mut p);
    check_store(cfg, &mut p);
    if let Some(uplink) = &cfg.uplink {
        check_uplink(uplink, &cfg.gateway.id, &mut p);
    }
    check_hardware(cfg, &mut p);
    p.0.extend(modbus::check(cfg));
    p.0.extend(exposure::check(cfg));
    check_ops(cfg, &mut p);
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&cfg.log.level) {
        p.add(
            "log.level",
            format!(
                "`{}` is not a log filter ({e}); use error, warn, info, debug, trace or e.g. `info,edgegate::forward=debug`",
                cfg.log.level
            ),
        );
    }
    p.0
}

/// What a valid `cfg` exposes that its operator should know about (see `exposure`): never a reason
/// to refuse it.
pub fn warnings(cfg: &Config) -> Vec<Problem> {
    let mut w = exposure::warnings(cfg);
    if let Some(up) = &cfg.uplink {
        w.extend(queued_command_warnings(up));
    }
    w
}

/// Rules whose stale commands nothing can catch: the session is persistent (`clean_session:
/// false`, or another rule says `while_offline: deliver`), so the cloud queues commands for
/// every rule, and this one says `drop` but names no `timestamp` to judge them by. And rules
/// that say `deliver` under `clean_session: true`, where nothing is queued.
fn queued_command_warnings(up: &UplinkConfig) -> Vec<Problem> {
    if !up.persistent_session() {
        // `deliver` asks for a queue that `clean_session: true` tells the upstream not to keep.
        return up
            .downlink
            .iter()
            .enumerate()
            .filter(|(_, r)| r.while_offline == WhileOffline::Deliver)
            .map(|(k, _)| {
                Problem::new(
                    format!("uplink.downlink[{k}].while_offline"),
                    "uplink.clean_session is true, so the upstream queues nothing while the link \
                     is down and `deliver` only applies retained commands; remove \
                     `clean_session` to have commands queued",
                )
            })
            .collect();
    }
    let why = if up.clean_session == Some(false) {
        "uplink.clean_session is false"
    } else {
        "another downlink rule says `while_offline: deliver`"
    };
    up.downlink
        .iter()
        .enumerate()
        .filter(|(_, r)| r.while_offline == WhileOffline::Drop && r.timestamp.is_none())
        .map(|(k, _)| {
            Problem::new(
                format!("uplink.downlink[{k}].while_offline"),
                format!(
                    "{why}, so the upstream queues commands while the link is down and this rule's \
                     are applied when it returns, however old; name the commands' `timestamp` \
                     field (judged against `max_age`), or say `while_offline: deliver`"
                ),
            )
        })
        .collect()
}

fn check_ops(cfg: &Config, p: &mut Problems) {
    let every = cfg.status.stats_interval.get();
    if !every.is_zero() && every < Duration::from_secs(1) {
        p.add(
            "status.stats_interval",
            format!(
                "{} is too often; use at least 1s, or 0s to turn the stats message off",
                cfg.status.stats_interval
            ),
        );
    }
    if let crate::config::StatusSocket::Path(sock) = &cfg.status.socket {
        if !sock.is_absolute() {
            p.add(
                "status.socket",
                format!("`{}` must be an absolute path", sock.display()),
            );
        }
    }
    let prefix = &cfg.homeassistant.prefix;
    if prefix.is_empty()
        || prefix.contains(['+', '#'])
        || prefix.starts_with('/')
        || prefix.ends_with('/')
    {
        p.add(
            "homeassistant.prefix",
            format!("`{prefix}` is not a topic prefix: non-empty, no wildcards, no leading or trailing `/`"),
        );
    }
}

/// Files the configuration refers to that cannot be opened: TLS certificates, keys, CA bundles and
/// password files. Touches the file system, unlike [`validate`].
pub fn check_files(cfg: &Config) -> Vec<Problem> {
    let mut p = Problems(Vec::new());
    let mut check = |field: String, path: &Path| {
        let result = File::open(path).and_then(|f| f.metadata());
        match result {
            Ok(meta) if meta.is_dir() => p.add(
                field,
                format!("`{}` is a directory, not a file", path.display()),
            ),
            Ok(_) => {}
            Err(e) => p.add(field, format!("cannot open `{}`: {e}", path.display())),
        }
    };
    if let Some(tls) = &cfg.broker.tls {
        check("broker.tls.cert_file".into(), &tls.cert_file);
        check("broker.tls.key_file".into(), &tls.key_file);
        check("broker.tls.client_ca_file".into(), &tls.client_ca_file);
    }
    for (i, user) in cfg.broker.users.iter().enumerate() {
        if let Some(file) = &user.password.password_file {
            check(format!("broker.users[{i}].password_file"), file);
        }
    }
    if let Some(up) = &cfg.uplink {
        if let Some(file) = &up.password.password_file {
            check("uplink.password_file".into(), file);
        }
        for (key, file) in [
            ("ca_file", &up.tls.ca_file),
            ("cert_file", &up.tls.cert_file),
            ("key_file", &up.tls.key_file),
        ] {
            if let Some(file) = file {
                check(format!("uplink.tls.{key}"), file);
            }
        }
    }
    p.0
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem::new(field, message));
    }
}

fn check_gateway(cfg: &Config, p: &mut Problems) {
    let id = &cfg.gateway.id;
    if id.is_empty() {
        p.add(
            "gateway.id",
            "must not be empty: it names this gateway upstream",
        );
    } else if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        p.add(
            "gateway.id",
            format!(
                "`{id}` contains {bad:?}; use only letters, digits, `_`, `.` and `-` (the id goes into topics and the client id)"
            ),
        );
    }
    check_placeholders(
        "gateway.status_topic",
        &cfg.gateway.status_topic,
        &["gateway_id"],
        p,
    );
    if let Err(e) = topic::valid_topic(&cfg.status_topic()) {
        p.add("gateway.status_topic", e);
    }
}

fn check_placeholders(field: &str, template: &str, known: &[&str], p: &mut Problems) {
    for name in topic::placeholders(template) {
        if !known.contains(&name) {
            let known: Vec<String> = known.iter().map(|k| format!("{{{k}}}")).collect();
            p.add(
                field,
                format!(
                    "unknown placeholder `{{{name}}}` in `{template}` (known here: {})",
                    known.join(", ")
                ),
            );
        }
    }
}

fn check_broker(cfg: &Config, p: &mut Problems) {
    let b = &cfg.broker;
    let metrics = cfg.metrics.enabled.then_some(cfg.metrics.listen);
    let listeners: Vec<(&str, SocketAddr)> = [
        ("broker.listen", b.listen),
        ("broker.listen_v5", b.listen_v5),
        ("broker.tls.listen", b.tls.as_ref().map(|t| t.listen)),
        (
            "broker.websocket.listen",
            b.websocket.as_ref().map(|w| w.listen),
        ),
        ("metrics.listen", metrics),
    ]
    .into_iter()
    .filter_map(|(field, addr)| addr.map(|a| (field, a)))
    .collect();
    if listeners
        .iter()
        .all(|(field, _)| *field == "metrics.listen")
    {
        p.add(
            "broker.listen",
            "no listener: set at least one of broker.listen, broker.listen_v5, broker.tls.listen, broker.websocket.listen",
        );
    }
    for (j, (field, addr)) in listeners.iter().enumerate() {
        if let Some((other, other_addr)) = listeners[..j].iter().find(|(_, a)| clash(*a, *addr)) {
            p.add(
                *field,
                format!("{addr} clashes with {other} ({other_addr}): two listeners cannot bind the same port"),
            );
        }
    }

    let mut seen: Vec<&str> = Vec::new();
    for (i, user) in b.users.iter().enumerate() {
        if user.username.is_empty() {
            p.add(format!("broker.users[{i}].username"), "must not be empty");
        } else if seen.contains(&user.username.as_str()) {
            p.add(
                format!("broker.users[{i}].username"),
                format!("user `{}` is listed twice", user.username),
            );
        }
        seen.push(&user.username);
        if !user.password.is_given() {
            p.add(
                format!("broker.users[{i}]"),
                format!(
                    "user `{}` has no password: set `password`, `password_file` or `password_env`",
                    user.username
                ),
            );
        }
    }

    if b.max_connections < 1 {
        p.add("broker.max_connections", "must be at least 1");
    }
    if !(1..=65_535).contains(&b.max_inflight) {
        p.add(
            "broker.max_inflight",
            format!(
                "{} is out of range: 1 to 65535 (MQTT packet ids)",
                b.max_inflight
            ),
        );
    }
    if b.segment_size.get() < MIN_SEGMENT_SIZE {
        p.add(
            "broker.segment_size",
            format!("{} is too small: at least 64KiB", b.segment_size),
        );
    }
    if b.segment_count < 1 {
        p.add("broker.segment_count", "must be at least 1");
    }
    if b.max_payload_size.get() == 0 {
        p.add("broker.max_payload_size", "must be more than 0");
    } else if b.max_payload_size > b.segment_size {
        p.add(
            "broker.max_payload_size",
            format!(
                "{} is larger than broker.segment_size ({}): a message must fit in one segment",
                b.max_payload_size, b.segment_size
            ),
        );
    }
    if b.connect_timeout.get().is_zero() {
        p.add("broker.connect_timeout", "must be more than 0");
    }
    check_front(b, p);
}

// ─── MQTT front (src/front/) ───
fn check_front(b: &BrokerConfig, p: &mut Problems) {
    for (i, user) in b.users.iter().enumerate() {
        for (key, list) in [("publish", &user.publish), ("subscribe", &user.subscribe)] {
            for (j, f) in list.iter().flatten().enumerate() {
                if let Err(e) = topic::valid_filter(f) {
                    p.add(format!("broker.users[{i}].{key}[{j}]"), e);
                }
            }
            if list.is_some() && !b.front_enabled() {
                p.add(
                    format!("broker.users[{i}].{key}"),
                    "topic ACLs are enforced by the MQTT front, which is off (broker.front)",
                );
            }
        }
    }
}

/// Whether two listeners would fight over a port. An unspecified address (`0.0.0.0`, `[::]`) binds
/// the port on every interface, so it clashes with any address on that port; port 0 asks the OS
/// for a free port and never clashes.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn check_store(cfg: &Config, p: &mut Problems) {
    let s = &cfg.store;
    if s.path.as_os_str().is_empty() {
        p.add("store.path", "must not be empty");
    }
    if s.max_bytes.get() < MIN_STORE_BYTES {
        p.add(
            "store.max_bytes",
            format!("{} is too small: at least 1MiB", s.max_bytes),
        );
    }
    if s.commit_interval.get() > MAX_COMMIT_INTERVAL {
        p.add(
            "store.commit_interval",
            format!(
                "{} is too long: at most 10s (messages are not durable until committed)",
                s.commit_interval
            ),
        );
    }
    if !(1..=MAX_COMMIT_ROWS).contains(&s.commit_max_rows) {
        p.add(
            "store.commit_max_rows",
            format!(
                "{} is out of range: 1 to {MAX_COMMIT_ROWS}",
                s.commit_max_rows
            ),
        );
    }
    if s.max_age.is_some_and(|a| a.get().is_zero()) {
        p.add(
            "store.max_age",
            "0 would expire every message at once; leave it unset to keep messages until sent",
        );
    }
    // A message the store can never take could not be acknowledged to an MQTT 3.1.1 device
    // (there is no negative PUBACK): its connection would be closed at every attempt.
    let largest = cfg.broker.max_payload_size.get() + 65_535 + crate::store::ROW_OVERHEAD_BYTES;
    if cfg.uplink.is_some()
        && s.max_bytes.get() >= MIN_STORE_BYTES
        && largest > s.max_bytes.get() / 2
    {
        p.add(
            "store.max_bytes",
            format!(
                "{} is too small for broker.max_payload_size {}: the store must hold at least two of the largest messages (payload, a topic of up to 64 KiB and {} bytes of overhead)",
                s.max_bytes,
                cfg.broker.max_payload_size,
                crate::store::ROW_OVERHEAD_BYTES
            ),
        );
    }
}

fn check_uplink(up: &UplinkConfig, gateway_id: &str, p: &mut Problems) {
    match up.endpoint() {
        Err(e) => p.add("uplink.url", e),
        Ok(ep) => {
            let t = &up.tls;
            if !ep.tls && (t.ca_file.is_some() || t.cert_file.is_some() || t.key_file.is_some()) {
                p.add(
                    "uplink.tls",
                    format!(
                        "TLS settings are given but `{}` is plain TCP; use mqtts:// (or remove uplink.tls)",
                        up.url
                    ),
                );
            }
        }
    }
    match (&up.tls.cert_file, &up.tls.key_file) {
        (Some(_), None) => p.add(
            "uplink.tls.key_file",
            "missing: tls.cert_file is set, and a client certificate needs its key",
        ),
        (None, Some(_)) => p.add(
            "uplink.tls.cert_file",
            "missing: tls.key_file is set, and a client key needs its certificate",
        ),
        _ => {}
    }
    match &up.client_id {
        Some(id) if id.is_empty() => p.add(
            "uplink.client_id",
            "must not be empty (leave it out to use the gateway id)",
        ),
        _ => {
            let id = up.client_id_or(gateway_id);
            if id.len() > topic::MAX_LEN {
                p.add(
                    "uplink.client_id",
                    format!("is {} bytes long; MQTT allows at most 65535", id.len()),
                );
            }
        }
    }
    if up.username.is_none() && up.protocol == Protocol::V4 {
        if let Some(key) = [
            ("password", up.password.password.is_some()),
            ("password_file", up.password.password_file.is_some()),
            ("password_env", up.password.password_env.is_some()),
        ]
        .iter()
        .find(|(_, set)| *set)
        .map(|(k, _)| *k)
        {
            p.add(
                format!("uplink.{key}"),
                "a password needs uplink.username: MQTT 3.1.1 sends a password only with a user name",
            );
        }
    }
    if up.max_inflight < 1 {
        p.add("uplink.max_inflight", "must be at least 1");
    }
    if let Some(rate) = up.max_rate {
        if !(rate.is_finite() && rate > 0.0) {
            p.add(
                "uplink.max_rate",
                format!("{rate} is not a rate: give messages per second above 0, or leave it out for no limit"),
            );
        }
    }
    if up.reconnect_min.get().is_zero() {
        p.add(
            "uplink.reconnect_min",
            "must be more than 0 (the backoff doubles it)",
        );
    }
    if up.reconnect_min > up.reconnect_max {
        p.add(
            "uplink.reconnect_min",
            format!(
                "{} is more than uplink.reconnect_max ({})",
                up.reconnect_min, up.reconnect_max
            ),
        );
    }
    if !(MIN_KEEP_ALIVE..=MAX_KEEP_ALIVE).contains(&up.keep_alive.get()) {
        p.add(
            "uplink.keep_alive",
            format!("{} is out of range: 5s to 65535s", up.keep_alive),
        );
    }
    check_forward(up, gateway_id, p);
    check_downlink(up, gateway_id, p);
}

fn check_forward(up: &UplinkConfig, gateway_id: &str, p: &mut Problems) {
    for (i, rule) in up.forward.iter().enumerate() {
        let field = format!("uplink.forward[{i}]");
        let filter_ok = match topic::valid_filter(&rule.local) {
            Ok(()) => true,
            Err(e) => {
                p.add(format!("{field}.local"), e);
                false
            }
        };
        if rule.qos > 1 {
            p.add(
                format!("{field}.qos"),
                format!(
                    "{} is not supported: 0 or 1 (the store already gives at-least-once)",
                    rule.qos
                ),
            );
        }
        check_placeholders(
            &format!("{field}.remote"),
            &rule.remote,
            &["topic", "gateway_id"],
            p,
        );
        let sample = sample_topic(if filter_ok { &rule.local } else { "sensors/x" });
        if let Err(e) = topic::valid_topic(&rule.remote_topic(&sample, gateway_id)) {
            p.add(
                format!("{field}.remote"),
                format!(
                    "`{}` does not give a valid topic (for local `{sample}`): {e}",
                    rule.remote
                ),
            );
        }
        if !filter_ok {
            continue;
        }
        for (j, earlier) in up.forward[..i].iter().enumerate() {
            if topic::valid_filter(&earlier.local).is_err() {
                continue;
            }
            let (a, b) = (&earlier.local, &rule.local);
            if a == b {
                p.add(
                    format!("{field}.local"),
                    format!("`{b}` is also the filter of uplink.forward[{j}]; merge the two rules"),
                );
            } else if topic::covers(a, b) {
                let same_settings = earlier.remote == rule.remote
                    && earlier.qos == rule.qos
                    && earlier.priority == rule.priority
                    && earlier.retain == rule.retain;
                if !same_settings {
                    p.add(
                        format!("{field}.local"),
                        format!(
                            "this rule never applies: uplink.forward[{j}] (`{a}`) comes first and matches every topic `{b}` does; move the narrower rule above it"
                        ),
                    );
                }
            } else if !topic::covers(b, a) && topic::intersects(a, b) {
                p.add(
                    format!("{field}.local"),
                    format!(
                        "`{b}` partly overlaps uplink.forward[{j}] (`{a}`): the broker delivers a message on both once per filter, so it would be stored twice; make one filter contain the other or make them disjoint"
                    ),
                );
            }
        }
    }
}

fn check_downlink(up: &UplinkConfig, gateway_id: &str, p: &mut Problems) {
    for (k, rule) in up.downlink.iter().enumerate() {
        let field = format!("uplink.downlink[{k}]");
        if rule.max_age.get() < Duration::from_secs(1) {
            p.add(
                format!("{field}.max_age"),
                format!(
                    "{} is shorter than a command's trip from the cloud; at least 1s",
                    rule.max_age
                ),
            );
        }
        if rule
            .timestamp
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            p.add(
                format!("{field}.timestamp"),
                "must name a top-level JSON field of the command, e.g. `ts`",
            );
        }
        check_placeholders(&format!("{field}.remote"), &rule.remote, &["gateway_id"], p);
        let remote = rule.remote_filter(gateway_id);
        if let Err(e) = topic::valid_filter(&remote) {
            p.add(format!("{field}.remote"), e);
            continue;
        }
        let local_field = match &rule.local {
            Some(local) => {
                let f = format!("{field}.local");
                if local.is_empty() {
                    p.add(
                        &f,
                        "must not be empty (use e.g. `cmd/`, or leave it out to keep the upstream topic)",
                    );
                    continue;
                }
                if local.contains(['+', '#']) {
                    p.add(
                        &f,
                        format!(
                            "`{local}` contains a wildcard; it is a topic prefix such as `cmd/`"
                        ),
                    );
                    continue;
                }
                f
            }
            None => format!("{field}.remote"),
        };
        let local_filter = rule.local_filter(gateway_id);
        if let Err(e) = topic::valid_filter(&local_filter) {
            p.add(&local_field, e);
            continue;
        }
        for (i, fwd) in up.forward.iter().enumerate() {
            if topic::valid_filter(&fwd.local).is_ok()
                && topic::intersects(&local_filter, &fwd.local)
            {
                p.add(
                    &local_field,
                    format!(
                        "echo loop: commands from `{remote}` are published locally on `{local_filter}`, which uplink.forward[{i}] (`{}`) forwards, so they would be sent back up; choose a local prefix outside the forward filters",
                        fwd.local
                    ),
                );
            }
        }
    }
}

/// A topic the filter matches, to try templates with: wildcards become `x`.
fn sample_topic(filter: &str) -> String {
    filter
        .split('/')
        .map(|l| if l == "+" || l == "#" { "x" } else { l })
        .collect::<Vec<_>>()
        .join("/")
}

// ─── Hardware adapters (`gpio`, `serial`) ────────────────────────────────────────────────────────

/// Longest debounce accepted: beyond this a "debounce" is really a different feature.
const MAX_DEBOUNCE: Duration = Duration::from_secs(10);
/// Largest serial frame: readings are small; a megabyte "line" is a wrong delimiter.
const MAX_SERIAL_FRAME: u64 = 64 * 1024;

fn check_hardware(cfg: &Config, p: &mut Problems) {
    let g = &cfg.gpio;
    // Names are unique across inputs, outputs and serial ports: they name log lines and topics.
    let mut names: Vec<(String, String)> = Vec::new();
    let mut name = |field: String, n: &str, p: &mut Problems| {
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            p.add(
                field,
                format!("`{n}` is not a name: use letters, digits, `_`, `-` and `.` (it goes into the default topic)"),
            );
        } else if let Some((other, _)) = names.iter().find(|(_, m)| m == n) {
            p.add(field, format!("`{n}` is already the name of {other}"));
        } else {
            names.push((field, n.to_string()));
        }
    };
    let mut pins: Vec<(String, String)> = Vec::new();
    let mut pin = |field: String, pin: String, p: &mut Problems| {
        if let Some((other, _)) = pins.iter().find(|(_, q)| *q == pin) {
            p.add(field, format!("line {pin} is already used by {other}"));
        } else {
            pins.push((field, pin));
        }
    };
    let topic_ok = |field: String, t: &str, p: &mut Problems| {
        if let Err(e) = topic::valid_topic(t) {
            p.add(field, e);
        }
    };
    for (i, input) in g.inputs.iter().enumerate() {
        let f = format!("gpio.inputs[{i}]");
        name(format!("{f}.name"), &input.name, p);
        pin(format!("{f}.pin"), input.pin.to_string(), p);
        topic_ok(format!("{f}.topic"), &input.topic(), p);
        if input.debounce.get() > MAX_DEBOUNCE {
            p.add(
                format!("{f}.debounce"),
                format!("{} is too long: at most 10s", input.debounce),
            );
        }
        if input.interval.is_some_and(|d| d.get().is_zero()) {
            p.add(
                format!("{f}.interval"),
                "must be more than 0 (leave it out to publish only changes)",
            );
        }
        if !input.sim_waveform.is_empty() && g.backend != GpioBackendKind::Sim {
            p.add(
                format!("{f}.sim_waveform"),
                "only the sim backend plays a waveform (gpio.backend: sim)",
            );
        }
        if !input.sim_waveform.is_empty()
            && input.sim_waveform.iter().all(|s| s.hold.get().is_zero())
        {
            p.add(
                format!("{f}.sim_waveform"),
                "every step holds 0s: give at least one step a `hold`",
            );
        }
    }
    for (i, out) in g.outputs.iter().enumerate() {
        let f = format!("gpio.outputs[{i}]");
        name(format!("{f}.name"), &out.name, p);
        pin(format!("{f}.pin"), out.pin.to_string(), p);
        topic_ok(format!("{f}.command_topic"), &out.command_topic(), p);
        topic_ok(format!("{f}.state_topic"), &out.state_topic(), p);
        if out.command_topic() == out.state_topic() {
            p.add(
                format!("{f}.state_topic"),
                "must differ from command_topic (the output would obey its own confirmations)",
            );
        }
        if out.fail_safe_after.is_some() {
            if out.fail_safe.is_none() {
                p.add(
                    format!("{f}.fail_safe_after"),
                    "needs `fail_safe`: the state to apply",
                );
            }
            if cfg.uplink.is_none() {
                p.add(
                    format!("{f}.fail_safe_after"),
                    "there is no uplink to watch (no `uplink` section)",
                );
            }
            if out.fail_safe_after.is_some_and(|d| d.get().is_zero()) {
                p.add(format!("{f}.fail_safe_after"), "must be more than 0");
            }
        }
    }
    for (i, port) in cfg.serial.ports.iter().enumerate() {
        let f = format!("serial.ports[{i}]");
        name(format!("{f}.name"), &port.name, p);
        topic_ok(format!("{f}.topic"), &port.topic(), p);
        match (&port.path, &port.sim) {
            (None, None) => p.add(
                format!("{f}.path"),
                "missing: give the device path (e.g. /dev/serial/by-id/…) or `sim`",
            ),
            (Some(_), Some(_)) => {
                p.add(format!("{f}.sim"), "give either `path` or `sim`, not both")
            }
            (Some(path), None) if path.as_os_str().is_empty() => {
                p.add(format!("{f}.path"), "must not be empty")
            }
            _ => {}
        }
        if let Some(sim) = &port.sim {
            if sim.lines.is_empty() {
                p.add(format!("{f}.sim.lines"), "must list at least one line");
            }
            if sim.interval.get().is_zero() {
                p.add(format!("{f}.sim.interval"), "must be more than 0");
            }
        }
        if !(50..=4_000_000).contains(&port.baud) {
            p.add(
                format!("{f}.baud"),
                format!("{} is out of range: 50 to 4000000", port.baud),
            );
        }
        if !(5..=8).contains(&port.data_bits) {
            p.add(
                format!("{f}.data_bits"),
                format!("{} is not 5, 6, 7 or 8", port.data_bits),
            );
        }
        if !(1..=2).contains(&port.stop_bits) {
            p.add(
                format!("{f}.stop_bits"),
                format!("{} is not 1 or 2", port.stop_bits),
            );
        }
        if port.delimiter.as_deref() == Some("") {
            p.add(
                format!("{f}.delimiter"),
                "must not be empty (leave it out for newline)",
            );
        }
        if !(1..=MAX_SERIAL_FRAME).contains(&port.max_frame.get()) {
            p.add(
                format!("{f}.max_frame"),
                format!("{} is out of range: 1 byte to 64KiB", port.max_frame),
            );
        }
        match port.format {
            SerialFormat::Csv if port.fields.is_empty() => p.add(
                format!("{f}.fields"),
                "csv needs the column names, in order",
            ),
            SerialFormat::Raw | SerialFormat::Value | SerialFormat::Kv | SerialFormat::Nmea
                if !port.fields.is_empty() =>
            {
                p.add(
                    format!("{f}.fields"),
                    "only the json (selection) and csv (column names) formats take fields",
                )
            }
            _ => {}
        }
        if let Some(poll) = &port.poll {
            if poll.request.is_empty() {
                p.add(format!("{f}.poll.request"), "must not be empty");
            }
            if poll.interval.get().is_zero() {
                p.add(format!("{f}.poll.interval"), "must be more than 0");
            }
        }
        if port.reopen_min.get().is_zero() {
            p.add(
                format!("{f}.reopen_min"),
                "must be more than 0 (the backoff doubles it)",
            );
        }
        if port.reopen_min > port.reopen_max {
            p.add(
                format!("{f}.reopen_min"),
                format!(
                    "{} is more than reopen_max ({})",
                    port.reopen_min, port.reopen_max
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Config {
        serde_yaml::from_str(yaml).expect("test config parses")
    }

    fn fields(cfg: &Config) -> Vec<String> {
        validate(cfg).into_iter().map(|p| p.field).collect()
    }

    fn problem<'a>(problems: &'a [Problem], field: &str) -> &'a Problem {
        problems
            .iter()
            .find(|p| p.field == field)
            .unwrap_or_else(|| panic!("no problem at {field}: {problems:?}"))
    }

    const BASE: &str = "gateway: {id: gw1}\n";

    #[test]
    fn defaults_with_an_id_are_valid() {
        assert_eq!(validate(&parse(BASE)), Vec::new());
    }

    #[test]
    fn gateway_ids_are_restricted_to_topic_safe_characters() {
        for (id, ok) in [
            ("pi-01.kitchen_a", true),
            ("", false),
            ("a/b", false),
            ("a+", false),
            ("é", false),
        ] {
            let cfg = parse(&format!("gateway: {{id: \"{id}\"}}"));
            assert_eq!(
                fields(&cfg).contains(&"gateway.id".to_string()),
                !ok,
                "{id}"
            );
        }
    }

    #[test]
    fn status_topic_must_be_a_topic_with_known_placeholders() {
        let cfg = parse("gateway: {id: a, status_topic: \"x/{gateway}/+\"}");
        let problems = validate(&cfg);
        assert_eq!(
            problems
                .iter()
                .filter(|p| p.field == "gateway.status_topic")
                .count(),
            2,
            "{problems:?}"
        );
    }

    #[test]
    fn broker_needs_a_listener_and_distinct_ports() {
        let cfg = parse(&format!("{BASE}broker: {{listen: null}}"));
        assert!(problem(&validate(&cfg), "broker.listen")
            .message
            .contains("no listener"));

        let cfg = parse(&format!(
            "{BASE}broker: {{listen: 0.0.0.0:1883, listen_v5: 127.0.0.1:1883, websocket: {{listen: 127.0.0.1:8083}}}}"
        ));
        let problems = validate(&cfg);
        assert!(problem(&problems, "broker.listen_v5")
            .message
            .contains("broker.listen"));
        assert!(!problems
            .iter()
            .any(|p| p.field == "broker.websocket.listen"));

        let cfg = parse(&format!(
            "{BASE}broker: {{listen: 127.0.0.1:0, listen_v5: 127.0.0.1:0}}"
        ));
        assert_eq!(validate(&cfg), Vec::new(), "port 0 picks a free port each");
    }

    #[test]
    fn broker_users_are_unique_and_have_passwords() {
        let cfg = parse(&format!(
            "{BASE}broker:\n  users:\n    - {{username: a, password: x}}\n    - {{username: a, password_env: X}}\n    - {{username: b}}\n"
        ));
        let problems = validate(&cfg);
        assert!(problem(&problems, "broker.users[1].username")
            .message
            .contains("twice"));
        assert!(problem(&problems, "broker.users[2]")
            .message
            .contains("no password"));
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    // ─── MQTT front ───
    #[test]
    fn the_front_is_on_by_default() {
        assert!(parse(BASE).broker.front_enabled());
        let cfg = parse(&format!("{BASE}broker:\n  front: false\n"));
        assert!(!cfg.broker.front_enabled());
    }

    #[test]
    fn acl_filters_must_be_valid_and_need_the_front() {
        let cfg = parse(&format!(
            "{BASE}broker:\n  users:\n    - {{username: a, password: x, publish: [\"a/#/b\"], subscribe: [\"ok/#\"]}}\n"
        ));
        let problems = validate(&cfg);
        assert!(problem(&problems, "broker.users[0].publish[0]")
            .message
            .contains('#'));
        assert_eq!(problems.len(), 1, "{problems:?}");
        let cfg = parse(&format!(
            "{BASE}broker:\n  front: false\n  users:\n    - {{username: a, password: x, subscribe: [\"ok/#\"]}}\n"
        ));
        assert!(problem(&validate(&cfg), "broker.users[0].subscribe")
            .message
            .contains("front"));
    }

    #[test]
    fn broker_limits_are_checked() {
        let cfg = parse(&format!(
            "{BASE}broker: {{max_connections: 0, segment_size: 1KiB, segment_count: 0, max_payload_size: 1MiB, max_inflight: 0}}"
        ));
        let f = fields(&cfg);
        for expected in [
            "broker.max_connections",
            "broker.segment_size",
            "broker.segment_count",
            "broker.max_payload_size",
            "broker.max_inflight",
        ] {
            assert!(f.contains(&expected.to_string()), "{expected} in {f:?}");
        }
    }

    #[test]
    fn store_limits_are_checked() {
        let cfg = parse(&format!(
            "{BASE}store: {{max_bytes: 512KiB, commit_interval: 11s, commit_max_rows: 100001, max_age: 0s}}"
        ));
        let f = fields(&cfg);
        for expected in [
            "store.max_bytes",
            "store.commit_interval",
            "store.commit_max_rows",
            "store.max_age",
        ] {
            assert!(f.contains(&expected.to_string()), "{expected} in {f:?}");
        }
        let cfg = parse(&format!(
            "{BASE}store: {{commit_interval: 10s, commit_max_rows: 100000, max_bytes: 1MiB}}"
        ));
        assert_eq!(
            validate(&cfg),
            Vec::new(),
            "the limits themselves are allowed"
        );
    }

    #[test]
    fn uplink_connection_settings_are_checked() {
        let cfg = parse(&format!(
            "{BASE}uplink:\n  url: mqtt://h\n  client_id: \"\"\n  tls: {{cert_file: c.pem}}\n  max_inflight: 0\n  max_rate: 0\n  reconnect_min: 1m\n  reconnect_max: 1s\n  keep_alive: 2s\n  password: x\n"
        ));
        let problems = validate(&cfg);
        for expected in [
            "uplink.client_id",
            "uplink.tls",
            "uplink.tls.key_file",
            "uplink.max_inflight",
            "uplink.max_rate",
            "uplink.reconnect_min",
            "uplink.keep_alive",
            "uplink.password",
        ] {
            problem(&problems, expected);
        }
        let cfg = parse(&format!("{BASE}uplink: {{url: \"http://h\"}}"));
        assert!(problem(&validate(&cfg), "uplink.url")
            .message
            .contains("scheme"));
    }

    #[test]
    fn forward_rules_check_filters_qos_and_templates() {
        let cfg = parse(&format!(
            "{BASE}uplink:\n  url: mqtts://h\n  forward:\n    - {{local: \"a/#/b\"}}\n    - {{local: c/+, qos: 2, remote: \"up/{{tpoic}}\"}}\n    - {{local: d, remote: \"up/#\"}}\n"
        ));
        let problems = validate(&cfg);
        problem(&problems, "uplink.forward[0].local");
        problem(&problems, "uplink.forward[1].qos");
        assert!(problem(&problems, "uplink.forward[1].remote")
            .message
            .contains("{tpoic}"));
        assert!(problem(&problems, "uplink.forward[2].remote")
            .message
            .contains("wildcard"));
    }

    #[test]
    fn forward_filters_may_nest_but_not_repeat_partly_overlap_or_shadow() {
        let ok = parse(&format!(
            "{BASE}uplink:\n  url: mqtt://h\n  forward:\n    - {{local: sensors/+/alarm, priority: 9}}\n    - {{local: \"sensors/#\"}}\n    - {{local: \"status/#\"}}\n"
        ));
        assert_eq!(
            validate(&ok),
            Vec::new(),
            "narrow before broad is how priorities work"
        );

        let bad = parse(&format!(
            "{BASE}uplink:\n  url: mqtt://h\n  forward:\n    - {{local: \"sensors/#\"}}\n    - {{local: \"sensors/#\"}}\n    - {{local: sensors/+/alarm, priority: 9}}\n    - {{local: +/kitchen/temp}}\n"
        ));
        let problems = validate(&bad);
        assert!(problem(&problems, "uplink.forward[1].local")
            .message
            .contains("merge"));
        assert!(problem(&problems, "uplink.forward[2].local")
            .message
            .contains("never applies"));
        assert!(problem(&problems, "uplink.forward[3].local")
            .message
            .contains("stored twice"));
    }

    #[test]
    fn downlink_rules_are_checked_and_echo_loops_refused() {
        let cfg = parse(&format!(
            "{BASE}uplink:\n  url: mqtt://h\n  forward:\n    - {{local: \"sensors/#\"}}\n  downlink:\n    - {{remote: \"edgegate/{{gateway_id}}/cmd/#\", local: cmd/}}\n    - {{remote: \"x/#/y\"}}\n    - {{remote: \"z/#\", local: \"a/+\"}}\n    - {{remote: \"sensors/+/set\"}}\n    - {{remote: \"q/#\", local: \"sensors/\"}}\n"
        ));
        let problems = validate(&cfg);
        assert!(
            !problems
                .iter()
                .any(|p| p.field.starts_with("uplink.downlink[0]")),
            "{problems:?}"
        );
        problem(&problems, "uplink.downlink[1].remote");
        problem(&problems, "uplink.downlink[2].local");
        let echo = problem(&problems, "uplink.downlink[3].remote");
        assert!(echo.message.contains("echo loop") && echo.message.contains("uplink.forward[0]"));
        assert!(problem(&problems, "uplink.downlink[4].local")
            .message
            .contains("sent back up"));
    }

    #[test]
    fn a_kept_session_warns_for_each_rule_that_cannot_tell_a_stale_command() {
        let with = |uplink: &str, rules: &str| {
            parse(&format!(
                "{BASE}uplink:\n  url: mqtt://h\n{uplink}  downlink:\n{rules}"
            ))
        };
        let plain = "    - {remote: \"a/#\", local: cmd/a/}\n";
        let stamped = "    - {remote: \"b/#\", local: cmd/b/, timestamp: ts}\n";
        let deliver = "    - {remote: \"c/#\", local: cmd/c/, while_offline: deliver}\n";
        let warnings =
            |cfg: &Config| queued_command_warnings(cfg.uplink.as_ref().expect("an uplink"));
        // A clean session (the default): nothing queued, nothing to warn about.
        assert_eq!(warnings(&with("", plain)), Vec::new());
        let fields =
            |cfg: &Config| -> Vec<String> { warnings(cfg).into_iter().map(|w| w.field).collect() };
        assert_eq!(
            fields(&with(
                "  clean_session: false\n",
                &format!("{plain}{stamped}")
            )),
            ["uplink.downlink[0].while_offline"]
        );
        let mixed = with("", &format!("{plain}{deliver}"));
        assert!(mixed
            .uplink
            .as_ref()
            .is_some_and(|u| u.persistent_session()));
        let w = warnings(&mixed);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].message.contains("another downlink rule"),
            "{}",
            w[0].message
        );
        // An explicit clean session wins over `deliver`: nothing is queued, and that is said.
        let clean = with("  clean_session: true\n", deliver);
        let w = warnings(&clean);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("queues nothing"), "{}", w[0].message);
        assert!(clean
            .uplink
            .as_ref()
            .is_some_and(|u| !u.persistent_session()));
    }

    #[test]
    fn a_downlink_max_age_under_a_second_and_an_empty_timestamp_field_are_refused() {
        let problems = validate(&parse(&format!(
            "{BASE}uplink:\n  url: mqtt://h\n  downlink:\n    - {{remote: \"a/#\", local: cmd/, max_age: 500ms, timestamp: \"\"}}\n"
        )));
        problem(&problems, "uplink.downlink[0].max_age");
        problem(&problems, "uplink.downlink[0].timestamp");
    }

    #[test]
    fn log_level_must_be_a_tracing_filter() {
        assert_eq!(
            validate(&parse(&format!(
                "{BASE}log: {{level: \"warn,edgegate::forward=debug\"}}"
            ))),
            Vec::new()
        );
        problem(
            &validate(&parse(&format!("{BASE}log: {{level: \"info,=[\"}}"))),
            "log.level",
        );
    }

    #[test]
    fn check_files_names_each_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let present = dir.path().join("ca.pem");
        std::fs::write(&present, "x").expect("write");
        let cfg = parse(&format!(
            "{BASE}uplink:\n  url: mqtts://h\n  tls: {{ca_file: {}, cert_file: {}, key_file: /nonexistent/k.pem}}\n",
            present.display(),
            dir.path().display()
        ));
        let problems = check_files(&cfg);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problem(&problems, "uplink.tls.cert_file")
            .message
            .contains("directory"));
        assert!(problem(&problems, "uplink.tls.key_file")
            .message
            .contains("cannot open"));
        assert_eq!(
            validate(&cfg),
            Vec::new(),
            "validate itself never looks at files"
        );
    }
}
