//! 1-Wire probes end to end: the built binary reads a fake `/sys/bus/w1/devices` tree (files in
//! the kernel's w1_therm format, written here byte for byte, not by our code) and publishes
//! upstream through a real mosquitto.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The example of the kernel's w1_therm documentation: 23.125 °C.
const GOOD: &str = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
/// -10.125 °C (scratchpad 5e ff, Dallas CRC-8 6a).
const COLD: &str = "5e ff 4b 46 7f ff 0c 10 6a : crc=6a YES\n5e ff 4b 46 7f ff 0c 10 6a t=-10125\n";
/// The driver saw a bad CRC on the wire.
const CRC_NO: &str = "72 01 4b 46 7f ff 0e 10 55 : crc=55 NO\n72 01 4b 46 7f ff 0e 10 55 t=23125\n";
/// The power-on value of the scratchpad: a probe that lost power, not a temperature.
const POWER_ON: &str =
    "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n";

const LISTED: &str = "28-00000a1b2c3d";
const FOUND: &str = "28-00000e4f5a6b";

fn probe(root: &Path, id: &str, text: &str) {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).expect("mkdir");
    // Written beside and renamed, as sysfs never shows half a file.
    std::fs::write(dir.join(".w1_slave"), text).expect("write");
    std::fs::rename(dir.join(".w1_slave"), dir.join("w1_slave")).expect("rename");
}

fn values(msgs: &[Msg], topic: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|(t, _)| t == topic)
        .filter_map(|(_, p)| serde_json::from_str(p).ok())
        .collect()
}

fn results(gw: &Gateway, sensor: &str) -> Value {
    let sock = gw.dir().join("status.sock").display().to_string();
    let out = run_bin(
        gw.dir(),
        &["status", "--json", "--socket", &sock],
        Duration::from_secs(20),
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    st["sensors"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|s| s["kind"] == "onewire" && s["name"] == sensor)
        })
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn probes_are_read_from_a_fake_sysfs_tree_and_crc_no_power_on_values_and_removal_are_counted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("w1");
    probe(&root, LISTED, GOOD);
    probe(&root, FOUND, COLD);
    std::fs::create_dir_all(root.join("w1_bus_master1")).expect("mkdir");
    let up = Mosquitto::start(MosquittoOpts::default());
    let upstream = Subscriber::start(
        up.port(),
        "sensors/#",
        &client_id("up"),
        &ClientOpts::qos(1),
    );
    let gw = retry_on_port_clash(5, || {
        let dir = tmp.path().join(format!("gw-{}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut yaml = gateway_yaml(&dir, free_port(), Some(&up.url()), "", "");
        yaml.push_str(&format!(
            "onewire:\n  root: {}\n  interval: 1s\n  all: true\n  sensors:\n    - {{id: {LISTED}, name: tank}}\n",
            root.display()
        ));
        Gateway::try_start_with(&dir, &yaml)
    });
    let found_topic = format!("sensors/w1/{FOUND}");
    assert!(
        wait_until(Duration::from_secs(15), || {
            let m = upstream.messages();
            !values(&m, "sensors/w1/tank").is_empty() && !values(&m, &found_topic).is_empty()
        }),
        "{:?}\n{}",
        upstream.messages(),
        gw.log()
    );
    let m = upstream.messages();
    let tank = &values(&m, "sensors/w1/tank")[0];
    assert_eq!(tank["value"], 23.125, "{tank}");
    assert_eq!(tank["unit"], "°C", "{tank}");
    assert!(tank["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(values(&m, &found_topic)[0]["value"], -10.125);

    // A CRC the driver refused, then the 85 °C power-on value: counted, never published.
    probe(&root, LISTED, CRC_NO);
    assert!(
        wait_until(Duration::from_secs(10), || results(&gw, "tank")["errors"]
            ["crc_no"]
            .as_u64()
            >= Some(1)),
        "{:#}\n{}",
        results(&gw, "tank"),
        gw.log()
    );
    probe(&root, LISTED, POWER_ON);
    assert!(
        wait_until(Duration::from_secs(10), || results(&gw, "tank")["errors"]
            ["power_on_reset"]
            .as_u64()
            >= Some(1)),
        "{:#}",
        results(&gw, "tank")
    );
    let published = values(&upstream.messages(), "sensors/w1/tank");
    assert!(
        published.iter().all(|v| v["value"] == 23.125),
        "a bad reading was published: {published:?}"
    );

    // The found probe is unplugged, then plugged back in.
    std::fs::remove_dir_all(root.join(FOUND)).expect("rm");
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("1-Wire probe gone")),
        "{}",
        gw.log()
    );
    let before = values(&upstream.messages(), &found_topic).len();
    probe(&root, FOUND, GOOD);
    assert!(
        wait_until(Duration::from_secs(10), || values(
            &upstream.messages(),
            &found_topic
        )
        .iter()
        .skip(before)
        .any(|v| v["value"] == 23.125)),
        "{}",
        gw.log()
    );
    // The listed probe is removed: `missing`, logged once however many rounds it stays away.
    std::fs::remove_dir_all(root.join(LISTED)).expect("rm");
    assert!(
        wait_until(Duration::from_secs(10), || results(&gw, "tank")["errors"]
            ["missing"]
            .as_u64()
            >= Some(3)),
        "{:#}",
        results(&gw, "tank")
    );
    assert_eq!(
        gw.log().matches("1-Wire probe missing").count(),
        1,
        "{}",
        gw.log()
    );
}
