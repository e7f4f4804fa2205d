//! 1-Wire temperature probes (DS18B20 and the rest of the w1_therm family) through the kernel's
//! w1 driver: every `interval`, `<root>/<id>/w1_slave` of each listed probe (and, with
//! `all: true`, of every probe found under `root`) is read and checked by
//! [`crate::codec::w1`]; a good reading becomes `{"ts","value","unit":"°C"}` on the probe's
//! topic.
//!
//! Errors are counted per probe and reason (`onewire_readings_total{sensor,result}`: `ok`,
//! `crc_no`, `crc_mismatch`, `power_on_reset`, `no_device`, `format`, `out_of_range`, `missing`
//! when the probe's directory is gone) and in its sensor entry; a probe that vanishes is logged
//! once, and again when it is back. Reading `w1_slave` blocks for the conversion (up to 750 ms
//! at 12 bits): the read runs on tokio's blocking pool, one probe after the other (they share
//! the bus), so the event loop never waits for it.
//!
//! `sim` writes fake probes under `root` before each round (a slowly changing temperature), so
//! the development configuration exercises exactly this code.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Map;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::codec::payload;
use crate::codec::w1::{self, W1Error};
use crate::config::modbus::{onewire_topic_of, OnewireConfig};
use crate::hw::clock::Clock;
use crate::intake::Reading;
use crate::shared::registry::registry;

/// What one read of a probe gave.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeRead {
    Celsius(f64),
    Bad(W1Error),
    /// The probe's directory or file is gone (unplugged, or the bus master lost it).
    Missing,
}

impl ProbeRead {
    pub fn result(&self) -> &'static str {
        match self {
            ProbeRead::Celsius(_) => "ok",
            ProbeRead::Bad(e) => e.reason(),
            ProbeRead::Missing => "missing",
        }
    }
}

/// Reads and checks one probe's `w1_slave` (blocking: call it on the blocking pool).
pub fn read_probe(root: &Path, id: &str) -> ProbeRead {
    match std::fs::read(root.join(id).join("w1_slave")) {
        Ok(bytes) => match w1::parse_w1_slave(&bytes) {
            Ok(r) => ProbeRead::Celsius(r.celsius()),
            Err(e) => ProbeRead::Bad(e),
        },
        Err(_) => ProbeRead::Missing,
    }
}

/// w1_therm probe ids under `root`, sorted (blocking).
pub fn list_probes(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| w1::is_therm_id(n))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The simulator's files: each probe at `celsius` ± a slow wander (`round` advances it).
fn write_sim(root: &Path, probes: &[(String, f64)], round: u64) {
    for (i, (id, base)) in probes.iter().enumerate() {
        let dir = root.join(id);
        let _ = std::fs::create_dir_all(&dir);
        let wander = ((round as f64 + i as f64 * 3.0) / 5.0).sin() * 0.5;
        let mc = ((base + wander) * 16.0).round() as i32 * 1000 / 16;
        let mc = if mc == w1::POWER_ON_RESET_MC {
            mc + 62
        } else {
            mc
        };
        // Written to a temporary name and renamed, so a reader never sees half a file.
        let tmp = dir.join(".w1_slave.tmp");
        if std::fs::write(&tmp, w1::w1_slave_text(mc, true)).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join("w1_slave"));
        }
    }
}

/// One probe being read: its name (for logs and counters) and topic.
#[derive(Debug, Clone)]
struct Probe {
    id: String,
    name: String,
    topic: String,
    listed: bool,
}

/// Runs until cancelled.
pub async fn run(
    cfg: OnewireConfig,
    out: mpsc::Sender<Reading>,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
) {
    let root = cfg.root.clone();
    let listed: Vec<Probe> = cfg
        .sensors
        .iter()
        .map(|s| Probe {
            id: s.id.clone(),
            name: s.name().to_string(),
            topic: s.topic(),
            listed: true,
        })
        .collect();
    let sim: Vec<(String, f64)> = cfg
        .sim
        .as_ref()
        .map(|s| s.probes.iter().map(|p| (p.id.clone(), p.celsius)).collect())
        .unwrap_or_default();
    // Whether each probe answered last time (for logging changes once).
    let mut present: HashMap<String, bool> = HashMap::new();
    let mut errors_logged: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(cfg.interval.get());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(root = %root.display(), listed = listed.len(), all = cfg.all, sim = !sim.is_empty(), "1-Wire probes");
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let root_b = root.clone();
        let sim_b = sim.clone();
        let all = cfg.all;
        let found = tokio::task::spawn_blocking(move || {
            if !sim_b.is_empty() {
                write_sim(&root_b, &sim_b, round);
            }
            if all {
                list_probes(&root_b)
            } else {
                Vec::new()
            }
        })
        .await
        .unwrap_or_default();
        round += 1;
        let mut probes = listed.clone();
        for id in found {
            if !probes.iter().any(|p| p.id == id) {
                probes.push(Probe {
                    topic: onewire_topic_of(&id),
                    name: id.clone(),
                    id,
                    listed: false,
                });
            }
        }
        // Probes found earlier by `all` that are gone now: say so once.
        for (id, was) in present.iter_mut() {
            if *was && !probes.iter().any(|p| &p.id == id) {
                *was = false;
                tracing::warn!(probe = %id, "1-Wire probe gone (no longer listed by the kernel)");
            }
        }
        for probe in probes {
            if cancel.is_cancelled() {
                return;
            }
            let (root_b, id) = (root.clone(), probe.id.clone());
            let read = tokio::task::spawn_blocking(move || read_probe(&root_b, &id))
                .await
                .unwrap_or(ProbeRead::Missing);
            let r = registry();
            r.counter(
                "onewire_readings_total",
                &[("sensor", &probe.name), ("result", read.result())],
            )
            .fetch_add(1, Ordering::Relaxed);
            let sensor = r.sensor("onewire", &probe.name);
            let was = present.get(&probe.id).copied();
            match read {
                ProbeRead::Celsius(c) => {
                    if was == Some(false) {
                        tracing::info!(probe = %probe.name, id = %probe.id, "1-Wire probe reads again");
                    } else if was.is_none() && !probe.listed {
                        tracing::info!(probe = %probe.id, "1-Wire probe found");
                    }
                    present.insert(probe.id.clone(), true);
                    let now = clock.now_ms();
                    sensor.read(now);
                    r.counter("messages_in_total", &[("source", "onewire")])
                        .fetch_add(1, Ordering::Relaxed);
                    let mut f = Map::new();
                    f.insert("value".into(), serde_json::json!(c));
                    let reading = Reading {
                        topic: probe.topic.clone(),
                        payload: payload::reading(now, f, Some("°C")).into(),
                        retain: false,
                    };
                    if out.send(reading).await.is_err() {
                        return;
                    }
                }
                bad => {
                    let reason = bad.result();
                    sensor.error(reason);
                    if bad == ProbeRead::Missing {
                        if was != Some(false) {
                            tracing::warn!(probe = %probe.name, id = %probe.id, path = %root.join(&probe.id).display(), "1-Wire probe missing (unplugged?); logged again when it reads");
                        }
                        present.insert(probe.id.clone(), false);
                        continue;
                    }
                    let n = errors_logged
                        .entry((probe.name.clone(), reason))
                        .or_insert(0);
                    *n += 1;
                    // The first of each reason, then every 100th.
                    if *n == 1 || (*n).is_multiple_of(100) {
                        let detail = match &bad {
                            ProbeRead::Bad(e) => e.to_string(),
                            _ => String::new(),
                        };
                        tracing::warn!(probe = %probe.name, id = %probe.id, reason, %detail, count = *n, "1-Wire reading refused");
                    }
                }
            }
        }
    }
}

/// Where the simulator writes (for the README and tests): `root/<id>/w1_slave`.
pub fn sim_file(root: &Path, id: &str) -> PathBuf {
    root.join(id).join("w1_slave")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_read_found_and_missed_from_a_fake_tree() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        write_sim(root, &[("28-000000000001".into(), 21.0)], 0);
        std::fs::create_dir_all(root.join("w1_bus_master1")).expect("mkdir");
        assert_eq!(list_probes(root), vec!["28-000000000001".to_string()]);
        let ProbeRead::Celsius(c) = read_probe(root, "28-000000000001") else {
            panic!("a good reading")
        };
        assert!((c - 21.0).abs() <= 0.6, "{c}");
        std::fs::write(
            sim_file(root, "28-000000000001"),
            w1::w1_slave_text(85_000, true),
        )
        .expect("write");
        assert_eq!(
            read_probe(root, "28-000000000001"),
            ProbeRead::Bad(W1Error::PowerOnReset)
        );
        assert_eq!(read_probe(root, "28-000000000002"), ProbeRead::Missing);
    }
}
