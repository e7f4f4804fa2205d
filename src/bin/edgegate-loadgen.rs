//! edgegate-loadgen: a Rust MQTT load generator for benchmarks beyond the Python harness's
//! ~45k msg/s ceiling. Not installed by the package.
//!
//! Publishes QoS 1 messages from N connections to the gateway (the edge), counts what arrives on
//! the upstream broker, and prints one JSON line: publish (PUBACK) rate, end-to-end rate, latency
//! percentiles, lost / duplicate / out-of-order counts and, with `--edge-pid`, the gateway's CPU
//! per message, peak RSS and bytes written to disk per message (from /proc).
//!
//! Payload: `<run id>:<conn>:<seq>:<send time ns>:` padded with `x` to `--size` bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[derive(Parser, Debug)]
#[command(about = "MQTT load generator for edgegate benchmarks (loopback only)")]
struct Args {
    /// Gateway (edge) broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    edge: String,
    /// Upstream broker to count arrivals on; omit to measure ingest only.
    #[arg(long)]
    upstream: Option<String>,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Messages per connection.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// QoS 1 messages in flight per connection.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Messages per second per connection (0 = as fast as possible), each connection starting
    /// at a random point of the period.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value = "sensors/load")]
    topic_prefix: String,
    /// PID of the gateway, for CPU, RSS and disk writes.
    #[arg(long)]
    edge_pid: Option<u32>,
    /// Give up waiting for arrivals after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Stop a connection at its first error (for crash tests) instead of reconnecting.
    #[arg(long)]
    stop_on_error: bool,
    /// Label copied into the result line.
    #[arg(long, default_value = "edgegate")]
    label: String,
}

fn split_addr(a: &str) -> (String, u16) {
    match a.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(1883)),
        None => (a.to_string(), 1883),
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[derive(Default, Clone, Copy)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
    write_bytes: u64,
}

fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let write_bytes = io
        .lines()
        .find(|l| l.starts_with("write_bytes:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_ticks: utime + stime,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        write_bytes,
    })
}

struct Arrivals {
    run_id: String,
    /// Per connection: highest seq seen, and seen set size.
    last: HashMap<usize, u64>,
    seen: HashMap<(usize, u64), u32>,
    out_of_order: u64,
    latencies_us: Vec<u64>,
    first: Option<Instant>,
    last_at: Option<Instant>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let run_id = format!("{:08x}", fastrand::u32(..));
    let total = args.messages * args.connections as u64;
    let arrivals = Arc::new(Mutex::new(Arrivals {
        run_id: run_id.clone(),
        last: HashMap::new(),
        seen: HashMap::new(),
        out_of_order: 0,
        latencies_us: Vec::new(),
        first: None,
        last_at: None,
    }));

    // Upstream subscriber first, so nothing is missed.
    let sub_done = Arc::new(tokio::sync::Notify::new());
    if let Some(up) = &args.upstream {
        let (h, p) = split_addr(up);
        let mut o = MqttOptions::new(format!("loadgen-sub-{run_id}"), h, p);
        // A persistent session: if the subscriber's connection drops under load, the upstream
        // keeps its messages and resends them, so a lost count is the gateway's, not ours.
        o.set_keep_alive(Duration::from_secs(60))
            .set_clean_session(false)
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(1000);
        let (client, mut el) = AsyncClient::new(o, 100);
        let filter = format!("{}/#", args.topic_prefix);
        let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
        // Wait for the SUBACK.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if Instant::now() > deadline {
                eprintln!("loadgen: no SUBACK from upstream");
                std::process::exit(2);
            }
            match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    eprintln!("loadgen: upstream: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => {}
            }
        }
        let arr = arrivals.clone();
        let done = sub_done.clone();
        tokio::spawn(async move {
            let _client = client;
            let mut unique = 0u64;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = Instant::now();
                        let recv_ns = now_ns();
                        let mut a = arr.lock().unwrap_or_else(|e| e.into_inner());
                        let text = String::from_utf8_lossy(&p.payload);
                        let mut parts = text.split(':');
                        let (Some(rid), Some(conn), Some(seq), Some(sent)) =
                            (parts.next(), parts.next(), parts.next(), parts.next())
                        else {
                            continue;
                        };
                        if rid != a.run_id {
                            continue;
                        }
                        let (Ok(conn), Ok(seq), Ok(sent)) = (
                            conn.parse::<usize>(),
                            seq.parse::<u64>(),
                            sent.parse::<u128>(),
                        ) else {
                            continue;
                        };
                        a.first.get_or_insert(now);
                        a.last_at = Some(now);
                        let c = a.seen.entry((conn, seq)).or_insert(0);
                        *c += 1;
                        if *c == 1 {
                            unique += 1;
                            let prev = a.last.get(&conn).copied();
                            if prev.is_some_and(|p| seq < p) {
                                a.out_of_order += 1;
                            } else {
                                a.last.insert(conn, seq);
                            }
                            a.latencies_us
                                .push((recv_ns.saturating_sub(sent) / 1000) as u64);
                            if unique == total {
                                done.notify_one();
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("loadgen: upstream subscriber: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }

    let before = args.edge_pid.and_then(sample);
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (eh, ep) = split_addr(&args.edge);
    let mut tasks = Vec::new();
    for conn in 0..args.connections {
        let acked = acked.clone();
        let (eh, run_id, prefix) = (eh.clone(), run_id.clone(), args.topic_prefix.clone());
        let (messages, size, inflight, rate) = (args.messages, args.size, args.inflight, args.rate);
        let stop_on_error = args.stop_on_error;
        tasks.push(tokio::spawn(async move {
            let mut o = MqttOptions::new(format!("loadgen-{run_id}-{conn}"), eh, ep);
            o.set_keep_alive(Duration::from_secs(60))
                .set_inflight(inflight.max(1))
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut el) = AsyncClient::new(o, usize::from(inflight) + 10);
            let topic = format!("{prefix}/{run_id}/{conn}");
            let pacing = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
            let publisher = tokio::spawn(async move {
                // Each paced connection starts at its own random point of the period, as real
                // devices do: publishing all at the same instant would batch their commits by
                // itself and hide what a trickle costs.
                let mut next = tokio::time::Instant::now()
                    + pacing.map_or(Duration::ZERO, |p| p.mul_f64(phase(conn, &run_id)));
                for seq in 0..messages {
                    if let Some(p) = pacing {
                        tokio::time::sleep_until(next).await;
                        next += p;
                    }
                    let mut payload = format!("{run_id}:{conn}:{seq}:{}:", now_ns()).into_bytes();
                    if payload.len() < size {
                        payload.resize(size, b'x');
                    }
                    if client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                client
            });
            let mut my_acks = 0u64;
            // PUBACK latency: from the PUBLISH leaving the client to its PUBACK.
            let mut sent_at: HashMap<u16, Instant> = HashMap::new();
            let mut my_lat: Vec<u64> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(3600);
            while my_acks < messages && Instant::now() < deadline {
                match el.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        sent_at.insert(pkid, Instant::now());
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if let Some(t) = sent_at.remove(&a.pkid) {
                            my_lat.push(t.elapsed().as_micros() as u64);
                        }
                        my_acks += 1;
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("loadgen: connection {conn}: {e}");
                        if stop_on_error {
                            publisher.abort();
                            return my_lat;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            if let Ok(c) = publisher.await {
                let _ = c.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
            }
            my_lat
        }));
    }
    let mut puback_lat: Vec<u64> = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            puback_lat.extend(l);
        }
    }
    puback_lat.sort_unstable();
    let puback_pct = |p: f64| -> Option<f64> {
        (!puback_lat.is_empty())
            .then(|| puback_lat[((puback_lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0)
    };
    let publish_s = started.elapsed().as_secs_f64();
    let acked = acked.load(Ordering::Relaxed);

    let mut e2e_s = None;
    if args.upstream.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(args.timeout), sub_done.notified()).await;
        // Let duplicates, if any, arrive too.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = a.last_at {
            e2e_s = Some(l.duration_since(started).as_secs_f64());
        }
    }
    let after = args.edge_pid.and_then(sample);

    let a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
    let unique = a.seen.len() as u64;
    let dups: u64 = a
        .seen
        .values()
        .map(|c| u64::from(c.saturating_sub(1)))
        .sum();
    let mut lat = a.latencies_us.clone();
    lat.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0)
    };
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let edge = match (before, after) {
        (Some(b), Some(a)) => {
            let cpu_s = (a.cpu_ticks.saturating_sub(b.cpu_ticks)) as f64 / ticks_per_s;
            serde_json::json!({
                "cpu_s": cpu_s,
                "cpu_us_per_msg": if acked > 0 { cpu_s * 1e6 / acked as f64 } else { 0.0 },
                "rss_mib_end": a.rss_kib as f64 / 1024.0,
                "peak_rss_mib": a.hwm_kib as f64 / 1024.0,
                "write_bytes_per_msg": if acked > 0 { (a.write_bytes.saturating_sub(b.write_bytes)) as f64 / acked as f64 } else { 0.0 },
            })
        }
        _ => serde_json::Value::Null,
    };
    let line = serde_json::json!({
        "label": args.label,
        "connections": args.connections,
        "messages": total,
        "size": args.size,
        "inflight": args.inflight,
        "rate_per_conn": args.rate,
        "acked": acked,
        "publish_s": publish_s,
        "ingest_msgs_s": acked as f64 / publish_s.max(1e-9),
        "delivered": unique,
        "lost": acked.saturating_sub(unique),
        "dups": dups,
        "out_of_order": a.out_of_order,
        "e2e_s": e2e_s,
        "e2e_msgs_s": e2e_s.map(|s| unique as f64 / s.max(1e-9)),
        "lat_ms_p50": pct(0.5),
        "lat_ms_p99": pct(0.99),
        "puback_ms_p50": puback_pct(0.5),
        "puback_ms_p99": puback_pct(0.99),
        "edge": edge,
    });
    println!("{line}");
}

/// A fraction in [0, 1) fixed by the connection and the run (splitmix64 of both).
fn phase(conn: usize, run_id: &str) -> f64 {
    let seed = run_id
        .bytes()
        .fold(conn as u64, |h, b| h.rotate_left(8) ^ u64::from(b));
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
