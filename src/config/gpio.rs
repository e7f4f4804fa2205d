//! The `gpio:` section (sources::gpio): the backend, pins (`PinSpec`), inputs with debounce and
//! simulated waveforms, outputs with their fail-safe states.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::units::HumanDuration;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioConfig {
    #[serde(default)]
    pub backend: GpioBackendKind,
    /// cdev: the chip numbered lines are on. Default: the first `/dev/gpiochip*`.
    #[serde(default)]
    pub chip: Option<PathBuf>,
    /// sim: a JSON file the simulated pin levels are written to on every change (for tests and
    /// demos; `{"17": 1, …}` by pin).
    #[serde(default)]
    pub sim_state_file: Option<PathBuf>,
    #[serde(default)]
    pub inputs: Vec<GpioInputConfig>,
    #[serde(default)]
    pub outputs: Vec<GpioOutputConfig>,
}

impl GpioConfig {
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpioBackendKind {
    /// cdev when a `/dev/gpiochip*` exists, else an error (sim is never picked silently).
    #[default]
    Auto,
    /// The Linux GPIO character device (uAPI v2) through gpiocdev: any SBC, Raspberry Pi 5 too.
    Cdev,
    /// rppal (Raspberry Pi only; retired upstream in 2025).
    Rppal,
    /// Simulated pins: driven by tests or by each input's `sim_waveform`.
    Sim,
}

/// A GPIO line: a number (the line offset on the chip; on a Raspberry Pi the BCM number) or a
/// line name such as `GPIO17`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PinSpec {
    Number(u32),
    Name(String),
}

impl fmt::Display for PinSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSpec::Number(n) => write!(f, "{n}"),
            PinSpec::Name(s) => f.write_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for PinSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PinSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a GPIO line number (17) or line name (\"GPIO17\")")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PinSpec, E> {
                u32::try_from(v)
                    .map(PinSpec::Number)
                    .map_err(|_| E::custom(format!("{v} is not a GPIO line number")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PinSpec, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a GPIO line number cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PinSpec, E> {
                let v = v.trim();
                if v.is_empty() {
                    return Err(E::custom("a GPIO line name cannot be empty"));
                }
                Ok(match v.parse::<u32>() {
                    Ok(n) => PinSpec::Number(n),
                    Err(_) => PinSpec::Name(v.to_string()),
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pull {
    Up,
    Down,
    #[default]
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    Rising,
    Falling,
    #[default]
    Both,
}

/// An on/off state in the file: `on`/`off`, `true`/`false` or `1`/`0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switch(pub bool);

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Switch;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("on or off (also true/false, 1/0)")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Switch, E> {
                Ok(Switch(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Switch, E> {
                match v {
                    0 => Ok(Switch(false)),
                    1 => Ok(Switch(true)),
                    _ => Err(E::custom(format!(
                        "{v} is not a switch state: use on or off"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Switch, E> {
                self.visit_u64(u64::try_from(v).unwrap_or(u64::MAX))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Switch, E> {
                match v.trim().to_ascii_lowercase().as_str() {
                    "on" | "true" | "1" => Ok(Switch(true)),
                    "off" | "false" | "0" => Ok(Switch(false)),
                    _ => Err(E::custom(format!(
                        "`{v}` is not a switch state: use on or off"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioInputConfig {
    /// Names the input in logs and in the default topic `sensors/<name>`.
    pub name: String,
    pub pin: PinSpec,
    #[serde(default)]
    pub pull: Pull,
    /// The input is "on" (state 1) when the line is low (switches to ground with a pull-up).
    #[serde(default)]
    pub active_low: bool,
    /// A change counts once the level has been stable this long (0 = off).
    #[serde(default = "default_debounce")]
    pub debounce: HumanDuration,
    /// Which changes are published: `rising` (off → on), `falling` or `both`.
    #[serde(default)]
    pub edge: EdgeKind,
    /// Default `sensors/<name>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Also publish the current state this often (no `edge` field). Default: only changes.
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// sim backend only: a level pattern played in a loop.
    #[serde(default)]
    pub sim_waveform: Vec<SimStep>,
}

fn default_debounce() -> HumanDuration {
    HumanDuration::from_millis(20)
}

/// One step of a simulated input: the physical level, how long it is held, and how many
/// contact-bounce toggles (1 ms apart) precede it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimStep {
    pub level: Switch,
    pub hold: HumanDuration,
    #[serde(default)]
    pub bounces: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioOutputConfig {
    pub name: String,
    pub pin: PinSpec,
    /// "on" drives the line low (relay boards with active-low inputs).
    #[serde(default)]
    pub active_low: bool,
    /// Local topic the output obeys. Default `cmd/<name>` (where the downlink puts cloud commands).
    #[serde(default)]
    pub command_topic: Option<String>,
    /// Retained topic confirming the level read back from the line. Default `sensors/<name>`.
    #[serde(default)]
    pub state_topic: Option<String>,
    /// State set when the gateway starts.
    #[serde(default)]
    pub initial: Switch,
    /// State set when the gateway stops (and after `fail_safe_after` without uplink). Default:
    /// none (the line keeps its level).
    #[serde(default)]
    pub fail_safe: Option<Switch>,
    /// Apply `fail_safe` once the uplink has been down this long (needs `fail_safe` and an
    /// uplink). Default: only at shutdown.
    #[serde(default)]
    pub fail_safe_after: Option<HumanDuration>,
}

impl GpioInputConfig {
    pub fn topic(&self) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("sensors/{}", self.name))
    }
}

impl GpioOutputConfig {
    pub fn command_topic(&self) -> String {
        self.command_topic
            .clone()
            .unwrap_or_else(|| format!("cmd/{}", self.name))
    }
    pub fn state_topic(&self) -> String {
        self.state_topic
            .clone()
            .unwrap_or_else(|| format!("sensors/{}", self.name))
    }
}
