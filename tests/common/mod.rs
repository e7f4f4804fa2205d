//! Integration-test harness: the real `edgegate` binary, a real mosquitto upstream, real clients.
//!
//! - [`Gateway`] spawns `edgegate run` in a temp dir with stderr captured to a file,
//! - [`Mosquitto`] runs `/usr/sbin/mosquitto` on a free loopback port (optionally TLS, persistence),
//! - [`Subscriber`] collects `(topic, payload)` from `mosquitto_sub`,
//! - [`publish`] / [`publish_seq`] / [`publish_each`] send messages (mosquitto_pub, rumqttc),
//! - [`certs::generate`] makes a CA, a server and a client certificate with the `openssl` CLI.
//!
//! Every wait is bounded and every child process is killed when its owner drops, so a panicking
//! test leaves no orphans behind.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tempfile::TempDir;

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_edgegate");

/// How long a gateway may take to open its broker port.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

// ---------------------------------------------------------------------------------------------
// Ports and waiting

/// A loopback port that was free a moment ago. Ports handed out by this process are never handed
/// out twice, so parallel tests in one binary cannot collide with each other; another process can
/// still take the port, hence [`retry_on_port_clash`].
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    // Ports are taken from below the kernel's ephemeral range: a port from `bind(:0)` can be
    // handed out again as the source port of any outgoing connection (another test's client,
    // or our own readiness probe connecting to itself), and the server then fails to bind.
    let (lo, hi) = ephemeral_range();
    let (start, end) = if lo > 12_000 {
        (10_000, lo)
    } else {
        (hi.saturating_add(1), 65_535)
    };
    let span = u32::from(end - start);
    let mut seed = u32::from(std::process::id() as u16).wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..1000 {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = start + ((seed >> 8) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no fresh free port in {start}..{end} after 1000 attempts");
}

/// The kernel's ephemeral (outgoing source) port range.
fn ephemeral_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
        _ => (32_768, 60_999),
    }
}

/// Runs `attempt` up to `tries` times while it fails with [`StartError::PortClash`] (someone took
/// the port between [`free_port`] and the server's bind); the closure picks new ports each time.
pub fn retry_on_port_clash<T>(
    tries: usize,
    mut attempt: impl FnMut() -> Result<T, StartError>,
) -> T {
    let mut last = String::new();
    for _ in 0..tries {
        match attempt() {
            Ok(v) => return v,
            Err(StartError::PortClash(log)) => last = log,
            Err(StartError::Failed(log)) => panic!("start failed:\n{log}"),
        }
    }
    panic!("port clash {tries} times in a row; last log:\n{last}");
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        // A TCP self-connect (source port == destination port) "succeeds" with nobody listening.
        Ok(s) => s.local_addr().map(|a| a.port() != port).unwrap_or(false),
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child to exit, at most `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => return None,
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
    }
}

fn signal(child: &Child, sig: &str) {
    // std has no way to send SIGTERM and the crate forbids unsafe, so use kill(1).
    // A child that already exited makes kill(1) fail; callers then see its exit status anyway.
    let _ = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = wait_child(child, Duration::from_secs(5));
}

/// Waits until a freshly spawned server accepts TCP connections on `port`. If it exits first,
/// `is_clash(status, log)` tells a lost port race (retried by `retry_on_port_clash`) from a real
/// failure; if it never accepts, it is killed. Errors carry the server's log.
fn wait_accepting(
    child: &mut Child,
    port: u16,
    timeout: Duration,
    is_clash: impl Fn(ExitStatus, &str) -> bool,
    log: impl Fn() -> String,
) -> Result<(), StartError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("polling a spawned server") {
            let text = format!("exited early with {status}\n{}", log());
            return Err(if is_clash(status, &text) {
                StartError::PortClash(text)
            } else {
                StartError::Failed(text)
            });
        }
        if port_accepts(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            kill_and_reap(child);
            return Err(StartError::Failed(format!(
                "port {port} not accepting after {timeout:?}\n{}",
                log()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command with a deadline; kills it when the deadline passes (then `status` is a
/// signal death, which callers report as a hang).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout was piped");
    let mut err = child.stderr.take().expect("stderr was piped");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let status = match wait_child(&mut child, timeout) {
        Some(s) => s,
        None => {
            kill_and_reap(&mut child);
            child.wait().expect("reaping a killed child")
        }
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs the edgegate binary with `args` in `cwd`, bounded by `timeout`.
pub fn run_bin(cwd: &Path, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).env_remove("JOURNAL_STREAM");
    run_with_timeout(&mut cmd, timeout)
}

/// stdout and stderr of an [`Output`] as one string for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// Why a server did not start.
#[derive(Debug)]
pub enum StartError {
    /// Its port was taken by someone else; try again with fresh ports. Carries the log.
    PortClash(String),
    /// Anything else. Carries the log.
    Failed(String),
}

/// A running `edgegate run --config FILE`. Killed (SIGKILL) on drop.
pub struct Gateway {
    /// Temp dir owned by this gateway (when it created it).
    _tmp: Option<TempDir>,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Gateway {
    /// Starts a gateway in a fresh temp dir; `{dir}` in the YAML becomes that dir's absolute path.
    pub fn start(config_yaml: &str) -> Gateway {
        let tmp = tempfile::tempdir().expect("creating a temp dir");
        let dir = tmp.path().to_path_buf();
        let yaml = config_yaml.replace("{dir}", &dir.display().to_string());
        let mut gw = Gateway::start_with(&dir, &yaml);
        gw._tmp = Some(tmp);
        gw
    }

    /// Starts a gateway whose config is written to `dir/edgegate.yaml`; panics with the log when
    /// it does not become ready within [`READY_TIMEOUT`].
    pub fn start_with(dir: &Path, config_yaml: &str) -> Gateway {
        match Gateway::try_start_with(dir, config_yaml) {
            Ok(gw) => gw,
            Err(StartError::PortClash(log)) | Err(StartError::Failed(log)) => {
                panic!("gateway did not start:\n{log}")
            }
        }
    }

    /// Like [`Gateway::start_with`] but reports a port clash so callers can retry.
    pub fn try_start_with(dir: &Path, config_yaml: &str) -> Result<Gateway, StartError> {
        let config = dir.join("edgegate.yaml");
        fs::write(&config, config_yaml).expect("writing the gateway config");
        let port = ready_port(config_yaml);
        let mut gw = Gateway {
            _tmp: None,
            dir: dir.to_path_buf(),
            log: dir.join("edgegate.log"),
            config,
            port,
            child: None,
        };
        gw.spawn_and_wait()?;
        Ok(gw)
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the gateway log");
        writeln!(log, "===== harness: starting edgegate =====").expect("writing the gateway log");
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .current_dir(&self.dir)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning the edgegate binary");
        self.child = Some(child);
        let mut child = self.child.take().expect("just spawned");
        let result = wait_accepting(
            &mut child,
            self.port,
            READY_TIMEOUT,
            // A taken port: edgegate exits 70 naming the address ("Address in use").
            |status, log| status.code() == Some(70) && log.contains("in use"),
            || self.log(),
        );
        if result.is_ok() {
            self.child = Some(child);
        }
        result
    }

    /// The broker port the harness waited on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Everything the gateway wrote to stdout/stderr so far, over all its runs.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the gateway process is still running (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; panics (after SIGKILL) on a hang.
    pub fn sigterm_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("gateway is not running");
        signal(&child, "-TERM");
        match wait_child(&mut child, timeout) {
            Some(status) => status,
            None => {
                kill_and_reap(&mut child);
                panic!(
                    "gateway still running {timeout:?} after SIGTERM; log:\n{}",
                    self.log()
                )
            }
        }
    }

    /// `kill -9`: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts the binary again with the same config and dir (after a stop or kill).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a running gateway");
        if let Err(StartError::PortClash(log) | StartError::Failed(log)) = self.spawn_and_wait() {
            panic!("gateway did not restart:\n{log}");
        }
    }

    /// Runs `edgegate <args> --config FILE` against this gateway's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        let config = self.config.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", config.as_str()]);
        run_bin(&self.dir, &all, Duration::from_secs(20))
    }

    /// `edgegate buffer stats --json`, parsed. Panics with the output when it fails.
    /// `edgegate status --json`, parsed (`Null` when it cannot be read: the gateway may be
    /// between states).
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn buffer_stats(&self) -> serde_json::Value {
        let out = self.cli(&["buffer", "stats", "--json"]);
        assert!(
            out.status.success(),
            "buffer stats failed:\n{}",
            output_text(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "buffer stats --json is not JSON ({e}):\n{}",
                output_text(&out)
            )
        })
    }

    /// `edgegate buffer export`: one JSON object per queued row.
    pub fn buffer_export(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["buffer", "export"]);
        assert!(
            out.status.success(),
            "buffer export failed:\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("export line is not JSON ({e}): {l}"))
            })
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// The port that tells us the gateway is ready: `broker.listen`, else `listen_v5`, else the TLS
/// listener.
fn ready_port(config_yaml: &str) -> u16 {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(config_yaml).expect("the test's own config must be YAML");
    let broker = &doc["broker"];
    let port = [
        &broker["listen"],
        &broker["listen_v5"],
        &broker["tls"]["listen"],
    ]
    .into_iter()
    .find_map(|v| v.as_str().and_then(|s| s.parse::<SocketAddr>().ok()))
    .map(|a| a.port())
    .expect("test configs must set broker.listen (the default 0.0.0.0:1883 is not for tests)");
    port
}

/// The usual test config: local broker on `port`, store in `dir`, forwarding `sensors/#` to the
/// upstream at `upstream_url` (no uplink when `None`). `extra_uplink` lines are indented into
/// the uplink section, `extra_store` into the store section.
pub fn gateway_yaml(
    dir: &Path,
    port: u16,
    upstream_url: Option<&str>,
    extra_store: &str,
    extra_uplink: &str,
) -> String {
    let mut y = format!(
        "gateway:\n  id: test\n  shutdown_timeout: 5s\nbroker:\n  listen: 127.0.0.1:{port}\nstore:\n  path: {}\n",
        dir.join("buffer.db").display()
    );
    for line in extra_store.lines().filter(|l| !l.trim().is_empty()) {
        y.push_str(&format!("  {line}\n"));
    }
    // Never the packaged /run/edgegate/status.sock: tests run side by side.
    y.push_str(&format!(
        "status:\n  socket: {}\n",
        dir.join("status.sock").display()
    ));
    if let Some(url) = upstream_url {
        y.push_str(&format!(
            "uplink:\n  url: {url}\n  reconnect_min: 100ms\n  reconnect_max: 1s\n  forward:\n    - local: \"sensors/#\"\n  downlink:\n    - remote: \"edgegate/{{gateway_id}}/cmd/#\"\n      local: \"cmd/\"\n"
        ));
        for line in extra_uplink.lines().filter(|l| !l.trim().is_empty()) {
            y.push_str(&format!("  {line}\n"));
        }
    }
    y
}

/// Reads a number from `buffer stats --json` by its dotted path (e.g. `dropped.store_full`),
/// panicking with the whole document when the field is missing.
pub fn stat(stats: &serde_json::Value, path: &str) -> u64 {
    let mut v = stats;
    for key in path.split('.') {
        v = &v[key];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("no number at `{path}` in buffer stats:\n{stats:#}"))
}

// ---------------------------------------------------------------------------------------------
// Forwarding scenarios (shared by forward.rs and chaos.rs)

/// Starts a gateway forwarding `sensors/#` to `upstream_url`, retrying on a port clash.
pub fn start_gateway(
    dir: &Path,
    upstream_url: &str,
    extra_store: &str,
    extra_uplink: &str,
) -> Gateway {
    retry_on_port_clash(3, || {
        let yaml = gateway_yaml(
            dir,
            free_port(),
            Some(upstream_url),
            extra_store,
            extra_uplink,
        );
        Gateway::try_start_with(dir, &yaml)
    })
}

pub fn persistent_upstream() -> Mosquitto {
    Mosquitto::start(MosquittoOpts {
        persistence: true,
        ..MosquittoOpts::default()
    })
}

/// Waits (bounded) until `buffer stats` reports `rows` queued rows; returns the last stats.
pub fn wait_rows(gw: &Gateway, rows: u64, timeout: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let reached = wait_until(timeout, || {
        last = gw.buffer_stats();
        stat(&last, "rows") == rows
    });
    assert!(
        reached,
        "store never held {rows} rows; last stats:\n{last:#}\nlog:\n{}",
        gw.log()
    );
    last
}

pub fn assert_complete_in_order(
    sub: &Subscriber,
    topic: &str,
    n: usize,
    gw: &Gateway,
) -> SeqReport {
    // Duplicates count towards the subscriber's total, so wait on the sequence, not the count.
    let mut report = check_seq(&[], topic, n);
    wait_until(Duration::from_secs(40), || {
        report = check_seq(&sub.messages(), topic, n);
        report.missing.is_empty()
    });
    assert!(
        report.missing.is_empty(),
        "lost messages: {}\ngateway log:\n{}",
        report.summary(),
        gw.log()
    );
    assert_eq!(report.out_of_order, 0, "{}", report.summary());
    report
}

// ---------------------------------------------------------------------------------------------
// Mosquitto upstream

/// TLS files for a mosquitto listener.
#[derive(Clone, Debug)]
pub struct MosquittoTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub require_certificate: bool,
}

#[derive(Clone, Debug, Default)]
pub struct MosquittoOpts {
    /// Keep sessions and queued messages across a graceful restart.
    pub persistence: bool,
    pub tls: Option<MosquittoTls>,
    /// `log_type all`: logs every PUBLISH received (used as a witness of arrival).
    pub verbose_log: bool,
}

/// A mosquitto broker on a free loopback port, killed on drop.
pub struct Mosquitto {
    tmp: TempDir,
    port: u16,
    opts: MosquittoOpts,
    child: Option<Child>,
    runs: usize,
}

impl Mosquitto {
    pub fn start(opts: MosquittoOpts) -> Mosquitto {
        retry_on_port_clash(5, || {
            let mut m = Mosquitto {
                tmp: tempfile::tempdir().expect("creating a temp dir"),
                port: free_port(),
                opts: opts.clone(),
                child: None,
                runs: 0,
            };
            m.spawn_and_wait()?;
            Ok(m)
        })
    }

    fn log_path(&self) -> PathBuf {
        self.tmp.path().join("mosquitto.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let dir = self.tmp.path();
        // Running as root: without `user root` mosquitto drops to user `mosquitto`, which could
        // not write the persistence dir nor read the keys in our temp dir.
        let mut conf = format!(
            "user root\nlistener {} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nlog_dest stderr\n",
            self.port
        );
        if self.opts.verbose_log {
            conf.push_str("log_type all\n");
        }
        if self.opts.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\n",
                dir.display()
            ));
        }
        if let Some(tls) = &self.opts.tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                tls.ca_file.display(),
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.require_certificate
            ));
        }
        let conf_path = dir.join("mosquitto.conf");
        fs::write(&conf_path, conf).expect("writing mosquitto.conf");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the mosquitto log");
        self.runs += 1;
        writeln!(log, "===== harness: mosquitto run {} =====", self.runs)
            .expect("writing the mosquitto log");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning mosquitto");
        self.child = Some(child);
        let mut child = self.child.take().expect("just spawned");
        let result = wait_accepting(
            &mut child,
            self.port,
            Duration::from_secs(10),
            |_, log| log.contains("in use"),
            || self.log(),
        );
        if result.is_ok() {
            self.child = Some(child);
        }
        result
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, or `mqtts://` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "mqtts"
        } else {
            "mqtt"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn tls(&self) -> Option<&MosquittoTls> {
        self.opts.tls.as_ref()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Graceful stop (SIGTERM); with persistence, sessions are saved.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "-TERM");
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                kill_and_reap(&mut child);
            }
        }
        let _ = wait_until(Duration::from_secs(5), || !port_accepts(self.port));
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts again on the same port (stopping first if needed).
    pub fn restart(&mut self) {
        self.stop();
        // The old socket may linger briefly; mosquitto sets SO_REUSEADDR, so a few tries suffice.
        for attempt in 0..5 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::PortClash(_)) if attempt < 4 => {
                    thread::sleep(Duration::from_millis(200))
                }
                Err(StartError::PortClash(log) | StartError::Failed(log)) => {
                    panic!("mosquitto did not restart on port {}:\n{log}", self.port)
                }
            }
        }
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// Topics of every PUBLISH this broker logged receiving from `client_id` (needs
    /// `verbose_log`), in order. This is the upstream's own record of what it accepted, so it
    /// does not depend on a subscriber being connected at the right moment.
    pub fn received_topics_from(&self, client_id: &str) -> Vec<String> {
        self.received_from(client_id)
            .into_iter()
            .map(|r| r.topic)
            .collect()
    }

    /// Every PUBLISH this broker logged receiving from `client_id` (needs `verbose_log`), from
    /// lines like `Received PUBLISH from test (d0, q1, r0, m7, 'sensors/a', ... (5 bytes))`.
    pub fn received_from(&self, client_id: &str) -> Vec<Received> {
        let needle = format!("Received PUBLISH from {client_id} (");
        self.log()
            .lines()
            .filter_map(|line| {
                let rest = &line[line.find(&needle)? + needle.len()..];
                let start = rest.find(", '")? + 3;
                let end = rest.rfind("', ...")?;
                let flags = &rest[..start];
                let flag = |name: char| {
                    flags
                        .split(", ")
                        .find_map(|f| f.strip_prefix(name)?.parse::<u8>().ok())
                };
                (start <= end).then(|| Received {
                    topic: rest[start..end].to_string(),
                    qos: flag('q').unwrap_or(u8::MAX),
                    retain: flag('r') == Some(1),
                })
            })
            .collect()
    }
}

/// One PUBLISH as the upstream logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Options for a [`Subscriber`] or [`publish`].
#[derive(Clone, Debug, Default)]
pub struct ClientOpts {
    pub qos: u8,
    /// Host to connect to; default `127.0.0.1`. TLS clients may need `localhost`: OpenSSL sends
    /// an IP literal as SNI, which some TLS servers refuse.
    pub host: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5 (`-V mqttv5`).
    pub v5: bool,
    /// A `mosquitto_sub -F` format instead of `-v`; the first space-separated word of each
    /// line becomes the topic, the rest the payload (e.g. `%t %P|%p` for MQTT 5 properties).
    pub format: Option<String>,
    /// (ca, cert, key) — cert and key may be absent for server-auth only.
    pub tls: Option<(PathBuf, Option<PathBuf>, Option<PathBuf>)>,
}

impl ClientOpts {
    pub fn qos(qos: u8) -> ClientOpts {
        ClientOpts {
            qos,
            ..ClientOpts::default()
        }
    }

    /// Client options matching a mosquitto's TLS files (client cert included).
    pub fn for_mosquitto(m: &Mosquitto, qos: u8) -> ClientOpts {
        ClientOpts {
            qos,
            tls: m.tls().map(|t| {
                (
                    t.ca_file.clone(),
                    Some(t.cert_file.clone()),
                    Some(t.key_file.clone()),
                )
            }),
            ..ClientOpts::default()
        }
    }

    fn host(&self) -> &str {
        self.host.as_deref().unwrap_or("127.0.0.1")
    }

    fn args(&self, cmd: &mut Command) {
        if let Some(u) = &self.username {
            cmd.args(["-u", u.as_str()]);
        }
        if let Some(p) = &self.password {
            cmd.args(["-P", p.as_str()]);
        }
        if self.v5 {
            cmd.args(["-V", "mqttv5"]);
        }
        if let Some((ca, cert, key)) = &self.tls {
            cmd.arg("--cafile").arg(ca);
            if let Some(c) = cert {
                cmd.arg("--cert").arg(c);
            }
            if let Some(k) = key {
                cmd.arg("--key").arg(k);
            }
        }
    }
}

/// A message as a subscriber saw it.
pub type Msg = (String, String);

#[derive(Default)]
struct SubState {
    msgs: Vec<Msg>,
    subacks: usize,
    closed: bool,
}

/// `mosquitto_sub` with a persistent session (`-c -i ID`, except for MQTT 5) collecting
/// `(topic, payload)`; it reconnects and resubscribes by itself. Killed on drop.
pub struct Subscriber {
    child: Child,
    state: Arc<Mutex<SubState>>,
    stderr: PathBuf,
    _tmp: TempDir,
}

impl Subscriber {
    /// Subscribes on 127.0.0.1:`port` and returns once the first SUBACK arrived (bounded 10 s).
    pub fn start(port: u16, filter: &str, id: &str, opts: &ClientOpts) -> Subscriber {
        let tmp = tempfile::tempdir().expect("creating a temp dir");
        let stderr = tmp.path().join("mosquitto_sub.err");
        let mut cmd = Command::new("stdbuf");
        // Line-buffered stdout so each message reaches us as soon as it is printed.
        cmd.args(["-oL", "mosquitto_sub", "-h", opts.host(), "-p"])
            .arg(port.to_string())
            .args([
                "-t",
                filter,
                "-q",
                opts.qos.to_string().as_str(),
                "-d",
                "-i",
                id,
            ]);
        match &opts.format {
            Some(f) => cmd.args(["-F", f.as_str()]),
            None => cmd.arg("-v"),
        };
        if !opts.v5 {
            cmd.arg("-c");
        }
        opts.args(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("creating the subscriber's stderr file"))
            .spawn()
            .expect("spawning mosquitto_sub");
        let stdout = child.stdout.take().expect("stdout was piped");
        let state = Arc::new(Mutex::new(SubState::default()));
        let st = Arc::clone(&state);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                // -d debug lines start with "Client <id> ..." or "Subscribed (mid: …".
                if line.starts_with("Client ") || line.starts_with("Subscribed (mid") {
                    if line.contains("received SUBACK") {
                        s.subacks += 1;
                    }
                    continue;
                }
                let (topic, payload) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                s.msgs.push((topic.to_string(), payload.to_string()));
            }
            st.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        });
        let sub = Subscriber {
            child,
            state,
            stderr,
            _tmp: tmp,
        };
        if !sub.wait_subscribed(1, Duration::from_secs(10)) {
            panic!(
                "mosquitto_sub on port {port} got no SUBACK within 10 s; stderr:\n{}",
                read_lossy(&sub.stderr)
            );
        }
        sub
    }

    /// Waits until `n` SUBACKs were seen in total (each reconnect resubscribes).
    pub fn wait_subscribed(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.lock().subacks >= n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until at least `n` messages arrived or `timeout` passed; returns all received.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Msg> {
        let _ = wait_until(timeout, || {
            let s = self.lock();
            s.msgs.len() >= n || s.closed
        });
        self.messages()
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.lock().msgs.clone()
    }

    pub fn count(&self) -> usize {
        self.lock().msgs.len()
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// One message with `mosquitto_pub` (bounded 10 s); returns the process output.
pub fn publish_with(
    port: u16,
    topic: &str,
    payload: &str,
    retain: bool,
    opts: &ClientOpts,
) -> Output {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", opts.host(), "-p"])
        .arg(port.to_string())
        .args([
            "-t",
            topic,
            "-m",
            payload,
            "-q",
            opts.qos.to_string().as_str(),
        ]);
    if retain {
        cmd.arg("-r");
    }
    opts.args(&mut cmd);
    run_with_timeout(&mut cmd, Duration::from_secs(10))
}

/// One plain message with `mosquitto_pub`; panics when it fails.
pub fn publish(port: u16, topic: &str, payload: &str, qos: u8) {
    let out = publish_with(port, topic, payload, false, &ClientOpts::qos(qos));
    assert!(
        out.status.success(),
        "mosquitto_pub failed:\n{}",
        output_text(&out)
    );
}

pub fn qos_of(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A single-threaded tokio runtime for a synchronous test to drive rumqttc.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

/// Publishes `n` messages to `topic` with payload = the sequence number (0, 1, …) using
/// rumqttc; returns how many were acknowledged (PUBACK/PUBCOMP; for QoS 0, how many were sent).
pub fn publish_seq(port: u16, topic: &str, n: usize, qos: u8) -> usize {
    let topic = topic.to_string();
    publish_each(port, n, qos, move |i| {
        (topic.clone(), i.to_string().into_bytes())
    })
}

/// Publishes `n` messages built by `make(seq)` with rumqttc, 100 in flight, bounded by 60 s;
/// returns how many were acknowledged.
pub fn publish_each(
    port: u16,
    n: usize,
    qos: u8,
    make: impl Fn(usize) -> (String, Vec<u8>) + Send + 'static,
) -> usize {
    runtime().block_on(async move {
        let mut opts = MqttOptions::new(client_id("pub"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(100)
            .set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let level = qos_of(qos);
        let sender = tokio::spawn(async move {
            for i in 0..n {
                let (topic, payload) = make(i);
                if client.publish(topic, level, false, payload).await.is_err() {
                    break;
                }
            }
            client
        });
        let mut acked = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while acked < n {
            let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(ev)) => ev,
                Ok(Err(_)) | Err(_) => break,
            };
            match ev {
                Event::Incoming(Packet::PubAck(_)) if qos == 1 => acked += 1,
                Event::Incoming(Packet::PubComp(_)) if qos == 2 => acked += 1,
                Event::Outgoing(Outgoing::Publish(_)) if qos == 0 => acked += 1,
                _ => {}
            }
        }
        // A held publisher's sender may be blocked on the full request channel: give it a
        // moment, then let dropping the event loop end it.
        if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_millis(500), sender).await {
            let _ = client.disconnect().await;
            // Let the DISCONNECT go out so the broker does not see an abrupt close.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while eventloop.poll().await.is_ok() {}
            })
            .await;
        }
        acked
    })
}

/// Publishes `0..n` to `topic` at QoS 1, one message per `every` (the pause yields to the event
/// loop, unlike a sleep inside [`publish_each`]'s closure), bounded by `every × n + 30 s`;
/// returns how many were acknowledged.
pub fn publish_paced(port: u16, topic: &str, n: usize, every: Duration) -> usize {
    let topic = topic.to_string();
    runtime().block_on(async move {
        let mut opts = MqttOptions::new(client_id("paced"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let sender = tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep(every).await;
                if client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, i.to_string())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let deadline = tokio::time::Instant::now()
            + every.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
            + Duration::from_secs(30);
        let mut acked = 0usize;
        while acked < n {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        sender.abort();
        acked
    })
}

/// A client id unique within this process.
pub fn client_id(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u32(..))
}

// ---------------------------------------------------------------------------------------------
// Checking sequences

/// What arrived of the sequence 0..n.
#[derive(Debug)]
pub struct SeqReport {
    /// Sequence numbers that never arrived.
    pub missing: Vec<usize>,
    /// Arrivals beyond the first of each number.
    pub duplicates: usize,
    /// First arrivals that came after a higher number's first arrival.
    pub out_of_order: usize,
    /// Payloads that were not a number in 0..n.
    pub foreign: usize,
}

/// Checks payload sequence numbers (see [`publish_seq`]) among `msgs` on exactly `topic`.
pub fn check_seq(msgs: &[Msg], topic: &str, n: usize) -> SeqReport {
    check_numbers(
        msgs.iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.trim().parse::<usize>().ok()),
        n,
    )
}

/// Checks a stream of sequence numbers (`None` = unparsable) against 0..n.
pub fn check_numbers(seqs: impl Iterator<Item = Option<usize>>, n: usize) -> SeqReport {
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    let mut highest_first: Option<usize> = None;
    let mut report = SeqReport {
        missing: Vec::new(),
        duplicates: 0,
        out_of_order: 0,
        foreign: 0,
    };
    for seq in seqs {
        match seq {
            Some(s) if s < n => {
                let count = seen.entry(s).or_insert(0);
                *count += 1;
                if *count > 1 {
                    report.duplicates += 1;
                } else {
                    if highest_first.is_some_and(|h| s < h) {
                        report.out_of_order += 1;
                    }
                    highest_first = highest_first.max(Some(s));
                }
            }
            _ => report.foreign += 1,
        }
    }
    report.missing = (0..n).filter(|i| !seen.contains_key(i)).collect();
    report
}

impl SeqReport {
    /// A short description for assertion messages (missing numbers abbreviated).
    pub fn summary(&self) -> String {
        let shown: Vec<_> = self.missing.iter().take(20).collect();
        format!(
            "missing {} (first: {shown:?}), duplicates {}, out of order {}, foreign {}",
            self.missing.len(),
            self.duplicates,
            self.out_of_order,
            self.foreign
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

pub mod certs {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Duration;

    /// Paths written by [`generate`].
    #[derive(Clone, Debug)]
    pub struct Certs {
        pub ca_cert: PathBuf,
        pub ca_key: PathBuf,
        pub server_cert: PathBuf,
        pub server_key: PathBuf,
        pub client_cert: PathBuf,
        pub client_key: PathBuf,
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(dir);
        let out = super::run_with_timeout(&mut cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\n{}",
            super::output_text(&out)
        );
    }

    /// A CA, a server certificate for 127.0.0.1/localhost and a client certificate
    /// (CN=test-client, O=edgegate), all PEM, all readable by anyone (mosquitto may drop root).
    pub fn generate(dir: &Path) -> Certs {
        let days = "3650";
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                days,
                "-subj",
                "/CN=edgegate test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("writing server.ext");
        fs::write(
            dir.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        )
        .expect("writing client.ext");
        for (name, subj) in [
            ("server", "/CN=localhost"),
            ("client", "/CN=test-client/O=edgegate"),
        ] {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            let ext = format!("{name}.ext");
            openssl(
                dir,
                &[
                    "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                    subj,
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    days,
                    "-sha256",
                    "-extfile",
                    &ext,
                ],
            );
        }
        for entry in fs::read_dir(dir).expect("listing the cert dir").flatten() {
            let mut perms = entry.metadata().expect("stat of a cert file").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
            fs::set_permissions(entry.path(), perms).expect("chmod of a cert file");
        }
        Certs {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pseudo-terminals (serial adapters without hardware)

/// Two linked pseudo-terminals made by `socat`: what is written into `device` comes out of
/// `port` and the other way round. The gateway opens `port` as its serial port; the test plays
/// the device on `device`. Killed on drop (both paths then vanish, like an unplugged adapter).
pub struct PtyPair {
    child: Option<Child>,
    pub port: PathBuf,
    pub device: PathBuf,
}

impl PtyPair {
    /// Creates `dir/<name>-port` and `dir/<name>-device`; panics when socat does not make them
    /// within 10 s.
    pub fn start(dir: &Path, name: &str) -> PtyPair {
        let mut p = PtyPair {
            child: None,
            port: dir.join(format!("{name}-port")),
            device: dir.join(format!("{name}-device")),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", self.port.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.device.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning socat (apt-get install socat)");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self.port.exists()
                && self.device.exists()),
            "socat did not create {} and {}",
            self.port.display(),
            self.device.display()
        );
    }

    /// Closes both terminals (the gateway's port sees a hang-up; the paths disappear).
    pub fn close(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
        let _ = wait_until(Duration::from_secs(5), || !self.port.exists());
        let _ = fs::remove_file(&self.port);
        let _ = fs::remove_file(&self.device);
    }

    /// Creates the pair again under the same paths (the adapter plugged back in).
    pub fn reopen(&mut self) {
        self.close();
        self.spawn();
    }

    /// Writes bytes as the device.
    pub fn write(&self, bytes: &[u8]) {
        let mut f = OpenOptions::new()
            .write(true)
            .open(&self.device)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.device.display()));
        f.write_all(bytes).expect("writing into the pty");
        f.flush().expect("flushing the pty");
    }

    /// Reads what the gateway wrote to the device until `want` bytes arrived or `timeout`.
    pub fn read_for(&self, want: usize, timeout: Duration) -> Vec<u8> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.device)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.device.display()));
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = std::io::Read::read(&mut f, &mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => got.extend(b),
                Err(_) => break,
            }
        }
        got
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small filesystems (full-disk and read-only tests; need root)

/// A tmpfs mounted for one test, unmounted on drop (declare it before the gateway, so the
/// gateway is killed first).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `4m`) at `path`; `Err` carries why not (not root, no
    /// mount permission in a container).
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(path),
            Duration::from_secs(10),
        );
        if out.status.success() {
            Ok(Tmpfs {
                path: path.to_path_buf(),
            })
        } else {
            Err(output_text(&out))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that still holds a file there must not leave the mount behind.
        let _ = run_with_timeout(
            Command::new("umount").arg("-l").arg(&self.path),
            Duration::from_secs(10),
        );
    }
}

/// True where a skipped environment test would hide a hole: CI (`CI` set) or running as root,
/// where mounting a tmpfs or a loop device must work.
pub fn skipping_is_forbidden() -> bool {
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false");
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    ci || root
}

/// A test that cannot run here says so on a line of its own on stderr, `SKIPPED: <test>: <why>`,
/// which `tests/ci.sh` collects and prints; in CI or as root (see [`skipping_is_forbidden`]) it fails
/// instead, so a broken environment never counts as a pass. The caller returns after this.
pub fn skip(test: &str, why: &str) {
    if skipping_is_forbidden() {
        panic!("{test} cannot run here, and skipping is not allowed in CI or as root: {why}");
    }
    // Straight to the process's stderr, past the test harness's capture: a passing test's
    // output is otherwise hidden, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {test}: {}",
        why.trim().replace('\n', " | ")
    );
}

/// Fills `path` with `bytes` of real data (tmpfs has no holes to cheat with).
pub fn write_filler(path: &Path, bytes: usize) {
    let mut f = fs::File::create(path).expect("creating the filler file");
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        if let Err(e) = f.write_all(&chunk[..n]) {
            panic!("writing the filler file: {e}");
        }
        left -= n;
    }
    f.sync_all().expect("syncing the filler file");
}

/// Fills the filesystem holding `path` completely: writes `path` until ENOSPC (tmpfs has no holes
/// to cheat with). Returns the bytes written.
pub fn fill_up(path: &Path) -> u64 {
    let mut f = fs::File::create(path).expect("creating the filler file");
    let chunk = vec![0x5au8; 4096];
    let mut written = 0u64;
    // Bounded: a filesystem of a test is at most a few hundred MiB.
    for _ in 0..(1 << 18) {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

/// A small ext4 filesystem on a loop device, mounted with `errors=remount-ro`: an ext4 error
/// (injected through `/sys/fs/ext4/<dev>/trigger_fs_error`) turns it read-only underneath
/// open files, exactly as an SD card that fails does. Unmounted and detached on drop.
pub struct Ext4Loop {
    pub path: PathBuf,
    dev: String,
    _img: TempDir,
}

impl Ext4Loop {
    /// `Err` carries why not (not root, no loop devices, no ext4).
    pub fn mount(path: &Path, mib: u64) -> Result<Ext4Loop, String> {
        let img_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let img = img_dir.path().join("card.img");
        let f = fs::File::create(&img).map_err(|e| e.to_string())?;
        f.set_len(mib << 20).map_err(|e| e.to_string())?;
        drop(f);
        let out = run_with_timeout(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&img),
            Duration::from_secs(30),
        );
        if !out.status.success() {
            return Err(format!("mkfs.ext4: {}", output_text(&out)));
        }
        let out = run_with_timeout(
            Command::new("losetup").args(["-f", "--show"]).arg(&img),
            Duration::from_secs(10),
        );
        if !out.status.success() {
            return Err(format!("losetup: {}", output_text(&out)));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = run_with_timeout(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "errors=remount-ro"])
                .arg(&dev)
                .arg(path),
            Duration::from_secs(10),
        );
        if !out.status.success() {
            let _ = run_with_timeout(
                Command::new("losetup").args(["-d", &dev]),
                Duration::from_secs(10),
            );
            return Err(format!("mount: {}", output_text(&out)));
        }
        Ok(Ext4Loop {
            path: path.to_path_buf(),
            dev,
            _img: img_dir,
        })
    }

    /// Injects an ext4 error: the kernel remounts the filesystem read-only at once.
    pub fn fail_to_read_only(&self) -> Result<(), String> {
        let name = Path::new(&self.dev)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        fs::write(
            format!("/sys/fs/ext4/{name}/trigger_fs_error"),
            "edgegate test\n",
        )
        .map_err(|e| format!("trigger_fs_error: {e}"))
    }
}

impl Drop for Ext4Loop {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("umount").arg("-l").arg(&self.path),
            Duration::from_secs(10),
        );
        let _ = run_with_timeout(
            Command::new("losetup").args(["-d", &self.dev]),
            Duration::from_secs(10),
        );
    }
}

/// The README's bound on acknowledgements a crash can lose (each one a duplicate after the
/// restart) for an uplink forwarding `rate` messages a second at the default
/// `store.commit_interval` (10 ms): acks wait in the forwarder at most 5 ms and in the store at
/// most ten lingers (100 ms), and never more than 768 in all (three batches of 256).
pub fn uncommitted_acks_bound(rate: usize) -> usize {
    (rate * 105 / 1000).min(768)
}
