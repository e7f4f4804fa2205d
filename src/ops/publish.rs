//! What the gateway says about itself over MQTT: the periodic stats message and Home Assistant
//! discovery.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::config::{Config, SerialFormat};

/// Where the stats message goes, locally and upstream.
pub fn stats_topic(cfg: &Config) -> String {
    format!("{}/stats", cfg.status_topic())
}

/// Home Assistant's device class for a unit, where one clearly applies.
fn device_class(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "°C" | "°F" | "K" | "C" | "degC" => "temperature",
        "%RH" => "humidity",
        "hPa" | "Pa" | "kPa" | "bar" | "mbar" | "psi" | "mmHg" => "pressure",
        "V" | "mV" => "voltage",
        "A" | "mA" => "current",
        "W" | "kW" => "power",
        "Wh" | "kWh" => "energy",
        "lx" => "illuminance",
        "ppm" => "carbon_dioxide",
        "µg/m³" | "ug/m3" => "pm25",
        "dB" | "dBA" => "sound_pressure",
        "Hz" => "frequency",
        _ => return None,
    })
}

/// Retained discovery messages `(topic, payload)`: each GPIO input as a binary sensor, each
/// output as a switch, each serial field known from the config (`value`; json and csv `fields`)
/// as a sensor, all under one device (the
/// gateway) whose availability is the status topic. Raw and NMEA serial ports are not
/// announced: raw payloads have no field to show, and NMEA positions are not a sensor value.
pub fn discovery_messages(cfg: &Config) -> Vec<(String, Bytes)> {
    let ha = &cfg.homeassistant;
    let gw = &cfg.gateway.id;
    let node = sanitize(gw);
    let device = json!({
        "identifiers": [format!("edgegate_{node}")],
        "name": format!("edgegate {gw}"),
        "manufacturer": "edgegate",
        "model": "edge gateway",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let status = cfg.status_topic();
    let common = |name: &str, unique: &str| -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        m.insert(
            "unique_id".into(),
            json!(format!("edgegate_{node}_{unique}")),
        );
        m.insert("object_id".into(), json!(format!("{node}_{unique}")));
        m.insert("availability_topic".into(), json!(status));
        m.insert("payload_available".into(), json!("online"));
        m.insert("payload_not_available".into(), json!("offline"));
        m.insert("device".into(), device.clone());
        m
    };
    let mut out = Vec::new();
    let mut push = |component: &str, object: &str, m: Map<String, Value>| {
        let topic = format!(
            "{}/{component}/{node}/{}/config",
            ha.prefix,
            sanitize(object)
        );
        out.push((topic, Bytes::from(Value::Object(m).to_string())));
    };

    for i in &cfg.gpio.inputs {
        let mut m = common(&i.name, &sanitize(&i.name));
        m.insert("state_topic".into(), json!(i.topic()));
        m.insert("value_template".into(), json!("{{ value_json.state }}"));
        m.insert("payload_on".into(), json!("1"));
        m.insert("payload_off".into(), json!("0"));
        push("binary_sensor", &i.name, m);
    }
    for o in &cfg.gpio.outputs {
        let mut m = common(&o.name, &sanitize(&o.name));
        m.insert("command_topic".into(), json!(o.command_topic()));
        m.insert("payload_on".into(), json!("on"));
        m.insert("payload_off".into(), json!("off"));
        m.insert("state_topic".into(), json!(o.state_topic()));
        m.insert("value_template".into(), json!("{{ value_json.state }}"));
        m.insert("state_on".into(), json!("1"));
        m.insert("state_off".into(), json!("0"));
        push("switch", &o.name, m);
    }
    for p in &cfg.serial.ports {
        let fields: Vec<String> = match p.format {
            SerialFormat::Value => vec!["value".to_string()],
            SerialFormat::Json | SerialFormat::Csv => p.fields.clone(),
            // kv names its fields only in the data; raw has none; NMEA positions are no sensor.
            SerialFormat::Kv | SerialFormat::Raw | SerialFormat::Nmea => Vec::new(),
        };
        for f in fields {
            let (name, object) = if p.format == SerialFormat::Value {
                (p.name.clone(), p.name.clone())
            } else {
                (format!("{} {f}", p.name), format!("{}_{f}", p.name))
            };
            let mut m = common(&name, &sanitize(&object));
            m.insert("state_topic".into(), json!(p.topic()));
            m.insert(
                "value_template".into(),
                json!(format!("{{{{ value_json['{}'] }}}}", f.replace('\'', ""))),
            );
            m.insert("state_class".into(), json!("measurement"));
            if let Some(unit) = &p.unit {
                m.insert("unit_of_measurement".into(), json!(unit));
                if let Some(class) = device_class(unit) {
                    m.insert("device_class".into(), json!(class));
                }
            }
            push("sensor", &object, m);
        }
    }
    // Modbus points and listed 1-Wire probes (sources::modbus::ha_entities).
    for e in crate::sources::modbus::ha_entities(cfg) {
        let mut m = common(&e.name, &sanitize(&e.object));
        m.extend(e.fields);
        if let Some(unit) = &e.unit {
            m.insert("unit_of_measurement".into(), json!(unit));
            if let Some(class) = device_class(unit) {
                m.insert("device_class".into(), json!(class));
            }
        }
        push(e.component, &e.object, m);
    }
    // The gateway's own backlog, from the stats message.
    let mut m = common(&format!("{gw} backlog"), "backlog");
    m.insert("state_topic".into(), json!(stats_topic(cfg)));
    m.insert(
        "value_template".into(),
        json!("{{ value_json.backlog.rows if value_json.backlog else 0 }}"),
    );
    m.insert("unit_of_measurement".into(), json!("messages"));
    m.insert("state_class".into(), json!("measurement"));
    m.insert("entity_category".into(), json!("diagnostic"));
    push("sensor", "backlog", m);
    let mut m = common(&format!("{gw} uplink"), "uplink");
    m.insert("state_topic".into(), json!(stats_topic(cfg)));
    m.insert(
        "value_template".into(),
        json!("{{ value_json.uplink.state }}"),
    );
    m.insert("payload_on".into(), json!("up"));
    m.insert("payload_off".into(), json!("down"));
    m.insert("device_class".into(), json!("connectivity"));
    m.insert("entity_category".into(), json!("diagnostic"));
    push("binary_sensor", "uplink", m);
    out
}

/// Home Assistant object ids: letters, digits, `_` and `-` only.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let yaml = format!(
            "gateway: {{id: pi.one}}\nbroker: {{listen: 127.0.0.1:1883}}\nhomeassistant: {{enabled: true}}\n{extra}"
        );
        crate::config::load_str(&yaml, std::path::Path::new("t.yaml")).expect("valid config")
    }

    fn find(msgs: &[(String, Bytes)], topic: &str) -> Value {
        let (_, p) = msgs.iter().find(|(t, _)| t == topic).unwrap_or_else(|| {
            panic!(
                "no {topic} in {:?}",
                msgs.iter().map(|m| &m.0).collect::<Vec<_>>()
            )
        });
        serde_json::from_slice(p).expect("discovery payloads are JSON")
    }

    #[test]
    fn inputs_outputs_and_numeric_serial_fields_are_announced_with_their_topics() {
        let msgs = discovery_messages(&cfg(
            "gpio:\n  backend: sim\n  inputs: [{name: door, pin: 17}]\n  outputs: [{name: relay, pin: 27}]\n\
             serial:\n  ports:\n    - {name: temp, sim: {lines: [\"1\"]}, format: value, unit: \"°C\"}\n    - {name: env, sim: {lines: [\"{}\"]}, format: json, fields: [hum, co2]}\n    - {name: gps, sim: {lines: [\"x\"]}, format: nmea}\n",
        ));
        let door = find(&msgs, "homeassistant/binary_sensor/pi_one/door/config");
        assert_eq!(door["state_topic"], "sensors/door");
        assert_eq!(door["availability_topic"], "edgegate/pi.one/status");
        assert_eq!(door["device"]["identifiers"][0], "edgegate_pi_one");
        let relay = find(&msgs, "homeassistant/switch/pi_one/relay/config");
        assert_eq!(relay["command_topic"], "cmd/relay");
        assert_eq!(relay["state_topic"], "sensors/relay");
        let temp = find(&msgs, "homeassistant/sensor/pi_one/temp/config");
        assert_eq!(temp["unit_of_measurement"], "°C");
        assert_eq!(temp["device_class"], "temperature");
        assert_eq!(temp["value_template"], "{{ value_json['value'] }}");
        let hum = find(&msgs, "homeassistant/sensor/pi_one/env_hum/config");
        assert_eq!(hum["state_topic"], "sensors/env");
        assert!(
            msgs.iter().all(|(t, _)| !t.contains("/gps")),
            "NMEA is not announced"
        );
        let up = find(&msgs, "homeassistant/binary_sensor/pi_one/uplink/config");
        assert_eq!(up["state_topic"], "edgegate/pi.one/status/stats");
    }

    #[test]
    fn modbus_points_and_listed_probes_are_announced_by_type_and_writability() {
        let msgs = discovery_messages(&cfg(
            "modbus:\n  buses:\n    - name: rs485\n      sim: {}\n      slaves:\n        - name: meter\n          unit: 1\n          points:\n            - {name: voltage, function: input_register, address: 0, type: f32, unit: V}\n            - {name: alarm, function: discrete_input, address: 0}\n            - {name: relay, function: coil, address: 0, writable: true}\n            - {name: limit, function: holding_register, address: 0, scale: 0.1, writable: true, min: 0, max: 32}\n        - name: env\n          unit: 2\n          publish: per_slave\n          points: [{name: hum, function: input_register, address: 0, unit: \"%\"}]\n\
             onewire:\n  root: /tmp/w1-fake\n  sensors: [{id: 28-00000a1b2c3d, name: tank}]\n",
        ));
        let v = find(
            &msgs,
            "homeassistant/sensor/pi_one/rs485_meter_voltage/config",
        );
        assert_eq!(v["state_topic"], "sensors/rs485/meter/voltage");
        assert_eq!(v["unit_of_measurement"], "V");
        assert_eq!(v["device_class"], "voltage");
        assert_eq!(v["value_template"], "{{ value_json.value }}");
        let alarm = find(
            &msgs,
            "homeassistant/binary_sensor/pi_one/rs485_meter_alarm/config",
        );
        assert_eq!(alarm["payload_on"], true);
        let relay = find(
            &msgs,
            "homeassistant/switch/pi_one/rs485_meter_relay/config",
        );
        assert_eq!(relay["command_topic"], "cmd/rs485/meter/relay");
        assert_eq!(relay["state_on"], true);
        let limit = find(
            &msgs,
            "homeassistant/number/pi_one/rs485_meter_limit/config",
        );
        assert_eq!(limit["command_topic"], "cmd/rs485/meter/limit");
        assert_eq!(limit["max"], 32.0);
        assert_eq!(limit["step"], 0.1);
        let hum = find(&msgs, "homeassistant/sensor/pi_one/rs485_env_hum/config");
        assert_eq!(hum["state_topic"], "sensors/rs485/env");
        assert_eq!(hum["value_template"], "{{ value_json['hum'] }}");
        let tank = find(&msgs, "homeassistant/sensor/pi_one/w1_tank/config");
        assert_eq!(tank["state_topic"], "sensors/w1/tank");
        assert_eq!(tank["device_class"], "temperature");
    }
}
