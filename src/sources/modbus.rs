//! Modbus masters: one task per bus (an RTU line or a Modbus TCP endpoint) polls its slaves
//! and turns their points into readings; writable points obey command topics.
//!
//! **Framing and timing (RTU)** are ours, over tokio-serial, not tokio-modbus's: before each
//! request the line must have been silent for t3.5 at the configured baud (the end of our own
//! frame on the wire counts: written bytes take `bytes × 11 bits / baud` to leave); bytes that
//! arrive while we wait (a late answer, noise) are discarded and restart the silence; each
//! response is decoded against its request ([`RtuDecoder`]: unit id, function, byte count, CRC),
//! and the response timeout starts when our request has left the wire. See the README's
//! dependency notes for why not tokio-modbus.
//!
//! **Schedule**: each slave has its own `interval`; the bus serves whichever is due first.
//! Each request is tried `1 + retries` times. A slave whose read times out on every attempt is
//! marked offline (logged once) and its remaining reads of that poll are skipped; while offline
//! it gets one probe request per interval, without retries, so a dead slave costs the others
//! one `timeout` per interval, never more. Queued commands run between polls.
//!
//! **Faults** are counted per slave and reason in `modbus_requests_total{bus,slave,result}`
//! (`ok`, `timeout`, `incomplete`, `crc`, `wrong_unit`, `wrong_function`, `byte_count`,
//! `length`, `echo`, an exception's name, …), per point in `modbus_point_errors_total`, and in
//! the slave's sensor entry (`edgegate status`). The port is reopened (the TCP connection
//! re-established) with backoff after it is lost, like `sources::serial`.
//!
//! **Writes**: a command on a writable point's command topic (a number, `{"value": n}` whose
//! other keys are not read, or on/off for bools) is range-checked, encoded, written (function 5, 6 or 16), read back and the
//! value read back is published retained on the point's state topic. A refused or failed command
//! is counted (`modbus_commands_total{…,result}`), logged, and answered on
//! `<state_topic>/refused` with the reason. Retained command messages are never executed, so a
//! restart or reload writes nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::codec::command::parse_switch;
use crate::codec::modbus::{
    self as mb, FrameError, Mbap, Request, Response, RtuDecoder, RtuTiming, Silence, Span, Table,
    Value, ValueType, MBAP_LEN,
};
use crate::codec::payload;
use crate::config::modbus::{
    ModbusBusConfig, ModbusConfig, ModbusPointConfig, ModbusSlaveConfig, PublishMode,
};
use crate::config::Config;
use crate::hw::clock::Clock;
use crate::hw::serial::SerialPort;
use crate::intake::Reading;
use crate::shared::registry::{registry, Sensor};
use crate::shared::RateLimited;

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands waiting per bus; more are refused (`queue_full`).
pub const COMMAND_QUEUE: usize = 32;

/// Why a request got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Nothing (or only part of a frame: `incomplete`) within the timeout.
    Timeout { partial: usize },
    /// An answer that is not the response (CRC, unit, function, …) or an exception.
    Frame(FrameError),
    /// The port or connection failed: it is reopened.
    Io(String),
}

impl Fault {
    pub fn reason(&self) -> &'static str {
        match self {
            Fault::Timeout { partial: 0 } => "timeout",
            Fault::Timeout { .. } => "incomplete",
            Fault::Frame(e) => e.reason(),
            Fault::Io(_) => "io",
        }
    }
    fn describe(&self) -> String {
        match self {
            Fault::Timeout { partial: 0 } => "no answer".into(),
            Fault::Timeout { partial } => format!("only {partial} bytes of an answer"),
            Fault::Frame(e) => e.to_string(),
            Fault::Io(e) => e.clone(),
        }
    }
}

/// Line traffic of one bus (`modbus_line_frames_total{bus}`,
/// `modbus_line_bytes_total{bus,direction}`): from these the benchmark computes how long the
/// same exchange takes on a real line (bytes × 11 bits / baud + a t3.5 silence per frame).
/// `Default` makes unregistered counters (unit tests).
#[derive(Debug, Default)]
pub struct LineCounters {
    pub frames: Arc<AtomicU64>,
    pub bytes_out: Arc<AtomicU64>,
    pub bytes_in: Arc<AtomicU64>,
}

impl LineCounters {
    /// The bus's counters in the registry (/metrics).
    pub fn registered(bus: &str) -> LineCounters {
        let r = registry();
        LineCounters {
            frames: r.counter("modbus_line_frames_total", &[("bus", bus)]),
            bytes_out: r.counter(
                "modbus_line_bytes_total",
                &[("bus", bus), ("direction", "out")],
            ),
            bytes_in: r.counter(
                "modbus_line_bytes_total",
                &[("bus", bus), ("direction", "in")],
            ),
        }
    }
}

// ─── RTU ──────────────────────────────────────────────────────────────────────────────────────────

/// An RTU line: the port, its timing, and the silence kept before each request.
pub struct Rtu {
    port: Box<dyn SerialPort>,
    timing: RtuTiming,
    silence: Silence<Instant>,
    turnaround: Duration,
    buf: Vec<u8>,
    line: Arc<LineCounters>,
    /// Bytes received outside any answer (discarded).
    pub stray: u64,
}

fn io_fault(e: std::io::Error) -> Fault {
    Fault::Io(e.to_string())
}

impl Rtu {
    pub fn new(
        port: Box<dyn SerialPort>,
        baud: u32,
        turnaround: Duration,
        line: Arc<LineCounters>,
    ) -> Rtu {
        let timing = RtuTiming::at(baud);
        let mut silence = Silence::new(timing);
        // Whatever was on the line before we opened it: start with a full silence.
        silence.busy(Instant::now());
        Rtu {
            port,
            timing,
            silence,
            turnaround,
            buf: vec![0u8; 512],
            line,
            stray: 0,
        }
    }

    /// Waits until the line has been silent for t3.5, discarding what arrives meanwhile.
    async fn quiet(&mut self) -> Result<(), Fault> {
        loop {
            let Some(ready) = self.silence.ready_at() else {
                return Ok(());
            };
            if Instant::now() >= ready {
                return Ok(());
            }
            tokio::select! {
                _ = sleep_until(ready) => return Ok(()),
                r = self.port.read(&mut self.buf) => match r {
                    Ok(0) => return Err(Fault::Io("end of file".into())),
                    Ok(n) => {
                        self.stray += n as u64;
                        self.silence.busy(Instant::now());
                    }
                    Err(e) => return Err(io_fault(e)),
                },
            }
        }
    }

    /// One request and its answer (none for unit 0: broadcast).
    pub async fn transact(
        &mut self,
        unit: u8,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, Fault> {
        self.quiet().await?;
        let frame = mb::rtu_request(unit, req);
        self.port.write_all(&frame).await.map_err(io_fault)?;
        self.port.flush().await.map_err(io_fault)?;
        let tx_end = Instant::now() + self.timing.frame(frame.len());
        self.silence.busy(tx_end);
        self.line.frames.fetch_add(1, Ordering::Relaxed);
        self.line
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        if unit == 0 {
            // Broadcast: nobody answers; every slave needs the turnaround delay to act on it.
            tokio::time::sleep_until(tx_end + self.turnaround).await;
            return Ok(Response::Written);
        }
        let deadline = tx_end + timeout;
        let mut dec = RtuDecoder::new(unit, req);
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return Err(Fault::Timeout { partial: dec.received() }),
                r = self.port.read(&mut self.buf) => match r {
                    Ok(0) => return Err(Fault::Io("end of file".into())),
                    Ok(n) => {
                        self.silence.busy(Instant::now());
                        self.line.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        self.line.frames.fetch_add(u64::from(dec.received() == 0), Ordering::Relaxed);
                        if let Some(result) = dec.push(&self.buf[..n]) {
                            return result.map_err(Fault::Frame);
                        }
                    }
                    Err(e) => return Err(io_fault(e)),
                },
            }
        }
    }
}

// ─── TCP ──────────────────────────────────────────────────────────────────────────────────────────

/// A Modbus TCP connection; requests one at a time, answers matched by transaction id.
pub struct Tcp {
    stream: TcpStream,
    transaction: u16,
    line: Arc<LineCounters>,
}

impl Tcp {
    pub async fn connect(addr: &str, line: Arc<LineCounters>) -> Result<Tcp, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} took more than 5s"))?
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Tcp {
            stream,
            transaction: 0,
            line,
        })
    }

    pub async fn transact(
        &mut self,
        unit: u8,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, Fault> {
        self.transaction = self.transaction.wrapping_add(1);
        let tid = self.transaction;
        let frame = mb::tcp_request(tid, unit, req);
        self.stream.write_all(&frame).await.map_err(io_fault)?;
        self.line.frames.fetch_add(1, Ordering::Relaxed);
        self.line
            .bytes_out
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        loop {
            let mut head = [0u8; MBAP_LEN];
            let read = async {
                self.stream.read_exact(&mut head).await?;
                let h = Mbap::parse(&head);
                let len = h.as_ref().map(|h| h.pdu_len()).unwrap_or(0);
                let mut pdu = vec![0u8; len];
                self.stream.read_exact(&mut pdu).await?;
                Ok::<_, std::io::Error>((h, pdu))
            };
            let (h, pdu) = match tokio::time::timeout_at(deadline, read).await {
                Err(_) => return Err(Fault::Timeout { partial: 0 }),
                Ok(Err(e)) => return Err(io_fault(e)),
                Ok(Ok(r)) => r,
            };
            self.line
                .bytes_in
                .fetch_add((MBAP_LEN + pdu.len()) as u64, Ordering::Relaxed);
            // A header we cannot trust leaves the stream unframed: drop the connection.
            let h = h.map_err(|e| Fault::Io(format!("bad MBAP header: {e}")))?;
            match mb::tcp_response(&h, &pdu, tid, unit, req) {
                // A late answer to an earlier, timed-out request: skip it, keep waiting.
                Err(FrameError::Transaction { got, .. }) if got != tid => continue,
                r => return r.map_err(Fault::Frame),
            }
        }
    }
}

enum Link {
    Rtu(Rtu),
    Tcp(Tcp),
}

impl Link {
    async fn transact(
        &mut self,
        unit: u8,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, Fault> {
        match self {
            Link::Rtu(r) => r.transact(unit, req, timeout).await,
            Link::Tcp(t) => t.transact(unit, req, timeout).await,
        }
    }
}

// ─── Counters ─────────────────────────────────────────────────────────────────────────────────────

/// Counters of one slave, made when the bus starts.
struct SlaveEvents {
    bus: String,
    slave: String,
    ok: Arc<AtomicU64>,
    polls: Arc<AtomicU64>,
    messages_in: Arc<AtomicU64>,
    sensor: Arc<Sensor>,
}

impl SlaveEvents {
    fn new(bus: &str, slave: &str) -> SlaveEvents {
        let r = registry();
        SlaveEvents {
            bus: bus.to_string(),
            slave: slave.to_string(),
            ok: r.counter(
                "modbus_requests_total",
                &[("bus", bus), ("slave", slave), ("result", "ok")],
            ),
            polls: r.counter("modbus_polls_total", &[("bus", bus), ("slave", slave)]),
            messages_in: r.counter("messages_in_total", &[("source", "modbus")]),
            sensor: r.sensor("modbus", &format!("{bus}/{slave}")),
        }
    }
    fn request(&self, fault: Option<&Fault>) {
        match fault {
            None => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Some(f) => {
                registry()
                    .counter(
                        "modbus_requests_total",
                        &[
                            ("bus", &self.bus),
                            ("slave", &self.slave),
                            ("result", f.reason()),
                        ],
                    )
                    .fetch_add(1, Ordering::Relaxed);
                self.sensor.error(f.reason());
            }
        }
    }
    fn point_error(&self, point: &str, reason: &'static str) {
        registry()
            .counter(
                "modbus_point_errors_total",
                &[
                    ("bus", &self.bus),
                    ("slave", &self.slave),
                    ("point", point),
                    ("reason", reason),
                ],
            )
            .fetch_add(1, Ordering::Relaxed);
    }
    fn command(&self, point: &str, result: &'static str) {
        registry()
            .counter(
                "modbus_commands_total",
                &[
                    ("bus", &self.bus),
                    ("slave", &self.slave),
                    ("point", point),
                    ("result", result),
                ],
            )
            .fetch_add(1, Ordering::Relaxed);
    }
    fn readings(&self, n: u64, now_ms: i64) {
        self.messages_in.fetch_add(n, Ordering::Relaxed);
        for _ in 0..n.min(1) {
            self.sensor.read(now_ms);
        }
    }
}

pub(crate) fn bus_error(bus: &str, reason: &'static str) {
    registry()
        .counter(
            "modbus_bus_errors_total",
            &[("bus", bus), ("reason", reason)],
        )
        .fetch_add(1, Ordering::Relaxed);
}

// ─── Slaves and points ────────────────────────────────────────────────────────────────────────────

struct PointState {
    cfg: ModbusPointConfig,
    span: Span,
    ty: ValueType,
    order: mb::Order,
    topic: String,
    last: Option<Value>,
    last_sent: Option<Instant>,
}

impl PointState {
    /// Whether this value is to be published now (on_change and max_silence).
    fn due(&self, v: &Value, now: Instant) -> bool {
        if !self.cfg.on_change {
            return true;
        }
        if self.last.as_ref() != Some(v) {
            return true;
        }
        match (self.cfg.max_silence, self.last_sent) {
            (Some(s), Some(t)) => now.duration_since(t) >= s.get(),
            _ => false,
        }
    }
}

struct SlaveState {
    cfg: ModbusSlaveConfig,
    blocks: Vec<mb::Block>,
    points: Vec<PointState>,
    next: Instant,
    online: bool,
    events: SlaveEvents,
    errors: RateLimited,
}

fn json_of(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::Unsigned(u) => json!(u),
        Value::Signed(i) => json!(i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(t) => Json::String(t.clone()),
    }
}

/// Decodes one point's share of a block's data.
fn point_value(p: &PointState, block: &mb::Block, data: &Response) -> Result<Value, &'static str> {
    let at = block.offset_of(&p.span);
    let n = usize::from(p.span.count);
    let raw = match data {
        Response::Bits(bits) => mb::Raw::Bool(*bits.get(at).ok_or("registers")?),
        Response::Registers(regs) => {
            let r = regs.get(at..at + n).ok_or("registers")?;
            mb::decode(r, p.ty, p.order).map_err(|e| e.reason())?
        }
        Response::Written => return Err("registers"),
    };
    mb::scale(raw, p.cfg.scale, p.cfg.offset).map_err(|e| e.reason())
}

/// A command payload → the value to write (numbers for registers, on/off for bools).
fn command_value(p: &PointState, payload: &[u8]) -> Result<f64, String> {
    if p.ty == ValueType::Bool {
        return parse_switch(payload)
            .map(|b| if b { 1.0 } else { 0.0 })
            .map_err(|e| e.to_string());
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| "not UTF-8".to_string())?
        .trim();
    if let Ok(v) = text.parse::<f64>() {
        return Ok(v);
    }
    let doc: Json = serde_json::from_str(text)
        .map_err(|_| "not a number: expected e.g. 21.5 or {\"value\": 21.5}".to_string())?;
    match doc.get("value").and_then(Json::as_f64) {
        Some(v) => Ok(v),
        _ => Err("not a number: expected e.g. 21.5 or {\"value\": 21.5}".to_string()),
    }
}

/// The write request for a point and a commanded value.
fn write_request(p: &PointState, value: f64) -> Result<Request, String> {
    let address = p.span.address;
    if p.span.table == Table::Coil {
        return Ok(Request::WriteCoil {
            address,
            on: value != 0.0,
        });
    }
    let regs = mb::encode(
        value,
        p.ty,
        p.order,
        p.cfg.scale,
        p.cfg.offset,
        p.cfg.min,
        p.cfg.max,
    )
    .map_err(|e| e.to_string())?;
    Ok(match regs.as_slice() {
        [one] => Request::WriteRegister {
            address,
            value: *one,
        },
        _ => Request::WriteRegisters {
            address,
            values: regs,
        },
    })
}

/// The local topics the writable points obey, over every bus.
pub fn command_topics(cfg: &ModbusConfig) -> Vec<String> {
    let mut out = Vec::new();
    for b in &cfg.buses {
        for s in &b.slaves {
            for p in s.points.iter().filter(|p| p.writable) {
                out.push(p.command_topic(&b.name, &s.name));
            }
        }
    }
    out
}

/// Commands for one bus: `(topic, payload)`.
pub type Command = (String, Bytes);

// ─── The bus task ─────────────────────────────────────────────────────────────────────────────────

/// One bus: its slaves' state and the command index.
pub struct Bus {
    cfg: ModbusBusConfig,
    slaves: Vec<SlaveState>,
    commands: HashMap<String, (usize, usize)>,
    out: mpsc::Sender<Reading>,
    clock: Arc<dyn Clock>,
    pub line: Arc<LineCounters>,
}

/// How a serving session ended.
enum Ended {
    Cancelled,
    Lost(String),
}

impl Bus {
    pub fn new(cfg: ModbusBusConfig, out: mpsc::Sender<Reading>, clock: Arc<dyn Clock>) -> Bus {
        let now = Instant::now();
        let mut commands = HashMap::new();
        let slaves: Vec<SlaveState> = cfg
            .slaves
            .iter()
            .enumerate()
            .map(|(si, s)| {
                let points: Vec<PointState> = s
                    .points
                    .iter()
                    .enumerate()
                    .map(|(pi, p)| {
                        if p.writable {
                            commands.insert(p.command_topic(&cfg.name, &s.name), (si, pi));
                        }
                        PointState {
                            span: p.span(),
                            ty: p.value_type(),
                            order: p.order_or(s),
                            topic: p.topic(&cfg.name, &s.name),
                            cfg: p.clone(),
                            last: None,
                            last_sent: None,
                        }
                    })
                    .collect();
                let spans: Vec<Span> = points.iter().map(|p| p.span).collect();
                SlaveState {
                    blocks: if s.is_broadcast() {
                        Vec::new()
                    } else {
                        mb::plan(&spans, s.max_gap, s.max_count)
                    },
                    points,
                    // Spread the first polls a little so slaves with one interval do not all
                    // start in the same instant (they are served in turn anyway).
                    next: now,
                    online: true,
                    events: SlaveEvents::new(&cfg.name, &s.name),
                    errors: RateLimited::new(Duration::from_secs(30)),
                    cfg: s.clone(),
                }
            })
            .collect();
        let line = Arc::new(LineCounters::registered(&cfg.name));
        Bus {
            cfg,
            slaves,
            commands,
            out,
            clock,
            line,
        }
    }

    fn what(&self) -> String {
        match (&self.cfg.path, &self.cfg.tcp) {
            (Some(p), _) => p.display().to_string(),
            (_, Some(_)) => format!("tcp {}", self.cfg.tcp_addr().unwrap_or_default()),
            _ => "sim".into(),
        }
    }

    async fn open(&self) -> Result<Link, String> {
        if self.cfg.is_rtu() {
            let port = crate::hw::modbus::open_rtu(&self.cfg).map_err(|e| e.to_string())?;
            Ok(Link::Rtu(Rtu::new(
                port,
                self.cfg.baud,
                self.cfg.turnaround.get(),
                self.line.clone(),
            )))
        } else {
            let addr = self.cfg.tcp_addr().unwrap_or_default();
            Tcp::connect(&addr, self.line.clone()).await.map(Link::Tcp)
        }
    }

    /// Runs until cancelled: open (with backoff), poll, write, reopen after a loss.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let name = self.cfg.name.clone();
        let what = self.what();
        let mut backoff = self.cfg.reopen_min.get();
        let mut failing_since: Option<std::time::Instant> = None;
        let mut queue: VecDeque<Command> = VecDeque::new();
        loop {
            let mut link = match self.open().await {
                Ok(l) => {
                    match failing_since.take() {
                        Some(t) => {
                            tracing::info!(bus = %name, path = %what, after = ?t.elapsed(), "Modbus bus reopened")
                        }
                        None => {
                            tracing::info!(bus = %name, path = %what, slaves = self.slaves.len(), "Modbus bus open")
                        }
                    }
                    backoff = self.cfg.reopen_min.get();
                    l
                }
                Err(e) => {
                    if failing_since.is_none() {
                        failing_since = Some(std::time::Instant::now());
                        bus_error(&name, "open_failed");
                        tracing::warn!(bus = %name, error = %e, "Modbus bus unavailable; retrying with backoff (logged again once it is back)");
                    }
                    if self.wait_refusing(&mut commands, backoff, &cancel).await {
                        return;
                    }
                    backoff = (backoff * 2).min(self.cfg.reopen_max.get());
                    continue;
                }
            };
            match self
                .serve(&mut link, &mut commands, &mut queue, &cancel)
                .await
            {
                Ended::Cancelled => return,
                Ended::Lost(reason) => {
                    failing_since = Some(std::time::Instant::now());
                    bus_error(&name, "port_lost");
                    for s in &self.slaves {
                        s.events.sensor_error("port_lost");
                    }
                    tracing::warn!(bus = %name, path = %what, %reason, "Modbus bus lost; reopening with backoff");
                }
            }
            drop(link);
            if self.wait_refusing(&mut commands, backoff, &cancel).await {
                return;
            }
        }
    }

    /// Sleeps `d` while the bus is down, refusing the commands that arrive. True: cancelled.
    async fn wait_refusing(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        d: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        let until = Instant::now() + d;
        // A bus without writable points has a closed command channel: then only sleep.
        let mut open = !commands.is_closed();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return true,
                _ = sleep_until(until) => return false,
                c = commands.recv(), if open => match c {
                    Some((topic, payload)) => self.refuse(&topic, &payload, "bus_down", "the bus is down (port closed or unreachable)").await,
                    None => open = false,
                }
            }
        }
    }

    async fn serve(
        &mut self,
        link: &mut Link,
        commands: &mut mpsc::Receiver<Command>,
        queue: &mut VecDeque<Command>,
        cancel: &CancellationToken,
    ) -> Ended {
        let mut commands_open = true;
        loop {
            let next = self
                .slaves
                .iter()
                .filter(|s| !s.blocks.is_empty())
                .map(|s| s.next)
                .min();
            if queue.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => return Ended::Cancelled,
                    c = commands.recv(), if commands_open => match c {
                        Some(c) => queue.push_back(c),
                        None => commands_open = false,
                    },
                    _ = async { match next { Some(t) => sleep_until(t).await, None => std::future::pending().await } } => {}
                }
            }
            // Commands first, between polls.
            while let Ok(c) = commands.try_recv() {
                queue.push_back(c);
            }
            while let Some((topic, payload)) = queue.pop_front() {
                if let Err(reason) = self.command(link, &topic, &payload).await {
                    return Ended::Lost(reason);
                }
                if cancel.is_cancelled() {
                    return Ended::Cancelled;
                }
            }
            let now = Instant::now();
            for i in 0..self.slaves.len() {
                if self.slaves[i].blocks.is_empty() || self.slaves[i].next > now {
                    continue;
                }
                if let Err(reason) = self.poll(link, i).await {
                    return Ended::Lost(reason);
                }
                let s = &mut self.slaves[i];
                let interval = s.cfg.interval.get();
                s.next += interval;
                if s.next <= Instant::now() {
                    // Behind schedule (a long outage of this slave or of others): skip the
                    // missed polls instead of bursting them.
                    s.next = Instant::now() + interval;
                }
                if cancel.is_cancelled() {
                    return Ended::Cancelled;
                }
                // A command that arrived meanwhile goes before the next slave's poll.
                if let Ok(c) = commands.try_recv() {
                    queue.push_back(c);
                    break;
                }
            }
        }
    }

    /// One request with the slave's retries (`attempts`); each failed attempt is counted.
    async fn request(
        link: &mut Link,
        slave: &SlaveState,
        req: &Request,
        attempts: u32,
    ) -> Result<Response, Fault> {
        let mut last = Fault::Timeout { partial: 0 };
        for _ in 0..attempts.max(1) {
            match link
                .transact(slave.cfg.unit, req, slave.cfg.timeout.get())
                .await
            {
                Ok(r) => {
                    slave.events.request(None);
                    return Ok(r);
                }
                Err(f @ Fault::Io(_)) => return Err(f),
                Err(f) => {
                    slave.events.request(Some(&f));
                    // An exception is the slave's considered answer: asking again changes
                    // nothing (busy and acknowledge excepted).
                    let retry = !matches!(&f, Fault::Frame(FrameError::Exception(e))
                        if !matches!(e, mb::Exception::ServerDeviceBusy | mb::Exception::Acknowledge));
                    last = f;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// Polls slave `i`: every block in turn; readings out. `Err`: the link is lost.
    async fn poll(&mut self, link: &mut Link, i: usize) -> Result<(), String> {
        let slave = &mut self.slaves[i];
        slave.events.polls.fetch_add(1, Ordering::Relaxed);
        let attempts = if slave.online {
            1 + u32::from(slave.cfg.retries)
        } else {
            1
        };
        let mut values: Vec<(usize, Value)> = Vec::new();
        let blocks = slave.blocks.clone();
        for block in &blocks {
            let req = block.request();
            match Self::request(link, slave, &req, attempts).await {
                Ok(data) => {
                    if !slave.online {
                        slave.online = true;
                        tracing::info!(bus = %self.cfg.name, slave = %slave.cfg.name, unit = slave.cfg.unit, "Modbus slave answers again");
                    }
                    for &pi in &block.points {
                        match point_value(&slave.points[pi], block, &data) {
                            Ok(v) => values.push((pi, v)),
                            Err(reason) => {
                                slave.events.point_error(&slave.points[pi].cfg.name, reason);
                                if slave.errors.allow() {
                                    tracing::warn!(bus = %self.cfg.name, slave = %slave.cfg.name, point = %slave.points[pi].cfg.name, reason, "Modbus point value refused");
                                }
                            }
                        }
                    }
                }
                Err(Fault::Io(e)) => return Err(e),
                Err(f) => {
                    for &pi in &block.points {
                        slave
                            .events
                            .point_error(&slave.points[pi].cfg.name, f.reason());
                    }
                    let timeout = matches!(f, Fault::Timeout { .. });
                    if timeout && slave.online {
                        slave.online = false;
                        tracing::warn!(bus = %self.cfg.name, slave = %slave.cfg.name, unit = slave.cfg.unit, fault = %f.describe(), attempts, "Modbus slave not answering; probing it once per interval (logged again when it answers)");
                    } else if !timeout && slave.errors.allow() {
                        tracing::warn!(bus = %self.cfg.name, slave = %slave.cfg.name, unit = slave.cfg.unit, table = block.table.name(), address = block.address, count = block.count, reason = f.reason(), fault = %f.describe(), "Modbus read failed");
                    }
                    if timeout {
                        // Its other reads would time out too: the other slaves should not wait.
                        break;
                    }
                }
            }
        }
        self.publish(i, values).await;
        Ok(())
    }

    async fn publish(&mut self, i: usize, values: Vec<(usize, Value)>) {
        let now_ms = self.clock.now_ms();
        let now = Instant::now();
        let bus = self.cfg.name.clone();
        let slave = &mut self.slaves[i];
        let mut readings = Vec::new();
        match slave.cfg.publish {
            PublishMode::PerPoint => {
                for (pi, v) in values {
                    let p = &mut slave.points[pi];
                    if !p.due(&v, now) {
                        continue;
                    }
                    let mut f = Map::new();
                    f.insert("value".into(), json_of(&v));
                    readings.push(Reading {
                        topic: p.topic.clone(),
                        payload: payload::reading(now_ms, f, p.cfg.unit.as_deref()).into(),
                        retain: false,
                    });
                    p.last = Some(v);
                    p.last_sent = Some(now);
                }
            }
            PublishMode::PerSlave => {
                let any_due = values.iter().any(|(pi, v)| slave.points[*pi].due(v, now));
                if any_due && !values.is_empty() {
                    let mut f = Map::new();
                    for (pi, v) in values {
                        let p = &mut slave.points[pi];
                        f.insert(p.cfg.name.clone(), json_of(&v));
                        p.last = Some(v);
                        p.last_sent = Some(now);
                    }
                    readings.push(Reading {
                        topic: slave.cfg.topic(&bus),
                        payload: payload::reading(now_ms, f, None).into(),
                        retain: false,
                    });
                }
            }
        }
        slave.events.readings(readings.len() as u64, now_ms);
        for r in readings {
            if self.out.send(r).await.is_err() {
                return;
            }
        }
    }

    /// Answers a command that was not carried out.
    async fn refuse(&mut self, topic: &str, payload: &[u8], result: &'static str, why: &str) {
        let Some(&(si, pi)) = self.commands.get(topic) else {
            return;
        };
        let s = &self.slaves[si];
        let p = &s.points[pi];
        s.events.command(&p.cfg.name, result);
        let shown: String = String::from_utf8_lossy(payload).chars().take(40).collect();
        tracing::warn!(bus = %self.cfg.name, slave = %s.cfg.name, point = %p.cfg.name, %topic, payload = %shown, result, error = %why, "Modbus command refused");
        let doc = json!({
            "ts": crate::codec::time::rfc3339_ms(self.clock.now_ms()),
            "error": why,
            "result": result,
            "command": shown,
        });
        let reading = Reading {
            topic: format!("{}/refused", p.cfg.state_topic(&self.cfg.name, &s.cfg)),
            payload: Bytes::from(doc.to_string()),
            retain: false,
        };
        let _ = self.out.send(reading).await;
    }

    /// Carries out one command: check, write, read back, confirm. `Err`: the link is lost.
    async fn command(
        &mut self,
        link: &mut Link,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let Some(&(si, pi)) = self.commands.get(topic) else {
            return Ok(());
        };
        let p = &self.slaves[si].points[pi];
        let req = match command_value(p, payload).and_then(|v| write_request(p, v)) {
            Ok(r) => r,
            Err(why) => {
                self.refuse(topic, payload, "refused", &why).await;
                return Ok(());
            }
        };
        let slave = &self.slaves[si];
        let attempts = 1 + u32::from(slave.cfg.retries);
        match Self::request(link, slave, &req, attempts).await {
            Ok(_) => {}
            Err(Fault::Io(e)) => {
                self.refuse(topic, payload, "failed", &format!("the bus was lost: {e}"))
                    .await;
                return Err(e);
            }
            Err(f) => {
                self.refuse(
                    topic,
                    payload,
                    "failed",
                    &format!("the write failed: {}", f.describe()),
                )
                .await;
                return Ok(());
            }
        }
        let (name, state_topic) = (
            p.cfg.name.clone(),
            p.cfg.state_topic(&self.cfg.name, &slave.cfg),
        );
        slave.events.command(&name, "ok");
        tracing::info!(bus = %self.cfg.name, slave = %slave.cfg.name, point = %name, "Modbus write done");
        if slave.cfg.is_broadcast() {
            return Ok(());
        }
        // Confirm what the device now holds, not what was asked.
        let block = mb::Block {
            table: p.span.table,
            address: p.span.address,
            count: p.span.count,
            points: vec![pi],
        };
        let read = match Self::request(link, slave, &block.request(), attempts).await {
            Ok(r) => r,
            Err(Fault::Io(e)) => return Err(e),
            Err(f) => {
                slave.events.point_error(&name, "readback");
                tracing::warn!(bus = %self.cfg.name, slave = %slave.cfg.name, point = %name, fault = %f.describe(), "Modbus write not confirmed: the read-back failed");
                return Ok(());
            }
        };
        match point_value(p, &block, &read) {
            Ok(v) => {
                let mut f = Map::new();
                f.insert("value".into(), json_of(&v));
                let r = Reading {
                    topic: state_topic,
                    payload: payload::reading(self.clock.now_ms(), f, p.cfg.unit.as_deref()).into(),
                    retain: true,
                };
                let _ = self.out.send(r).await;
            }
            Err(reason) => slave.events.point_error(&name, reason),
        }
        Ok(())
    }
}

impl SlaveEvents {
    fn sensor_error(&self, reason: &'static str) {
        self.sensor.error(reason);
    }
}

// ─── Home Assistant ───────────────────────────────────────────────────────────────────────────────

/// One entity for Home Assistant discovery (`ops::publish` adds the common fields).
pub struct HaEntity {
    /// `sensor`, `binary_sensor`, `switch` or `number`.
    pub component: &'static str,
    /// Unique within the gateway: `<bus>_<slave>_<point>`, `w1_<name>`.
    pub object: String,
    pub name: String,
    pub unit: Option<String>,
    pub fields: Map<String, Json>,
}

/// Entities for the Modbus points and the listed 1-Wire probes.
pub fn ha_entities(cfg: &Config) -> Vec<HaEntity> {
    let mut out = Vec::new();
    for b in &cfg.modbus.buses {
        for s in &b.slaves {
            for p in &s.points {
                let (state_topic, template) = match s.publish {
                    PublishMode::PerPoint => (
                        p.topic(&b.name, &s.name),
                        "{{ value_json.value }}".to_string(),
                    ),
                    PublishMode::PerSlave => (
                        s.topic(&b.name),
                        format!("{{{{ value_json['{}'] }}}}", p.name),
                    ),
                };
                let ty = p.value_type();
                let mut f = Map::new();
                let component = match (ty, p.writable) {
                    (ValueType::Bool, false) => {
                        f.insert("payload_on".into(), json!(true));
                        f.insert("payload_off".into(), json!(false));
                        "binary_sensor"
                    }
                    (ValueType::Bool, true) => {
                        f.insert(
                            "command_topic".into(),
                            json!(p.command_topic(&b.name, &s.name)),
                        );
                        f.insert("payload_on".into(), json!("on"));
                        f.insert("payload_off".into(), json!("off"));
                        f.insert("state_on".into(), json!(true));
                        f.insert("state_off".into(), json!(false));
                        "switch"
                    }
                    (_, true) => {
                        f.insert(
                            "command_topic".into(),
                            json!(p.command_topic(&b.name, &s.name)),
                        );
                        f.insert("mode".into(), json!("box"));
                        if let Some(m) = p.min {
                            f.insert("min".into(), json!(m));
                        }
                        if let Some(m) = p.max {
                            f.insert("max".into(), json!(m));
                        }
                        f.insert(
                            "step".into(),
                            json!(if ty == ValueType::F32 || ty == ValueType::F64 {
                                0.001
                            } else {
                                p.scale.abs()
                            }),
                        );
                        "number"
                    }
                    (ValueType::String, false) => "sensor",
                    (_, false) => {
                        f.insert("state_class".into(), json!("measurement"));
                        "sensor"
                    }
                };
                let state_topic = if p.writable {
                    // The state topic carries the confirmations (retained) as well as, for
                    // per_point, the polled readings.
                    p.state_topic(&b.name, s)
                } else {
                    state_topic
                };
                let template = if p.writable && p.state_topic.is_some() {
                    "{{ value_json.value }}".to_string()
                } else {
                    template
                };
                f.insert("state_topic".into(), json!(state_topic));
                f.insert("value_template".into(), json!(template));
                out.push(HaEntity {
                    component,
                    object: format!("{}_{}_{}", b.name, s.name, p.name),
                    name: format!("{} {} {}", b.name, s.name, p.name),
                    unit: p.unit.clone(),
                    fields: f,
                });
            }
        }
    }
    for w in &cfg.onewire.sensors {
        let mut f = Map::new();
        f.insert("state_topic".into(), json!(w.topic()));
        f.insert("value_template".into(), json!("{{ value_json.value }}"));
        f.insert("state_class".into(), json!("measurement"));
        out.push(HaEntity {
            component: "sensor",
            object: format!("w1_{}", w.name()),
            name: w.name().to_string(),
            unit: Some("°C".into()),
            fields: f,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// When each request reached the device, and its bytes.
    type Arrivals = Arc<std::sync::Mutex<Vec<(Instant, Vec<u8>)>>>;

    /// A scripted RTU device on the far end of a pipe: records when each request arrived
    /// (tokio's clock: paused in these tests) and answers it from `answer`.
    async fn device(
        mut line: DuplexStream,
        mut answer: impl FnMut(u8, &Request) -> Option<Vec<u8>> + Send + 'static,
        arrivals: Arrivals,
        reply_delay: Duration,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        loop {
            let n = match line.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(len) = mb::rtu_request_len(&buf) {
                if buf.len() < len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..len).collect();
                arrivals
                    .lock()
                    .expect("lock")
                    .push((Instant::now(), frame.clone()));
                let (unit, pdu) = mb::rtu_split(&frame).expect("our requests have a valid CRC");
                let req = Request::parse(pdu).expect("our requests are valid");
                if let Some(reply) = answer(unit, &req) {
                    tokio::time::sleep(reply_delay).await;
                    line.write_all(&reply).await.expect("device write");
                }
            }
        }
    }

    fn regs_reply(unit: u8, req: &Request, value: u16) -> Vec<u8> {
        let Request::Read { count, .. } = req else {
            return mb::rtu_frame(unit, &mb::reply_pdu(req, Ok(&Response::Written)));
        };
        let regs = vec![value; usize::from(*count)];
        mb::rtu_frame(unit, &mb::reply_pdu(req, Ok(&Response::Registers(regs))))
    }

    fn read(address: u16) -> Request {
        Request::Read {
            table: Table::HoldingRegister,
            address,
            count: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_waits_for_t3_5_of_silence_after_the_last_byte_on_the_line() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        // The device answers 20 ms after each request (after our 8 bytes, 9.2 ms at 9600
        // baud, have left the wire, as on a real line).
        let delay = Duration::from_millis(20);
        tokio::spawn(device(
            theirs,
            |u, r| Some(regs_reply(u, r, 7)),
            arrivals.clone(),
            delay,
        ));
        let baud = 9600;
        let t = RtuTiming::at(baud);
        let mut rtu = Rtu::new(
            Box::new(ours),
            baud,
            Duration::from_millis(100),
            Arc::default(),
        );
        let start = Instant::now();
        for a in 0..3 {
            let r = rtu
                .transact(1, &read(a), Duration::from_millis(200))
                .await
                .expect("answered");
            assert_eq!(r, Response::Registers(vec![7]));
        }
        let got = arrivals.lock().expect("lock").clone();
        assert_eq!(got.len(), 3);
        // The first request waits t3.5 after the port was opened.
        assert!(got[0].0 - start >= t.t3_5, "{:?}", got[0].0 - start);
        for w in got.windows(2) {
            // Request i+1 may start t3.5 after the answer to request i arrived, and does not
            // wait much longer than that either.
            let gap = w[1].0 - w[0].0;
            assert!(gap >= delay + t.t3_5, "{gap:?}");
            assert!(gap <= delay + t.t3_5 + Duration::from_millis(1), "{gap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_never_starts_before_its_predecessor_has_left_the_wire_and_t3_5_passed() {
        // A device that answers "instantly" (impossible on a real line): the silence then
        // counts from the end of our own transmission.
        let (ours, theirs) = tokio::io::duplex(1024);
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(device(
            theirs,
            |u, r| Some(regs_reply(u, r, 7)),
            arrivals.clone(),
            Duration::ZERO,
        ));
        let t = RtuTiming::at(9600);
        let mut rtu = Rtu::new(
            Box::new(ours),
            9600,
            Duration::from_millis(100),
            Arc::default(),
        );
        for a in 0..2 {
            rtu.transact(1, &read(a), Duration::from_millis(200))
                .await
                .expect("answered");
        }
        let got = arrivals.lock().expect("lock").clone();
        assert!(
            got[1].0 - got[0].0 >= t.frame(8) + t.t3_5,
            "{:?}",
            got[1].0 - got[0].0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stray_bytes_on_the_line_restart_the_silence_and_are_discarded() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let t = RtuTiming::at(19200);
        let mut rtu = Rtu::new(
            Box::new(ours),
            19200,
            Duration::from_millis(100),
            Arc::default(),
        );
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let arr = arrivals.clone();
        let noise_until = Instant::now() + Duration::from_millis(10);
        tokio::spawn(async move {
            // Noise every millisecond for 10 ms, then behave as a device.
            while Instant::now() < noise_until {
                theirs.write_all(&[0x55]).await.expect("noise");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            device(
                theirs,
                |u, r| Some(regs_reply(u, r, 1)),
                arr,
                Duration::ZERO,
            )
            .await;
        });
        rtu.transact(1, &read(0), Duration::from_millis(100))
            .await
            .expect("answered after the noise");
        let first = arrivals.lock().expect("lock")[0].0;
        assert!(
            first >= noise_until - Duration::from_millis(1) + t.t3_5,
            "sent into the noise"
        );
        assert!(rtu.stray >= 9, "noise discarded: {}", rtu.stray);
    }

    #[tokio::test(start_paused = true)]
    async fn the_response_timeout_starts_when_the_request_has_left_the_wire() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(device(
            theirs,
            |_, _| None,
            arrivals.clone(),
            Duration::ZERO,
        ));
        let baud = 1200;
        let t = RtuTiming::at(baud);
        let mut rtu = Rtu::new(
            Box::new(ours),
            baud,
            Duration::from_millis(100),
            Arc::default(),
        );
        let before = Instant::now() + t.t3_5;
        let err = rtu
            .transact(1, &read(0), Duration::from_millis(50))
            .await
            .expect_err("no answer");
        assert_eq!(err, Fault::Timeout { partial: 0 });
        // 8 bytes at 1200 baud take 73 ms to send; the 50 ms timeout counts from then.
        assert!(Instant::now() - before >= t.frame(8) + Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_slave_costs_the_others_one_timeout_per_interval_and_answers_are_published() {
        let cfg: Config = serde_yaml::from_str(
            "gateway: {id: t}\nmodbus:\n  buses:\n    - name: line\n      sim: {}\n      slaves:\n        - {name: alive, unit: 1, interval: 1s, timeout: 100ms, retries: 2, points: [{name: a, function: holding_register, address: 0}]}\n        - {name: dead, unit: 2, interval: 1s, timeout: 100ms, retries: 2, points: [{name: b, function: holding_register, address: 0}]}\n",
        )
        .expect("config");
        let (ours, theirs) = tokio::io::duplex(1024);
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::spawn(device(
            theirs,
            |u, r| (u == 1).then(|| regs_reply(u, r, 42)),
            arrivals.clone(),
            Duration::from_millis(2),
        ));
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let clock: Arc<dyn Clock> = Arc::new(crate::hw::clock::FixedClock::default());
        let mut bus = Bus::new(cfg.modbus.buses[0].clone(), out_tx, clock);
        let mut link = Link::Rtu(Rtu::new(
            Box::new(ours),
            19200,
            Duration::ZERO,
            Arc::default(),
        ));
        let (_cmd_tx, mut cmd_rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let serve = async {
            bus.serve(&mut link, &mut cmd_rx, &mut VecDeque::new(), &cancel)
                .await;
        };
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(4500)).await;
            stop.cancel();
        };
        tokio::join!(serve, stopper);
        let mut got = Vec::new();
        while let Ok(r) = out_rx.try_recv() {
            got.push(r);
        }
        assert_eq!(got.len(), 5, "alive was read at 0, 1, 2, 3 and 4 s");
        assert!(got.iter().all(|r| r.topic == "sensors/line/alive/a"));
        let doc: Json = serde_json::from_slice(&got[0].payload).expect("json");
        assert_eq!(doc["value"], 42);
        let arr = arrivals.lock().expect("lock").clone();
        let to_dead: Vec<Instant> = arr
            .iter()
            .filter(|(_, f)| f[0] == 2)
            .map(|(t, _)| *t)
            .collect();
        // First poll: 1 + 2 retries; afterwards one probe per interval.
        assert_eq!(to_dead.len(), 3 + 4, "{to_dead:?}");
        let alive: Vec<Instant> = arr
            .iter()
            .filter(|(_, f)| f[0] == 1)
            .map(|(t, _)| *t)
            .collect();
        for w in alive.windows(2).skip(1) {
            let gap = w[1] - w[0];
            assert!(
                gap <= Duration::from_millis(1010),
                "alive polled every second: {gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn on_change_publishes_the_first_value_each_change_and_a_repeat_after_max_silence() {
        let cfg: Config = serde_yaml::from_str(
            "gateway: {id: t}\nmodbus:\n  buses:\n    - name: line\n      sim: {}\n      slaves:\n        - {name: s, unit: 1, interval: 1s, timeout: 100ms, points: [{name: a, function: holding_register, address: 0, on_change: true, max_silence: 3s}]}\n",
        )
        .expect("config");
        let (ours, theirs) = tokio::io::duplex(1024);
        let mut polls = 0u16;
        // 5 for the polls at 0-3 s, 6 from 4 s on.
        tokio::spawn(device(
            theirs,
            move |u, r| {
                polls += 1;
                Some(regs_reply(u, r, if polls <= 4 { 5 } else { 6 }))
            },
            Arc::default(),
            Duration::from_millis(2),
        ));
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let clock: Arc<dyn Clock> = Arc::new(crate::hw::clock::FixedClock::default());
        let mut bus = Bus::new(cfg.modbus.buses[0].clone(), out_tx, clock);
        let mut link = Link::Rtu(Rtu::new(
            Box::new(ours),
            19200,
            Duration::ZERO,
            Arc::default(),
        ));
        let (_cmd_tx, mut cmd_rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let mut queue = VecDeque::new();
        let serve = bus.serve(&mut link, &mut cmd_rx, &mut queue, &cancel);
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(9500)).await;
            stop.cancel();
        };
        tokio::join!(serve, stopper);
        let mut got = Vec::new();
        while let Ok(r) = out_rx.try_recv() {
            let doc: Json = serde_json::from_slice(&r.payload).expect("json");
            got.push(doc["value"].clone());
        }
        // 10 polls (0-9 s): the first 5, the change to 6 at 4 s, the repeat at 7 s.
        assert_eq!(got, vec![json!(5), json!(6), json!(6)]);
    }

    fn point_state(yaml: &str) -> PointState {
        let p: ModbusPointConfig = serde_yaml::from_str(yaml).expect("point");
        PointState {
            span: p.span(),
            ty: p.value_type(),
            order: p.order.unwrap_or_default().0,
            topic: "t".into(),
            cfg: p,
            last: None,
            last_sent: None,
        }
    }

    #[test]
    fn commands_become_the_right_write_function_with_range_checks() {
        let coil = point_state("{name: r, function: coil, address: 3, writable: true}");
        assert_eq!(
            command_value(&coil, b"on").and_then(|v| write_request(&coil, v)),
            Ok(Request::WriteCoil {
                address: 3,
                on: true
            })
        );
        let sp = point_state("{name: sp, function: holding_register, address: 10, type: i16, scale: 0.1, writable: true, min: 5, max: 30}");
        assert_eq!(
            command_value(&sp, b"{\"value\": 21.5}").and_then(|v| write_request(&sp, v)),
            Ok(Request::WriteRegister {
                address: 10,
                value: 215
            })
        );
        assert!(command_value(&sp, b"31")
            .and_then(|v| write_request(&sp, v))
            .is_err());
        assert!(command_value(&sp, b"warm").is_err());
        let f = point_state(
            "{name: f, function: holding_register, address: 0, type: f32, writable: true}",
        );
        assert_eq!(
            command_value(&f, b"1.5").and_then(|v| write_request(&f, v)),
            Ok(Request::WriteRegisters {
                address: 0,
                values: vec![0x3FC0, 0]
            })
        );
    }

    #[test]
    fn on_change_publishes_changes_and_after_max_silence() {
        let mut p = point_state(
            "{name: x, function: holding_register, address: 0, on_change: true, max_silence: 60s}",
        );
        let t0 = Instant::now();
        assert!(p.due(&Value::Unsigned(1), t0));
        p.last = Some(Value::Unsigned(1));
        p.last_sent = Some(t0);
        assert!(!p.due(&Value::Unsigned(1), t0 + Duration::from_secs(59)));
        assert!(p.due(&Value::Unsigned(2), t0 + Duration::from_secs(1)));
        assert!(p.due(&Value::Unsigned(1), t0 + Duration::from_secs(60)));
    }
}
