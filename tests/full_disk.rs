//! A full or failing disk: a device never gets a PUBACK for a message the store does not hold,
//! and the store never wedges.
//!
//! Real small filesystems (tmpfs, and ext4 on a loop device for the read-only case; both need
//! root, which CI has): the store fills one itself, another file fills it, it is remounted
//! read-only. Devices are real clients (rumqttc, MQTT 3.1.1 and 5) that remember which messages
//! were acknowledged; the record of what arrived is a persistent subscriber on the upstream.
//! After each scenario: every acknowledged message is in the store file (read with
//! `edgegate buffer export`) or upstream.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const TOPIC: &str = "sensors/full";

/// What a device learned from the gateway, by sequence number.
#[derive(Default)]
struct Seen {
    /// PUBACK (success).
    acked: BTreeSet<usize>,
    /// MQTT 5 PUBACK with reason 0x97 (quota exceeded).
    rejected: BTreeSet<usize>,
    /// Other PUBACK reasons (none expected).
    other: BTreeMap<usize, String>,
    /// Why the connection ended, if it did.
    error: Option<String>,
}

/// A device publishing `"<seq> <padding>"` on [`TOPIC`] at QoS 1 with a bounded window, in its
/// own thread, until every message is answered, `stop` is set or `limit` passes.
struct Device {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Device {
    fn start(
        port: u16,
        n: usize,
        payload: usize,
        inflight: u16,
        v5: bool,
        limit: Duration,
    ) -> Device {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (s, st, se) = (seen.clone(), stop.clone(), sent.clone());
        let thread = thread::spawn(move || {
            let r = if v5 {
                run_v5(port, n, payload, inflight, limit, &s, &st, &se)
            } else {
                run_v4(port, n, payload, inflight, limit, &s, &st, &se)
            };
            if let Err(e) = r {
                s.lock().unwrap_or_else(|e| e.into_inner()).error = Some(e);
            }
        });
        Device {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn answered(&self) -> usize {
        self.seen(|s| s.acked.len() + s.rejected.len() + s.other.len())
    }

    /// Waits until no new answer came for `quiet` (the device is held), bounded by `limit`.
    fn wait_stalled(&self, quiet: Duration, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut last = (self.answered(), Instant::now());
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            let now = self.answered();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return true;
            }
        }
        false
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.finish();
    }
}

fn payload_of(i: usize, len: usize) -> Vec<u8> {
    let mut p = format!("{i} ").into_bytes();
    p.resize(len.max(p.len()), b'x');
    p
}

#[allow(clippy::too_many_arguments)]
fn run_v4(
    port: u16,
    n: usize,
    payload: usize,
    inflight: u16,
    limit: Duration,
    seen: &Mutex<Seen>,
    stop: &AtomicBool,
    sent: &AtomicUsize,
) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    runtime().block_on(async move {
        let mut opts = MqttOptions::new(client_id("dev"), "127.0.0.1", port);
        // Short, so a device held for seconds proves its keep-alive is still answered.
        opts.set_keep_alive(Duration::from_secs(2))
            .set_inflight(inflight)
            .set_clean_session(true);
        let (client, mut ev) = AsyncClient::new(opts, 10);
        let sender = tokio::spawn(async move {
            for i in 0..n {
                if client
                    .publish(TOPIC, QoS::AtLeastOnce, false, payload_of(i, payload))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            client
        });
        // Packet ids go out in publish order: the i-th Outgoing::Publish is message i.
        let mut by_pkid: BTreeMap<u16, usize> = BTreeMap::new();
        let mut next = 0usize;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let done = {
                let s = seen.lock().unwrap_or_else(|e| e.into_inner());
                s.acked.len() >= n
            };
            if done {
                break;
            }
            let e = match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
                Err(_) if tokio::time::Instant::now() < deadline => continue,
                Err(_) => return Err("time limit".to_string()),
                Ok(Err(e)) => return Err(format!("connection: {e}")),
                Ok(Ok(e)) => e,
            };
            match e {
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    by_pkid.insert(pkid, next);
                    next += 1;
                    sent.store(next, Ordering::SeqCst);
                }
                Event::Incoming(Packet::PubAck(a)) => {
                    if let Some(i) = by_pkid.remove(&a.pkid) {
                        seen.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .acked
                            .insert(i);
                    }
                }
                _ => {}
            }
        }
        // A held device's sender may be blocked on the full request channel: give it a
        // moment, then let dropping the event loop end it.
        if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_millis(500), sender).await {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_millis(300), async {
                while ev.poll().await.is_ok() {}
            })
            .await;
        }
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn run_v5(
    port: u16,
    n: usize,
    payload: usize,
    inflight: u16,
    limit: Duration,
    seen: &Mutex<Seen>,
    stop: &AtomicBool,
    sent: &AtomicUsize,
) -> Result<(), String> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    use rumqttc::Outgoing;
    runtime().block_on(async move {
        let mut opts = MqttOptions::new(client_id("dev5"), "127.0.0.1", port);
        // rumqttc's MQTT 5 client allows no keep-alive under 5 s.
        opts.set_keep_alive(Duration::from_secs(5))
            .set_outgoing_inflight_upper_limit(inflight)
            .set_clean_start(true);
        let (client, mut ev) = AsyncClient::new(opts, 10);
        let sender = tokio::spawn(async move {
            for i in 0..n {
                if client
                    .publish(TOPIC, QoS::AtLeastOnce, false, payload_of(i, payload))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            client
        });
        let mut by_pkid: BTreeMap<u16, usize> = BTreeMap::new();
        let mut next = 0usize;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let done = {
                let s = seen.lock().unwrap_or_else(|e| e.into_inner());
                s.acked.len() + s.rejected.len() + s.other.len() >= n
            };
            if done {
                break;
            }
            let e = match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
                Err(_) if tokio::time::Instant::now() < deadline => continue,
                Err(_) => return Err("time limit".to_string()),
                Ok(Err(e)) => return Err(format!("connection: {e}")),
                Ok(Ok(e)) => e,
            };
            match e {
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    by_pkid.insert(pkid, next);
                    next += 1;
                    sent.store(next, Ordering::SeqCst);
                }
                Event::Incoming(Packet::PubAck(a)) => {
                    if let Some(i) = by_pkid.remove(&a.pkid) {
                        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                        match a.reason {
                            PubAckReason::Success => {
                                s.acked.insert(i);
                            }
                            PubAckReason::QuotaExceeded => {
                                s.rejected.insert(i);
                            }
                            other => {
                                s.other.insert(i, format!("{other:?}"));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // A held device's sender may be blocked on the full request channel: give it a
        // moment, then let dropping the event loop end it.
        if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_millis(500), sender).await {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_millis(300), async {
                while ev.poll().await.is_ok() {}
            })
            .await;
        }
        Ok(())
    })
}

/// Sequence numbers of [`TOPIC`] rows in the store file.
fn stored_seqs(gw: &Gateway) -> BTreeSet<usize> {
    gw.buffer_export()
        .iter()
        .filter(|r| r["topic"] == TOPIC)
        .filter_map(|r| r["payload"].as_str()?.split(' ').next()?.parse().ok())
        .collect()
}

/// Sequence numbers of [`TOPIC`] messages the upstream subscriber got, and how many came twice.
fn arrived(sub: &Subscriber) -> (BTreeSet<usize>, usize) {
    let mut set = BTreeSet::new();
    let mut dup = 0;
    for (t, p) in sub.messages() {
        if t != TOPIC {
            continue;
        }
        if let Some(i) = p.split(' ').next().and_then(|s| s.parse().ok()) {
            if !set.insert(i) {
                dup += 1;
            }
        }
    }
    (set, dup)
}

/// An upstream that has a persistent subscriber on `sensors/#` and is then stopped: the
/// gateway starts with its link down.
fn upstream_down() -> (Mosquitto, Subscriber) {
    let mut up = persistent_upstream();
    let sub = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    up.stop();
    (up, sub)
}

/// The gateway's config for these tests: the store on `store_dir`, a short commit interval.
fn start_on(
    tmp: &std::path::Path,
    store_dir: &std::path::Path,
    up: &Mosquitto,
    store: &str,
    uplink: &str,
) -> Gateway {
    let store_dir = store_dir.to_path_buf();
    retry_on_port_clash(3, || {
        let yaml = gateway_yaml(&store_dir, free_port(), Some(&up.url()), store, uplink);
        Gateway::try_start_with(tmp, &yaml)
    })
}

fn assert_acked_kept(acked: &BTreeSet<usize>, kept: &BTreeSet<usize>, gw: &Gateway, when: &str) {
    let lost: Vec<usize> = acked.difference(kept).copied().take(20).collect();
    assert!(
        lost.is_empty(),
        "{when}: {} acknowledged messages are neither in the store nor upstream (first: {lost:?}); log:\n{}",
        acked.difference(kept).count(),
        gw.log()
    );
}

/// The reproduction: a 3 MiB tmpfs, 256 KiB headroom, the upstream down, one MQTT 3.1.1
/// device publishing 30 000 messages of 200 bytes with 50 in flight. The store fills the disk
/// itself; the device is held (its keep-alive answered) instead of acknowledged; once the
/// upstream returns, the backlog drains, the held messages are taken and the device finishes —
/// without a restart.
#[test]
fn a_store_filling_its_own_disk_holds_an_mqtt_3_device_and_takes_its_messages_after_the_drain() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store_dir = tmp.path().join("store");
    let _mnt = match Tmpfs::mount(&store_dir, "3m") {
        Ok(m) => m,
        Err(why) => return skip("a_store_filling_its_own_disk_holds_an_mqtt_3_device_and_takes_its_messages_after_the_drain", &format!("cannot mount a tmpfs: {why}")),
    };
    let (mut up, sub) = upstream_down();
    let gw = start_on(tmp.path(), &store_dir, &up, "min_free_disk: 256KiB", "");
    let n = 30_000;
    let mut dev = Device::start(gw.port(), n, 200, 50, false, Duration::from_secs(150));
    assert!(
        dev.wait_stalled(Duration::from_secs(5), Duration::from_secs(60)),
        "the device was never held; log:\n{}",
        gw.log()
    );
    let held_at = dev.seen(|s| s.acked.clone());
    assert!(held_at.len() < n, "everything fitted on a 3 MiB disk?");
    // Held for 5 s with a 2 s keep-alive: the connection is still up.
    assert_eq!(
        dev.seen(|s| s.error.clone()),
        None,
        "the held device lost its connection"
    );
    let st = gw.status_json();
    assert_eq!(st["store"]["accepting"], false, "status: {st:#}");
    assert_eq!(
        st["store"]["refusing"]["reason"], "disk_full",
        "status: {st:#}"
    );
    assert_eq!(st["front"]["devices_held"], 1, "status: {st:#}");
    let stored = stored_seqs(&gw);
    assert_acked_kept(&held_at, &stored, &gw, "while held");
    let free = st["store"]["free_disk_bytes"].as_u64().unwrap_or(0);
    assert!(
        free > 0,
        "the store filled its disk to the last byte: {st:#}"
    );
    println!(
        "held after {} acknowledged ({} rows stored), {free} bytes still free",
        held_at.len(),
        stored.len()
    );

    up.restart();
    dev.join();
    let (acked, err) = dev.seen(|s| (s.acked.clone(), s.error.clone()));
    assert_eq!(err, None, "log:\n{}", gw.log());
    assert_eq!(
        acked.len(),
        n,
        "the held messages were taken after the drain; log:\n{}",
        gw.log()
    );
    let mut got = (BTreeSet::new(), 0);
    let complete = wait_until(Duration::from_secs(60), || {
        got = arrived(&sub);
        got.0.len() == n
    });
    assert!(
        complete,
        "{} of {n} arrived upstream; log:\n{}",
        got.0.len(),
        gw.log()
    );
    let drained = wait_until(Duration::from_secs(30), || {
        stat(&gw.buffer_stats(), "rows") == 0
    });
    assert!(drained, "backlog never reached 0: {:#}", gw.buffer_stats());
    assert!(wait_until(Duration::from_secs(10), || gw.status_json()
        ["store"]["accepting"]
        == true));
    // A new message is accepted, as a new device would send it.
    assert_eq!(publish_seq(gw.port(), "sensors/after", 10, 1), 10);
    assert_eq!(
        stat(&gw.buffer_stats(), "dropped.disk_full"),
        0,
        "QoS 1 messages are held, never dropped"
    );
    println!(
        "{n} of {n} acknowledged and forwarded; {} duplicates upstream",
        got.1
    );
}

/// The same with an MQTT 5 device: refused messages get PUBACK 0x97, every successful PUBACK is
/// a stored message.
#[test]
fn on_a_full_disk_an_mqtt_5_device_gets_puback_0x97_and_every_success_is_stored() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store_dir = tmp.path().join("store");
    let _mnt = match Tmpfs::mount(&store_dir, "3m") {
        Ok(m) => m,
        Err(why) => {
            return skip(
                "on_a_full_disk_an_mqtt_5_device_gets_puback_0x97_and_every_success_is_stored",
                &format!("cannot mount a tmpfs: {why}"),
            )
        }
    };
    let (mut up, sub) = upstream_down();
    let gw = start_on(tmp.path(), &store_dir, &up, "min_free_disk: 256KiB", "");
    let n = 20_000;
    let mut dev = Device::start(gw.port(), n, 200, 50, true, Duration::from_secs(120));
    dev.join();
    let (acked, rejected, other, err) = dev.seen(|s| {
        (
            s.acked.clone(),
            s.rejected.clone(),
            s.other.clone(),
            s.error.clone(),
        )
    });
    assert_eq!(err, None, "log:\n{}", gw.log());
    assert!(other.is_empty(), "unexpected PUBACK reasons: {other:?}");
    assert_eq!(acked.len() + rejected.len(), n);
    assert!(!rejected.is_empty(), "nothing was refused on a 3 MiB disk");
    let stored = stored_seqs(&gw);
    assert_acked_kept(&acked, &stored, &gw, "after the device finished");
    assert!(
        rejected.is_disjoint(&stored),
        "a message answered 0x97 is in the store"
    );
    let st = gw.status_json();
    assert!(
        st["front"]["rejected"]["disk_full"].as_u64().unwrap_or(0) >= rejected.len() as u64,
        "status: {st:#}"
    );
    up.restart();
    let mut got = (BTreeSet::new(), 0);
    let all = wait_until(Duration::from_secs(60), || {
        got = arrived(&sub);
        acked.is_subset(&got.0)
    });
    assert!(
        all,
        "{} of {} acknowledged arrived",
        got.0.len(),
        acked.len()
    );
    println!(
        "{} acknowledged, {} answered 0x97",
        acked.len(),
        rejected.len()
    );
}

/// Another program fills the disk to the last byte while a backlog waits. Deletes still commit
/// (the store gives back its reserve), the backlog drains, and a held device's messages are
/// taken afterwards, while the other file stays.
#[test]
fn a_disk_another_file_filled_to_the_last_byte_still_drains_and_then_takes_new_messages() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store_dir = tmp.path().join("store");
    let _mnt = match Tmpfs::mount(&store_dir, "8m") {
        Ok(m) => m,
        Err(why) => return skip(
            "a_disk_another_file_filled_to_the_last_byte_still_drains_and_then_takes_new_messages",
            &format!("cannot mount a tmpfs: {why}"),
        ),
    };
    let (mut up, sub) = upstream_down();
    let gw = start_on(tmp.path(), &store_dir, &up, "min_free_disk: 256KiB", "");
    // A backlog of 5 000 while the link is down.
    let first = 5_000;
    assert_eq!(publish_seq(gw.port(), "sensors/backlog", first, 1), first);
    let filled = fill_up(&store_dir.join("filler"));
    let free = rustix_free(&store_dir);
    assert!(free < 64 * 1024, "{free} bytes left after filling");
    println!("filled {filled} bytes; {free} left");

    let n = 2_000;
    let mut dev = Device::start(gw.port(), n, 200, 50, false, Duration::from_secs(120));
    assert!(dev.wait_stalled(Duration::from_secs(3), Duration::from_secs(20)));
    let held = dev.seen(|s| s.acked.len());
    assert!(held < n, "a full disk took {held} messages");

    up.restart();
    let drained = wait_until(Duration::from_secs(60), || {
        let (got, _) = arrived_topic(&sub, "sensors/backlog");
        got.len() == first
    });
    assert!(
        drained,
        "the backlog did not drain on a full disk; log:\n{}",
        gw.log()
    );
    dev.join();
    let (acked, err) = dev.seen(|s| (s.acked.clone(), s.error.clone()));
    assert_eq!(err, None, "log:\n{}", gw.log());
    assert_eq!(
        acked.len(),
        n,
        "held messages taken once the drained store gave space back; log:\n{}",
        gw.log()
    );
    let got = wait_until(Duration::from_secs(30), || arrived(&sub).0.len() == n);
    assert!(got, "{} of {n} arrived", arrived(&sub).0.len());
    assert!(store_dir.join("filler").exists());
    assert!(wait_until(Duration::from_secs(30), || stat(
        &gw.buffer_stats(),
        "rows"
    ) == 0));
    // Whether the deletes needed the reserve depends on how much of the log the checkpoint
    // had reclaimed when they committed; both ways must drain (asserted above).
    println!(
        "reserve released while draining: {}",
        gw.log().contains("reserve was released")
    );
}

/// The messages of one topic the upstream subscriber got: payload = sequence number.
fn arrived_topic(sub: &Subscriber, topic: &str) -> (BTreeSet<usize>, usize) {
    let mut set = BTreeSet::new();
    let mut dup = 0;
    for (t, p) in sub.messages() {
        if t == topic {
            if let Ok(i) = p.trim().parse() {
                if !set.insert(i) {
                    dup += 1;
                }
            }
        }
    }
    (set, dup)
}

fn rustix_free(dir: &std::path::Path) -> u64 {
    let out = run_with_timeout(
        std::process::Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(dir),
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok());
    match (it.next(), it.next()) {
        (Some(blocks), Some(size)) => blocks * size,
        _ => u64::MAX,
    }
}

/// `kill -9` while a backlog drains on a disk another file keeps full, and a restart on that
/// full disk: the deletes committed before the kill stay committed, so what arrives twice is
/// bounded by the window plus the acknowledgements not yet committed — not the whole backlog.
#[test]
fn a_restart_on_a_full_disk_sends_again_only_what_the_duplicate_bound_allows() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store_dir = tmp.path().join("store");
    let _mnt = match Tmpfs::mount(&store_dir, "8m") {
        Ok(m) => m,
        Err(why) => {
            return skip(
                "a_restart_on_a_full_disk_sends_again_only_what_the_duplicate_bound_allows",
                &format!("cannot mount a tmpfs: {why}"),
            )
        }
    };
    let (mut up, sub) = upstream_down();
    // 2 000 msg/s upstream, 20 in flight: the kill lands mid-drain, and the bound is the
    // README's: 20 + what 2 000 msg/s acknowledges while acks wait for their commit.
    let mut gw = start_on(
        tmp.path(),
        &store_dir,
        &up,
        "min_free_disk: 256KiB",
        "max_rate: 2000\nmax_inflight: 20",
    );
    let n = 8_000;
    assert_eq!(publish_seq(gw.port(), "sensors/backlog", n, 1), n);
    fill_up(&store_dir.join("filler"));
    up.restart();
    assert!(wait_until(Duration::from_secs(30), || arrived_topic(
        &sub,
        "sensors/backlog"
    )
    .0
    .len()
        >= n / 2));
    gw.kill9();
    let before = arrived_topic(&sub, "sensors/backlog").0.len();
    gw.restart();
    let done = wait_until(Duration::from_secs(60), || {
        arrived_topic(&sub, "sensors/backlog").0.len() == n
    });
    let (got, dup) = arrived_topic(&sub, "sensors/backlog");
    assert!(
        done,
        "{} of {n} after the restart on a full disk; log:\n{}",
        got.len(),
        gw.log()
    );
    // Give late duplicates a moment to show (bounded by the drain having finished).
    assert!(wait_until(Duration::from_secs(10), || stat(
        &gw.buffer_stats(),
        "rows"
    ) == 0));
    let bound = 20 + uncommitted_acks_bound(2000);
    assert!(
        dup <= bound,
        "{dup} duplicates after a restart on a full disk ({before} had arrived before the kill); bound {bound}"
    );
    println!(
        "{before} arrived before the kill; {dup} duplicates after the restart (bound {bound})"
    );
}

/// The SD card fails and the kernel remounts it read-only under the running gateway. Devices
/// are refused (MQTT 5: 0x97) or held (3.1.1), the gateway stays up and says why, what was
/// stored before keeps forwarding, and nothing acknowledged is missing.
#[test]
fn a_store_remounted_read_only_refuses_new_messages_and_keeps_forwarding_what_it_holds() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store_dir = tmp.path().join("card");
    let card = match Ext4Loop::mount(&store_dir, 32) {
        Ok(c) => c,
        Err(why) => return skip(
            "a_store_remounted_read_only_refuses_new_messages_and_keeps_forwarding_what_it_holds",
            &format!("cannot mount an ext4 loop device: {why}"),
        ),
    };
    let (mut up, sub) = upstream_down();
    let gw = start_on(tmp.path(), &store_dir, &up, "min_free_disk: 1MiB", "");
    let before = 2_000;
    assert_eq!(publish_seq(gw.port(), "sensors/backlog", before, 1), before);
    card.fail_to_read_only().expect("injecting an ext4 error");
    assert!(
        wait_until(Duration::from_secs(5), || fs::write(
            store_dir.join("probe"),
            "x"
        )
        .is_err()),
        "the filesystem did not turn read-only"
    );
    let mut v5 = Device::start(gw.port(), 200, 100, 20, true, Duration::from_secs(30));
    v5.join();
    let (acked5, rejected5) = v5.seen(|s| (s.acked.clone(), s.rejected.clone()));
    assert!(
        acked5.is_empty(),
        "{} messages acknowledged on a read-only disk",
        acked5.len()
    );
    assert_eq!(rejected5.len(), 200, "MQTT 5: every message answered 0x97");
    let mut v3 = Device::start(gw.port(), 200, 100, 20, false, Duration::from_secs(60));
    assert!(v3.wait_stalled(Duration::from_secs(3), Duration::from_secs(20)));
    assert!(
        v3.seen(|s| s.acked.is_empty()),
        "MQTT 3.1.1: held, never acknowledged"
    );
    let st = gw.status_json();
    assert_eq!(
        st["store"]["refusing"]["reason"], "read_only",
        "status: {st:#}"
    );
    assert_eq!(st["front"]["devices_held"], 1, "status: {st:#}");

    up.restart();
    let all = wait_until(Duration::from_secs(30), || {
        arrived_topic(&sub, "sensors/backlog").0.len() == before
    });
    assert!(
        all,
        "what was stored before did not reach the upstream; log:\n{}",
        gw.log()
    );
    assert!(v3.seen(|s| s.error.is_none()), "the held device was cut");
    v3.finish();
    assert!(gw.log().contains("read_only"), "log:\n{}", gw.log());
}
