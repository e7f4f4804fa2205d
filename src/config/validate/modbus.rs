//! Checks of the `modbus:` and `onewire:` sections (their structs are in `config/modbus.rs`):
//! names, paths, unit ids, register spans, point types, topics unique among all hardware, 1-Wire
//! probe ids and the simulators. [`check`] is called by [`super::validate`].

use crate::codec::modbus::{self as mb, ValueType};
use crate::config::modbus::{default_w1_root, ModbusPointConfig, PublishMode, SimValue};
use crate::config::problem::Problem;
use crate::config::root::Config;
use crate::config::topic;

const MAX_RETRIES: u8 = 10;

/// Every problem of the two sections (the other sections' checks live in `validate/mod.rs`).
pub(super) fn check(cfg: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut add = |f: String, m: String| p.push(Problem::new(f, m));
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    let bad_name = |n: &str| {
        format!("`{n}` is not a name: use letters, digits, `_`, `-` and `.` (it goes into the default topics)")
    };
    // Topics of other hardware, so a Modbus point cannot publish over a GPIO input.
    let mut topics: Vec<(String, String)> = cfg
        .gpio
        .inputs
        .iter()
        .map(|i| (i.topic(), format!("gpio input `{}`", i.name)))
        .chain(
            cfg.serial
                .ports
                .iter()
                .map(|s| (s.topic(), format!("serial port `{}`", s.name))),
        )
        .collect();
    let mut commands: Vec<(String, String)> = cfg
        .gpio
        .outputs
        .iter()
        .map(|o| (o.command_topic(), format!("gpio output `{}`", o.name)))
        .collect();
    let mut topic =
        |field: String, t: String, what: String, add: &mut dyn FnMut(String, String)| {
            if let Err(e) = topic::valid_topic(&t) {
                add(field, e);
            } else if let Some((_, other)) = topics.iter().find(|(u, _)| *u == t) {
                add(field, format!("`{t}` is already the topic of {other}"));
            } else {
                topics.push((t, what));
            }
        };
    let mut bus_names: Vec<&str> = Vec::new();
    let mut paths: Vec<String> = cfg
        .serial
        .ports
        .iter()
        .filter_map(|s| s.path.as_ref().map(|p| p.display().to_string()))
        .collect();
    for (bi, bus) in cfg.modbus.buses.iter().enumerate() {
        let f = format!("modbus.buses[{bi}]");
        if !name_ok(&bus.name) {
            add(format!("{f}.name"), bad_name(&bus.name));
        } else if bus_names.contains(&bus.name.as_str()) {
            add(
                format!("{f}.name"),
                format!("`{}` is already the name of another bus", bus.name),
            );
        } else {
            bus_names.push(&bus.name);
        }
        let given = [bus.path.is_some(), bus.tcp.is_some(), bus.sim.is_some()];
        match given.iter().filter(|g| **g).count() {
            0 => add(
                format!("{f}.path"),
                "missing: give the serial device (`path`), a Modbus TCP `tcp: host:port`, or `sim`"
                    .into(),
            ),
            1 => {}
            _ => add(
                format!("{f}.tcp"),
                "give only one of `path` (RTU), `tcp` (Modbus TCP) and `sim`".into(),
            ),
        }
        if let Some(path) = &bus.path {
            let s = path.display().to_string();
            if s.is_empty() {
                add(format!("{f}.path"), "must not be empty".into());
            } else if paths.contains(&s) {
                add(
                    format!("{f}.path"),
                    format!("`{s}` is already used by another serial port or bus (one owner per line: put every slave of an RS-485 line under one bus)"),
                );
            } else {
                paths.push(s);
            }
        }
        if let Some(t) = &bus.tcp {
            let ok = bus.tcp_addr().is_some_and(|a| {
                a.rsplit_once(':').is_some_and(|(h, port)| {
                    !h.trim().is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                })
            });
            if !ok {
                add(
                    format!("{f}.tcp"),
                    format!("`{t}` is not host:port (e.g. 192.168.1.50:502 or meter.local)"),
                );
            }
        }
        if let Some(sim) = &bus.sim {
            if !(0.0..=0.5).contains(&sim.jitter) {
                add(
                    format!("{f}.sim.jitter"),
                    format!("{} is out of range: 0 to 0.5", sim.jitter),
                );
            }
        }
        if bus.is_rtu() {
            if !(300..=1_000_000).contains(&bus.baud) {
                add(
                    format!("{f}.baud"),
                    format!("{} is out of range: 300 to 1000000", bus.baud),
                );
            }
            if bus.data_bits != 8 {
                add(
                    format!("{f}.data_bits"),
                    format!("{}: Modbus RTU always uses 8 data bits", bus.data_bits),
                );
            }
            if !(1..=2).contains(&bus.stop_bits) {
                add(
                    format!("{f}.stop_bits"),
                    format!("{} is not 1 or 2", bus.stop_bits),
                );
            }
        }
        if bus.reopen_min.get().is_zero() {
            add(
                format!("{f}.reopen_min"),
                "must be more than 0 (the backoff doubles it)".into(),
            );
        }
        if bus.reopen_min > bus.reopen_max {
            add(
                format!("{f}.reopen_min"),
                format!(
                    "{} is more than reopen_max ({})",
                    bus.reopen_min, bus.reopen_max
                ),
            );
        }
        if bus.slaves.is_empty() {
            add(
                format!("{f}.slaves"),
                "a bus needs at least one slave".into(),
            );
        }
        let mut units: Vec<(u8, &str)> = Vec::new();
        let mut slave_names: Vec<&str> = Vec::new();
        for (si, slave) in bus.slaves.iter().enumerate() {
            let f = format!("{f}.slaves[{si}]");
            if !name_ok(&slave.name) {
                add(format!("{f}.name"), bad_name(&slave.name));
            } else if slave_names.contains(&slave.name.as_str()) {
                add(
                    format!("{f}.name"),
                    format!("`{}` is already a slave of this bus", slave.name),
                );
            } else {
                slave_names.push(&slave.name);
            }
            if slave.unit > 247 {
                add(
                    format!("{f}.unit"),
                    format!(
                        "{} is out of range: unit ids are 1 to 247 (0 is broadcast)",
                        slave.unit
                    ),
                );
            } else if let Some((_, other)) = units.iter().find(|(u, _)| *u == slave.unit) {
                add(
                    format!("{f}.unit"),
                    format!("unit {} is already slave `{other}` on this bus", slave.unit),
                );
            } else {
                units.push((slave.unit, &slave.name));
            }
            if slave.is_broadcast() {
                if !bus.is_rtu() {
                    add(
                        format!("{f}.unit"),
                        "0 (broadcast) exists only on serial lines: give the TCP device's unit id (1 to 247)".into(),
                    );
                }
                if slave.points.iter().any(|p| !p.writable) {
                    add(
                        format!("{f}.unit"),
                        "0 is broadcast: no slave answers it, so it can only carry writable points (commands), which are sent without confirmation".into(),
                    );
                }
            }
            if slave.interval.get().is_zero() {
                add(format!("{f}.interval"), "must be more than 0".into());
            }
            if slave.timeout.get().is_zero() {
                add(format!("{f}.timeout"), "must be more than 0".into());
            } else if slave.timeout.get() > std::time::Duration::from_secs(60) {
                add(
                    format!("{f}.timeout"),
                    format!("{} is too long: at most 60s", slave.timeout),
                );
            }
            if slave.retries > MAX_RETRIES {
                add(
                    format!("{f}.retries"),
                    format!("{} is too many: at most {MAX_RETRIES}", slave.retries),
                );
            }
            if slave.max_count == 0 || slave.max_count > mb::MAX_READ_BITS {
                add(
                    format!("{f}.max_count"),
                    format!(
                        "{} is out of range: 1 to 125 (registers; up to 2000 for coils and inputs)",
                        slave.max_count
                    ),
                );
            }
            if slave.topic.is_some() && slave.publish == PublishMode::PerPoint {
                add(
                    format!("{f}.topic"),
                    "only `publish: per_slave` uses the slave's topic (per_point: give each point a `topic`)".into(),
                );
            }
            if slave.publish == PublishMode::PerSlave {
                topic(
                    format!("{f}.topic"),
                    slave.topic(&bus.name),
                    format!("slave `{}`", slave.name),
                    &mut add,
                );
            }
            if slave.points.is_empty() {
                add(
                    format!("{f}.points"),
                    "a slave needs at least one point".into(),
                );
            }
            let mut point_names: Vec<&str> = Vec::new();
            let mut spans: Vec<(mb::Span, &str)> = Vec::new();
            for (pi, point) in slave.points.iter().enumerate() {
                let f = format!("{f}.points[{pi}]");
                if !name_ok(&point.name) {
                    add(format!("{f}.name"), bad_name(&point.name));
                } else if point_names.contains(&point.name.as_str()) {
                    add(
                        format!("{f}.name"),
                        format!("`{}` is already a point of this slave", point.name),
                    );
                } else {
                    point_names.push(&point.name);
                }
                let table = point.function.table();
                let ty = point.value_type();
                check_point_type(point, &f, &mut add);
                let count = point.span_count();
                let end = u32::from(point.address) + u32::from(count);
                if end > 0x1_0000 {
                    add(
                        format!("{f}.address"),
                        format!(
                            "{} + {count} registers runs past the last address (65535)",
                            point.address
                        ),
                    );
                }
                let limit = slave.max_count.min(table.max_read());
                if count > limit {
                    add(
                        format!("{f}.count"),
                        format!("{count} registers do not fit one read (max_count {limit})"),
                    );
                }
                let span = point.span();
                if let Some((other, name)) = spans.iter().find(|(s, _)| {
                    s.table == span.table
                        && u32::from(s.address) < end
                        && u32::from(span.address) < u32::from(s.address) + u32::from(s.count)
                }) {
                    add(
                        format!("{f}.address"),
                        format!(
                            "{} {}–{} overlaps point `{name}` ({}–{})",
                            table.name(),
                            point.address,
                            end - 1,
                            other.address,
                            u32::from(other.address) + u32::from(other.count) - 1
                        ),
                    );
                }
                spans.push((span, &point.name));
                if !point.scale.is_finite() || point.scale == 0.0 {
                    add(format!("{f}.scale"), "must be a number other than 0".into());
                }
                if !point.offset.is_finite() {
                    add(format!("{f}.offset"), "must be a number".into());
                }
                if (point.scale != 1.0 || point.offset != 0.0)
                    && matches!(ty, ValueType::Bool | ValueType::String)
                {
                    add(
                        format!("{f}.scale"),
                        format!("a {} is not scaled", ty.name()),
                    );
                }
                if slave.publish == PublishMode::PerPoint {
                    topic(
                        format!("{f}.topic"),
                        point.topic(&bus.name, &slave.name),
                        format!("point `{}/{}/{}`", bus.name, slave.name, point.name),
                        &mut add,
                    );
                } else if point.topic.is_some() {
                    add(
                        format!("{f}.topic"),
                        "with `publish: per_slave` the point's value goes into the slave's object; remove `topic` or publish per_point".into(),
                    );
                }
                if point.max_silence.is_some() && !point.on_change {
                    add(
                        format!("{f}.max_silence"),
                        "needs `on_change: true` (without it every poll publishes)".into(),
                    );
                }
                if let Some(s) = point.max_silence {
                    if s.get() < slave.interval.get() {
                        add(
                            format!("{f}.max_silence"),
                            format!(
                                "{s} is shorter than the slave's interval ({})",
                                slave.interval
                            ),
                        );
                    }
                }
                if point.writable {
                    if !table.is_writable() {
                        add(
                            format!("{f}.writable"),
                            format!("{} points are read-only in Modbus; only coils and holding registers can be written", table.name()),
                        );
                    }
                    if ty == ValueType::String {
                        add(
                            format!("{f}.writable"),
                            "strings cannot be written (give a numeric or bool type)".into(),
                        );
                    }
                    let cmd = point.command_topic(&bus.name, &slave.name);
                    let state = point.state_topic(&bus.name, slave);
                    if let Err(e) = topic::valid_topic(&cmd) {
                        add(format!("{f}.command_topic"), e);
                    } else if let Some((_, other)) = commands.iter().find(|(c, _)| *c == cmd) {
                        add(
                            format!("{f}.command_topic"),
                            format!("`{cmd}` is already the command topic of {other}"),
                        );
                    } else {
                        commands.push((cmd.clone(), format!("point `{}`", point.name)));
                    }
                    if let Err(e) = topic::valid_topic(&state) {
                        add(format!("{f}.state_topic"), e);
                    }
                    if cmd == state {
                        add(
                            format!("{f}.state_topic"),
                            "must differ from command_topic (the point would obey its own confirmations)".into(),
                        );
                    }
                } else {
                    for (key, set) in [
                        ("command_topic", point.command_topic.is_some()),
                        ("state_topic", point.state_topic.is_some()),
                        ("min", point.min.is_some()),
                        ("max", point.max.is_some()),
                    ] {
                        if set {
                            add(
                                format!("{f}.{key}"),
                                "applies only to a point with `writable: true`".into(),
                            );
                        }
                    }
                }
                if let (Some(lo), Some(hi)) = (point.min, point.max) {
                    if lo > hi {
                        add(format!("{f}.min"), format!("{lo} is more than max ({hi})"));
                    }
                }
                if point.sim_value.is_some() && bus.sim.is_none() {
                    add(
                        format!("{f}.sim_value"),
                        "only a `sim` bus serves simulated values".into(),
                    );
                }
                if let Some(v) = &point.sim_value {
                    let fits = match (v, ty) {
                        (SimValue::Bool(_), ValueType::Bool) => true,
                        (SimValue::Text(_), ValueType::String) => true,
                        (SimValue::Number(_), t) => {
                            !matches!(t, ValueType::Bool | ValueType::String)
                        }
                        _ => false,
                    };
                    if !fits {
                        add(
                            format!("{f}.sim_value"),
                            format!("{v} does not fit a {}", ty.name()),
                        );
                    }
                }
            }
        }
    }
    // ─── onewire ───
    let w = &cfg.onewire;
    if w.root.as_os_str().is_empty() {
        add("onewire.root".into(), "must not be empty".into());
    }
    if !w.is_empty() && w.interval.get() < std::time::Duration::from_secs(1) {
        add(
            "onewire.interval".into(),
            format!(
                "{} is too often: a conversion takes up to 750 ms per probe; use at least 1s",
                w.interval
            ),
        );
    }
    let mut ids: Vec<&str> = Vec::new();
    for (i, s) in w.sensors.iter().enumerate() {
        let f = format!("onewire.sensors[{i}]");
        if !crate::codec::w1::is_therm_id(&s.id) {
            add(
                format!("{f}.id"),
                format!("`{}` is not a w1_therm probe id (family 28, 10, 22, 3b, 42 or 7e, `-`, 12 hex digits, e.g. 28-0316a2793aff)", s.id),
            );
        } else if ids.contains(&s.id.as_str()) {
            add(format!("{f}.id"), format!("`{}` is listed twice", s.id));
        } else {
            ids.push(&s.id);
        }
        if !name_ok(s.name()) {
            add(format!("{f}.name"), bad_name(s.name()));
        }
        topic(
            format!("{f}.topic"),
            s.topic(),
            format!("1-Wire probe `{}`", s.name()),
            &mut add,
        );
    }
    if let Some(sim) = &w.sim {
        if w.root == default_w1_root() {
            add(
                "onewire.sim".into(),
                "the simulator writes fake probes under `root`: give a directory of your own, not the kernel's /sys/bus/w1/devices".into(),
            );
        }
        for (i, p) in sim.probes.iter().enumerate() {
            if !crate::codec::w1::is_therm_id(&p.id) {
                add(
                    format!("onewire.sim.probes[{i}].id"),
                    format!(
                        "`{}` is not a w1_therm probe id (e.g. 28-0316a2793aff)",
                        p.id
                    ),
                );
            }
            if !(-55.0..=125.0).contains(&p.celsius) {
                add(
                    format!("onewire.sim.probes[{i}].celsius"),
                    format!("{} is outside a DS18B20's range (-55 to 125)", p.celsius),
                );
            }
        }
    }
    p
}

fn check_point_type(point: &ModbusPointConfig, f: &str, add: &mut dyn FnMut(String, String)) {
    let table = point.function.table();
    let ty = point.value_type();
    if table.is_bits() && ty != ValueType::Bool {
        add(
            format!("{f}.type"),
            format!(
                "a {} holds one bit: its type is bool, not {}",
                table.name(),
                ty.name()
            ),
        );
    }
    match (ty, point.count) {
        (ValueType::String, None) => add(
            format!("{f}.count"),
            "a string needs `count`: how many registers (two characters each) it spans".into(),
        ),
        (ValueType::String, Some(0)) => add(format!("{f}.count"), "must be at least 1".into()),
        (ValueType::String, Some(_)) => {}
        (_, Some(c)) if table.is_bits() && c != 1 => add(
            format!("{f}.count"),
            format!(
                "{c}: a point on a {} is one bit (one point per bit)",
                table.name()
            ),
        ),
        (t, Some(c)) if !table.is_bits() && c != t.registers(1) => add(
            format!("{f}.count"),
            format!(
                "a {} needs {} register(s), not {c} (leave `count` out: the type decides)",
                t.name(),
                t.registers(1)
            ),
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::serial::Parity;

    fn problems(extra: &str) -> Vec<Problem> {
        let yaml = format!("gateway: {{id: gw}}\n{extra}");
        let cfg: Config = serde_yaml::from_str(&yaml).expect("test config parses");
        check(&cfg)
    }

    fn has(problems: &[Problem], field: &str, words: &str) -> bool {
        problems
            .iter()
            .any(|p| p.field == field && p.message.contains(words))
    }

    const METER: &str = "modbus:\n  buses:\n    - name: rs485\n      path: /dev/ttyAMA0\n      slaves:\n        - name: meter\n          unit: 1\n          points:\n";

    #[test]
    fn a_meter_with_two_points_is_valid_and_defaults_match_the_specification() {
        let p = problems(&format!(
            "{METER}            - {{name: voltage, function: input_register, address: 0, type: f32, unit: V}}\n            - {{name: relay, function: coil, address: 0, writable: true}}\n"
        ));
        assert_eq!(p, Vec::new());
        let cfg: Config = serde_yaml::from_str(&format!(
            "gateway: {{id: gw}}\n{METER}            - {{name: v, function: holding_register, address: 3}}\n"
        ))
        .expect("parses");
        let bus = &cfg.modbus.buses[0];
        assert_eq!(
            (bus.baud, bus.parity, bus.data_bits, bus.stop_bits),
            (19200, Parity::Even, 8, 1)
        );
        let s = &bus.slaves[0];
        assert_eq!(s.max_count, 125);
        assert_eq!(s.points[0].value_type(), ValueType::U16);
        assert_eq!(s.points[0].topic("rs485", "meter"), "sensors/rs485/meter/v");
        assert_eq!(
            s.points[0].command_topic("rs485", "meter"),
            "cmd/rs485/meter/v"
        );
    }

    #[test]
    fn overlapping_and_out_of_range_registers_are_refused() {
        let p = problems(&format!(
            "{METER}            - {{name: a, function: holding_register, address: 10, type: u32}}\n            - {{name: b, function: holding_register, address: 11}}\n            - {{name: c, function: input_register, address: 11}}\n            - {{name: d, function: holding_register, address: 65535, type: f32}}\n"
        ));
        let f = "modbus.buses[0].slaves[0].points";
        assert!(
            has(&p, &format!("{f}[1].address"), "overlaps point `a` (10–11)"),
            "{p:?}"
        );
        assert!(
            !p.iter().any(|x| x.field == format!("{f}[2].address")),
            "other table: {p:?}"
        );
        assert!(has(&p, &format!("{f}[3].address"), "runs past"), "{p:?}");
    }

    #[test]
    fn types_counts_and_writability_must_fit_the_function() {
        let p = problems(&format!(
            "{METER}            - {{name: a, function: input_register, address: 0, writable: true}}\n            - {{name: b, function: holding_register, address: 1, type: u32, count: 1}}\n            - {{name: c, function: holding_register, address: 5, type: string}}\n            - {{name: d, function: coil, address: 0, type: u16}}\n            - {{name: e, function: holding_register, address: 20, type: string, count: 4, writable: true}}\n            - {{name: f, function: holding_register, address: 30, min: 1}}\n"
        ));
        let f = "modbus.buses[0].slaves[0].points";
        assert!(has(&p, &format!("{f}[0].writable"), "read-only"), "{p:?}");
        assert!(
            has(&p, &format!("{f}[1].count"), "needs 2 register(s)"),
            "{p:?}"
        );
        assert!(has(&p, &format!("{f}[2].count"), "needs `count`"), "{p:?}");
        assert!(has(&p, &format!("{f}[3].type"), "bool"), "{p:?}");
        assert!(has(&p, &format!("{f}[4].writable"), "strings"), "{p:?}");
        assert!(has(&p, &format!("{f}[5].min"), "writable"), "{p:?}");
    }

    #[test]
    fn unit_ids_names_and_topics_are_unique_and_in_range() {
        let p = problems(
            "modbus:\n  buses:\n    - name: a\n      path: /dev/ttyUSB0\n      slaves:\n        - {name: m, unit: 248, points: [{name: x, function: coil, address: 0}]}\n        - {name: m, unit: 3, points: [{name: x, function: coil, address: 0, topic: t/x}, {name: y, function: coil, address: 1, topic: t/x}]}\n        - {name: n, unit: 3, points: [{name: x, function: coil, address: 0}]}\n        - {name: o, unit: 0, points: [{name: x, function: coil, address: 0}]}\n    - name: a\n      path: /dev/ttyUSB0\n      tcp: 1.2.3.4\n      slaves: []\n",
        );
        let f = "modbus.buses[0].slaves";
        assert!(has(&p, &format!("{f}[0].unit"), "1 to 247"), "{p:?}");
        assert!(has(&p, &format!("{f}[1].name"), "already a slave"), "{p:?}");
        assert!(
            has(&p, &format!("{f}[1].points[1].topic"), "already the topic"),
            "{p:?}"
        );
        assert!(
            has(&p, &format!("{f}[2].unit"), "already slave `m`"),
            "{p:?}"
        );
        assert!(has(&p, &format!("{f}[3].unit"), "broadcast"), "{p:?}");
        assert!(has(&p, "modbus.buses[1].name", "already the name"), "{p:?}");
        assert!(has(&p, "modbus.buses[1].tcp", "only one of"), "{p:?}");
        assert!(has(&p, "modbus.buses[1].path", "already used"), "{p:?}");
        assert!(
            has(&p, "modbus.buses[1].slaves", "at least one slave"),
            "{p:?}"
        );
    }

    #[test]
    fn tcp_addresses_get_port_502_and_rtu_needs_8_data_bits() {
        let cfg: Config = serde_yaml::from_str(
            "gateway: {id: gw}\nmodbus:\n  buses:\n    - {name: plc, tcp: 192.168.1.5, slaves: [{name: s, unit: 1, points: [{name: x, function: coil, address: 0}]}]}\n    - {name: r, path: /dev/x, data_bits: 7, slaves: [{name: s, unit: 1, points: [{name: x, function: coil, address: 0}]}]}\n",
        )
        .expect("parses");
        assert_eq!(
            cfg.modbus.buses[0].tcp_addr().as_deref(),
            Some("192.168.1.5:502")
        );
        let p = check(&cfg);
        assert!(has(&p, "modbus.buses[1].data_bits", "8 data bits"), "{p:?}");
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn onewire_ids_must_be_probe_ids_and_the_simulator_needs_its_own_root() {
        let p = problems(
            "onewire:\n  interval: 500ms\n  sensors: [{id: 28-0316a2793aff}, {id: 28-0316a2793aff}, {id: w1_bus_master1}]\n  sim: {probes: [{id: 28-000000000001, celsius: 200}]}\n",
        );
        assert!(has(&p, "onewire.interval", "at least 1s"), "{p:?}");
        assert!(has(&p, "onewire.sensors[1].id", "twice"), "{p:?}");
        assert!(has(&p, "onewire.sensors[2].id", "not a w1_therm"), "{p:?}");
        assert!(has(&p, "onewire.sim", "directory of your own"), "{p:?}");
        assert!(has(&p, "onewire.sim.probes[0].celsius", "range"), "{p:?}");
    }
}
