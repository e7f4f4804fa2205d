//! Serial sensors: port → [`Framer`] → [`decode`] → a reading on the port's topic.
//!
//! A bad frame (too long, not UTF-8, not the configured format, a wrong NMEA checksum) is counted
//! per reason and logged, rate-limited, and skipped: it never stops the port. A port that cannot be
//! opened or that vanishes (a USB adapter unplugged, a PTY closed) is reopened with exponential
//! backoff (`reopen_min` doubling to `reopen_max`); the failure is logged once, and the recovery.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::codec::format::{decode, Decoded, Format};
use crate::codec::frame::{Delimiter, Framer};
use crate::codec::payload;
use crate::config::{SerialFormat, SerialPortConfig};
use crate::hw::clock::Clock;
use crate::hw::serial;
use crate::intake::Reading;
use crate::shared::{HardwareCounters, RateLimited};

/// How often a bad-frame summary is logged per port at most (the first of each reason is logged
/// at once).
const BAD_FRAME_LOG_EVERY: Duration = Duration::from_secs(10);

/// The codec settings of a port.
pub fn format_of(cfg: &SerialPortConfig) -> Format {
    match cfg.format {
        SerialFormat::Raw => Format::Raw,
        SerialFormat::Value => Format::Value,
        SerialFormat::Json => Format::Json {
            fields: cfg.fields.clone(),
        },
        SerialFormat::Kv => Format::Kv,
        SerialFormat::Csv => Format::Csv {
            columns: cfg.fields.clone(),
        },
        SerialFormat::Nmea => Format::Nmea,
    }
}

pub fn delimiter_of(cfg: &SerialPortConfig) -> Delimiter {
    match cfg.delimiter.as_deref() {
        None | Some("\n") | Some("\r\n") => Delimiter::Newline,
        Some(d) => Delimiter::Bytes(d.as_bytes().to_vec()),
    }
}

/// Bad frames of one port, by reason; logs the first of each reason and then a summary at most
/// every [`BAD_FRAME_LOG_EVERY`].
struct BadFrames {
    port: String,
    events: Arc<crate::shared::registry::SerialPortEvents>,
    total: BTreeMap<&'static str, u64>,
    log: RateLimited,
}

impl BadFrames {
    fn count(&mut self, reason: &'static str, detail: &str, counters: &HardwareCounters) {
        counters.bad_frames.fetch_add(1, Ordering::Relaxed);
        self.events.frame_skipped(reason);
        let n = self.total.entry(reason).or_insert(0);
        *n += 1;
        let first_of_reason = *n == 1;
        if self.log.allow_or(first_of_reason) {
            let totals: Vec<String> = self.total.iter().map(|(r, n)| format!("{r}={n}")).collect();
            tracing::warn!(
                port = %self.port,
                reason,
                detail,
                skipped_since_last_log = self.log.take_skipped() + 1,
                totals = %totals.join(","),
                "serial frame skipped"
            );
        }
    }
}

/// Runs one port until cancelled: open (with backoff), read, frame, parse, send readings.
pub async fn run_port(
    cfg: SerialPortConfig,
    out: mpsc::Sender<Reading>,
    clock: Arc<dyn Clock>,
    counters: Arc<HardwareCounters>,
    cancel: CancellationToken,
) {
    let topic = cfg.topic();
    let events = Arc::new(crate::shared::registry::SerialPortEvents::new(&cfg.name));
    let format = format_of(&cfg);
    let delimiter = delimiter_of(&cfg);
    let delim_bytes: Vec<u8> = match &delimiter {
        Delimiter::Newline => b"\n".to_vec(),
        Delimiter::Bytes(b) => b.clone(),
    };
    let max = usize::try_from(cfg.max_frame.get()).unwrap_or(usize::MAX);
    let mut framer = Framer::new(delimiter, max);
    let mut bad = BadFrames {
        port: cfg.name.clone(),
        events: events.clone(),
        total: BTreeMap::new(),
        log: RateLimited::new(BAD_FRAME_LOG_EVERY),
    };
    let mut backoff = cfg.reopen_min.get();
    let mut failing_since: Option<std::time::Instant> = None;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 4096];
    let what = cfg
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "sim".to_string());
    loop {
        let mut port = match serial::open(&cfg, &delim_bytes) {
            Ok(p) => {
                match failing_since.take() {
                    Some(t) => {
                        tracing::info!(port = %cfg.name, path = %what, after = ?t.elapsed(), "serial port reopened")
                    }
                    None => tracing::info!(port = %cfg.name, path = %what, "serial port open"),
                }
                backoff = cfg.reopen_min.get();
                p
            }
            Err(e) => {
                if failing_since.is_none() {
                    failing_since = Some(std::time::Instant::now());
                    events.port_error("open_failed");
                    tracing::warn!(port = %cfg.name, error = %e, "serial port unavailable; retrying with backoff (logged again once it is back)");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(cfg.reopen_max.get());
                continue;
            }
        };
        framer.reset();
        let mut poll = cfg.poll.as_ref().map(|p| {
            let mut t = tokio::time::interval(p.interval.get());
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (t, p.request.clone().into_bytes())
        });
        let lost = loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = port.read(&mut buf) => match r {
                    Ok(0) => break "end of file".to_string(),
                    Ok(n) => {
                        framer.push(&buf[..n], &mut frames);
                        for f in frames.drain(..) {
                            let frame = match f {
                                Ok(frame) => frame,
                                Err(e) => {
                                    bad.count(e.reason(), &e.to_string(), &counters);
                                    continue;
                                }
                            };
                            let payload = match decode(&format, &frame) {
                                Ok(Decoded::Raw(bytes)) => bytes,
                                Ok(Decoded::Fields(fields)) => payload::reading(clock.now_ms(), fields, cfg.unit.as_deref()),
                                Err(e) => {
                                    bad.count(e.reason(), &e.to_string(), &counters);
                                    continue;
                                }
                            };
                            events.frame_ok(clock.now_ms());
                            let reading = Reading { topic: topic.clone(), payload: payload.into(), retain: false };
                            if out.send(reading).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => break e.to_string(),
                },
                _ = async { match poll.as_mut() { Some((t, _)) => { t.tick().await; } None => std::future::pending().await } } => {
                    if let Some((_, req)) = &poll {
                        if let Err(e) = port.write_all(req).await {
                            break e.to_string();
                        }
                        let _ = port.flush().await;
                    }
                }
            }
        };
        failing_since = Some(std::time::Instant::now());
        events.port_error("port_lost");
        tracing::warn!(port = %cfg.name, path = %what, reason = %lost, "serial port lost; reopening with backoff");
        drop(port);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}
