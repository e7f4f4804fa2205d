//! Who may reach the broker without logging in: the checks of `broker.allow_anonymous` and
//! `broker.anonymous` ([`check`], errors), and the warnings about what the network can reach
//! ([`warnings`]): an anonymous broker on a network listener, and outputs (GPIO, writable Modbus
//! points) whose command topic an anonymous client from the network may publish to. Warnings do
//! not stop a start; `check-config` prints them and the gateway logs them at start.

use crate::config::broker::AllowAnonymous;
use crate::config::problem::Problem;
use crate::config::root::Config;
use crate::config::topic;

/// Every error in the anonymous-access settings.
pub(super) fn check(cfg: &Config) -> Vec<Problem> {
    let b = &cfg.broker;
    let mut p = Vec::new();
    for (key, list) in [
        ("publish", &b.anonymous.publish),
        ("subscribe", &b.anonymous.subscribe),
    ] {
        for (j, f) in list.iter().flatten().enumerate() {
            if let Err(e) = topic::valid_filter(f) {
                p.push(Problem::new(format!("broker.anonymous.{key}[{j}]"), e));
            }
        }
        if list.is_some() && !b.front_enabled() {
            p.push(Problem::new(
                format!("broker.anonymous.{key}"),
                "topic ACLs are enforced by the MQTT front, which is off (broker.front)",
            ));
        }
    }
    if b.allow_anonymous == Some(AllowAnonymous::Nobody) && b.users.is_empty() {
        p.push(Problem::new(
            "broker.allow_anonymous",
            "false with no broker.users: no client could connect; add users, or use `loopback` \
             (programs on this machine only)",
        ));
    }
    // Without the front, rumqttd decides alone: anonymous from anywhere when there are no users,
    // nobody when there are. Only settings that mean the same are accepted.
    if let (Some(asked), false) = (b.allow_anonymous, b.front_enabled()) {
        let same = match asked {
            AllowAnonymous::Everyone => b.users.is_empty(),
            AllowAnonymous::Nobody => !b.users.is_empty(),
            AllowAnonymous::Loopback => b.users.is_empty() && b.network_listeners().is_empty(),
        };
        if !same {
            p.push(Problem::new(
                "broker.allow_anonymous",
                format!(
                    "`{asked}` needs the MQTT front, which is off (broker.front): the embedded \
                     broker alone admits anonymous clients from anywhere when broker.users is \
                     empty, and nobody when it is not"
                ),
            ));
        }
    }
    p
}

/// What the network can do without a password, one warning per thing.
pub(super) fn warnings(cfg: &Config) -> Vec<Problem> {
    let b = &cfg.broker;
    let mut w = Vec::new();
    let exposed = b.network_listeners();
    if b.anonymous() != AllowAnonymous::Everyone || exposed.is_empty() {
        return w;
    }
    let addrs: Vec<String> = exposed.iter().map(|(_, a)| a.to_string()).collect();
    let why = match b.allow_anonymous {
        Some(_) => "broker.allow_anonymous is true".to_string(),
        None => "broker.users is empty and broker.allow_anonymous is not set".to_string(),
    };
    let field = match b.allow_anonymous {
        Some(_) => "broker.allow_anonymous",
        None => exposed[0].0,
    };
    w.push(Problem::new(
        field,
        format!(
            "anyone who can reach {} may publish and subscribe without a password ({why}); add \
             broker.users and set `allow_anonymous: loopback`, or listen on 127.0.0.1",
            addrs.join(", ")
        ),
    ));
    let may_publish = |t: &str| {
        b.anonymous
            .publish
            .as_ref()
            .is_none_or(|fs| fs.iter().any(|f| topic::matches(f, t)))
    };
    let mut obeys = |field: String, what: String, command: String| {
        if may_publish(&command) {
            w.push(Problem::new(
                field,
                format!(
                    "{what} obeys `{command}`, which anonymous clients from the network may \
                     publish to; require users (see broker.allow_anonymous), or limit \
                     broker.anonymous.publish"
                ),
            ));
        }
    };
    for (i, o) in cfg.gpio.outputs.iter().enumerate() {
        obeys(
            format!("gpio.outputs[{i}].command_topic"),
            format!("GPIO output `{}`", o.name),
            o.command_topic(),
        );
    }
    for (i, bus) in cfg.modbus.buses.iter().enumerate() {
        for (j, slave) in bus.slaves.iter().enumerate() {
            for (k, point) in slave.points.iter().enumerate() {
                if point.writable {
                    obeys(
                        format!("modbus.buses[{i}].slaves[{j}].points[{k}].command_topic"),
                        format!("Modbus point `{}/{}/{}`", bus.name, slave.name, point.name),
                        point.command_topic(&bus.name, &slave.name),
                    );
                }
            }
        }
    }
    w
}
