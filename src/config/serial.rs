//! The `serial:` section (sources::serial): serial sensors, their line settings, framing, parsing,
//! polling and simulator. `Parity` is here too: the Modbus RTU buses (`modbus.rs`) share it.

use std::path::PathBuf;

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default)]
    pub ports: Vec<SerialPortConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPortConfig {
    pub name: String,
    /// The device; prefer the stable `/dev/serial/by-id/…` names of USB adapters. Exactly one of
    /// `path` and `sim`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Frame delimiter; default newline (`\n`, with `\r\n` accepted).
    #[serde(default)]
    pub delimiter: Option<String>,
    /// Longest frame; longer ones are counted (`too_long`) and dropped.
    #[serde(default = "default_max_frame")]
    pub max_frame: ByteSize,
    #[serde(default)]
    pub format: SerialFormat,
    /// json: fields to keep (default all); csv: the column names (required).
    #[serde(default)]
    pub fields: Vec<String>,
    /// Added to structured readings as `unit` (e.g. `°C`).
    #[serde(default)]
    pub unit: Option<String>,
    /// Default `sensors/<name>`.
    #[serde(default)]
    pub topic: Option<String>,
    /// For sensors that answer on demand: write `request` every `interval`.
    #[serde(default)]
    pub poll: Option<PollConfig>,
    /// First reopen delay after the port vanished; doubles up to `reopen_max`.
    #[serde(default = "default_reopen_min")]
    pub reopen_min: HumanDuration,
    #[serde(default = "default_reopen_max")]
    pub reopen_max: HumanDuration,
    /// A simulated device instead of `path`: plays `lines` in a loop.
    #[serde(default)]
    pub sim: Option<SerialSimConfig>,
}

impl SerialPortConfig {
    pub fn topic(&self) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("sensors/{}", self.name))
    }
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_max_frame() -> ByteSize {
    ByteSize(1024)
}
fn default_reopen_min() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_reopen_max() -> HumanDuration {
    HumanDuration::from_secs(30)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialFormat {
    /// The frame's bytes, published unchanged.
    #[default]
    Raw,
    /// One number per frame → `{"ts","value","unit"}`.
    Value,
    Json,
    Kv,
    Csv,
    Nmea,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    /// Written as is (YAML escapes such as "\r\n" work in double quotes).
    pub request: String,
    pub interval: HumanDuration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSimConfig {
    /// Lines the simulated device sends, in a loop (the delimiter is appended).
    pub lines: Vec<String>,
    /// One line this often; with `poll`, the device also answers each request with the next line.
    #[serde(default = "default_sim_interval")]
    pub interval: HumanDuration,
}

fn default_sim_interval() -> HumanDuration {
    HumanDuration::from_secs(2)
}
