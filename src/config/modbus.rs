//! The `modbus:` and `onewire:` sections (sources::modbus, sources::onewire): their serde
//! structs and the helpers the sources read them with. Their checks live in `validate/modbus.rs`;
//! the root `Config` only holds the two fields.
//!
//! Addresses are the protocol's 0-based addresses, as Home Assistant's and ThingsBoard's
//! Modbus configurations use them: the datasheet's "register 40001" is holding register 0,
//! "30001" input register 0.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::serial::Parity;
use super::units::HumanDuration;
use crate::codec::modbus::{self as mb, Order, Table, ValueType};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    #[serde(default)]
    pub buses: Vec<ModbusBusConfig>,
}

impl ModbusConfig {
    pub fn is_empty(&self) -> bool {
        self.buses.is_empty()
    }
}

/// One RTU line (a serial port with its slaves) or one Modbus TCP endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusBusConfig {
    /// Names the bus in logs, counters and the default topics `sensors/<bus>/<slave>/<point>`.
    pub name: String,
    /// RTU: the serial device (an RS-485 HAT's UART or a USB adapter). Exactly one of `path`,
    /// `tcp` and `sim`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Modbus TCP: `host:port` (port 502 when left out).
    #[serde(default)]
    pub tcp: Option<String>,
    /// A simulated RTU line served in-process from the points' `sim_value`s.
    #[serde(default)]
    pub sim: Option<ModbusSimConfig>,
    /// RTU line settings; the specification's default is 19200 baud, 8 data bits, even parity.
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_parity")]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// RTU: after a broadcast write (unit 0) no slave answers; wait this long before the next
    /// request so every slave has processed it.
    #[serde(default = "default_turnaround")]
    pub turnaround: HumanDuration,
    /// First reopen (or reconnect) delay after the port vanished; doubles up to `reopen_max`.
    #[serde(default = "default_reopen_min")]
    pub reopen_min: HumanDuration,
    #[serde(default = "default_reopen_max")]
    pub reopen_max: HumanDuration,
    #[serde(default)]
    pub slaves: Vec<ModbusSlaveConfig>,
}

fn default_baud() -> u32 {
    19_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_parity() -> Parity {
    Parity::Even
}
fn default_stop_bits() -> u8 {
    1
}
fn default_turnaround() -> HumanDuration {
    HumanDuration::from_millis(100)
}
fn default_reopen_min() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_reopen_max() -> HumanDuration {
    HumanDuration::from_secs(30)
}

impl ModbusBusConfig {
    /// `host:port` of a TCP bus, with the default port 502.
    pub fn tcp_addr(&self) -> Option<String> {
        let t = self.tcp.as_deref()?.trim();
        let has_port = match t.rsplit_once(':') {
            Some((host, port)) => !host.ends_with(':') && port.parse::<u16>().is_ok(),
            None => false,
        };
        Some(if has_port {
            t.to_string()
        } else {
            format!("{t}:502")
        })
    }
    /// Whether the bus is a serial line (a path or the simulator), with RTU timing.
    pub fn is_rtu(&self) -> bool {
        self.tcp.is_none()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSimConfig {
    /// The simulated slave answers after this long (its processing time).
    #[serde(default)]
    pub delay: Option<HumanDuration>,
    /// Relative random variation applied to numeric `sim_value`s at each read (0.01 = ±1 %).
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_jitter() -> f64 {
    0.01
}

/// How a slave's readings are published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// One message per point on its topic: `{"ts","value","unit"}`.
    #[default]
    PerPoint,
    /// One object per poll on the slave's topic: `{"ts", "<point>": value, …}`.
    PerSlave,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSlaveConfig {
    pub name: String,
    /// Unit id 1–247; 0 (broadcast) only for a slave whose points are all writable.
    pub unit: u8,
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// How long to wait for each answer.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Further attempts after a failed request (timeout or bad frame) in one poll. A slave that
    /// stopped answering is probed with one request per interval until it answers again.
    #[serde(default = "default_retries")]
    pub retries: u8,
    /// Unused addresses a read may span to join two points (0: only adjacent points).
    #[serde(default)]
    pub max_gap: u16,
    /// Most registers (bits: items) one read may ask for; at most 125 registers / 2000 bits.
    #[serde(default = "default_max_count")]
    pub max_count: u16,
    #[serde(default)]
    pub publish: PublishMode,
    /// per_slave: the topic of the object. Default `sensors/<bus>/<slave>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Default byte/word order of the slave's points.
    #[serde(default)]
    pub order: OrderConfig,
    #[serde(default)]
    pub points: Vec<ModbusPointConfig>,
}

fn default_interval() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_millis(500)
}
fn default_retries() -> u8 {
    1
}
fn default_max_count() -> u16 {
    mb::MAX_READ_REGISTERS
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionConfig {
    Coil,
    DiscreteInput,
    HoldingRegister,
    InputRegister,
}

impl FunctionConfig {
    pub fn table(self) -> Table {
        match self {
            FunctionConfig::Coil => Table::Coil,
            FunctionConfig::DiscreteInput => Table::DiscreteInput,
            FunctionConfig::HoldingRegister => Table::HoldingRegister,
            FunctionConfig::InputRegister => Table::InputRegister,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeConfig {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    String,
}

impl TypeConfig {
    pub fn codec(self) -> ValueType {
        match self {
            TypeConfig::Bool => ValueType::Bool,
            TypeConfig::U16 => ValueType::U16,
            TypeConfig::I16 => ValueType::I16,
            TypeConfig::U32 => ValueType::U32,
            TypeConfig::I32 => ValueType::I32,
            TypeConfig::U64 => ValueType::U64,
            TypeConfig::I64 => ValueType::I64,
            TypeConfig::F32 => ValueType::F32,
            TypeConfig::F64 => ValueType::F64,
            TypeConfig::String => ValueType::String,
        }
    }
}

/// `ABCD` (default), `CDAB`, `BADC`, `DCBA`; Home Assistant's `none`, `word`, `byte`,
/// `word_byte` are accepted as the same four.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrderConfig(pub Order);

impl<'de> Deserialize<'de> for OrderConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(OrderConfig(match s.trim().to_ascii_uppercase().as_str() {
            "ABCD" | "NONE" => Order::Abcd,
            "CDAB" | "WORD" => Order::Cdab,
            "BADC" | "BYTE" => Order::Badc,
            "DCBA" | "WORD_BYTE" => Order::Dcba,
            _ => {
                return Err(de::Error::custom(format!(
                    "`{s}` is not a byte/word order: use ABCD (big-endian), CDAB (word swap), BADC (byte swap) or DCBA (little-endian)"
                )))
            }
        }))
    }
}

/// A simulated point's value: a number (scaled units), on/off, or text.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SimValue {
    Bool(bool),
    Number(f64),
    Text(String),
}

impl fmt::Display for SimValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimValue::Bool(b) => write!(f, "{b}"),
            SimValue::Number(n) => write!(f, "{n}"),
            SimValue::Text(t) => write!(f, "{t:?}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusPointConfig {
    pub name: String,
    pub function: FunctionConfig,
    /// 0-based protocol address.
    pub address: u16,
    /// Default: `bool` on coils and discrete inputs, `u16` on registers.
    #[serde(default, rename = "type")]
    pub kind: Option<TypeConfig>,
    /// Registers of a `string`; for other types it may be given and must match the type.
    #[serde(default)]
    pub count: Option<u16>,
    /// Default: the slave's `order`.
    #[serde(default)]
    pub order: Option<OrderConfig>,
    /// Published value = raw × scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    #[serde(default)]
    pub unit: Option<String>,
    /// per_point: default `sensors/<bus>/<slave>/<point>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Publish only when the value changed (and at least every `max_silence`).
    #[serde(default)]
    pub on_change: bool,
    #[serde(default)]
    pub max_silence: Option<HumanDuration>,
    /// A coil or holding register that obeys `command_topic`.
    #[serde(default)]
    pub writable: bool,
    /// Default `cmd/<bus>/<slave>/<point>`.
    #[serde(default)]
    pub command_topic: Option<String>,
    /// Retained confirmation of a write (the value read back). Default: the point's topic.
    #[serde(default)]
    pub state_topic: Option<String>,
    /// Accepted command range, in the scaled unit.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// sim buses: the value the simulated slave holds (scaled units).
    #[serde(default)]
    pub sim_value: Option<SimValue>,
}

fn default_scale() -> f64 {
    1.0
}

impl ModbusPointConfig {
    pub fn value_type(&self) -> ValueType {
        match self.kind {
            Some(k) => k.codec(),
            None if self.function.table().is_bits() => ValueType::Bool,
            None => ValueType::U16,
        }
    }
    /// Bits or registers the point spans.
    pub fn span_count(&self) -> u16 {
        if self.function.table().is_bits() {
            1
        } else {
            self.value_type().registers(self.count.unwrap_or(1))
        }
    }
    pub fn span(&self) -> mb::Span {
        mb::Span {
            table: self.function.table(),
            address: self.address,
            count: self.span_count(),
        }
    }
    pub fn order_or(&self, slave: &ModbusSlaveConfig) -> Order {
        self.order.unwrap_or(slave.order).0
    }
    pub fn topic(&self, bus: &str, slave: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("sensors/{bus}/{slave}/{}", self.name))
    }
    pub fn command_topic(&self, bus: &str, slave: &str) -> String {
        self.command_topic
            .clone()
            .unwrap_or_else(|| format!("cmd/{bus}/{slave}/{}", self.name))
    }
    /// Where a write is confirmed: `state_topic`, else the point's topic (per_point), else
    /// `<slave topic>/<point>` (per_slave).
    pub fn state_topic(&self, bus: &str, slave: &ModbusSlaveConfig) -> String {
        self.state_topic
            .clone()
            .unwrap_or_else(|| match slave.publish {
                PublishMode::PerPoint => self.topic(bus, &slave.name),
                PublishMode::PerSlave => format!("{}/{}", slave.topic(bus), self.name),
            })
    }
}

impl ModbusSlaveConfig {
    pub fn topic(&self, bus: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("sensors/{bus}/{}", self.name))
    }
    /// Unit 0: broadcast writes only, never polled.
    pub fn is_broadcast(&self) -> bool {
        self.unit == 0
    }
}

// ─── onewire ──────────────────────────────────────────────────────────────────────────────────────

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnewireConfig {
    /// Where the kernel lists 1-Wire devices (tests and the simulator point it elsewhere).
    #[serde(default = "default_w1_root")]
    pub root: PathBuf,
    /// Read every probe this often (a DS18B20 conversion takes up to 750 ms).
    #[serde(default = "default_w1_interval")]
    pub interval: HumanDuration,
    /// Read every w1_therm probe found under `root` (looked for again at each interval), besides
    /// the listed `sensors`.
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub sensors: Vec<OnewireSensorConfig>,
    /// Writes fake probes under `root` and changes their temperature slowly (development).
    #[serde(default)]
    pub sim: Option<OnewireSimConfig>,
}

impl Default for OnewireConfig {
    fn default() -> Self {
        OnewireConfig {
            root: default_w1_root(),
            interval: default_w1_interval(),
            all: false,
            sensors: Vec::new(),
            sim: None,
        }
    }
}

impl OnewireConfig {
    pub fn is_empty(&self) -> bool {
        !self.all && self.sensors.is_empty()
    }
}

pub(in crate::config) fn default_w1_root() -> PathBuf {
    PathBuf::from("/sys/bus/w1/devices")
}
fn default_w1_interval() -> HumanDuration {
    HumanDuration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnewireSensorConfig {
    /// The probe's id as the kernel names its directory, e.g. `28-0316a2793aff`.
    pub id: String,
    /// Default: the id.
    #[serde(default)]
    pub name: Option<String>,
    /// Default `sensors/w1/<name>`.
    #[serde(default)]
    pub topic: Option<String>,
}

impl OnewireSensorConfig {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }
    pub fn topic(&self) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("sensors/w1/{}", self.name()))
    }
}

/// The default topic of a probe found by `all: true`.
pub fn onewire_topic_of(id: &str) -> String {
    format!("sensors/w1/{id}")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnewireSimConfig {
    pub probes: Vec<OnewireSimProbe>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnewireSimProbe {
    pub id: String,
    /// Around this temperature.
    pub celsius: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_accept_the_letters_and_home_assistants_swap_names() {
        for (s, o) in [
            ("ABCD", Order::Abcd),
            ("cdab", Order::Cdab),
            ("byte", Order::Badc),
            ("word_byte", Order::Dcba),
        ] {
            let v: OrderConfig = serde_yaml::from_str(s).expect("order");
            assert_eq!(v.0, o);
        }
        let e = serde_yaml::from_str::<OrderConfig>("ACBD").expect_err("refused");
        assert!(e.to_string().contains("CDAB (word swap)"), "{e}");
    }
}
